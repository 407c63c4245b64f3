"""A real Prometheus server scrapes weightpipe, and the dashboard and docs match the code.

The end-to-end test starts Debian's ``prometheus`` binary on a loopback port with a
temporary config whose only target is a ``serve_metrics`` endpoint, runs a real
``Pipeline`` of small torch stages with ``WeightpipeMetrics`` as observer, records syncs,
and then reads the series back through Prometheus' HTTP API: every value must equal what
the ``RunReport`` says. Without the binary the test skips locally but fails under
``CI=true`` (run ``.ci/install-prometheus``), because CI is where this has to be proven.
The other tests keep ``docs/grafana-dashboard.json`` and ``docs/metrics.md`` from drifting
away from the series ``WeightpipeMetrics`` registers.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.to_thread
import httpx
import pytest
import torch
from prometheus_client import CollectorRegistry

from tests.helpers import free_port
from weightpipe.pipeline import Pipeline, RunReport, Stage, StageError
from weightpipe.pipeline.metrics import MetricsServer, serve_metrics
from weightpipe.stages.metrics import WeightpipeMetrics

T = TypeVar("T")

DOCS = Path(__file__).resolve().parents[2] / "docs"
DASHBOARD = DOCS / "grafana-dashboard.json"
METRICS_DOC = DOCS / "metrics.md"
JOB = "weightpipe"
ENGINE = "test-engine"
# Generous: Prometheus usually answers within a few seconds, but this machine is shared.
DEADLINE_S = 60.0
POLL_S = 0.2
SERIES_NAME = re.compile(r"\bweightpipe_[a-z0-9_]+\b")


# Stages doing real (small) torch work, so bytes are real and differ between stages -----


class Scale(Stage[torch.Tensor, torch.Tensor]):
    name = "scale"

    async def process(self, item: torch.Tensor) -> list[torch.Tensor]:
        return [await anyio.to_thread.run_sync(torch.mul, item, 0.5)]


class ToBf16(Stage[torch.Tensor, torch.Tensor]):
    """Halves the bytes; two workers exercise the pipeline's parallel path."""

    name = "to_bf16"
    workers = 2

    async def process(self, item: torch.Tensor) -> list[torch.Tensor]:
        return [await anyio.to_thread.run_sync(item.to, torch.bfloat16)]


class Split(Stage[torch.Tensor, torch.Tensor]):
    """Two outputs per input, streamed as an async generator."""

    name = "split"

    async def process(self, item: torch.Tensor) -> AsyncIterator[torch.Tensor]:
        for part in item.chunk(2):
            yield part


class Explode(Stage[torch.Tensor, torch.Tensor]):
    """Fails on its third item, to put a point on the errors series."""

    name = "explode"

    def __init__(self) -> None:
        self.seen = 0

    async def process(self, item: torch.Tensor) -> list[torch.Tensor]:
        self.seen += 1
        if self.seen == 3:
            raise ValueError("third item refused")
        return [item]


def make_tensors() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(16 * (i + 1), 32, generator=generator) for i in range(8)]


# The Prometheus server -----------------------------------------------------------------


@dataclass
class PrometheusServer:
    """A Prometheus subprocess and a client for its HTTP API."""

    process: subprocess.Popen[bytes]
    client: httpx.Client
    log: Path

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Results of an instant query; fails the test on a PromQL or HTTP error."""
        response = self.client.get("/api/v1/query", params={"query": expr})
        body = response.json()
        assert response.status_code == 200, (expr, body)
        assert body["status"] == "success", (expr, body)
        results: list[dict[str, Any]] = body["data"]["result"]
        return results

    def values(self, expr: str, label: str) -> dict[str, float]:
        """``{label value: sample value}`` of an instant query's vector."""
        return {r["metric"].get(label, ""): float(r["value"][1]) for r in self.query(expr)}

    def wait_for(self, what: str, condition: Callable[[], T | None]) -> T:
        """Poll ``condition`` until it returns something truthy (bounded by a deadline).

        Prometheus scrapes on its own clock, so there is no event to wait on; this polls a
        condition and asserts nothing about how long it took.
        """
        deadline = time.monotonic() + DEADLINE_S
        while True:
            if self.process.poll() is not None:
                pytest.fail(f"prometheus exited ({self.process.returncode}):\n{self.log_tail()}")
            try:
                result = condition()
            except httpx.TransportError:
                result = None  # not listening yet
            if result:
                return result
            if time.monotonic() > deadline:
                pytest.fail(f"gave up after {DEADLINE_S} s waiting for {what}:\n{self.log_tail()}")
            time.sleep(POLL_S)


@pytest.fixture
def prometheus_binary() -> str:
    binary = shutil.which("prometheus")
    if binary is None:
        message = "no prometheus binary on PATH; install it with .ci/install-prometheus"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message} (CI must run this test)")
        pytest.skip(message)
    return binary


