"""PipelineMetrics: series agree with the run report, live through an injectable registry,
and blocked/starved seconds show up while a run is stuck, not only when it ends."""

from __future__ import annotations

import re
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.to_thread
import pytest
import torch
from anyio import wait_all_tasks_blocked
from prometheus_client import CollectorRegistry

from weightpipe.pipeline import Pipeline, Stage, StageError
from weightpipe.pipeline.metrics import PipelineMetrics, serve_metrics


class Scale(Stage[torch.Tensor, torch.Tensor]):
    def __init__(self, name: str, factor: float, workers: int = 1) -> None:
        self.name = name
        self.factor = factor
        self.workers = workers

    async def process(self, item: torch.Tensor) -> AsyncIterator[torch.Tensor]:
        yield await anyio.to_thread.run_sync(torch.mul, item, self.factor)


class ToHalf(Stage[torch.Tensor, torch.Tensor]):
    name = "half"

    async def process(self, item: torch.Tensor) -> list[torch.Tensor]:
        return [item.to(torch.bfloat16)]

    async def flush(self) -> AsyncIterator[torch.Tensor]:
        yield torch.zeros(3, dtype=torch.bfloat16)  # flushed output bytes count too


class Held(Stage[Any, Any]):
    """Holds its first item until ``release`` is set."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.release = anyio.Event()

    async def process(self, item: Any) -> list[Any]:
        await self.release.wait()
        return [item]


async def test_metrics_agree_with_the_run_report() -> None:
    registry = CollectorRegistry()
    metrics = PipelineMetrics(registry)
    pipe = Pipeline([Scale("scale", 2.0, workers=2), ToHalf()], depth=2, observer=metrics)
    report = await pipe.run([torch.ones(64, 64) for _ in range(10)])
    for stage in report.stages:
        labels = {"stage": stage.name}
        assert registry.get_sample_value("weightpipe_stage_items_total", labels) == stage.items_in
        assert registry.get_sample_value("weightpipe_stage_bytes_total", labels) == stage.bytes_in
        assert (
            registry.get_sample_value("weightpipe_stage_output_bytes_total", labels)
            == stage.bytes_out
        )
        assert registry.get_sample_value("weightpipe_stage_seconds_count", labels) == 10
        busy = registry.get_sample_value("weightpipe_stage_busy_seconds_total", labels)
        assert busy == pytest.approx(stage.busy_s)
        blocked = registry.get_sample_value("weightpipe_stage_blocked_seconds_total", labels)
        assert blocked == stage.blocked_s
        starved = registry.get_sample_value("weightpipe_stage_starved_seconds_total", labels)
        assert starved == stage.starved_s
    for channel in report.channels:
        labels = {"queue": channel.name}
        assert registry.get_sample_value("weightpipe_queue_peak_depth", labels) == channel.peak
        assert registry.get_sample_value("weightpipe_queue_capacity", labels) == channel.capacity
    assert report.stage("scale").bytes_in == 10 * 64 * 64 * 4
    assert report.stage("half").bytes_out == 10 * 64 * 64 * 2 + 6


async def test_wait_counters_sum_over_runs_of_one_observer() -> None:
    registry = CollectorRegistry()
    metrics = PipelineMetrics(registry)
    reports = [
        await Pipeline([Scale("scale", 1.0), ToHalf()], observer=metrics).run([torch.ones(8)] * 5)
        for _ in range(2)
    ]
    labels = {"stage": "half"}
    starved = registry.get_sample_value("weightpipe_stage_starved_seconds_total", labels)
    assert starved == pytest.approx(sum(r.stage("half").starved_s for r in reports))


class Copier(Stage[torch.Tensor, torch.Tensor]):
    """Copies each item into a fresh buffer and counts the bytes it wrote."""

    name = "copy"

    def __init__(self) -> None:
        self.written_bytes = 0

    async def process(self, item: torch.Tensor) -> list[torch.Tensor]:
        out = item.clone()
        self.written_bytes += out.numel() * out.element_size()
        return [out]


class PassThrough(Stage[torch.Tensor, torch.Tensor]):
    name = "pass"
    written_bytes = True  # not an int counter: ignored, reads as 0

    async def process(self, item: torch.Tensor) -> list[torch.Tensor]:
        return [item]


async def test_written_bytes_are_each_runs_share_of_the_stage_counter() -> None:
    registry = CollectorRegistry()
    metrics = PipelineMetrics(registry)
    copier = Copier()
    items = [torch.ones(16, dtype=torch.float32)] * 3
    first = await Pipeline([copier, PassThrough()], observer=metrics).run(items)
    second = await Pipeline([copier, PassThrough()], observer=metrics).run(items[:1])
    assert first.stage("copy").written_bytes == 3 * 64
    assert second.stage("copy").written_bytes == 64  # this run's share, not the total
    assert first.stage("pass").written_bytes == 0
    assert "MB written" in first.format()
    total = registry.get_sample_value("weightpipe_stage_written_bytes_total", {"stage": "copy"})
    assert total == 4 * 64


def _sample(text: str, name: str, stage: str) -> float:
    match = re.search(rf'^{name}{{stage="{stage}"}} (\S+)$', text, re.MULTILINE)
    assert match is not None, f"no {name} for {stage!r} in the scrape"
    return float(match.group(1))


async def test_a_scrape_during_a_stuck_run_shows_its_backpressure() -> None:
    # "fast" fills its output channel in front of "held" and then waits for room: a hung
    # sync looks like this. The scrape (an HTTP request from another thread, as
    # Prometheus makes it) must show those seconds while the wait is still going on.
    metrics = PipelineMetrics()
    held = Held("held")
    pipe = Pipeline([Scale("fast", 1.0), held], depth=1, observer=metrics)
    server = serve_metrics(metrics)

    def scrape() -> str:
        with urllib.request.urlopen(server.url, timeout=10) as response:
            return str(response.read().decode())

    try:
        with anyio.fail_after(30):
            async with anyio.create_task_group() as group:
                group.start_soon(pipe.run, [torch.ones(4)] * 10)
                await wait_all_tasks_blocked()
                live = pipe.statistics()
                assert live is not None and live.channels[1].senders_waiting == 1
                text = await anyio.to_thread.run_sync(scrape)
                blocked = _sample(text, "weightpipe_stage_blocked_seconds_total", "fast")
                assert blocked > 0
                again = await anyio.to_thread.run_sync(scrape)
                assert _sample(again, "weightpipe_stage_blocked_seconds_total", "fast") >= blocked
                held.release.set()
        after = await anyio.to_thread.run_sync(scrape)
    finally:
        server.close()
    # Once the run is over the counter holds its final figure, never less than before.
    assert _sample(after, "weightpipe_stage_blocked_seconds_total", "fast") >= blocked


async def test_errors_are_counted_by_stage_and_kind() -> None:
    class Broken(Stage[int, int]):
        name = "broken"

        async def process(self, item: int) -> list[int]:
            raise ZeroDivisionError("no")

    registry = CollectorRegistry()
    metrics = PipelineMetrics(registry)
    with pytest.raises(StageError):
        await Pipeline([Broken()], observer=metrics).run([1])
    labels = {"stage": "broken", "kind": "ZeroDivisionError"}
    assert registry.get_sample_value("weightpipe_errors_total", labels) == 1


def test_a_registry_holds_one_set_of_series() -> None:
    registry = CollectorRegistry()
    PipelineMetrics(registry)
    with pytest.raises(ValueError, match="Duplicated"):
        PipelineMetrics(registry)


async def test_exposition_binds_loopback_and_serves_the_series() -> None:
    metrics = PipelineMetrics()
    await Pipeline([ToHalf()], observer=metrics).run([torch.ones(8)])
    server = serve_metrics(metrics)
    try:
        assert server.addr == "127.0.0.1" and server.port > 0

        def fetch() -> str:
            with urllib.request.urlopen(server.url, timeout=10) as response:
                return str(response.read().decode())

        text = await anyio.to_thread.run_sync(fetch)
    finally:
        server.close()
    assert 'weightpipe_stage_bytes_total{stage="half"} 32.0' in text
