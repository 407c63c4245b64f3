"""The engine fault matrix: each call of a sync x each fault, one fault per trial.

SGLang over HTTP (``FaultyHTTPDouble``, SGLang's own decoding, in both server behaviours:
0.5.23 with weight-update sessions, 0.5.12 without): every endpoint a sync calls (the
version query, pause, begin, the first / middle / last bucket, the end of the session, the
flush, the version update, resume) x (success=false with 400, one 500, 500 always, a hang
past Load's deadline, a connection reset, a 200 whose body is not JSON, 401). The local
engine (``FaultyEngine`` around a generating ``LocalEngine``): every protocol call x
(raise, hang past the deadline, an outside cancellation at that call).

Each trial: a clean sync of v1, the faulted sync of v2, then a clean sync of v3.
- A retryable fault (one 500, one reset; and a refused or text-answered flush, which
  SGLang answers while requests run) is absorbed: v2 commits, with v2's weights.
- Any other fails the sync: the engine reports v1; if the engine had accepted a bucket or
  been sent the commit and cannot roll back (SGLang) it is dirty and kept paused, else
  nothing of v2 was applied and generation runs; the session is closed whenever the
  server answered the abort's close (the client never believes a session closed that is
  open). A failed resume comes after the commit: v2 is served, and the resume is retried.
- v3 then commits, generation runs, nothing is dirty, no session is open.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Literal, get_args

import anyio
import pytest
import torch

from tests.fakes.faults import ENGINE_CALLS, STAGE_FAULTS, EngineCallName, FaultyEngine, StageFault
from tests.fakes.local import local_engine, new_weights
from tests.fakes.sglang_faults import (
    HTTP_FAULTS,
    IN_PROCESS_FAULTS,
    MATRIX_NAMES,
    MATRIX_SHAPE,
    RETRYABLE,
    FaultyFakeSGLangEngine,
    FaultyHTTPDouble,
    HTTPFault,
    InProcessFault,
    matrix_buckets,
    serves,
)
from weightpipe.pipeline import Pipeline, StageError
from weightpipe.stages.engines.sglang.http import SGLangHTTPEngine
from weightpipe.stages.engines.sglang.inprocess import SGLangEngine
from weightpipe.stages.fetch import Fetch
from weightpipe.stages.load import Load, engine_is_dirty
from weightpipe.stages.sync import sync_weights

TIMEOUT_S = 0.5
"""Load's deadline per engine call: how long a hang lasts."""

Behaviour = Literal["0.5.23", "0.5.12"]

# -- SGLang over HTTP ---------------------------------------------------------------------

HTTPCall = Literal[
    "version query",
    "pause",
    "begin",
    "load first",
    "load middle",
    "load last",
    "end of session",
    "version update",
    "resume",
]
HTTP_CALLS: tuple[HTTPCall, ...] = get_args(HTTPCall)
NOT_CALLED: dict[Behaviour, frozenset[HTTPCall]] = {
    "0.5.23": frozenset(),
    "0.5.12": frozenset({"begin", "end of session", "version update"}),
}
"""Calls a sync does not make on that server: 0.5.12 has no sessions, and its last update
carries the weight version. On both, the last update carries the cache flush, so there is
no separate flush call to fail: a fault there is the last bucket's."""
TOUCHES = frozenset({"load middle", "load last", "end of session", "version update"})
"""Calls after which the server holds part of the sync: a failure there leaves it dirty."""


def _path(call: HTTPCall, behave_like: Behaviour) -> tuple[str, int]:
    """The endpoint a call reaches and how many requests to it come first in a sync."""
    if call == "version query":
        return ("/model_info" if behave_like == "0.5.23" else "/get_model_info", 0)
    if call.startswith("load"):
        return (
            "/update_weights_from_tensor",
            ("load first", "load middle", "load last").index(call),
        )
    return {
        "pause": ("/pause_generation", 0),
        "begin": ("/begin_weight_update", 0),
        "end of session": ("/end_weight_update", 0),
        "version update": ("/update_weight_version", 0),
        "resume": ("/continue_generation", 0),
    }[call]


SPEC = {name: (MATRIX_SHAPE, torch.bfloat16) for name in MATRIX_NAMES}


def _serves(server: FaultyHTTPDouble, version: int) -> bool:
    return serves(server.weights, version)


def _http_trials() -> Iterator[object]:
    for behave_like in ("0.5.23", "0.5.12"):
        for call in HTTP_CALLS:
            if call in NOT_CALLED[behave_like]:
                continue
            for fault in HTTP_FAULTS:
                yield pytest.param(behave_like, call, fault, id=f"{behave_like}-{call}-{fault}")


