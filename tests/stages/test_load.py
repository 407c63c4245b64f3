"""The Load stage against scripted fake engines: the transaction per sync mode, and faults.

Every fault (at open, mid-stream, at close, or a cancellation) must surface as one
``StageError`` naming the load stage (or the upstream stage at fault), leave the engine's
version unchanged, call ``abort`` once for a sync that began, and leave generation
resumed. Synchronisation is by events (a gate stage, the engines' events), never sleeps.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import AsyncIterator

import anyio
import pytest
import torch
from prometheus_client import CollectorRegistry

from tests.fakes import FakeEngine, FakeGate, fake_buckets
from tests.fakes.engines import FakeSteppingEngine
from weightpipe.pipeline import Pipeline, StageError
from weightpipe.pipeline.config import ConfigError
from weightpipe.stages.app.config import load_weightpipe_config
from weightpipe.stages.app.factory import build_load
from weightpipe.stages.bucket import WeightBucket
from weightpipe.stages.engines.base import DEFAULT_TIMEOUT_S, EngineError, SyncMode
from weightpipe.stages.load import PAUSE_POLICY, Load, PausePhases, engine_is_dirty
from weightpipe.stages.metrics import WeightpipeMetrics


class RollbackEngine(FakeEngine):
    """``FakeEngine`` declaring ``rolls_back`` as ``LocalEngine`` does (its staged commit
    discards the staged buckets on abort): a failed sync resumes generation."""

    rolls_back = True


MODES: list[SyncMode] = ["pause", "prefetch", "in_flight"]
PAUSING: list[SyncMode] = ["pause", "prefetch"]


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


async def run_tolerating_failure(load: Load, source: object) -> None:
    """Run; a StageError is fine (a test that cancels the run checks the engine instead)."""
    with contextlib.suppress(StageError):
        await run(load, source)


async def run_expecting_failure(load: Load, source: object, *stages: object) -> StageError:
    with pytest.raises(StageError) as info:
        await run(load, source, *stages)
    return info.value


def expected_calls(mode: SyncMode, *middle: str) -> list[str]:
    """The engine calls of a sync in ``mode``: pause/resume around ``middle`` unless in_flight."""
    return list(middle) if mode == "in_flight" else ["pause", *middle, "resume"]


# -- the transaction in each mode -------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_protocol_order_per_mode(mode: SyncMode) -> None:
    engine = RollbackEngine()
    load = Load(engine, mode=mode, pause_mode="in_place")
    await run(load, buckets())
    assert engine.call_names() == expected_calls(mode, "begin", "load", "load", "load", "commit")
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


@pytest.mark.parametrize("mode", MODES)
async def test_pause_policy_decides_when_generation_stops(mode: SyncMode) -> None:
    engine = RollbackEngine()
    gate = FakeGate(hold_at=0)
    load = Load(engine, mode=mode)
    async with anyio.create_task_group() as group:
        group.start_soon(run, load, buckets(), gate)
        await gate.reached.wait()
        # The first bucket is still upstream of Load: only a pause at open has paused yet.
        assert engine.paused is (PAUSE_POLICY[mode] == "open")
        assert "begin" not in engine.call_names()
        gate.release.set()
    assert await engine.version() == 1
    assert not engine.paused
    assert ("pause" in engine.call_names()) is (PAUSE_POLICY[mode] != "never")


@pytest.mark.parametrize(("prefetch_bytes", "pause_after"), [(0, 0), (32, 1), (None, 3)])
async def test_prefetch_holds_buckets_back_up_to_its_budget(
    prefetch_bytes: int | None, pause_after: int
) -> None:
    engine = RollbackEngine()

    async def source() -> AsyncIterator[WeightBucket]:
        for bucket in buckets(count=4):  # 16 bytes each
            engine.calls.append(("source", bucket.index))
            yield bucket

    load = Load(engine, mode="prefetch", prefetch_bytes=prefetch_bytes)
    await run(load, source())
    calls = engine.calls
    # Load cannot pause before the bucket that fills its budget has arrived.
    assert calls.index(("pause", "retract")) > calls.index(("source", pause_after))
    assert [c for c in engine.call_names() if c != "source"] == expected_calls(
        "prefetch", "begin", "load", "load", "load", "load", "commit"
    )
    assert [b.index for b in engine.loaded] == [0, 1, 2, 3]
    assert load.report.committed


async def test_prefetch_failure_while_holding_touches_nothing() -> None:
    engine = RollbackEngine()
    error = await run_expecting_failure(
        Load(engine, mode="prefetch", prefetch_bytes=None), failing_source()
    )
    assert error.stage == "source"
    assert engine.calls == []


async def test_prefetch_with_look_ahead_aborts_a_failing_load() -> None:
    engine = RollbackEngine(fail_at={"load": "error"}, fail_load_at=2)
    error = await run_expecting_failure(
        Load(engine, mode="prefetch", prefetch_bytes=None), buckets()
    )
    assert error.__cause__ is engine.raised[0]
    assert engine.call_names() == ["pause", "begin", "load", "load", "load", "abort", "resume"]
    assert await engine.version() == 0


# -- engines that cannot switch atomically -------------------------------------------------


class AppliesAsItArrives(FakeEngine):
    """``FakeEngine`` declaring what the SGLang adapters declare: each bucket goes into the
    live model as it arrives (``switches_atomically = False``)."""

    switches_atomically = False


class PreparingEngine(AppliesAsItArrives):
    """Also ``PreparesBuckets``, as the SGLang adapters do (it records each prepare, and
    ``fail_prepare_at`` makes that bucket's prepare fail)."""

    def __init__(self, *, fail_prepare_at: int | None = None, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.fail_prepare_at = fail_prepare_at

    async def prepare(self, bucket: WeightBucket) -> None:
        self.calls.append(("prepare", bucket.index))
        if bucket.index == self.fail_prepare_at:
            error = EngineError(self.name, "cannot encode (fake)")
            self.raised.append(error)
            raise error


@pytest.mark.parametrize(
    ("engine_class", "pauses"),
    [
        (FakeEngine, True),  # declares nothing and cannot roll back: applies as it arrives
        (AppliesAsItArrives, True),
        (RollbackEngine, False),  # rolls back, so it stages until commit: the switch
        (type("Atomic", (FakeEngine,), {"switches_atomically": True}), False),
        (type("RollbackNotAtomic", (RollbackEngine,), {"switches_atomically": False}), True),
    ],
)
async def test_in_flight_pauses_in_place_only_an_engine_that_cannot_switch_atomically(
    engine_class: type[FakeEngine], pauses: bool
) -> None:
    engine = engine_class()
    load = Load(engine, mode="in_flight", pause_mode="retract")
    await run(load, buckets())
    middle = ["begin", "load", "load", "load", "commit"]
    assert engine.call_names() == (["pause", *middle, "resume"] if pauses else middle)
    assert engine.pause_modes == (["in_place"] if pauses else [])  # never abort or retract
    assert load.report.pause_mode == ("in_place" if pauses else "retract")
    assert (load.report.hard_pause_s > 0.0) is pauses
    assert await engine.version() == 1
    assert not engine.paused


@pytest.mark.parametrize(("prefetch_bytes", "pause_after"), [(0, 0), (32, 1), (None, 3)])
async def test_in_flight_on_such_an_engine_holds_buckets_like_prefetch(
    prefetch_bytes: int | None, pause_after: int
) -> None:
    engine = AppliesAsItArrives()

    async def source() -> AsyncIterator[WeightBucket]:
        for bucket in buckets(count=4):  # 16 bytes each
            engine.calls.append(("source", bucket.index))
            yield bucket

    load = Load(engine, mode="in_flight", prefetch_bytes=prefetch_bytes)
    await run(load, source())
    calls = engine.calls
    # Load cannot pause before the bucket that fills its budget has arrived.
    assert calls.index(("pause", "in_place")) > calls.index(("source", pause_after))
    assert [b.index for b in engine.loaded] == [0, 1, 2, 3]


@pytest.mark.parametrize(("mode", "prepared_first"), [("prefetch", 3), ("in_flight", 3)])
async def test_a_whole_sync_prefetched_is_prepared_before_the_pause(
    mode: SyncMode, prepared_first: int
) -> None:
    engine = PreparingEngine()
    load = Load(engine, mode=mode, prefetch_bytes=None)
    await run(load, buckets())
    names = engine.call_names()
    assert names[: names.index("pause")] == ["prepare"] * prepared_first
    assert names[names.index("pause") :] == [
        "pause",
        "begin",
        "load",
        "load",
        "load",
        "commit",
        "resume",
    ]
    kinds = [call.kind for call in load.report.calls]
    assert kinds[: kinds.index("pause")] == ["version", *["prepare"] * prepared_first]


async def test_each_bucket_is_prepared_before_the_pause_for_it() -> None:
    engine = PreparingEngine()
    await run(Load(engine, mode="prefetch"), buckets())
    assert engine.calls[:3] == [("prepare", 0), ("pause", "retract"), ("begin", 1)]
    assert engine.call_names().count("prepare") == 3


async def test_a_failed_prepare_touches_nothing() -> None:
    engine = PreparingEngine(fail_prepare_at=2)
    load = Load(engine, mode="in_flight", prefetch_bytes=None)
    error = await run_expecting_failure(load, buckets())
    assert error.__cause__ is engine.raised[0]
    assert engine.call_names() == ["prepare", "prepare", "prepare"]
    assert not load.report.engine_dirty
    assert not engine.paused
    assert await engine.version() == 0


@pytest.mark.parametrize("mode", MODES)
async def test_pause_phases_add_up_to_the_hard_pause(mode: SyncMode) -> None:
    engine = PreparingEngine()
    load = Load(engine, mode=mode)
    await run(load, buckets())
    report = load.report
    parts = report.pause_phases.as_dict()
    assert all(value >= 0.0 for value in parts.values())
    assert math.isclose(sum(parts.values()), report.hard_pause_s, rel_tol=1e-9, abs_tol=1e-12)
    handed = [c for c in report.calls if c.kind in {"begin", "load", "commit"}]
    assert math.isclose(
        report.pause_phases.engine_calls_s, sum(c.end_s - c.start_s for c in handed), rel_tol=1e-9
    )
    assert report.pause_phases.resume_s > 0.0


async def test_no_pause_no_phases() -> None:
    load = Load(RollbackEngine(), mode="in_flight")
    await run(load, buckets())
    assert load.report.hard_pause_s == 0.0
    assert load.report.pause_phases == PausePhases()


# -- errors at open -----------------------------------------------------------------------


async def test_failed_pause_at_open_still_resumes() -> None:
    engine = RollbackEngine(fail_at={"pause": "error"})
    load = Load(engine, mode="pause")
    error = await run_expecting_failure(load, buckets())
    assert error.phase == "open"
    assert error.__cause__ is engine.raised[0]
    assert engine.call_names() == ["pause", "resume"]
    assert not engine.paused
    assert await engine.version() == 0
    engine.fail_at = {}
    await run(Load(engine, mode="pause"), buckets(version=2))  # the engine is free again
    assert await engine.version() == 2


@pytest.mark.parametrize("second_mode", MODES)
async def test_a_second_sync_on_a_busy_engine_is_refused_without_touching_the_first(
    second_mode: SyncMode,
) -> None:
    engine = RollbackEngine()
    gate = FakeGate(hold_at=1)
    first = Load(engine, mode="pause")
    async with anyio.create_task_group() as group:
        group.start_soon(run, first, buckets(), gate)
        await gate.reached.wait()
        calls_before = list(engine.calls)
        error = await run_expecting_failure(Load(engine, mode=second_mode), buckets(version=2))
        assert error.phase == "open"
        assert isinstance(error.__cause__, EngineError)
        assert "one sync at a time per engine" in str(error.__cause__)
        # The first sync is exactly where it was: still paused, nothing resumed or aborted.
        assert engine.calls == calls_before
        assert engine.paused
        gate.release.set()
    assert first.report.committed
    assert await engine.version() == 1
    assert not engine.paused


async def test_one_engine_twice_in_one_pipeline_is_refused_at_open() -> None:
    engine = RollbackEngine()
    error = await run_expecting_failure(Load(engine, name="second"), buckets(), Load(engine))
    assert error.stage == "second"
    assert error.phase == "open"
    assert engine.calls == []


# -- errors mid-stream ---------------------------------------------------------------------

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


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("fail_at", "at_bucket"), FAULTS)
async def test_engine_fault_aborts_and_resumes(
    mode: SyncMode, fail_at: dict[str, str], at_bucket: int
) -> None:
    engine = RollbackEngine(fail_at=fail_at, fail_load_at=at_bucket)
    load = Load(engine, mode=mode, timeout_s=0.2)
    error = await run_expecting_failure(load, buckets())
    assert error.stage == "load"
    assert error.phase == "process"
    cause = error.__cause__
    assert isinstance(cause, EngineError)
    (call,) = fail_at
    if "hang" in fail_at.values():
        # Load's deadline fired: the error names the engine and the call that hung.
        assert cause.retryable
        assert cause.engine == "fake"
        assert str(cause).startswith(f"engine 'fake': {call}")
        assert "did not answer within 0.2 s" in str(cause)
    else:
        assert cause is engine.raised[0]
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
    engine = RollbackEngine(fail_at={"load": "error"}, fail_load_at=1)
    error = await run_expecting_failure(Load(engine), buckets())
    assert error.item is not None
    assert "bucket 1 of v1" in error.item
    assert isinstance(error.__cause__, EngineError)
    assert error.__cause__.tensor == "w1"


@pytest.mark.parametrize("mode", MODES)
async def test_upstream_failure_mid_sync_aborts(mode: SyncMode) -> None:
    engine = RollbackEngine()
    load = Load(engine, mode=mode)
    error = await run_expecting_failure(load, failing_source())
    assert error.stage == "source"
    assert isinstance(error.__cause__, OSError)
    assert engine.call_names() == expected_calls(mode, "begin", "load", "load", "abort")
    assert ("abort", 1) in engine.calls
    assert await engine.version() == 0
    assert not engine.paused


async def test_pause_still_being_entered_when_upstream_fails_is_completed_then_resumed() -> None:
    # The local engine enters a requested pause after its current step, whether or not the
    # caller still waits: a resume sent before that is a no-op, and generation would then
    # stay paused. Load must wait for the pause, then resume.
    engine = FakeSteppingEngine()
    gate = FakeGate(hold_at=1)

    async def source() -> AsyncIterator[WeightBucket]:
        first, second, _ = buckets()
        yield first
        yield second
        await engine.pause_requested.wait()
        raise OSError("trainer went away")

    load = Load(engine, mode="prefetch")
    async with anyio.create_task_group() as group:
        group.start_soon(run_expecting_failure, load, source(), gate)
        await gate.cancelled.wait()  # the failure has cancelled every stage, Load included
        await anyio.wait_all_tasks_blocked()  # Load has done all it does before the step ends
        engine.finish_step()
    engine.finish_step()  # a pause still pending would be entered now
    assert not engine.paused
    assert engine.call_names() == ["pause", "resume"]
    assert not load.report.aborted  # no begin was sent: nothing to abort


async def test_pause_still_being_entered_at_open_when_cancelled_is_completed_then_resumed() -> None:
    engine = FakeSteppingEngine()
    load = Load(engine, mode="pause")
    scope = anyio.CancelScope()

    async def sync() -> None:
        with scope:
            await run(load, buckets())

    async with anyio.create_task_group() as group:
        group.start_soon(sync)
        await engine.pause_requested.wait()
        scope.cancel()  # delivered to Load at once (anyio cancels every task in one pass)
        await anyio.wait_all_tasks_blocked()  # Load has done all it does before the step ends
        engine.finish_step()
    assert scope.cancelled_caught
    engine.finish_step()  # a pause still pending would be entered now
    assert not engine.paused
    assert engine.call_names() == ["pause", "resume"]
    assert await engine.version() == 0


async def test_a_pause_waited_for_through_a_cancellation_still_has_its_deadline() -> None:
    engine = FakeSteppingEngine()
    load = Load(engine, mode="prefetch", timeout_s=0.05)
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as group:
            group.start_soon(run_tolerating_failure, load, buckets())
            await engine.pause_requested.wait()
            scope.cancel()  # the step never ends: only the deadline ends the wait
    assert scope.cancelled_caught
    assert engine.call_names() == ["pause", "resume"]


# -- errors at close ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_failing_abort_at_close_does_not_mask_the_cause(mode: SyncMode) -> None:
    engine = RollbackEngine(fail_at={"load": "error", "abort": "error"}, fail_load_at=1)
    load = Load(engine, mode=mode)
    error = await run_expecting_failure(load, buckets())
    load_error, abort_error = engine.raised
    assert error.__cause__ is load_error
    assert load.report.abort_error == f"EngineError: {abort_error}"
    assert not engine.paused
    assert await engine.version() == 0


@pytest.mark.parametrize("mode", MODES)
async def test_hanging_abort_times_out_and_generation_resumes(mode: SyncMode) -> None:
    engine = RollbackEngine(fail_at={"load": "error", "abort": "hang"})
    load = Load(engine, mode=mode, timeout_s=0.1)
    error = await run_expecting_failure(load, buckets())
    assert error.__cause__ is engine.raised[0]
    assert load.report.abort_error is not None
    assert "abort did not answer within 0.1 s" in load.report.abort_error
    assert engine.call_names()[-1] == ("abort" if mode == "in_flight" else "resume")
    assert not engine.paused


@pytest.mark.parametrize("mode", PAUSING)
async def test_failed_resume_at_close_is_reported_after_the_abort(mode: SyncMode) -> None:
    engine = RollbackEngine(fail_at={"resume": "error"})
    load = Load(engine, mode=mode)
    error = await run_expecting_failure(load, buckets()[:2])  # no last bucket: flush fails
    assert error.phase == "flush"
    assert engine.call_names()[-2:] == ["abort", "resume"]
    assert await engine.version() == 0
    assert load.report.aborted


@pytest.mark.parametrize("mode", PAUSING)
async def test_failed_resume_after_commit_is_reported(mode: SyncMode) -> None:
    engine = RollbackEngine(fail_at={"resume": "error"})
    load = Load(engine, mode=mode)
    error = await run_expecting_failure(load, buckets())
    assert error.stage == "load"
    assert error.__cause__ is engine.raised[0]
    assert load.report.committed  # the weights did change; the error says generation did not
    assert "abort" not in engine.call_names()


@pytest.mark.parametrize("mode", MODES)
async def test_stream_without_last_bucket_is_not_committed(mode: SyncMode) -> None:
    engine = RollbackEngine()
    error = await run_expecting_failure(Load(engine, mode=mode), buckets()[:2])
    assert error.phase == "flush"
    assert "without one marked is_last" in str(error)
    assert engine.call_names() == expected_calls(mode, "begin", "load", "load", "abort")
    assert not engine.paused


async def test_empty_stream_is_an_error_without_engine_calls() -> None:
    engine = RollbackEngine()
    with pytest.raises(StageError, match="no buckets"):
        await run(Load(engine, mode="in_flight"), [])
    assert engine.calls == []


# -- cancellation ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_cancellation_mid_sync_aborts_and_resumes(mode: SyncMode) -> None:
    engine = RollbackEngine()
    gate = FakeGate(hold_at=1)
    load = Load(engine, mode=mode)
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as group:
            group.start_soon(run, load, buckets(), gate)
            await gate.reached.wait()
            scope.cancel()
    assert scope.cancelled_caught
    assert engine.call_names() == expected_calls(mode, "begin", "load", "abort")
    assert await engine.version() == 0
    assert not engine.paused
    assert load.report.aborted


@pytest.mark.parametrize("mode", MODES)
async def test_cancelled_engine_call_is_aborted_and_the_engine_released(mode: SyncMode) -> None:
    engine = RollbackEngine(fail_at={"load": "hang"}, fail_load_at=1)
    load = Load(engine, mode=mode)
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as group:
            group.start_soon(run, load, buckets())
            await engine.hung.wait()
            scope.cancel()
    assert scope.cancelled_caught
    assert engine.call_names() == expected_calls(mode, "begin", "load", "load", "abort")
    engine.fail_at = {}
    await run(Load(engine, mode=mode), buckets(version=2))  # the engine is free again
    assert await engine.version() == 2


# -- the stream's checks ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "message"),
    [
        pytest.param([buckets()[1]], "arrived in position 0", id="out-of-order"),
        pytest.param(buckets(version=2), "does not belong to the sync of v1", id="wrong-version"),
        pytest.param([("w", torch.zeros(1))], "put Fetch before it", id="not-a-bucket"),
    ],
)
async def test_bad_streams_are_refused(source: list[object], message: str) -> None:
    engine = RollbackEngine()
    with pytest.raises(StageError, match=message):
        await run(Load(engine, version=1), source)
    assert await engine.version() == 0
    assert not engine.paused


