"""``sync_weights`` against fake engines: the version it hands to stages, the generation
figures it asks the engine for, and the deadline it leaves to the engine.

Whole syncs into the local engine, in each mode, are in ``test_sync_modes.py``.
"""

from __future__ import annotations

import anyio
import pytest
import torch

from tests.fakes import FakeEngine, fake_buckets
from tests.fakes.engines import FakeMeasuringEngine
from weightpipe.pipeline import Stage, StageError
from weightpipe.stages.bucket import WeightBucket
from weightpipe.stages.engines.base import WireSpec
from weightpipe.stages.engines.local import GenerationStats
from weightpipe.stages.fetch import Fetch
from weightpipe.stages.quantize import Fp8Quantize
from weightpipe.stages.sync import sync_weights


def named_tensors() -> list[tuple[str, torch.Tensor]]:
    return [(f"w{i}", torch.full((8,), float(i))) for i in range(3)]


def stats() -> GenerationStats:
    return GenerationStats(
        elapsed_s=2.0,
        tokens=300,
        steps=100,
        finished=4,
        tokens_per_s=150.0,
        longest_gap_s=0.25,
        median_step_s=0.01,
        paused_s=0.2,
        weight_writes=3,
        weight_write_s=0.05,
    )


class VersionRecorder:
    """A stage that is told the sync's version (the ``SyncAware`` protocol)."""

    name = "recorder"

    def __init__(self) -> None:
        self.versions: list[int] = []

    def start_sync(self, version: int) -> None:
        self.versions.append(version)

    async def process(self, item: WeightBucket) -> list[WeightBucket]:
        return [item]


class SchemaVersioned:
    """A stage whose integer ``version`` means something else (a format revision)."""

    name = "schema"

    def __init__(self) -> None:
        self.version = 7

    async def process(self, item: WeightBucket) -> list[WeightBucket]:
        return [item]


async def test_the_version_reaches_fetch_through_start_sync() -> None:
    engine = FakeEngine()
    fetch = Fetch(16, version=0)
    report = await sync_weights(named_tensors(), engine, version=5, stages=[fetch])
    assert [b.version for b in engine.loaded] == [5, 5, 5]
    assert await engine.version() == 5
    assert report.load.buckets == 3
    assert fetch.stats.syncs == 1  # telling Fetch the version does not count a second sync


async def test_only_sync_aware_stages_are_told_the_version() -> None:
    engine = FakeEngine()
    recorder, schema = VersionRecorder(), SchemaVersioned()
    source = fake_buckets(dict(named_tensors()), per_bucket=2, version=4)
    await sync_weights(source, engine, version=4, stages=[recorder, schema])
    assert recorder.versions == [4]
    assert schema.version == 7  # an unrelated ``version`` attribute is left alone
    assert await engine.version() == 4


async def test_generation_is_measured_by_any_engine_that_measures_it() -> None:
    engine = FakeMeasuringEngine(stats())
    source = fake_buckets(dict(named_tensors()), per_bucket=1, version=1)
    report = await sync_weights(source, engine, version=1, mode="pause")
    assert report.generation == stats()
    assert report.tokens_per_s_during_sync == 150.0
    assert report.longest_gap_s == 0.25
    assert "150 tokens/s during the sync" in report.format()
    assert engine.windows_open == 0


async def test_the_generation_window_is_closed_when_the_sync_fails() -> None:
    engine = FakeMeasuringEngine(stats(), fail_at={"load": "error"})
    source = fake_buckets(dict(named_tensors()), per_bucket=1, version=1)
    with pytest.raises(StageError):
        await sync_weights(source, engine, version=1)
    assert engine.windows_open == 0
    assert await engine.version() == 0


async def test_an_engine_that_does_not_measure_generation_reports_none() -> None:
    engine = FakeEngine()
    source = fake_buckets(dict(named_tensors()), per_bucket=1, version=2)
    report = await sync_weights(source, engine, version=2)
    assert report.generation is None
    assert report.tokens_per_s_during_sync is None
    assert "tokens/s" not in report.format()


async def test_each_engine_call_gets_the_engines_default_deadline() -> None:
    engine = FakeEngine(fail_at={"commit": "hang"}, default_timeout_s=0.05)
    source = fake_buckets(dict(named_tensors()), per_bucket=1, version=3)
    with pytest.raises(StageError) as info:
        await sync_weights(source, engine, version=3)
    assert "commit did not answer within 0.05 s" in str(info.value.__cause__)
    assert ("abort", 3) in engine.calls
    # The commit was sent to an engine that cannot roll back: it may hold the new
    # weights under the old version, so it stays paused and the error says so.
    assert engine.paused
    assert getattr(info.value, "engine_dirty", False) or getattr(
        info.value.__cause__, "engine_dirty", False
    )


async def test_a_failure_before_load_after_the_engine_took_a_bucket_says_it_is_dirty() -> None:
    loaded = anyio.Event()

    class SignalingEngine(FakeEngine):
        async def load(self, bucket: WeightBucket) -> None:
            await super().load(bucket)
            loaded.set()

    engine = SignalingEngine()

    class FailsOnceLoaded(Stage[WeightBucket, WeightBucket]):
        """Passes buckets on; the third fails once the engine has taken one."""

        name = "upstream"

        def __init__(self) -> None:
            self.seen = 0

        async def process(self, item: WeightBucket) -> list[WeightBucket]:
            self.seen += 1
            if self.seen == 3:
                with anyio.fail_after(10):
                    await loaded.wait()
                raise RuntimeError("upstream broke")
            return [item]

    source = fake_buckets(dict(named_tensors()), per_bucket=1, version=4)
    with pytest.raises(StageError) as info:
        await sync_weights(source, engine, version=4, stages=[FailsOnceLoaded()], depth=1)
    assert info.value.stage == "upstream"
    assert getattr(info.value, "engine_dirty", False) is True
    assert "cannot roll back" in "\n".join(getattr(info.value, "__notes__", []))
    assert engine.paused  # the engine holds part of v4: it is not resumed
    assert await engine.version() == 0


async def test_the_last_stage_before_load_writes_the_engines_wire_buffer() -> None:
    spec = WireSpec(align_bytes=16, shared_memory=False)

    class FlatEngine(FakeEngine):
        def wire_spec(self) -> WireSpec | None:
            return spec

    fetch, quantize = Fetch(1 << 20), Fp8Quantize()
    engine = FlatEngine()
    await sync_weights(list(named_tensors()), engine, version=1, stages=[fetch, quantize])
    assert fetch.wire is None and quantize.wire == spec
    # Fetch alone before Load writes it instead; a plain engine asks for nothing.
    await sync_weights(list(named_tensors()), engine, version=2, stages=[fetch])
    assert fetch.wire == spec
    await sync_weights(list(named_tensors()), FakeEngine(), version=1, stages=[fetch, quantize])
    assert fetch.wire is None and quantize.wire is None


async def test_an_explicit_deadline_overrides_the_engines_default() -> None:
    engine = FakeEngine(fail_at={"load": "hang"}, default_timeout_s=600.0)
    source = fake_buckets(dict(named_tensors()), per_bucket=1, version=3)
    with pytest.raises(StageError) as info:
        await sync_weights(source, engine, version=3, timeout_s=0.05)
    assert "did not answer within 0.05 s" in str(info.value.__cause__)
