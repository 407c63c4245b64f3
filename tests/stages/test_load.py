"""The Load stage against a scripted fake engine: protocol order per mode, and faults.

Every fault must surface as one ``StageError`` from the load stage, leave the engine's
version unchanged, call ``abort`` and leave generation resumed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import pytest
import torch

from tests.fakes import FakeEngine, FakeGate, fake_buckets
from weightpipe.pipeline import Pipeline, StageError
from weightpipe.stages.bucket import WeightBucket
from weightpipe.stages.engines.base import EngineError
from weightpipe.stages.load import Load


def buckets(version: int = 1, count: int = 3) -> list[WeightBucket]:
    tensors = {f"w{i}": torch.full((4,), float(i)) for i in range(count)}
    return fake_buckets(tensors, per_bucket=1, version=version)


async def failing_source() -> AsyncIterator[WeightBucket]:
    """Two buckets of a sync, then the trainer goes away."""
    for bucket in buckets()[:2]:
        yield bucket
    raise OSError("trainer went away")


async def run(load: Load, source: object, *stages: object) -> None:
    await Pipeline([*stages, load], depth=2).run(source)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("pause", ["pause", "begin", "load", "load", "load", "commit", "resume"]),
        ("prefetch", ["pause", "begin", "load", "load", "load", "commit", "resume"]),
        ("in_flight", ["begin", "load", "load", "load", "commit"]),
    ],
)
async def test_protocol_order_per_mode(mode: str, expected: list[str]) -> None:
    engine = FakeEngine()
    load = Load(engine, mode=mode, pause_mode="in_place")  # type: ignore[arg-type]
    await run(load, buckets())
    assert engine.call_names() == expected
    assert await engine.version() == 1
    assert not engine.paused
    report = load.report
    assert report.committed
    assert not report.aborted
    assert report.buckets == 3
    assert report.tensors == 3
    assert report.bytes == 3 * 16
    assert report.version == 1
    assert report.names == ("w0", "w1", "w2")
    if mode == "in_flight":
        assert report.hard_pause_s == 0.0
    else:
        assert report.hard_pause_s > 0.0
        assert engine.pause_modes == ["in_place"]


@pytest.mark.parametrize(("mode", "paused_upstream"), [("pause", True), ("prefetch", False)])
async def test_pause_starts_at_open_or_at_first_bucket(mode: str, paused_upstream: bool) -> None:
    engine = FakeEngine()
    gate = FakeGate(hold_at=0)
    load = Load(engine, mode=mode)  # type: ignore[arg-type]
    async with anyio.create_task_group() as group:
        group.start_soon(run, load, buckets(), gate)
        await gate.reached.wait()
        # The first bucket is still upstream of Load: only pause mode has paused yet.
        assert engine.paused is paused_upstream
        assert "begin" not in engine.call_names()
        gate.release.set()
    assert await engine.version() == 1
    assert not engine.paused


@pytest.mark.parametrize(("prefetch_bytes", "pause_after"), [(0, 0), (32, 1), (None, 3)])
async def test_prefetch_holds_buckets_back_up_to_its_budget(
    prefetch_bytes: int | None, pause_after: int
) -> None:
    engine = FakeEngine()

    async def source() -> AsyncIterator[WeightBucket]:
        for bucket in buckets(count=4):  # 16 bytes each
            engine.calls.append(("source", bucket.index))
            yield bucket

    load = Load(engine, mode="prefetch", prefetch_bytes=prefetch_bytes)
    await run(load, source())
    calls = engine.calls
    # Load cannot pause before the bucket that fills its budget has arrived.
    assert calls.index(("pause", "retract")) > calls.index(("source", pause_after))
    assert [c for c in engine.call_names() if c != "source"] == [
        "pause",
        "begin",
        "load",
        "load",
        "load",
        "load",
        "commit",
        "resume",
    ]
    assert [b.index for b in engine.loaded] == [0, 1, 2, 3]
    assert load.report.committed


async def test_prefetch_failure_while_holding_touches_nothing() -> None:
    engine = FakeEngine()
    with pytest.raises(StageError, match="trainer went away"):
        await run(Load(engine, mode="prefetch", prefetch_bytes=None), failing_source())
    assert engine.calls == []


async def test_prefetch_with_look_ahead_aborts_a_failing_load() -> None:
    engine = FakeEngine(fail_at={"load": "error"}, fail_load_at=2)
    with pytest.raises(StageError, match="load failed"):
        await run(Load(engine, mode="prefetch", prefetch_bytes=None), buckets())
    assert engine.call_names() == ["pause", "begin", "load", "load", "load", "abort", "resume"]
    assert await engine.version() == 0


FAULTS = [
    pytest.param({"begin": "error"}, 0, id="begin-error"),
    pytest.param({"load": "error"}, 1, id="load-error-mid-sync"),
    pytest.param({"load": "refuse"}, 2, id="load-success-false-last"),
    pytest.param({"commit": "error"}, 0, id="commit-error"),
    pytest.param({"commit": "refuse"}, 0, id="commit-success-false"),
    pytest.param({"begin": "hang"}, 0, id="begin-timeout"),
    pytest.param({"load": "hang"}, 1, id="load-timeout"),
    pytest.param({"commit": "hang"}, 0, id="commit-timeout"),
]


@pytest.mark.parametrize("mode", ["pause", "prefetch", "in_flight"])
@pytest.mark.parametrize(("fail_at", "at_bucket"), FAULTS)
async def test_engine_fault_aborts_and_resumes(
    mode: str, fail_at: dict[str, str], at_bucket: int
) -> None:
    engine = FakeEngine(fail_at=fail_at, fail_load_at=at_bucket)
    load = Load(engine, mode=mode, timeout_s=0.2)  # type: ignore[arg-type]
    with pytest.raises(StageError) as info:
        await run(load, buckets())
    error = info.value
    assert error.stage == "load"
    assert error.phase == "process"
    assert isinstance(error.__cause__, EngineError)
    assert "'fake'" in str(error)
    if "hang" in fail_at.values():
        assert "did not answer within 0.2 s" in str(error)
        assert error.__cause__.retryable
    assert await engine.version() == 0
    assert not engine.paused
    assert engine.call_names().count("abort") == 1
    assert ("abort", 1) in engine.calls
    assert load.report.aborted
    assert not load.report.committed
    if mode != "in_flight":
        assert engine.call_names()[-1] == "resume"
    else:
        assert "pause" not in engine.call_names()


async def test_load_error_names_the_bucket_and_tensor() -> None:
    engine = FakeEngine(fail_at={"load": "error"}, fail_load_at=1)
    with pytest.raises(StageError) as info:
        await run(Load(engine), buckets())
    assert "bucket 1 of v1" in str(info.value)
    assert info.value.__cause__.tensor == "w1"  # type: ignore[union-attr]


async def test_failing_abort_does_not_mask_the_cause() -> None:
    engine = FakeEngine(fail_at={"load": "error", "abort": "error"}, fail_load_at=1)
    load = Load(engine, mode="pause")
    with pytest.raises(StageError) as info:
        await run(load, buckets())
    assert "load failed" in str(info.value)
    assert load.report.abort_error is not None
    assert "abort failed" in load.report.abort_error
    assert not engine.paused
    assert await engine.version() == 0


async def test_hanging_abort_times_out_and_generation_resumes() -> None:
    engine = FakeEngine(fail_at={"load": "error", "abort": "hang"})
    load = Load(engine, mode="prefetch", timeout_s=0.1)
    with pytest.raises(StageError, match="load failed"):
        await run(load, buckets())
    assert load.report.abort_error is not None
    assert "did not answer" in load.report.abort_error
    assert not engine.paused


async def test_failed_pause_at_open_still_resumes() -> None:
    engine = FakeEngine(fail_at={"pause": "error"})
    load = Load(engine, mode="pause")
    with pytest.raises(StageError) as info:
        await run(load, buckets())
    assert info.value.phase == "open"
    assert engine.call_names() == ["pause", "resume"]
    assert not engine.paused
    assert await engine.version() == 0


async def test_failed_resume_after_commit_is_reported() -> None:
    engine = FakeEngine(fail_at={"resume": "error"})
    load = Load(engine, mode="prefetch")
    with pytest.raises(StageError) as info:
        await run(load, buckets())
    assert info.value.stage == "load"
    assert "resume failed" in str(info.value)
    assert load.report.committed  # the weights did change; the error says generation did not


async def test_upstream_failure_mid_sync_aborts() -> None:
    engine = FakeEngine()
    load = Load(engine, mode="pause")
    with pytest.raises(StageError) as info:
        await run(load, failing_source())
    assert info.value.stage == "source"
    assert ("abort", 1) in engine.calls
    assert await engine.version() == 0
    assert not engine.paused


async def test_stream_without_last_bucket_is_not_committed() -> None:
    engine = FakeEngine()
    with pytest.raises(StageError) as info:
        await run(Load(engine), buckets()[:2])
    assert info.value.phase == "flush"
    assert "without one marked is_last" in str(info.value)
    assert "commit" not in engine.call_names()
    assert ("abort", 1) in engine.calls
    assert not engine.paused


async def test_empty_stream_is_an_error_without_engine_calls() -> None:
    engine = FakeEngine()
    with pytest.raises(StageError, match="no buckets"):
        await run(Load(engine, mode="in_flight"), [])
    assert engine.calls == []


@pytest.mark.parametrize(
    ("source", "message"),
    [
        pytest.param([buckets()[1]], "arrived in position 0", id="out-of-order"),
        pytest.param(buckets(version=2), "does not belong to the sync of v1", id="wrong-version"),
        pytest.param([("w", torch.zeros(1))], "put Fetch before it", id="not-a-bucket"),
    ],
)
async def test_bad_streams_are_refused(source: list[object], message: str) -> None:
    engine = FakeEngine()
    with pytest.raises(StageError, match=message):
        await run(Load(engine, version=1), source)
    assert await engine.version() == 0
    assert not engine.paused


async def test_bucket_after_the_committed_last_one_is_refused() -> None:
    engine = FakeEngine()
    with pytest.raises(StageError, match="arrived after the last bucket was committed"):
        await run(Load(engine), [*buckets(), buckets()[0]])
    # The sync itself had committed; the stray bucket is refused, not loaded.
    assert await engine.version() == 1
    assert engine.call_names().count("load") == 3
    assert not engine.paused


async def test_mixed_versions_in_one_stream_are_refused() -> None:
    mixed = [buckets(version=1)[0], buckets(version=2)[1], buckets(version=1)[2]]
    engine = FakeEngine()
    with pytest.raises(StageError, match="bucket 1 of v2"):
        await run(Load(engine), mixed)
    assert ("abort", 1) in engine.calls


async def test_cancellation_mid_sync_aborts_and_resumes() -> None:
    engine = FakeEngine()
    gate = FakeGate(hold_at=1)
    load = Load(engine, mode="prefetch")
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as group:
            group.start_soon(run, load, buckets(), gate)
            await gate.reached.wait()
            scope.cancel()
    assert scope.cancelled_caught
    assert engine.call_names() == ["pause", "begin", "load", "abort", "resume"]
    assert await engine.version() == 0
    assert not engine.paused


async def test_stage_is_reusable_across_syncs() -> None:
    engine = FakeEngine(fail_at={"commit": "error"})
    load = Load(engine, mode="pause")
    with pytest.raises(StageError):
        await run(load, buckets(version=1))
    assert load.report.aborted
    engine.fail_at = {}
    await run(load, buckets(version=2, count=2))
    report = load.report
    assert report.committed
    assert not report.aborted
    assert report.buckets == 2
    assert report.version == 2
    assert await engine.version() == 2


def test_constructor_rejects_bad_arguments() -> None:
    engine = FakeEngine()
    with pytest.raises(ValueError, match="sync mode"):
        Load(engine, mode="later")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="pause mode"):
        Load(engine, pause_mode="nap")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeout_s"):
        Load(engine, timeout_s=0)
    with pytest.raises(ValueError, match="prefetch_bytes"):
        Load(engine, prefetch_bytes=-1)