async def test_bucket_after_the_committed_last_one_is_refused() -> None:
    engine = RollbackEngine()
    with pytest.raises(StageError, match="arrived after the last bucket was committed"):
        await run(Load(engine), [*buckets(), buckets()[0]])
    # The sync itself had committed; the stray bucket is refused, not loaded.
    assert await engine.version() == 1
    assert engine.call_names().count("load") == 3
    assert not engine.paused


async def test_mixed_versions_in_one_stream_are_refused() -> None:
    mixed = [buckets(version=1)[0], buckets(version=2)[1], buckets(version=1)[2]]
    engine = RollbackEngine()
    with pytest.raises(StageError, match="bucket 1 of v2"):
        await run(Load(engine), mixed)
    assert ("abort", 1) in engine.calls


async def test_stage_is_reusable_across_syncs() -> None:
    engine = RollbackEngine(fail_at={"commit": "error"})
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


# -- construction: deadlines and names --------------------------------------------------------


async def test_deadline_defaults_to_the_engines_default_timeout() -> None:
    engine = RollbackEngine(fail_at={"commit": "hang"}, default_timeout_s=0.05)
    load = Load(engine, mode="in_flight")
    error = await run_expecting_failure(load, buckets())
    assert "commit did not answer within 0.05 s" in str(error.__cause__)


