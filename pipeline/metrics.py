"""Prometheus series for pipelines: stages and channels; the framework's only importer of
prometheus_client.

Stages stay metrics-free: the pipeline reports live events to an observer, and
``PipelineMetrics`` is that observer. Everything it exports is derived from the same
numbers as the ``RunReport``, so a scrape and a report never disagree. Blocked and
starved seconds are read from the runs themselves at scrape time (a custom collector over
``Pipeline`` statistics), so a run stuck on a full channel shows its backpressure while it
is stuck, not when it ends. The registry is injectable: a host program that already
exposes a registry passes it in and these series appear beside its own; ``serve_metrics``
binds 127.0.0.1 unless told otherwise. Applications extend the class with series of
their own (``weightpipe.stages.metrics`` does).

Series (all ``weightpipe_*``, base units, counters end in ``_total``):

=========================================  =========  ============  ==========================
name                                       type       labels        meaning
=========================================  =========  ============  ==========================
weightpipe_stage_seconds                   histogram  stage         busy seconds per input item
weightpipe_stage_busy_seconds_total        counter    stage         seconds working (process+flush)
weightpipe_stage_items_total               counter    stage         input items processed
weightpipe_stage_bytes_total               counter    stage         input bytes processed
weightpipe_stage_output_bytes_total        counter    stage         output bytes emitted
weightpipe_stage_blocked_seconds_total     counter    stage         waiting for room downstream
weightpipe_stage_starved_seconds_total     counter    stage         waiting for input
weightpipe_stage_written_bytes_total       counter    stage         bytes written into buffers
weightpipe_queue_depth                     gauge      queue         items in the channel now
weightpipe_queue_peak_depth                gauge      queue         peak items in the last run
weightpipe_queue_capacity                  gauge      queue         the channel's depth
weightpipe_errors_total                    counter    stage, kind   failed runs by stage, type
=========================================  =========  ============  ==========================

The ``queue`` label is the channel's name (``upstream->downstream``): Prometheus users
call a bounded buffer a queue, and the series names predate the word channel here.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from weightpipe.pipeline._channel import ChannelStatistics
from weightpipe.pipeline._pipeline import RunReport

__all__ = ["MetricsServer", "PipelineMetrics", "serve_metrics"]

# Per-item stage times span a no-op hop (microseconds) to a slow item (seconds).
_STAGE_SECONDS_BOUNDS = (
    1e-5,
    1e-4,
    1e-3,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

# Per-stage counters read from the runs themselves at scrape time: (name, help, field).
_LIVE_SERIES: tuple[tuple[str, str, str], ...] = (
    (
        "weightpipe_stage_blocked_seconds",
        "Seconds a stage waited for room in its output channel (backpressure).",
        "blocked_s",
    ),
    ("weightpipe_stage_starved_seconds", "Seconds a stage waited for an input item.", "starved_s"),
    (
        "weightpipe_stage_written_bytes",
        "Bytes a stage wrote into buffers it filled (not items passed on unchanged).",
        "written_bytes",
    ),
)


class _WaitCollector(Collector):
    """Blocked and starved seconds and written bytes per stage: finished runs plus runs in
    progress.

    Each run registers its ``statistics`` callable when it starts. A scrape adds every
    live run's figures (ongoing waits included) to the totals of the runs already
    folded; a run whose snapshot says ``ended`` is folded into those totals and dropped.
    A run's figures only grow and its final figures are what it last reports, so each
    counter is monotonic across scrapes. The lock orders scrapes (any thread) against
    folding on the event loop.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._folded: dict[str, dict[str, float]] = {f: {} for _, _, f in _LIVE_SERIES}
        self._live: list[Callable[[], RunReport]] = []

    def add(self, statistics: Callable[[], RunReport]) -> None:
        with self._lock:
            self._live.append(statistics)

    def fold(self) -> None:
        with self._lock:
            self._totals()

    def _totals(self) -> dict[str, dict[str, float]]:
        running: list[RunReport] = []
        live: list[Callable[[], RunReport]] = []
        for statistics in self._live:
            report = statistics()
            if report.ended:
                _add(self._folded, report)
            else:
                running.append(report)
                live.append(statistics)
        self._live = live
        totals = {field: dict(values) for field, values in self._folded.items()}
        for report in running:
            _add(totals, report)
        return totals

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            totals = self._totals()
        for name, text, field in _LIVE_SERIES:
            family = CounterMetricFamily(name, text, labels=["stage"])
            for stage, value in sorted(totals[field].items()):
                family.add_metric([stage], value)
            yield family

    def describe(self) -> Iterator[Metric]:
        # Names only, so the registry's duplicate check sees these series too.
        for name, text, _ in _LIVE_SERIES:
            yield CounterMetricFamily(name, text, labels=["stage"])


