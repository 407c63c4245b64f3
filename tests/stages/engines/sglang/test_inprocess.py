"""SGLangEngine (in-process ``sglang.Engine``) against FakeSGLangEngine.

The real Engine cannot start here (no GPU build of its kernels), so the adapter is tested
against a named fake whose methods are checked, parameter by parameter, against the
installed sglang's ``Engine`` source, and whose decoding is SGLang's own code. Every sync
runs through the Load stage (``drive``). Also covers the lazy import and its message,
sessions by capability (0.5.23) and without (0.5.12), errors naming the tensor, retries of
a refused flush only, a failed ``end_weight_update`` closed by the abort that follows,
timeouts with one Engine call at a time even after one was abandoned, and the version
staying old on every failure.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import sys
import threading
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch

from tests.fakes.sglang_engine import (
    FakePausableSGLangEngine,
    FakeSGLangEngine,
    FakeSGLangEngine0512,
    FakeSGLangModule,
)
from tests.fakes.sglang_faults import FaultyFakeSGLangEngine
from tests.stages.engines.sglang.drive import WaitRecordingEvent, failed_sync, load_sync
from weightpipe.pipeline import Pipeline, StageError
from weightpipe.stages.bucket import WeightBucket
from weightpipe.stages.engines.base import Engine, EngineError
from weightpipe.stages.engines.sglang.inprocess import SGLangEngine, import_sglang
from weightpipe.stages.fetch import Fetch
from weightpipe.stages.load import Load
from weightpipe.stages.sync import sync_weights


def _model() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [
        ("model.norm.weight", torch.randn(5, generator=g).to(torch.bfloat16)),
        (
            "model.layers.0.self_attn.q_proj.weight",
            torch.randn(6, 8, generator=g).to(torch.float8_e4m3fn),
        ),
        ("model.layers.0.self_attn.q_proj.weight_scale_inv", torch.rand(1, 1, generator=g)),
    ]


def _spec() -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {n: (tuple(t.shape), t.dtype) for n, t in _model()}


def _bucket(version: int, tensors: list[tuple[str, torch.Tensor]] | None = None) -> WeightBucket:
    return WeightBucket(tuple(_model() if tensors is None else tensors), 0, True, version)


def _engine_methods() -> dict[str, ast.FunctionDef]:
    spec = importlib.util.find_spec("sglang.srt.entrypoints.engine")
    assert spec is not None
    assert spec.origin is not None
    tree = ast.parse(Path(spec.origin).read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Engine")
    return {n.name: n for n in cls.body if isinstance(n, ast.FunctionDef)}


@pytest.mark.parametrize(
    "method",
    [
        "begin_weight_update",
        "end_weight_update",
        "update_weights_from_tensor",
        "flush_cache",
        "get_model_info",
        "shutdown",
        "init_weights_update_group",
        "update_weights_from_distributed",
        "destroy_weights_update_group",
    ],
)
def test_fake_follows_the_real_engine_signatures(method: str) -> None:
    # Read from the installed engine.py (importing it needs uvloop and GPU-only deps).
    real = _engine_methods()[method]
    params = [a.arg for a in real.args.args]
    defaults = [ast.literal_eval(d) for d in real.args.defaults]
    fake = inspect.signature(getattr(FakeSGLangEngine, method))
    assert list(fake.parameters) == params
    fake_defaults = [
        p.default for p in fake.parameters.values() if p.default is not inspect.Parameter.empty
    ]
    assert fake_defaults == defaults


def test_adapter_calls_only_methods_the_real_engine_has() -> None:
    real = _engine_methods()
    for name in ("begin_weight_update", "end_weight_update", "update_weights_from_tensor"):
        assert name in real
    assert "pause_generation" not in real  # hence pause/resume are no-ops in-process


def test_satisfies_protocol() -> None:
    assert isinstance(SGLangEngine(FakeSGLangEngine(_spec())), Engine)


@pytest.mark.parametrize("load_format", ["flattened_bucket", "named_tensors"])
async def test_sync_bit_identical(load_format: str) -> None:
    fake = FakeSGLangEngine(_spec(), tp_size=2)
    engine = SGLangEngine(fake, tp_size=2, load_format=load_format)  # type: ignore[arg-type]
    assert await engine.version() is None
    report = await load_sync(engine, [_bucket(4)])
    assert report.committed
    assert await engine.version() == 4
    assert fake.calls == [
        "begin_weight_update",
        "update_weights_from_tensor",  # the sync's last update carries the flush
        "end_weight_update",
    ]
    assert fake.flush_cache_args == [True]
    for name, sent in _model():
        assert torch.equal(fake.weights[name].view(torch.uint8), sent.view(torch.uint8)), name


async def test_cuda_work_is_waited_for_off_the_loop_before_the_update() -> None:
    # SGLang's scheduler reads CUDA-IPC handles on its own streams: the bucket's ready
    # event must be waited on before the update, and in a worker thread, not on the loop.
    fake = FakeSGLangEngine(_spec())
    event = WaitRecordingEvent(lambda: fake.calls.count("update_weights_from_tensor"))
    engine = SGLangEngine(fake)
    bucket = _bucket(1)
    await load_sync(engine, [bucket.with_tensors(bucket.tensors, ready=event)])
    assert event.host_waits == 1
    ((thread, updates_before),) = event.waits
    assert thread != threading.get_ident()
    assert updates_before == 0
    assert await engine.version() == 1


async def test_no_sessions_on_0512_engine() -> None:
    fake = FakeSGLangEngine0512(_spec())
    engine = SGLangEngine(fake)
    await load_sync(engine, [_bucket(1)])
    assert fake.calls == ["update_weights_from_tensor"]  # the flush folded into it
    assert fake.flush_cache_args == [True]
    assert await engine.version() == 1


async def test_only_the_last_update_of_a_sync_flushes() -> None:
    fake = FakeSGLangEngine(_spec())
    engine = SGLangEngine(fake)
    tensors = _model()
    buckets = [
        WeightBucket((tensors[0],), index=0, is_last=False, version=1),
        WeightBucket(tuple(tensors[1:]), index=1, is_last=True, version=1),
    ]
    load = Load(engine, mode="prefetch", prefetch_bytes=None)
    await Pipeline([load], depth=2).run(buckets)
    report = load.report
    assert report.committed
    assert fake.flush_cache_args == [False, True]
    kinds = [call.kind for call in report.calls]
    assert kinds.index("pause") > max(i for i, k in enumerate(kinds) if k == "prepare")


async def test_session_off_against_0523_is_refused_clearly() -> None:
    engine = SGLangEngine(FakeSGLangEngine(_spec()), session="off")
    error, _ = await failed_sync(engine, [_bucket(1)])
    assert "must run between begin_weight_update" in str(error)
    assert await engine.version() is None


async def test_refusal_names_the_tensor_and_keeps_the_version() -> None:
    fake = FakeSGLangEngine(_spec())
    engine = SGLangEngine(fake, initial_version=3)
    bad = [("model.layers.0.self_attn.q_proj.weight", torch.zeros(6, 8))]
    error, _ = await failed_sync(engine, [_bucket(4, bad)])
    assert "expects (6, 8) torch.float8_e4m3fn" in str(error)
    assert error.tensor == "model.layers.0.self_attn.q_proj.weight"
    assert not error.retryable
    assert fake.calls.count("update_weights_from_tensor") == 1  # a refusal is not retried
    assert await engine.version() == 3
    assert not fake.session_open


async def test_unknown_name_and_engine_exception() -> None:
    fake = FakeSGLangEngine(_spec())
    engine = SGLangEngine(fake)
    error, _ = await failed_sync(engine, [_bucket(1, [("nope.weight", torch.zeros(1))])])
    assert "is not a parameter" in str(error)
    assert error.tensor == "nope.weight"
    fake.raise_next = RuntimeError("CUDA error: an illegal memory access")
    error, _ = await failed_sync(SGLangEngine(fake), [_bucket(2)])
    assert "begin_weight_update raised RuntimeError: CUDA" in str(error)
    assert not error.retryable
    assert await engine.version() is None


async def test_flush_refused_at_commit_is_retried_and_keeps_the_version() -> None:
    fake = FakeSGLangEngine(_spec(), running_requests=1)
    engine = SGLangEngine(fake, initial_version=0, retries=2, backoff_s=0)
    # paused in retract (here a no-op: the Engine has no pause API), nothing would run
    error, report = await failed_sync(engine, [_bucket(1)], mode="prefetch")
    assert "flush_cache failed: requests are running; gave up after 3 attempts" in str(error)
    assert fake.calls.count("flush_cache") == 3
    assert report.engine_dirty  # the bucket is in, under the old version
    assert await engine.version() == 0


async def test_failed_end_weight_update_is_closed_by_the_abort() -> None:
    # The session stays marked open until the Engine confirms the close, so Load's abort
    # after the failed commit calls end_weight_update again and the session is closed.
    fake = FakeSGLangEngine(_spec())
    engine = SGLangEngine(fake, initial_version=0)
    fake.refuse_once("end_weight_update", "the scheduler is busy")
    error, report = await failed_sync(engine, [_bucket(1)])
    assert "end_weight_update failed: the scheduler is busy" in str(error)
    assert report.aborted
    assert report.abort_error is None
    assert fake.calls.count("end_weight_update") == 2  # the commit's, then the abort's
    assert not fake.session_open
    assert not engine.session_is_open()
    assert await engine.version() == 0
    await load_sync(engine, [_bucket(1)])  # a new session opens without a refusal
    assert await engine.version() == 1


@pytest.mark.parametrize("hung", ["begin_weight_update", "update_weights_from_tensor"])
async def test_timeout_keeps_one_engine_call_at_a_time(hung: str) -> None:
    # A call abandoned at Load's deadline still runs inside the Engine; the abort that
    # follows must wait for it (under its own deadline) instead of running beside it.
    fake = FakeSGLangEngine(_spec())
    engine = SGLangEngine(fake, timeout_s=0.3)
    fake.hang(hung)
    try:
        error, report = await failed_sync(engine, [_bucket(1)])
        assert fake.entered_hang.is_set()
        assert "did not answer within 0.3 s" in str(error)
        assert error.retryable
        # The abort gave up waiting for the hung call without touching the Engine.
        assert report.aborted
        assert report.abort_error is not None
        assert "abort did not answer within 0.3 s" in report.abort_error
        assert "end_weight_update" not in fake.calls
    finally:
        fake.release()
    # Once the hung call returned, the next sync closes the session it may have left open
    # and runs; never were two Engine methods running at once.
    await load_sync(engine, [_bucket(1)], timeout_s=60)
    assert await engine.version() == 1
    assert fake.max_in_flight == 1
    assert not fake.session_open


async def test_a_resume_given_up_behind_a_hung_call_runs_before_any_later_call() -> None:
    # A pause that never answered lands once its call returns: the resume that gave up
    # waiting for it is owed and runs first, even with a later call already queued.
    fake = FaultyFakeSGLangEngine(_spec())
    transport = SGLangEngine(fake).transport
    fake.inject("pause_generation", "hang")
    with anyio.move_on_after(0.2) as pause_scope:
        await transport.call("pause_generation", {"mode": "retract"})
    with anyio.move_on_after(0.2) as resume_scope:
        await transport.call("continue_generation", {})
    assert pause_scope.cancelled_caught and resume_scope.cancelled_caught
    assert fake.calls == []  # the pause hangs; the resume never entered the Engine
    async with anyio.create_task_group() as tg:
        tg.start_soon(transport.call, "begin_weight_update", {"selector": "all"})
        await anyio.wait_all_tasks_blocked()  # the begin waits for the hung pause
        fake.release_hang()
    assert fake.calls == ["pause:retract", "continue", "begin_weight_update"]
    assert fake.max_at_once == 1
    assert fake.session_open


async def test_pause_and_resume_are_noops_without_engine_support() -> None:
    fake = FakeSGLangEngine(_spec())
    engine = SGLangEngine(fake)
    await load_sync(engine, [_bucket(1)], mode="pause", pause_mode="in_place")
    assert "pause_generation" not in fake.calls
    assert "continue_generation" not in fake.calls
    assert await engine.version() == 1


async def test_pause_uses_the_engine_when_it_has_one() -> None:
    fake = FakePausableSGLangEngine(_spec())
    engine = SGLangEngine(fake)
    await load_sync(engine, [_bucket(1)], mode="pause", pause_mode="retract")
    assert fake.calls[0] == "pause:retract"
    assert fake.calls[-1] == "continue"


async def test_lazy_construction_and_shutdown(monkeypatch: pytest.MonkeyPatch) -> None:
    module = FakeSGLangModule(_spec())
    monkeypatch.setattr("weightpipe.stages.engines.sglang.inprocess.import_sglang", lambda: module)
    engine = SGLangEngine(model_path="/models/x", tp_size=1)
    await load_sync(engine, [_bucket(1)])
    assert module.built == [{"model_path": "/models/x", "tp_size": 1}]
    fake = engine.engine
    await engine.aclose()
    assert fake.shut_down


def test_missing_sglang_gives_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sglang", None)  # makes `import sglang` fail
    with pytest.raises(ImportError, match=r"needs the sglang package.*pip install"):
        import_sglang()


async def test_missing_sglang_surfaces_on_first_use(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail() -> Any:
        raise ImportError("the in-process SGLang engine needs the sglang package")

    monkeypatch.setattr("weightpipe.stages.engines.sglang.inprocess.import_sglang", fail)
    engine = SGLangEngine(model_path="/models/x")
    with pytest.raises(StageError) as info:
        await Pipeline([Load(engine, mode="in_flight")], depth=2).run([_bucket(1)])
    assert isinstance(info.value.__cause__, ImportError)
    assert "needs the sglang package" in str(info.value.__cause__)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"sglang\.Engine or the keyword arguments"):
        SGLangEngine()
    with pytest.raises(ValueError, match="timeout_s"):
        SGLangEngine(FakeSGLangEngine(_spec()), timeout_s=0)


# -- launch settings: the Engine's get_server_info(), read before the Engine is touched ----


class _ReportingEngine(FakeSGLangEngine):
    """FakeSGLangEngine plus ``get_server_info()``, which the real ``sglang.Engine`` has: a
    dict of its resolved server args (``tp_size`` and ``quantization`` among them), its
    scheduler info and ``version``."""

    def __init__(
        self,
        spec: dict[str, tuple[tuple[int, ...], torch.dtype]],
        *,
        tp_size: int = 1,
        quantization: str | None = None,
    ) -> None:
        super().__init__(spec, tp_size=tp_size)
        self.quantization = quantization
        self.info_reads = 0

    def get_server_info(self) -> dict[str, Any]:
        self.info_reads += 1
        return {"tp_size": self.tp_size, "quantization": self.quantization, "version": "0.5.23"}


async def _sync_pairs(engine: SGLangEngine, version: int) -> Any:
    return await sync_weights(_model(), engine, version=version, stages=[Fetch(1 << 20)])


async def test_a_sync_for_another_tp_size_is_refused_before_the_engine_is_touched() -> None:
    fake = _ReportingEngine(_spec(), tp_size=2)
    engine = SGLangEngine(fake, tp_size=1)  # type: ignore[arg-type]
    with pytest.raises(EngineError) as info:
        await _sync_pairs(engine, 1)
    message = str(info.value)
    assert "engine 'sglang_engine'" in message
    assert "tp_size=2" in message and "tp_size=1" in message
    assert fake.calls == []  # no begin, no update
    assert not fake.weights
    assert await engine.version() is None
    matching = SGLangEngine(fake, tp_size=2)  # type: ignore[arg-type]
    await _sync_pairs(matching, 1)
    await _sync_pairs(matching, 2)
    assert await matching.version() == 2
    assert fake.info_reads == 2  # once by each adapter


async def test_an_engine_without_get_server_info_is_not_checked() -> None:
    fake = FakeSGLangEngine(_spec(), tp_size=1)
    engine = SGLangEngine(fake, tp_size=1)  # type: ignore[arg-type]
    report = await _sync_pairs(engine, 1)
    assert report.version == 1
