"""The engine fault matrix for the distributed adapter, over a real gloo group.

This process is the trainer (rank 0); a spawned process is SGLang's receiving rank
(``SubprocessReceiver``: SGLang's own ``init_custom_process_group`` and
``FlattenedTensorBucket``), one for the module, with a spare process for each trial that
kills it; the control plane is ``FaultyHTTPDouble`` in the 0.5.23 behaviour (the 0.5.12 one
differs only in the control calls, which the HTTP matrix covers). Every HTTP call a sync
of ``SGLangDistributedEngine`` makes x every fault of ``HTTP_FAULTS``, one per trial:

- the control calls, through the control engine's client (retried): the version query,
  pause, begin, the end of the session, the flush (the distributed announcements never
  flush, so commit flushes once), the version update, resume;
- the update group's calls (never retried: each pairs with a rendezvous or a broadcast
  that happens once): the group's init (the faulted sync forms a new group), the
  announcement (``update_weights_from_distributed``) of the first / a middle / the last
  bucket, and the group's destroy (at ``close``, where the engine's side is dropped);
- the receiving rank killed in the middle of the first / a middle / the last bucket's
  broadcast (then replaced, as a supervisor would).

Each trial: a clean sync of v1, the faulted sync of v2 under a short deadline, then a
clean sync of v3. The invariants are the HTTP matrix's:
- a retryable fault of a control call (one 500, one reset; a refused or text-answered
  flush) is absorbed: v2 commits with v2's weights, on the same group;
- any other fails the sync, with one error: the engine reports v1; if the server accepted a
  bucket (or may have: an announcement never answered) or was sent the commit, it is dirty
  and kept paused, else it serves v1 and generates; no session is left open where the
  server answered the abort's close; a failed resume comes after the commit (v2 served);
- a failure around a broadcast leaves the group unusable: v3 builds a new one (name and
  port) and commits; v3 commits in every trial, generating, clean, no session open; no
  task is left.

Two more trials carry buckets larger than the loopback socket buffers, so that a gloo
broadcast nobody receives blocks its sender: the announcement refused and the rank killed
at the second bucket (whose sender's broadcast fails at once: the peer's sockets closed);
the next sync must not wait for the blocked broadcast.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Literal, get_args

import anyio
import pytest
import torch

from tests.fakes.sglang_faults import (
    HTTP_FAULTS,
    MATRIX_NAMES,
    MATRIX_SHAPE,
    RETRYABLE,
    FaultyHTTPDouble,
    HTTPFault,
    matrix_buckets,
    serves,
)
from tests.fakes.sglang_receiver import SubprocessReceiver
from tests.helpers import free_port
from weightpipe.pipeline import Pipeline, StageError
from weightpipe.stages.engines.sglang.distributed import SGLangDistributedEngine
from weightpipe.stages.engines.sglang.http import SGLangHTTPEngine
from weightpipe.stages.load import Load, engine_is_dirty

pytestmark = pytest.mark.slow

GROUP_TIMEOUT_S = 15.0
"""torch's limit on the group's rendezvous and collectives: how long an abandoned gloo
broadcast or rendezvous blocks its thread. The receiving rank is ``ready()`` (torch and
sglang imported) before each group forms, so the rendezvous needs no more."""
DEADLINE_S = 1.5
"""Load's deadline per call in the faulted sync: how long a hang lasts."""
CLEAN_DEADLINE_S = GROUP_TIMEOUT_S
"""Load's deadline in the clean syncs, which form a group (a rendezvous on 2 busy cores)."""

DistributedCall = Literal[
    "version query",
    "pause",
    "init group",
    "begin",
    "load first",
    "load middle",
    "load last",
    "end of session",
    "flush",
    "version update",
    "resume",
    "destroy group",
]
CALLS: tuple[DistributedCall, ...] = get_args(DistributedCall)
GROUP_CALLS = frozenset({"init group", "load first", "load middle", "load last", "destroy group"})
"""The update group's calls: never retried."""
LOADS: tuple[DistributedCall, ...] = ("load first", "load middle", "load last")
TOUCHES = frozenset({"load middle", "load last", "end of session", "flush", "version update"})
"""Calls after which the server holds part of the sync: a failure there leaves it dirty."""
UNANSWERED: frozenset[HTTPFault] = frozenset({"hang", "reset", "non_json"})
"""Faults after which the server may have carried the call out (no SGLang answer came)."""
KILLED_AT = ("first", "middle", "last")