@pytest.fixture
def metrics() -> WeightpipeMetrics:
    return WeightpipeMetrics(engine=ENGINE)


@pytest.fixture
def endpoint(metrics: WeightpipeMetrics) -> Iterator[MetricsServer]:
    server = serve_metrics(metrics)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def prometheus(
    prometheus_binary: str, endpoint: MetricsServer, tmp_path: Path
) -> Iterator[PrometheusServer]:
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n"
        "  scrape_interval: 1s\n"
        "  scrape_timeout: 1s\n"
        "  evaluation_interval: 1s\n"
        "scrape_configs:\n"
        f"  - job_name: {JOB}\n"
        "    static_configs:\n"
        f"      - targets: ['{endpoint.addr}:{endpoint.port}']\n"
    )
    # Prometheus exits at once if it lost the race for the port, and the readiness wait
    # then reports its log.
    port = free_port()
    log = tmp_path / "prometheus.log"
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            [
                prometheus_binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    # Loopback only: a proxy from the environment must not see these requests.
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10.0, trust_env=False)
    try:
        server = PrometheusServer(process, client, log)
        server.wait_for("prometheus to be ready", lambda: client.get("/-/ready").is_success)
        yield server
    finally:
        client.close()
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# Tests ---------------------------------------------------------------------------------


async def run_pipelines(metrics: WeightpipeMetrics) -> RunReport:
    """One good run and one failing run, both observed by ``metrics``."""
    report = await Pipeline([Scale(), ToBf16(), Split()], depth=2, observer=metrics).run(
        make_tensors()
    )
    with pytest.raises(StageError, match="explode"):
        await Pipeline([Explode()], depth=1, observer=metrics).run(make_tensors())
    return report


def test_prometheus_scrapes_pipeline_series(
    metrics: WeightpipeMetrics, endpoint: MetricsServer, prometheus: PrometheusServer
) -> None:
    # The endpoint is live and scraped before the pipeline runs.
    prometheus.wait_for(
        "the first scrape of the weightpipe endpoint",
        lambda: prometheus.values(f'up{{job="{JOB}"}}', "job").get(JOB) == 1.0,
    )

    report = anyio.run(run_pipelines, metrics)
    source_bytes = sum(t.nbytes for t in make_tensors())
    delivered = report.stage("split").bytes_out
    assert report.stage("scale").bytes_in == source_bytes > 0
    assert delivered == source_bytes // 2
    metrics.record_sync(seconds=0.75, nbytes=delivered, ok=False, version=6, hard_pause_s=0.0)
    metrics.record_sync(
        seconds=report.wall_s, nbytes=delivered, ok=True, version=7, hard_pause_s=0.02
    )

    # Everything above happened before record_sync's last call, and one scrape is one
    # atomic append, so a scrape showing the ok sync shows the final value of every series.
    prometheus.wait_for(
        "a scrape taken after the syncs",
        lambda: prometheus.values("weightpipe_syncs_total", "outcome").get("ok") == 1.0,
    )

    # The failing run counted its first two items; the third raised.
    tensors = make_tensors()
    explode_bytes = tensors[0].nbytes + tensors[1].nbytes
    stages = {s.name: s for s in report.stages}
    items = {**{n: float(s.items_in) for n, s in stages.items()}, "explode": 2.0}
    assert items == {"scale": 8.0, "to_bf16": 8.0, "split": 8.0, "explode": 2.0}
    assert prometheus.values("weightpipe_stage_bytes_total", "stage") == {
        **{n: float(s.bytes_in) for n, s in stages.items()},
        "explode": explode_bytes,
    }
    assert prometheus.values("weightpipe_stage_output_bytes_total", "stage") == {
        **{n: float(s.bytes_out) for n, s in stages.items()},
        "explode": explode_bytes,
    }
    assert prometheus.values("weightpipe_stage_items_total", "stage") == items
    assert prometheus.values("weightpipe_stage_seconds_count", "stage") == items
    assert prometheus.values('weightpipe_stage_seconds_bucket{le="+Inf"}', "stage") == items
    per_item = prometheus.values("weightpipe_stage_seconds_sum", "stage")
    busy = prometheus.values("weightpipe_stage_busy_seconds_total", "stage")
    blocked = prometheus.values("weightpipe_stage_blocked_seconds_total", "stage")
    starved = prometheus.values("weightpipe_stage_starved_seconds_total", "stage")
    for name, stage in stages.items():
        # The histogram sees per-item time; busy_s (like the counter) also counts flush().
        assert 0.0 < per_item[name] <= stage.busy_s + 1e-9, name
        assert busy[name] == pytest.approx(stage.busy_s, rel=1e-12, abs=1e-15), name
        assert blocked[name] == pytest.approx(stage.blocked_s, rel=1e-12, abs=1e-15), name
        assert starved[name] == pytest.approx(stage.starved_s, rel=1e-12, abs=1e-15), name
    quantiles = prometheus.values(
        "histogram_quantile(0.5, sum by (le, stage) (weightpipe_stage_seconds_bucket))", "stage"
    )
    assert set(quantiles) == set(items)

    channels = {c.name: c for c in report.channels}
    peaks = prometheus.values("weightpipe_queue_peak_depth", "queue")
    assert {q: peaks[q] for q in channels} == {q: c.peak for q, c in channels.items()}
    capacity = prometheus.values("weightpipe_queue_capacity", "queue")
    assert {q: capacity[q] for q in channels} == {q: c.capacity for q, c in channels.items()}
    depth = prometheus.values("weightpipe_queue_depth", "queue")
    assert {q: depth[q] for q in channels} == {q: c.current for q, c in channels.items()}
    assert set(peaks) == {*channels, "source->explode"}

    assert prometheus.values("weightpipe_errors_total", "kind") == {"ValueError": 1.0}
    assert prometheus.values("weightpipe_errors_total", "stage") == {"explode": 1.0}

    assert prometheus.values("weightpipe_syncs_total", "outcome") == {"ok": 1.0, "failed": 1.0}
    assert prometheus.values("weightpipe_sync_bytes_total", "engine") == {ENGINE: delivered}
    assert prometheus.values("weightpipe_sync_seconds_count", "engine") == {ENGINE: 2.0}
    assert prometheus.values("weightpipe_sync_seconds_sum", "engine") == {
        ENGINE: pytest.approx(0.75 + report.wall_s)
    }
    assert prometheus.values("weightpipe_hard_pause_seconds_sum", "engine") == {
        ENGINE: pytest.approx(0.02)
    }
    assert prometheus.values("weightpipe_weight_version", "engine") == {ENGINE: 7.0}

    # Every dashboard expression is valid PromQL to this real server (parse errors are 400s).
    for expr in dashboard_expressions(load_dashboard()):
        prometheus.query(expr.replace("$__rate_interval", "1m").replace("$job", ".*"))


