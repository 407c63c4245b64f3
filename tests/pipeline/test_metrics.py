"""Metrics agree with the run report, live through an injectable registry."""

from __future__ import annotations

import urllib.request
from collections.abc import AsyncIterator

import anyio
import anyio.to_thread
import pytest
import torch
from prometheus_client import CollectorRegistry

from weightpipe.pipeline import Pipeline, Stage, StageError
from weightpipe.pipeline.metrics import WeightpipeMetrics, serve_metrics


class Scale(Stage[torch.Tensor, torch.Tensor]):
    def __init__(self, name: str, factor: float, workers: int = 1) -> None:
        self.name = name  # type: ignore[misc]
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


async def test_metrics_agree_with_the_run_report() -> None:
    registry = CollectorRegistry()
    metrics = WeightpipeMetrics(registry, engine="test")
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
        assert blocked == pytest.approx(stage.blocked_s)
        starved = registry.get_sample_value("weightpipe_stage_starved_seconds_total", labels)
        assert starved == pytest.approx(stage.starved_s)
    for channel in report.channels:
        labels = {"queue": channel.name}
        assert registry.get_sample_value("weightpipe_queue_peak_depth", labels) == channel.peak
        assert registry.get_sample_value("weightpipe_queue_capacity", labels) == channel.capacity
    assert report.stage("scale").bytes_in == 10 * 64 * 64 * 4
    assert report.stage("half").bytes_out == 10 * 64 * 64 * 2 + 6


async def test_errors_are_counted_by_stage_and_kind() -> None:
    class Broken(Stage[int, int]):
        name = "broken"

        async def process(self, item: int) -> list[int]:
            raise ZeroDivisionError("no")

    registry = CollectorRegistry()
    metrics = WeightpipeMetrics(registry)
    with pytest.raises(StageError):
        await Pipeline([Broken()], observer=metrics).run([1])
    labels = {"stage": "broken", "kind": "ZeroDivisionError"}
    assert registry.get_sample_value("weightpipe_errors_total", labels) == 1


def test_sync_series() -> None:
    registry = CollectorRegistry()
    metrics = WeightpipeMetrics(registry, engine="local")
    metrics.record_sync(seconds=1.5, nbytes=1000, ok=True, version=3, hard_pause_s=0.01)
    metrics.record_sync(seconds=0.5, nbytes=999, ok=False, version=3)
    metrics.record_event("fetch", "made_contiguous", 2)
    get = registry.get_sample_value
    assert get("weightpipe_syncs_total", {"engine": "local", "outcome": "ok"}) == 1
    assert get("weightpipe_syncs_total", {"engine": "local", "outcome": "failed"}) == 1
    assert get("weightpipe_sync_bytes_total", {"engine": "local"}) == 1000
    assert get("weightpipe_weight_version", {"engine": "local"}) == 3
    assert get("weightpipe_sync_seconds_count", {"engine": "local"}) == 2
    assert get("weightpipe_stage_events_total", {"stage": "fetch", "event": "made_contiguous"}) == 2


def test_a_registry_holds_one_set_of_series() -> None:
    registry = CollectorRegistry()
    WeightpipeMetrics(registry)
    with pytest.raises(ValueError, match="Duplicated"):
        WeightpipeMetrics(registry)


async def test_exposition_binds_loopback_and_serves_the_series() -> None:
    metrics = WeightpipeMetrics()
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