async def _http_sync(engine: SGLangHTTPEngine, version: int) -> Load:
    load = Load(engine, mode="pause", version=version, timeout_s=TIMEOUT_S)
    await Pipeline([load]).run(matrix_buckets(version))
    return load


@pytest.mark.parametrize(("behave_like", "call", "fault"), list(_http_trials()))
async def test_http_fault(behave_like: Behaviour, call: HTTPCall, fault: HTTPFault) -> None:
    spec = SPEC
    with FaultyHTTPDouble(spec, behave_like=behave_like) as server:
        async with SGLangHTTPEngine(server.url, retries=3, backoff_s=0) as engine:
            await _http_sync(engine, 1)
            tasks_before = set(asyncio.all_tasks())
            path, skip = _path(call, behave_like)
            server.inject(path, fault, skip=skip)
            load = Load(engine, mode="pause", version=2, timeout_s=TIMEOUT_S)
            error: StageError | None = None
            with anyio.fail_after(10 * TIMEOUT_S + 5):
                try:
                    await Pipeline([load]).run(matrix_buckets(2))
                except StageError as exc:
                    error = exc
            fired = server.fired(path)
            server.clear()
            assert fired, f"the fault on {path} never fired"
            absorbed = fault in RETRYABLE
            report = load.report
            if absorbed:
                assert error is None
                assert server.weight_version == "2"
                assert _serves(server, 2)
                assert server.paused is None
            elif call == "resume":
                # after the commit: v2 is served; close retried the resume
                assert error is not None
                assert server.weight_version == "2"
                assert _serves(server, 2)
                assert not engine_is_dirty(engine)
                assert (server.paused is None) == (fault not in ("500_always", "hang"))
            else:
                assert error is not None, "the sync committed despite the fault"
                assert server.weight_version == "1"
                # a load without an answer (a timeout, a 200 that is not SGLang's JSON) may
                # have been carried out: it touched the engine
                unanswered = call == "load first" and fault in ("hang", "non_json")
                dirty = call in TOUCHES or unanswered
                assert report.engine_dirty == dirty
                assert engine_is_dirty(engine) == dirty
                assert (
                    getattr(error, "engine_dirty", False)
                    or getattr(error.__cause__, "engine_dirty", False) == dirty
                )
                if dirty:
                    assert report.left_paused
                    assert server.paused == "retract"
                elif not unanswered:
                    assert _serves(server, 1)  # nothing of v2 reached the server
                    assert server.paused is None
            assert engine.session_is_open() or not server.session_open
            if fault not in ("500_always", "hang") or call != "end of session":
                assert not server.session_open
            assert set(asyncio.all_tasks()) == tasks_before

            await _http_sync(engine, 3)
            assert server.weight_version == "3"
            assert _serves(server, 3)
            assert server.paused is None
            assert not server.session_open
            assert not engine_is_dirty(engine)


@pytest.mark.parametrize(
    "fault",
    [
        pytest.param(
            "applied_then_hang",
        ),
        pytest.param(
            "applied_then_reset",
        ),
    ],
)
@pytest.mark.parametrize("behave_like", ["0.5.23", "0.5.12"])
async def test_http_lost_answer_on_the_first_bucket(
    behave_like: Behaviour, fault: HTTPFault
) -> None:
    # The server applied the first bucket of v2, then its answer was lost.
    spec = SPEC
    with FaultyHTTPDouble(spec, behave_like=behave_like) as server:
        async with SGLangHTTPEngine(server.url, retries=3, backoff_s=0) as engine:
            await _http_sync(engine, 1)
            server.inject("/update_weights_from_tensor", fault)
            load = Load(engine, mode="pause", version=2, timeout_s=TIMEOUT_S)
            error: StageError | None = None
            with anyio.fail_after(10 * TIMEOUT_S + 5):
                try:
                    await Pipeline([load]).run(matrix_buckets(2))
                except StageError as exc:
                    error = exc
            assert server.fired("/update_weights_from_tensor")
            server.clear()
            if fault == "applied_then_reset":  # retried: the same bucket again, harmless
                assert error is None
                assert _serves(server, 2)
            else:
                assert error is not None
                assert server.weight_version == "1"
                assert not _serves(server, 1)  # the first bucket of v2 is in
                assert load.report.engine_dirty
                assert server.paused == "retract"
            await _http_sync(engine, 3)
            assert _serves(server, 3)
            assert server.paused is None


# -- SGLang in-process --------------------------------------------------------------------