def _add(totals: dict[str, dict[str, float]], report: RunReport) -> None:
    for stage in report.stages:
        for field, values in totals.items():
            values[stage.name] = values.get(stage.name, 0.0) + float(getattr(stage, field))


class PipelineMetrics:
    """Prometheus series for stages and channels; pass it as a pipeline's ``observer``.

    One instance may observe many runs, in turn or at once; a stage's series sum over
    every run that had a stage of that name.

    Args:
        registry: where the series live; a fresh ``CollectorRegistry`` by default. Pass
            ``prometheus_client.REGISTRY`` (or your program's) to share one endpoint.

    Raises:
        ValueError: the registry already holds these series (prometheus_client's
            duplicate check); build one instance per registry.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        reg = self.registry
        self.stage_seconds = Histogram(
            "weightpipe_stage_seconds",
            "Busy seconds a stage spent on one input item.",
            ["stage"],
            buckets=_STAGE_SECONDS_BOUNDS,
            registry=reg,
        )
        self.stage_busy = Counter(
            "weightpipe_stage_busy_seconds",
            "Seconds a stage spent working (process and flush, summed over workers).",
            ["stage"],
            registry=reg,
        )
        self.stage_items = Counter(
            "weightpipe_stage_items", "Input items a stage processed.", ["stage"], registry=reg
        )
        self.stage_bytes = Counter(
            "weightpipe_stage_bytes", "Input bytes a stage processed.", ["stage"], registry=reg
        )
        self.stage_output_bytes = Counter(
            "weightpipe_stage_output_bytes",
            "Output bytes a stage emitted.",
            ["stage"],
            registry=reg,
        )
        self._waits = _WaitCollector()
        reg.register(self._waits)
        self.queue_depth = Gauge(
            "weightpipe_queue_depth", "Items in a channel now.", ["queue"], registry=reg
        )
        self.queue_peak = Gauge(
            "weightpipe_queue_peak_depth",
            "Most items a channel held during the last run.",
            ["queue"],
            registry=reg,
        )
        self.queue_capacity = Gauge(
            "weightpipe_queue_capacity", "A channel's capacity (depth).", ["queue"], registry=reg
        )
        self.errors = Counter(
            "weightpipe_errors",
            "Failed runs by the stage at fault and the exception type.",
            ["stage", "kind"],
            registry=reg,
        )

    # PipelineObserver -------------------------------------------------------------------

    def on_run_start(self, statistics: Callable[[], RunReport]) -> None:
        self._waits.add(statistics)
        for channel in statistics().channels:
            self.queue_capacity.labels(channel.name).set(channel.capacity)

    def on_item(
        self, stage: str, seconds: float, bytes_in: int, bytes_out: int, items_out: int
    ) -> None:
        self.stage_seconds.labels(stage).observe(seconds)
        self.stage_busy.labels(stage).inc(seconds)
        self.stage_items.labels(stage).inc()
        self.stage_bytes.labels(stage).inc(bytes_in)
        self.stage_output_bytes.labels(stage).inc(bytes_out)

    def on_flush(self, stage: str, seconds: float, bytes_out: int, items_out: int) -> None:
        self.stage_busy.labels(stage).inc(seconds)
        self.stage_output_bytes.labels(stage).inc(bytes_out)

    def on_channel(self, stats: ChannelStatistics) -> None:
        self.queue_depth.labels(stats.name).set(stats.current)
        self.queue_capacity.labels(stats.name).set(stats.capacity)

    def on_error(self, stage: str, kind: str) -> None:
        self.errors.labels(stage, kind).inc()

    def on_run_end(self, report: RunReport) -> None:
        self._waits.fold()
        for channel in report.channels:
            self.queue_depth.labels(channel.name).set(channel.current)
            self.queue_peak.labels(channel.name).set(channel.peak)
            self.queue_capacity.labels(channel.name).set(channel.capacity)


@dataclass(frozen=True)
class MetricsServer:
    """A running ``/metrics`` endpoint; ``close()`` stops it."""

    addr: str
    port: int
    _server: WSGIServer
    _thread: threading.Thread

    @property
    def url(self) -> str:
        return f"http://{self.addr}:{self.port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def serve_metrics(
    registry: CollectorRegistry | PipelineMetrics, port: int = 0, addr: str = "127.0.0.1"
) -> MetricsServer:
    """Serve ``registry`` on ``http://addr:port/metrics`` from a daemon thread.

    ``port=0`` picks a free port (read it from the result). Binds loopback by default:
    exposing metrics beyond the host is a decision the caller makes explicitly.

    Raises:
        OSError: the address can't be bound (in use, not local).
    """
    if isinstance(registry, PipelineMetrics):
        registry = registry.registry
    server, thread = start_http_server(port, addr=addr, registry=registry)
    return MetricsServer(addr, int(server.server_port), server, thread)