def _path(call: DistributedCall) -> tuple[str, int]:
    """The endpoint a call reaches and how many requests to it come first in the sync."""
    if call in LOADS:
        return "/update_weights_from_distributed", LOADS.index(call)
    return {
        "version query": "/model_info",
        "pause": "/pause_generation",
        "init group": "/init_weights_update_group",
        "begin": "/begin_weight_update",
        "end of session": "/end_weight_update",
        "flush": "/flush_cache",
        "version update": "/update_weight_version",
        "resume": "/continue_generation",
        "destroy group": "/destroy_weights_update_group",
    }[call], 0


def _absorbed(call: DistributedCall, fault: HTTPFault) -> bool:
    """Whether the sync commits despite the fault."""
    if call in GROUP_CALLS:
        return call == "destroy group"  # at close: logged, never a sync's failure
    if call == "flush":  # refused or text-answered while requests run: SGLang's own answers
        return fault in RETRYABLE or fault in ("success_false", "non_json")
    return fault in RETRYABLE


@pytest.fixture(scope="module")
def receiver() -> Iterator[SubprocessReceiver]:
    rank = SubprocessReceiver(spares=len(KILLED_AT) + 1)  # one per killed rank
    try:
        yield rank
    finally:
        rank.close()


@contextlib.asynccontextmanager
async def _distributed(
    receiver: SubprocessReceiver, name: str, shape: tuple[int, ...] = MATRIX_SHAPE
) -> AsyncIterator[tuple[FaultyHTTPDouble, SGLangDistributedEngine]]:
    """A faulty 0.5.23 double holding ``shape``-d weights, wired to ``receiver``, and a
    distributed engine on a fresh port driving it; the engine is closed (hung requests
    released first) on the way out."""
    receiver.ready()
    with FaultyHTTPDouble({n: (shape, torch.bfloat16) for n in MATRIX_NAMES}) as server:
        server.receiver = receiver
        async with SGLangHTTPEngine(server.url, retries=3, backoff_s=0) as control:
            engine = SGLangDistributedEngine(
                control,
                master_address="127.0.0.1",
                master_port=free_port(),
                group_name=f"wp_{name}",
                timeout_s=GROUP_TIMEOUT_S,
            )
            try:
                yield server, engine
            finally:
                server.clear()
                with anyio.fail_after(CLEAN_DEADLINE_S):
                    await engine.close()


async def _sync(
    engine: SGLangDistributedEngine,
    version: int,
    *,
    deadline_s: float = CLEAN_DEADLINE_S,
    shape: tuple[int, ...] = MATRIX_SHAPE,
) -> Load:
    load = Load(engine, mode="pause", version=version, timeout_s=deadline_s)
    await Pipeline([load]).run(matrix_buckets(version, shape))
    return load


async def _failing_sync(
    engine: SGLangDistributedEngine, version: int, shape: tuple[int, ...] = MATRIX_SHAPE
) -> tuple[Load, StageError | None]:
    """A sync of ``version`` under ``DEADLINE_S``: its Load and its error (None if it
    committed). Bounded: its calls, then an abort and a resume under their deadlines."""
    load = Load(engine, mode="pause", version=version, timeout_s=DEADLINE_S)
    with anyio.fail_after(load.close_timeout_s + 12 * DEADLINE_S):
        try:
            await Pipeline([load]).run(matrix_buckets(version, shape))
        except StageError as exc:
            return load, exc
    return load, None


def _assert_failed_cleanly(
    server: FaultyHTTPDouble, load: Load, error: StageError | None, *, dirty: bool
) -> None:
    """The faulted sync failed: v1 reported, dirty and paused exactly when told."""
    assert error is not None, "the sync committed despite the fault"
    assert server.weight_version == "1"
    assert load.report.engine_dirty == dirty
    assert engine_is_dirty(load.engine) == dirty
    assert (
        getattr(error, "engine_dirty", False)
        or getattr(error.__cause__, "engine_dirty", False) == dirty
    )
    assert load.report.left_paused == dirty
    assert server.paused == ("retract" if dirty else None)


async def _assert_next_sync_commits(
    server: FaultyHTTPDouble, engine: SGLangDistributedEngine
) -> None:
    await _sync(engine, 3)
    assert server.weight_version == "3"
    assert serves(server.weights, 3)
    assert server.paused is None
    assert not server.session_open
    assert not engine_is_dirty(engine)


def _trials() -> Iterator[object]:
    for call in CALLS:
        for fault in HTTP_FAULTS:
            yield pytest.param(call, fault, id=f"{call}-{fault}")


