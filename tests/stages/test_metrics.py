"""WeightpipeMetrics: the sync-level series on top of the pipeline's, one engine label."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from weightpipe.stages.metrics import WeightpipeMetrics


def test_sync_series() -> None:
    registry = CollectorRegistry()
    metrics = WeightpipeMetrics(registry, engine="local")
    metrics.record_sync(seconds=1.5, nbytes=1000, ok=True, version=3, hard_pause_s=0.01)
    metrics.record_sync(seconds=0.5, nbytes=999, ok=False, version=None)
    get = registry.get_sample_value
    assert get("weightpipe_syncs_total", {"engine": "local", "outcome": "ok"}) == 1
    assert get("weightpipe_syncs_total", {"engine": "local", "outcome": "failed"}) == 1
    assert get("weightpipe_sync_bytes_total", {"engine": "local"}) == 1000  # failed: not counted
    assert get("weightpipe_weight_version", {"engine": "local"}) == 3  # None left it alone
    assert get("weightpipe_sync_seconds_count", {"engine": "local"}) == 2
    assert get("weightpipe_sync_seconds_sum", {"engine": "local"}) == 2.0
    assert get("weightpipe_hard_pause_seconds_sum", {"engine": "local"}) == pytest.approx(0.01)


def test_the_pipeline_series_come_with_it() -> None:
    names = {family.name for family in WeightpipeMetrics().registry.collect()}
    assert {"weightpipe_stage_seconds", "weightpipe_stage_blocked_seconds"} <= names
    assert "weightpipe_stage_events" not in names  # fed by nothing, so not exported


def test_a_registry_holds_one_set_of_series() -> None:
    registry = CollectorRegistry()
    WeightpipeMetrics(registry)
    with pytest.raises(ValueError, match="Duplicated"):
        WeightpipeMetrics(registry)