# The dashboard and the docs against the code --------------------------------------------


def exported_series(registry: CollectorRegistry) -> dict[str, str]:
    """``{series name a query can use: family name}`` for every weightpipe family.

    Derived from the family types, so it holds even before a labelled child exists.
    """
    suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_count", "_sum")}
    series: dict[str, str] = {}
    for family in registry.collect():
        if family.name.startswith("weightpipe_"):
            for suffix in suffixes[family.type]:
                series[family.name + suffix] = family.name
    return series


def load_dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return dashboard


def panels_of(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    panels: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # collapsed rows nest their panels
    return panels


def dashboard_expressions(dashboard: dict[str, Any]) -> list[str]:
    expressions = [
        target["expr"] for panel in panels_of(dashboard) for target in panel.get("targets", [])
    ]
    return expressions


def test_dashboard_queries_only_series_the_code_exports() -> None:
    dashboard = load_dashboard()
    series = exported_series(WeightpipeMetrics().registry)
    variable_queries = [v["definition"] for v in dashboard["templating"]["list"]]
    used: set[str] = set()
    for expr in [*dashboard_expressions(dashboard), *variable_queries]:
        names = set(SERIES_NAME.findall(expr))
        unknown = names - set(series)
        assert not unknown, f"dashboard query {expr!r} uses series the code lacks: {unknown}"
        used |= names
    # The list: bytes/s, stage seconds, queue depth and peak, blocked/starved,
    # sync duration, hard pause, weight version, errors.
    assert {
        "weightpipe_stage_bytes_total",
        "weightpipe_stage_seconds_bucket",
        "weightpipe_queue_depth",
        "weightpipe_queue_peak_depth",
        "weightpipe_stage_blocked_seconds_total",
        "weightpipe_stage_starved_seconds_total",
        "weightpipe_sync_seconds_bucket",
        "weightpipe_hard_pause_seconds_bucket",
        "weightpipe_weight_version",
        "weightpipe_errors_total",
    } <= used
    assert {series[name] for name in used} == set(series.values()), "a family has no panel"


def test_dashboard_is_importable() -> None:
    dashboard = load_dashboard()
    assert dashboard["schemaVersion"] >= 36
    assert dashboard["uid"] == "weightpipe"
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    panels = panels_of(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"}, panel["title"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
        assert panel["targets"], panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]


def test_metrics_reference_lists_every_series() -> None:
    text = METRICS_DOC.read_text()
    for family in WeightpipeMetrics().registry.collect():
        # Counters are documented by their exposed name, which ends in _total.
        exposed = family.name + ("_total" if family.type == "counter" else "")
        assert f"`{exposed}`" in text, f"docs/metrics.md does not document {exposed}"