def test_deadline_falls_back_to_the_base_default_and_an_explicit_one_wins() -> None:
    assert Load(RollbackEngine()).timeout_s == DEFAULT_TIMEOUT_S
    assert Load(RollbackEngine(default_timeout_s=600.0)).timeout_s == 600.0
    assert Load(RollbackEngine(default_timeout_s=600.0), timeout_s=5).timeout_s == 5.0


async def test_two_named_loads_in_one_pipeline_drive_two_engines() -> None:
    first, second = RollbackEngine(), RollbackEngine(fail_at={"load": "error"}, fail_load_at=2)
    loads = [Load(first, name="load_a", mode="in_flight"), Load(second, name="load_b")]
    error = await run_expecting_failure(loads[1], buckets(), loads[0])
    assert error.stage == "load_b"
    # The first engine committed every bucket before the second refused the last one.
    assert await first.version() == 1
    assert await second.version() == 0
    assert ("abort", 1) in second.calls


def test_constructor_rejects_bad_arguments() -> None:
    engine = RollbackEngine()
    with pytest.raises(ValueError, match="sync mode"):
        Load(engine, mode="later")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="pause mode"):
        Load(engine, pause_mode="nap")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeout_s"):
        Load(engine, timeout_s=0)
    with pytest.raises(ValueError, match="engine 'fake': default_timeout_s"):
        Load(RollbackEngine(default_timeout_s=-1.0))
    with pytest.raises(ValueError, match="prefetch_bytes"):
        Load(engine, prefetch_bytes=-1)
    with pytest.raises(ValueError, match="name"):
        Load(engine, name="")


