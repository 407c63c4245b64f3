"""Prometheus metrics from pipeline statistics; the only importer of prometheus_client.

Stages stay metrics-free: the pipeline reports live events to an observer, and
``WeightpipeMetrics`` is that observer. Everything it exports is derived from the same
numbers as the ``RunReport`` (per-item busy seconds, bytes, channel occupancy, blocked and
starved seconds), so a scrape and a report never disagree. The registry is injectable: a
trainer that already exposes a registry passes it in and weightpipe's series appear
beside its own; ``serve_metrics`` binds 127.0.0.1 unless told otherwise.

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
weightpipe_stage_events_total              counter    stage, event  stage-specific counts
weightpipe_queue_depth                     gauge      queue         items in the channel now
weightpipe_queue_peak_depth                gauge      queue         peak items in the last run
weightpipe_queue_capacity                  gauge      queue         the channel's depth
weightpipe_sync_seconds                    histogram  engine        duration of a whole sync
weightpipe_sync_bytes_total                counter    engine        bytes delivered by syncs
weightpipe_syncs_total                     counter    engine, outcome  syncs by ok / failed
weightpipe_hard_pause_seconds              histogram  engine        generation paused per sync
weightpipe_weight_version                  gauge      engine        version the engine serves
weightpipe_errors_total                    counter    stage, kind   failed runs by stage, type
=========================================  =========  ============  ==========================
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)

from weightpipe.pipeline._channel import ChannelStatistics
from weightpipe.pipeline._pipeline import RunReport

__all__ = ["MetricsServer", "WeightpipeMetrics", "serve_metrics"]

# Per-item stage times span a no-op hop (microseconds) to a large bucket (seconds).
_STAGE_BUCKETS = (1e-5, 1e-4, 1e-3, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_SYNC_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_PAUSE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class WeightpipeMetrics:
    """Prometheus series for pipelines and syncs; pass it as a pipeline's ``observer``.

    Args:
        registry: where the series live; a fresh ``CollectorRegistry`` by default. Pass
            ``prometheus_client.REGISTRY`` (or your trainer's) to share one endpoint.
        engine: the ``engine`` label of sync-level series.

    Raises:
        ValueError: the registry already holds weightpipe series (prometheus_client's
            duplicate check); build one ``WeightpipeMetrics`` per registry.
    """

    def __init__(self, registry: CollectorRegistry | None = None, engine: str = "local") -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.engine = engine
        reg = self.registry
        self.stage_seconds = Histogram(
            "weightpipe_stage_seconds",
            "Busy seconds a stage spent on one input item.",
            ["stage"],
            buckets=_STAGE_BUCKETS,
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
        self.stage_blocked = Counter(
            "weightpipe_stage_blocked_seconds",
            "Seconds a stage waited for room in its output channel (backpressure).",
            ["stage"],
            registry=reg,
        )
        self.stage_starved = Counter(
            "weightpipe_stage_starved_seconds",
            "Seconds a stage waited for an input item.",
            ["stage"],
            registry=reg,
        )
        self.stage_events = Counter(
            "weightpipe_stage_events",
            "Stage-specific counts (e.g. tensors made contiguous, non-finite kept).",
            ["stage", "event"],
            registry=reg,
        )
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
        self.sync_seconds = Histogram(
            "weightpipe_sync_seconds",
            "Duration of one whole weight sync.",
            ["engine"],
            buckets=_SYNC_BUCKETS,
            registry=reg,
        )
        self.sync_bytes = Counter(
            "weightpipe_sync_bytes", "Bytes delivered to the engine.", ["engine"], registry=reg
        )
        self.syncs = Counter(
            "weightpipe_syncs", "Weight syncs by outcome.", ["engine", "outcome"], registry=reg
        )
        self.hard_pause = Histogram(
            "weightpipe_hard_pause_seconds",
            "Seconds generation was paused during one sync.",
            ["engine"],
            buckets=_PAUSE_BUCKETS,
            registry=reg,
        )
        self.weight_version = Gauge(
            "weightpipe_weight_version",
            "Weight version the engine serves (moves only on a committed sync).",
            ["engine"],
            registry=reg,
        )
        self.errors = Counter(
            "weightpipe_errors",
            "Failed runs by the stage at fault and the exception type.",
            ["stage", "kind"],
            registry=reg,
        )

    # PipelineObserver -------------------------------------------------------------------

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
        for stage in report.stages:
            self.stage_blocked.labels(stage.name).inc(stage.blocked_s)
            self.stage_starved.labels(stage.name).inc(stage.starved_s)
        for channel in report.channels:
            self.queue_depth.labels(channel.name).set(channel.current)
            self.queue_peak.labels(channel.name).set(channel.peak)
            self.queue_capacity.labels(channel.name).set(channel.capacity)

    # Sync level -------------------------------------------------------------------------

    def record_sync(
        self,
        *,
        seconds: float,
        nbytes: int,
        ok: bool,
        version: int | None,
        hard_pause_s: float = 0.0,
    ) -> None:
        """One sync finished; ``version`` is what the engine reports afterwards."""
        self.syncs.labels(self.engine, "ok" if ok else "failed").inc()
        self.sync_seconds.labels(self.engine).observe(seconds)
        self.hard_pause.labels(self.engine).observe(hard_pause_s)
        if ok:
            self.sync_bytes.labels(self.engine).inc(nbytes)
        if version is not None:
            self.weight_version.labels(self.engine).set(version)

    def record_event(self, stage: str, event: str, count: int = 1) -> None:
        """Add ``count`` to a stage-specific event counter."""
        if count:
            self.stage_events.labels(stage, event).inc(count)


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
    registry: CollectorRegistry | WeightpipeMetrics, port: int = 0, addr: str = "127.0.0.1"
) -> MetricsServer:
    """Serve ``registry`` on ``http://addr:port/metrics`` from a daemon thread.

    ``port=0`` picks a free port (read it from the result). Binds loopback by default:
    exposing metrics beyond the host is a decision the caller makes explicitly.

    Raises:
        OSError: the address can't be bound (in use, not local).
    """
    if isinstance(registry, WeightpipeMetrics):
        registry = registry.registry
    server, thread = start_http_server(port, addr=addr, registry=registry)
    return MetricsServer(addr, int(server.server_port), server, thread)
