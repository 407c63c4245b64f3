"""The pipeline fault matrix: every position x phase x fault, one fault per trial.

Positions: the source, the first stage (its work in a worker thread, like Fetch), a middle
stage with two workers (the parallel path), the last stage, the ``sink`` callable. Phases:
open; process at the first, a middle and the last item; flush; close (the source's open is
its first ``__anext__``, its flush the call that ends the stream, its close ``aclose``;
the sink has only items). Faults: raise; hang until cancelled (the test cancels once the
fake says it is hanging, an event, not a sleep; a close is shielded, so its hang ends at
the pipeline's ``close_timeout_s``); an outside cancellation landing right at that point.

Every trial, under a deadline it must not reach:
- ``raise``: exactly one ``StageError`` (never a group) naming the stage, phase and item,
  the injected error its cause; ``hang`` and ``cancel``: the cancellation propagates (the
  scope catches it, nothing else escapes), except a hung close: ``StageError`` (close);
- no task is left on the loop and no worker thread still runs stage code;
- every stage whose open returned is closed exactly once, and one whose open did not is
  never closed; the source is closed exactly once once it was started;
- no pooled buffer (``LeasePool``, BufferPool's rule) is still held once the error is
  dropped.

A sync source blocked inside ``next()`` (which no cancellation can interrupt) still lets
the caller's cancellation end the run at once; its thread closes the source afterwards.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import anyio
import anyio.to_thread
import pytest

from tests.fakes.faults import (
    PHASES,
    STAGE_FAULTS,
    FaultPoint,
    FaultySink,
    FaultySource,
    FaultyStage,
    InjectedFault,
    LeasePool,
    Phase,
    StageFault,
)
from weightpipe.pipeline import Pipeline, StageError

ITEMS = 5
DEADLINE_S = 10.0
"""The trial's own deadline: never reached unless the pipeline hangs (a failure)."""
CLOSE_TIMEOUT_S = 0.05
"""The pipeline's bound on each close: how a hung close ends."""

STAGES = ("first", "middle", "last")
POSITIONS = ("source", *STAGES, "sink")


def _trials() -> list[tuple[str, Phase, StageFault]]:
    trials = []
    for where in POSITIONS:
        phases = ("first", "middle", "last") if where == "sink" else PHASES
        for phase in phases:
            for fault in STAGE_FAULTS:
                trials.append((where, phase, fault))
    return trials


@dataclass
class Outcome:
    error: tuple[str, str, str | None, type[BaseException]] | None
    """(stage, phase, item, type of the cause) of the StageError raised, if any."""
    escaped: str | None
    """The type of any other exception that left the trial's scope."""
    cancelled: bool


async def _trial(
    point: FaultPoint, source: FaultySource, pipeline: Pipeline, sink: FaultySink
) -> Outcome:
    error = None
    escaped = None
    with anyio.fail_after(DEADLINE_S), anyio.CancelScope() as scope:
        point.scope = scope
        async with anyio.create_task_group() as group:
            if point.fault == "hang":

                async def cancel_when_hanging() -> None:
                    await point.reached.wait()
                    scope.cancel()

                group.start_soon(cancel_when_hanging)
            try:
                await pipeline.run(source, sink=sink)
            except StageError as exc:
                cause = exc.__cause__
                assert cause is not None
                error = (exc.stage, exc.phase, exc.item, type(cause))
            except Exception as exc:  # pragma: no cover - reported by the assertions
                escaped = type(exc).__name__
            finally:
                group.cancel_scope.cancel()
    return Outcome(error, escaped, scope.cancelled_caught)


def _expected_error(where: str, phase: Phase) -> tuple[str, str, str | None]:
    index = {"first": 1, "middle": ITEMS // 2 + 1, "last": ITEMS}.get(phase)
    if where == "source":
        # the source's close runs as its stream ends, inside the call that ends it
        produced = {"open": 0, "flush": ITEMS, "close": ITEMS}.get(phase, (index or 1) - 1)
        return ("source", "source", f"after {produced} items")
    if where == "sink":
        return ("sink", "sink", f"lease {index}")
    if phase in ("open", "close", "flush"):
        return (where, phase, None)
    return (where, "process", f"item {index} (lease {index})")


@pytest.mark.parametrize(("where", "phase", "fault"), _trials(), ids=str)
async def test_one_fault(where: str, phase: Phase, fault: StageFault) -> None:
    point = FaultPoint(where, phase, fault, items=ITEMS)
    pool = LeasePool()
    source = FaultySource(point, pool, close_timeout_s=CLOSE_TIMEOUT_S)
    stages = [
        FaultyStage("first", point, in_thread=True),
        FaultyStage("middle", point, workers=2),
        FaultyStage("last", point),
    ]
    sink = FaultySink(point)
    pipeline = Pipeline(stages, depth=2, close_timeout_s=CLOSE_TIMEOUT_S)
    tasks_before = set(asyncio.all_tasks())

    outcome = await _trial(point, source, pipeline, sink)

    assert point.reached.is_set(), "the fault was never reached"
    assert outcome.escaped is None
    if fault == "raise":
        expected = _expected_error(where, phase)
        assert outcome.error == (*expected, InjectedFault)
    elif fault == "hang" and phase == "close":
        # shielded, so the trial's cancellation waits; the close's own bound ends it
        expected = _expected_error(where, phase)
        assert outcome.error == (*expected, TimeoutError)
    else:
        assert outcome.error is None
    assert set(asyncio.all_tasks()) == tasks_before
    for stage in stages:
        assert stage.threads_busy == 0
        assert stage.opens <= 1, stage.name
        assert stage.closes == stage.opened, stage.name
    assert source.closes == (1 if source.started else 0)
    assert pool.checked_out() == []


@pytest.mark.parametrize("phase", ["first", "middle", "last"])
async def test_sync_source_blocked_in_next_honours_the_callers_cancellation(phase: Phase) -> None:
    # A sync generator blocked inside next() (a collective, a disk read) cannot be
    # interrupted; the caller's cancellation must still end the run at once, and the
    # source must be closed (its finally run) by its thread once next() returns.
    block_at = {"first": 1, "middle": ITEMS // 2 + 1, "last": ITEMS}[phase]
    entered, release, closed = threading.Event(), threading.Event(), threading.Event()

    def source() -> Iterator[int]:
        try:
            for index in range(1, ITEMS + 1):
                if index == block_at:
                    entered.set()
                    release.wait(DEADLINE_S)
                yield index
        finally:
            closed.set()

    stage = FaultyStage("first", FaultPoint("nowhere", "open", "raise", items=ITEMS))
    with anyio.fail_after(DEADLINE_S), anyio.CancelScope() as scope:
        async with anyio.create_task_group() as group:

            async def cancel_when_blocked() -> None:
                await anyio.to_thread.run_sync(entered.wait, DEADLINE_S)
                scope.cancel()

            group.start_soon(cancel_when_blocked)
            await Pipeline([stage]).run(source())
    assert scope.cancelled_caught
    assert not release.is_set()  # the run ended while the source was still blocked
    assert not closed.is_set()
    assert stage.closes == stage.opened == 1
    release.set()
    assert await anyio.to_thread.run_sync(closed.wait, DEADLINE_S)