async def test_a_slow_abort_does_not_cut_off_the_resume_after_it() -> None:
    # The pipeline bounds each stage's close; Load's own bound leaves room for an abort
    # and a resume, each under Load's deadline, so generation is resumed.
    engine = RollbackEngine(fail_at={"load": "error", "abort": "hang"})
    load = Load(engine, mode="pause", timeout_s=0.2)
    with pytest.raises(StageError):
        await Pipeline([load], depth=2, close_timeout_s=0.1).run(buckets())
    assert engine.call_names()[-2:] == ["abort", "resume"]
    assert not engine.paused


# -- partial failures on an engine that cannot roll back ---------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_load_failure_after_a_bucket_keeps_a_non_rollback_engine_paused(
    mode: SyncMode,
) -> None:
    engine = FakeEngine(fail_at={"load": "error"}, fail_load_at=1)
    load = Load(engine, mode=mode)
    error = await run_expecting_failure(load, buckets())
    cause = error.__cause__
    assert isinstance(cause, EngineError) and cause.engine_dirty
    assert cause is engine.raised[0]  # the engine's own error, told it left the engine dirty
    assert "left paused and marked dirty" in str(cause)
    assert engine.paused and engine.committed_version == 0
    assert engine.call_names()[-1] != "resume"
    assert load.report.engine_dirty and load.report.left_paused
    assert engine_is_dirty(engine)