@pytest.mark.parametrize(("call", "fault"), list(_trials()))
async def test_distributed_fault(
    receiver: SubprocessReceiver, call: DistributedCall, fault: HTTPFault
) -> None:
    async with _distributed(receiver, f"{call.replace(' ', '_')}_{fault}") as (server, engine):
        await _sync(engine, 1)
        if call == "init group":  # the faulted sync forms the group anew
            await engine.close()
        first_group = (engine.group_name, engine.master_port)
        tasks_before = set(asyncio.all_tasks())
        path, skip = _path(call)
        server.inject(path, fault, skip=skip)
        if call == "destroy group":
            await _sync(engine, 2, deadline_s=DEADLINE_S)
            with anyio.fail_after(3 * DEADLINE_S):
                await engine.close()  # the engine's refusal is logged, never raised
            assert server.fired(path)
            server.clear()
            assert server.weight_version == "2"
            await _assert_next_sync_commits(server, engine)
            # the engine may still hold the old group: never reused
            assert (engine.group_name, engine.master_port) != first_group
            return
        load, error = await _failing_sync(engine, 2)
        assert server.fired(path), f"the fault on {path} never fired"
        server.clear()
        if _absorbed(call, fault):
            assert error is None
            assert server.weight_version == "2"
            assert serves(server.weights, 2)
            assert server.paused is None
            assert (engine.group_name, engine.master_port) == first_group
        elif call == "resume":
            # after the commit: v2 is served; close retried the resume
            assert error is not None
            assert server.weight_version == "2"
            assert serves(server.weights, 2)
            assert not engine_is_dirty(engine)
            assert (server.paused is None) == (fault not in ("500_always", "hang"))
        else:
            unanswered = call == "load first" and fault in UNANSWERED
            dirty = call in TOUCHES or unanswered
            _assert_failed_cleanly(server, load, error, dirty=dirty)
            if not dirty:
                assert serves(server.weights, 1)  # nothing of v2 reached the server
        assert engine.control.client.session_open or not server.session_open
        if fault not in ("500_always", "hang") or call != "end of session":
            assert not server.session_open
        assert set(asyncio.all_tasks()) == tasks_before
        await _assert_next_sync_commits(server, engine)
        if call in LOADS:  # the broadcast's peers disagree: the group was rebuilt
            assert (engine.group_name, engine.master_port) != first_group


@pytest.mark.parametrize("at", KILLED_AT)
async def test_distributed_rank_killed(receiver: SubprocessReceiver, at: str) -> None:
    async with _distributed(receiver, f"killed_{at}") as (server, engine):
        await _sync(engine, 1)
        first_group = (engine.group_name, engine.master_port)
        tasks_before = set(asyncio.all_tasks())
        receiver.die_at_receive(KILLED_AT.index(at) + 1)
        load, error = await _failing_sync(engine, 2)
        _assert_failed_cleanly(server, load, error, dirty=at != "first")
        assert "died" in str(error) or "broadcasting" in str(error)
        assert not server.session_open
        assert set(asyncio.all_tasks()) == tasks_before
        receiver.restart()  # the supervisor's new rank: it knows no group
        receiver.ready()
        await _assert_next_sync_commits(server, engine)
        assert (engine.group_name, engine.master_port) != first_group


BIG_SHAPE = (4096, 2048)
"""16 MiB of bf16 per tensor: more than the loopback socket buffers hold, so a gloo
broadcast nobody receives blocks its sender (a small one completes)."""


@pytest.mark.parametrize("fault", ["announcement_refused", "rank_killed"])
async def test_blocked_broadcast_does_not_hold_up_the_next_sync(
    receiver: SubprocessReceiver, fault: str
) -> None:
    async with _distributed(receiver, f"blocked_{fault}", BIG_SHAPE) as (server, engine):
        await _sync(engine, 1, shape=BIG_SHAPE)
        first_group = (engine.group_name, engine.master_port)
        if fault == "announcement_refused":
            server.inject("/update_weights_from_distributed", "success_false", skip=1)
        else:
            receiver.die_at_receive(2)
        load, error = await _failing_sync(engine, 2, BIG_SHAPE)
        # The refusal or the dead rank failed the sync, not Load's deadline.
        assert error is not None
        assert ("injected refusal" if fault == "announcement_refused" else "died") in str(error)
        _assert_failed_cleanly(server, load, error, dirty=True)  # the first bucket was taken
        assert not server.session_open
        server.clear()
        if fault == "rank_killed":
            receiver.restart()
            receiver.ready()
        # A new group (name and port) formed within the deadline: the sync did not wait
        # behind the old group's blocked broadcast.
        await _sync(engine, 3, deadline_s=GROUP_TIMEOUT_S / 2, shape=BIG_SHAPE)
        assert (engine.group_name, engine.master_port) != first_group
        assert server.weight_version == "3"
        assert serves(server.weights, 3, BIG_SHAPE)
        assert server.paused is None
        assert not engine_is_dirty(engine)
        assert not server.session_open