IN_PROCESS_CALLS: dict[str, tuple[str, int]] = {
    "pause": ("pause_generation", 0),
    "begin": ("begin_weight_update", 0),
    "load first": ("update_weights_from_tensor", 0),
    "load middle": ("update_weights_from_tensor", 1),
    "load last": ("update_weights_from_tensor", 2),
    "end of session": ("end_weight_update", 0),
    "resume": ("continue_generation", 0),
}
"""The in-process engine's calls and the ``sglang.Engine`` method each reaches (its
version is kept by the adapter: no call to fail)."""


def _paused(fake: FaultyFakeSGLangEngine) -> bool:
    marks = [c for c in fake.calls if c.startswith("pause") or c == "continue"]
    return bool(marks) and marks[-1] != "continue"


def _fake_serves(fake: FaultyFakeSGLangEngine, version: int) -> bool:
    return serves(fake.weights, version)


@pytest.mark.parametrize(
    ("call", "fault"),
    [
        (call, fault)
        for call in IN_PROCESS_CALLS
        for fault in IN_PROCESS_FAULTS
        # pause and continue answer nothing, so there is no refusal to give: they only raise
        if not (fault == "refuse" and call in ("pause", "resume"))
    ],
)
async def test_in_process_fault(call: str, fault: InProcessFault) -> None:
    fake = FaultyFakeSGLangEngine(SPEC)
    engine = SGLangEngine(fake, retries=3, backoff_s=0)
    load = Load(engine, mode="pause", version=1, timeout_s=10 * TIMEOUT_S)
    await Pipeline([load]).run(matrix_buckets(1))
    method, skip = IN_PROCESS_CALLS[call]
    fake.inject(method, fault, skip=skip)
    load = Load(engine, mode="pause", version=2, timeout_s=10 * TIMEOUT_S)
    with pytest.raises(StageError) as info:
        await Pipeline([load]).run(matrix_buckets(2))
    assert fake.fired
    report = load.report
    if call == "resume":
        assert await engine.version() == 2
        assert _fake_serves(fake, 2)
        assert not _paused(fake)  # close retried the resume
    else:
        assert await engine.version() == 1
        dirty = call in TOUCHES
        assert report.engine_dirty == dirty
        assert (
            getattr(info.value, "engine_dirty", False)
            or getattr(info.value.__cause__, "engine_dirty", False) == dirty
        )
        assert _paused(fake) == dirty
        if not dirty:
            assert _fake_serves(fake, 1)
    assert not fake.session_open
    load = Load(engine, mode="pause", version=3, timeout_s=10 * TIMEOUT_S)
    await Pipeline([load]).run(matrix_buckets(3))
    assert await engine.version() == 3
    assert _fake_serves(fake, 3)
    assert not _paused(fake)
    assert not engine_is_dirty(engine)


HANG_DIRTY = frozenset({"load first", "load middle", "load last", "end of session"})
"""In-process calls whose hang leaves the engine dirty: an update that never answered may
have been applied (it is, once released), and the end of the session was the commit."""


def _sync_threads() -> set[threading.Thread]:
    """Threads other than anyio's worker pool, whose threads idle there once a call ends."""
    return {t for t in threading.enumerate() if t.name != "AnyIO worker thread"}


