"""Prometheus series for weight syncs, on top of the framework's stage and channel series.

``WeightpipeMetrics`` is ``weightpipe.pipeline.metrics.PipelineMetrics`` (per-stage and
per-channel series, observed live from each pipeline run) plus the series only a weight
sync has: its duration, bytes and outcome, the hard pause of generation, and the weight
version the engine serves, all labelled by ``engine``. Whoever drives a sync calls
``record_sync`` once per sync. With ``weightpipe.pipeline.metrics`` this is the only
module that imports prometheus_client.

Series added to ``PipelineMetrics``' (all labelled ``engine``):

=========================================  =========  ===============  =======================
name                                       type       labels           meaning
=========================================  =========  ===============  =======================
weightpipe_sync_seconds                    histogram  engine           duration of a whole sync
weightpipe_sync_bytes_total                counter    engine           bytes delivered by syncs
weightpipe_syncs_total                     counter    engine, outcome  syncs by ok / failed
weightpipe_hard_pause_seconds              histogram  engine           generation paused per sync
weightpipe_weight_version                  gauge      engine           version the engine serves
weightpipe_engine_dirty                    gauge      engine           1: engine is dirty
=========================================  =========  ===============  =======================
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from weightpipe.pipeline.metrics import MetricsServer, PipelineMetrics, serve_metrics

__all__ = ["MetricsServer", "WeightpipeMetrics", "serve_metrics"]

_SYNC_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_PAUSE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class WeightpipeMetrics(PipelineMetrics):
    """Stage, channel and sync series; pass it as the sync's pipeline ``observer``.

    Args:
        registry: where the series live; a fresh ``CollectorRegistry`` by default. Pass
            ``prometheus_client.REGISTRY`` (or your trainer's) to share one endpoint.
        engine: the ``engine`` label of the sync-level series.

    Raises:
        ValueError: the registry already holds weightpipe series (prometheus_client's
            duplicate check); build one ``WeightpipeMetrics`` per registry.
    """

    def __init__(self, registry: CollectorRegistry | None = None, engine: str = "local") -> None:
        super().__init__(registry)
        self.engine = engine
        reg = self.registry
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
        self.engine_dirty = Gauge(
            "weightpipe_engine_dirty",
            "1 while the engine holds part of a failed sync it cannot roll back (paused "
            "under on_partial_failure=keep_paused until a full sync commits), else 0.",
            ["engine"],
            registry=reg,
        )
        self.engine_dirty.labels(engine).set(0)

    def set_engine_dirty(self, dirty: bool) -> None:
        """Whether the engine holds part of a failed sync (``LoadReport.engine_dirty``)."""
        self.engine_dirty.labels(self.engine).set(1 if dirty else 0)

    def record_sync(
        self,
        *,
        seconds: float,
        nbytes: int,
        ok: bool,
        version: int | None,
        hard_pause_s: float = 0.0,
        engine_dirty: bool | None = None,
    ) -> None:
        """One sync finished; ``version`` is what the engine reports afterwards.

        ``nbytes`` counts only when ``ok``; ``version`` ``None`` leaves the gauge as it is;
        ``engine_dirty`` (``LoadReport.engine_dirty``, or ``engine_is_dirty(engine)``)
        sets ``weightpipe_engine_dirty``, ``None`` leaves it as it is.
        """
        if engine_dirty is not None:
            self.set_engine_dirty(engine_dirty)
        self.syncs.labels(self.engine, "ok" if ok else "failed").inc()
        self.sync_seconds.labels(self.engine).observe(seconds)
        self.hard_pause.labels(self.engine).observe(hard_pause_s)
        if ok:
            self.sync_bytes.labels(self.engine).inc(nbytes)
        if version is not None:
            self.weight_version.labels(self.engine).set(version)