async def test_the_next_sync_on_a_dirty_engine_resumes_only_after_its_commit() -> None:
    engine = FakeEngine(fail_at={"commit": "error"})
    await run_expecting_failure(Load(engine, mode="prefetch"), buckets())
    assert engine.paused and engine_is_dirty(engine)
    del engine.fail_at["commit"]
    engine.calls.clear()
    load = Load(engine, mode="prefetch")
    await run(load, buckets(version=2))
    # Already paused: not paused again; resumed once, after the commit.
    assert engine.call_names() == ["begin", "load", "load", "load", "commit", "resume"]
    assert not engine.paused and engine.committed_version == 2
    assert not engine_is_dirty(engine) and not load.report.engine_dirty


async def test_a_failed_sync_on_a_dirty_engine_leaves_it_paused() -> None:
    engine = FakeEngine(fail_at={"load": "error"}, fail_load_at=1)
    await run_expecting_failure(Load(engine), buckets())
    engine.fail_load_at = 0  # the next sync fails before the engine accepted anything
    error = await run_expecting_failure(Load(engine), buckets(version=2))
    assert isinstance(error.__cause__, EngineError)
    assert engine.paused and engine_is_dirty(engine)


async def test_on_partial_failure_resume_resumes_and_warns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine = FakeEngine(fail_at={"load": "error"}, fail_load_at=2)
    load = Load(engine, on_partial_failure="resume")
    error = await run_expecting_failure(load, buckets())
    assert isinstance(error.__cause__, EngineError) and error.__cause__.engine_dirty
    assert not engine.paused
    assert load.report.engine_dirty and not load.report.left_paused
    assert any(
        r.levelname == "WARNING" and "'fake'" in r.getMessage() and "resum" in r.getMessage()
        for r in caplog.records
    )