@pytest.mark.parametrize("call", list(IN_PROCESS_CALLS))
async def test_in_process_hang(call: str) -> None:
    # A hung sglang.Engine method holds its worker thread until it returns (it cannot be
    # interrupted); the adapter keeps one call at a time. The version update is no row:
    # the adapter keeps the version itself, no Engine call is made.
    fake = FaultyFakeSGLangEngine(SPEC)
    engine = SGLangEngine(fake, retries=3, backoff_s=0)
    await Pipeline([Load(engine, mode="pause", version=1, timeout_s=10 * TIMEOUT_S)]).run(
        matrix_buckets(1)
    )
    tasks_before, threads_before = set(asyncio.all_tasks()), _sync_threads()
    method, skip = IN_PROCESS_CALLS[call]
    fake.inject(method, "hang", skip=skip)
    load = Load(engine, mode="pause", version=2, timeout_s=TIMEOUT_S)
    # the sync's calls, then at most an abort and a resume, each under its own deadline
    with anyio.fail_after(3 * TIMEOUT_S + load.close_timeout_s + 5):
        with pytest.raises(StageError) as info:
            await Pipeline([load]).run(matrix_buckets(2))
    assert fake.hung.is_set() and not fake.hang_returned.is_set()
    what = {"pause": "pause(", "load first": "bucket 0", "load middle": "bucket 1"}
    what |= {"load last": "bucket 2", "end of session": "commit"}
    assert f"did not answer within {TIMEOUT_S} s" in str(info.value)
    assert what.get(call, call) in str(info.value)
    report = load.report
    if call == "resume":  # after the commit: v2 is served
        assert await engine.version() == 2
        assert not report.engine_dirty
    else:
        assert await engine.version() == 1
        dirty = call in HANG_DIRTY
        assert report.engine_dirty == dirty
        assert engine_is_dirty(engine) == dirty
        assert report.left_paused == dirty
        if not dirty:
            assert _fake_serves(fake, 1)
    if call not in ("pause", "resume"):  # begun, not committed: the abort waited, then gave up
        assert report.abort_error is not None
        assert "abort did not answer" in report.abort_error
    assert fake.max_at_once == 1  # the abort and the resume waited; nothing raced the hang

    hung_at = len(fake.calls)  # the hung call is recorded when it does its work
    fake.release_hang()
    await anyio.to_thread.run_sync(fake.hang_returned.wait)
    load = Load(engine, mode="pause", version=3, timeout_s=10 * TIMEOUT_S)
    await Pipeline([load]).run(matrix_buckets(3))
    assert await engine.version() == 3
    assert _fake_serves(fake, 3)
    assert not _paused(fake)
    assert not fake.session_open
    assert not engine_is_dirty(engine)
    assert fake.max_at_once == 1
    after = fake.calls[hung_at:]
    assert after[0] == ("pause:retract" if call == "pause" else method.replace("_generation", ""))
    if call in ("pause", "begin"):
        # the resume that waited behind the hung call ran right after it, before v3's pause
        assert after[1:3] == ["continue", "pause:retract"], after
    assert set(asyncio.all_tasks()) == tasks_before
    assert _sync_threads() == threads_before


# -- the local engine ---------------------------------------------------------------------


def _engine_threads() -> list[str]:
    """Threads other than anyio's idle worker pool (a stopped engine has joined its
    staging threads)."""
    return sorted(t.name for t in threading.enumerate() if t.name != "AnyIO worker thread")


@pytest.fixture(scope="module")
def weights() -> dict[int, dict[str, torch.Tensor]]:
    engine = local_engine()
    return {v: new_weights(engine, seed=v) for v in (1, 2, 3)}


def _assert_serves(engine: object, expected: dict[str, torch.Tensor]) -> None:
    for name, tensor in expected.items():
        assert torch.equal(engine.parameter(name), tensor), name  # type: ignore[attr-defined]


@pytest.mark.parametrize("fault", STAGE_FAULTS)
@pytest.mark.parametrize("call", ENGINE_CALLS)
async def test_local_fault(
    call: EngineCallName, fault: StageFault, weights: dict[int, dict[str, torch.Tensor]]
) -> None:
    inner = local_engine()
    engine = FaultyEngine(inner)
    bucket_bytes = 64 << 10
    total = sum(t.nbytes for t in weights[1].values())
    buckets = total // bucket_bytes  # at most Fetch's count: bucket n // 2 is a middle one
    threads_before = _engine_threads()
    async with inner:
        await sync_weights(
            list(weights[1].items()), engine, version=1, stages=[Fetch(bucket_bytes)]
        )
        before = {name: inner.parameter(name) for name in weights[1]}
        engine.arm(call, fault, buckets=buckets)
        error: StageError | None = None
        with anyio.fail_after(10 * TIMEOUT_S + 5), anyio.CancelScope() as scope:
            engine.cancel_scope = scope
            try:
                await sync_weights(
                    list(weights[2].items()),
                    engine,
                    version=2,
                    stages=[Fetch(bucket_bytes)],
                    timeout_s=TIMEOUT_S,
                )
            except StageError as exc:
                error = exc
        assert engine.fired, f"{call} was never made"
        version = await inner.version()
        if call == "resume":
            assert version == 2  # committed before the resume failed
            _assert_serves(inner, weights[2])
        else:
            assert error is not None or scope.cancelled_caught
            assert version == 1
            _assert_serves(inner, before)  # rolled back: nothing of v2 is served
        assert (error is None) == (fault == "cancel")
        assert not inner.paused
        assert not engine_is_dirty(engine)
        await sync_weights(
            list(weights[3].items()), engine, version=3, stages=[Fetch(bucket_bytes)]
        )
        assert await inner.version() == 3
        _assert_serves(inner, weights[3])
        assert not inner.paused
    assert _engine_threads() == threads_before