async def test_failure_before_any_bucket_was_accepted_resumes_a_non_rollback_engine() -> None:
    engine = FakeEngine(fail_at={"load": "error"}, fail_load_at=0)
    load = Load(engine, mode="pause")
    error = await run_expecting_failure(load, buckets())
    assert isinstance(error.__cause__, EngineError) and not error.__cause__.engine_dirty
    assert not engine.paused and not engine_is_dirty(engine)
    assert not load.report.engine_dirty


@pytest.mark.parametrize("mode", MODES)
async def test_upstream_failure_after_a_bucket_marks_a_non_rollback_engine_dirty(
    mode: SyncMode,
) -> None:
    engine = FakeEngine()
    load = Load(engine, mode=mode)
    await run_expecting_failure(load, failing_source())
    assert load.report.engine_dirty and load.report.left_paused
    assert engine.paused and engine.committed_version == 0


def test_unknown_on_partial_failure_is_refused() -> None:
    with pytest.raises(ValueError, match="on_partial_failure"):
        Load(FakeEngine(), on_partial_failure="ignore")  # type: ignore[arg-type]


# -- version checks before the engine is touched ----------------------------------------


@pytest.mark.parametrize(
    ("version", "words"),
    [(True, "must be an int"), ("2", "must be an int"), (-1, ">= 0"), (2.0, "must be an int")],
)
def test_a_bad_version_is_refused_at_construction(version: object, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        Load(RollbackEngine(), version=version)  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("version", [5, 3])
async def test_a_version_not_above_the_engines_is_refused_before_the_engine_is_touched(
    mode: SyncMode, version: int
) -> None:
    engine = RollbackEngine(initial_version=5)
    error = await run_expecting_failure(Load(engine, mode=mode, version=version), buckets(version))
    assert isinstance(error.__cause__, ValueError)
    assert f"version {version} is not greater than the version 5" in str(error.__cause__)
    assert engine.call_names() == []  # version() is a read the fake does not record
    assert engine.committed_version == 5 and not engine.paused


async def test_a_bucket_version_not_above_the_engines_is_refused_without_load_version() -> None:
    engine = RollbackEngine(initial_version=4)
    error = await run_expecting_failure(Load(engine, mode="prefetch"), buckets(version=2))
    assert "version 2 is not greater than the version 4" in str(error.__cause__)
    assert engine.call_names() == []  # version() is a read the fake does not record


async def test_a_dirty_report_sets_the_engine_dirty_gauge() -> None:
    registry = CollectorRegistry()
    metrics = WeightpipeMetrics(registry, engine="fake")
    assert registry.get_sample_value("weightpipe_engine_dirty", {"engine": "fake"}) == 0
    engine = FakeEngine(fail_at={"commit": "error"})
    load = Load(engine)
    await run_expecting_failure(load, buckets())
    metrics.record_sync(
        seconds=0.1, nbytes=0, ok=False, version=0, engine_dirty=load.report.engine_dirty
    )
    assert registry.get_sample_value("weightpipe_engine_dirty", {"engine": "fake"}) == 1
    del engine.fail_at["commit"]
    load = Load(engine)
    await run(load, buckets(version=2))
    metrics.record_sync(
        seconds=0.1, nbytes=1, ok=True, version=2, engine_dirty=load.report.engine_dirty
    )
    assert registry.get_sample_value("weightpipe_engine_dirty", {"engine": "fake"}) == 0


def test_on_partial_failure_comes_from_the_config_through_the_factory() -> None:
    assert load_weightpipe_config().engine.on_partial_failure == "keep_paused"
    config = load_weightpipe_config(overrides=["engine.on_partial_failure=resume"])
    load = build_load(config.engine, FakeEngine(), version=3)
    assert load.on_partial_failure == "resume" and load.version == 3
    with pytest.raises(ConfigError, match=r"engine\.on_partial_failure"):
        load_weightpipe_config(overrides=["engine.on_partial_failure=ignore"])
