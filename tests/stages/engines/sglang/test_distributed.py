"""SGLangDistributedEngine: this process is the trainer (rank 0), a spawned process is the
engine's receiving rank.

The receiving rank joins with SGLang's own ``init_custom_process_group`` and receives with
SGLang's own ``FlattenedTensorBucket.empty`` (or one broadcast per tensor), so the tests
pass only if the announcement and the broadcast match what SGLang allocates. Gloo on
127.0.0.1; the control plane is the HTTP double (0.5.23 and 0.5.12) or the in-process fake;
every sync runs through the Load stage (``drive``).
What is not covered here: NCCL and CUDA tensors (same code path, other backend), and more
than one receiving rank (the layout is per rank identical; only world size changes).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from tests.fakes.sglang_engine import FakeSGLangEngine
from tests.fakes.sglang_http import SGLangHTTPDouble
from tests.fakes.sglang_receiver import SubprocessReceiver
from tests.helpers import bits, free_port
from tests.stages.engines.sglang.drive import failed_sync, load_sync
from weightpipe.stages.bucket import WeightBucket
from weightpipe.stages.engines.base import Engine
from weightpipe.stages.engines.sglang.distributed import SGLangDistributedEngine
from weightpipe.stages.engines.sglang.http import SGLangHTTPEngine
from weightpipe.stages.engines.sglang.inprocess import SGLangEngine

pytestmark = pytest.mark.slow


def _model() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    w = torch.randn(130, 70, generator=g) * 50
    return [
        ("model.norm.weight", torch.randn(13, generator=g).to(torch.bfloat16)),  # odd bf16
        ("model.layers.0.mlp.up_proj.weight", w.clamp(-448, 448).to(torch.float8_e4m3fn)),
        ("model.layers.0.mlp.up_proj.weight_scale_inv", torch.rand(2, 1, generator=g)),
        ("lm_head.weight", torch.randn(5, 7, generator=g).to(torch.bfloat16)),
    ]


def _spec() -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {n: (tuple(t.shape), t.dtype) for n, t in _model()}


def _assert_received(
    weights: dict[str, torch.Tensor], sent: list[tuple[str, torch.Tensor]]
) -> None:
    for name, tensor in sent:
        assert weights[name].dtype == tensor.dtype, name
        assert weights[name].shape == tensor.shape, name
        assert torch.equal(bits(weights[name]), bits(tensor)), name


@pytest.fixture(scope="module")
def receiver() -> Iterator[SubprocessReceiver]:
    # One spawned receiving rank for the module: spawning (torch + sglang import) is the
    # slow part; every test uses its own group name and port.
    rank = SubprocessReceiver()
    try:
        yield rank
    finally:
        rank.close()


def _buckets(version: int, tensors: list[tuple[str, torch.Tensor]]) -> list[WeightBucket]:
    halves = [tensors[:2], tensors[2:]]
    return [
        WeightBucket(tuple(h), index=i, is_last=i == 1, version=version)
        for i, h in enumerate(halves)
    ]


def _local_engine(control: Any, group_name: str, **kwargs: Any) -> SGLangDistributedEngine:
    """The engine under test, rank 0 of a group on 127.0.0.1 at a free port."""
    return SGLangDistributedEngine(
        control,
        master_address="127.0.0.1",
        master_port=free_port(),
        group_name=group_name,
        **kwargs,
    )


def test_satisfies_protocol() -> None:
    control = SGLangHTTPEngine("http://127.0.0.1:1")
    assert isinstance(
        SGLangDistributedEngine(control, master_address="127.0.0.1", master_port=1), Engine
    )


async def test_flattened_buckets_over_http_control_0523(receiver: SubprocessReceiver) -> None:
    with SGLangHTTPDouble(_spec()) as server:
        server.receiver = receiver
        async with SGLangHTTPEngine(server.url) as control:
            engine = _local_engine(control, "wp_flat", timeout_s=60)
            try:
                await load_sync(engine, _buckets(1, _model()))
                assert await engine.version() == 1
                _assert_received(server.weights, _model())
                # the group is reused by the next sync
                second = [(n, t.clone()) for n, t in _model()]
                second[-1] = ("lm_head.weight", torch.ones(5, 7, dtype=torch.bfloat16))
                await load_sync(engine, _buckets(2, second))
                assert await engine.version() == 2
                _assert_received(server.weights, second)
            finally:
                await engine.close()
        paths = server.paths()
        assert paths.count("/init_weights_update_group") == 1
        assert paths.count("/update_weights_from_distributed") == 4
        assert paths.count("/begin_weight_update") == 2
        assert paths[-1] == "/destroy_weights_update_group"
        announces = [c.body for c in server.calls if c.path == "/update_weights_from_distributed"]
        assert all(a["flush_cache"] is False for a in announces)
        assert all(a["load_format"] == "flattened_bucket" for a in announces)
        # ordered by element size so SGLang's unpadded receive bucket stays aligned
        assert announces[0]["dtypes"] == ["bfloat16", "float8_e4m3fn"]
        assert announces[1]["dtypes"] == ["float32", "bfloat16"]
        init = next(c.body for c in server.calls if c.path == "/init_weights_update_group")
        assert init["world_size"] == 2
        assert init["rank_offset"] == 1
        assert init["backend"] == "gloo"


async def test_per_tensor_broadcasts_on_0512(receiver: SubprocessReceiver) -> None:
    # gloo cannot broadcast float8, so the per-tensor path is shown with bf16 and fp32.
    tensors = [(n, t) for n, t in _model() if t.dtype != torch.float8_e4m3fn]
    spec = {n: (tuple(t.shape), t.dtype) for n, t in tensors}
    with SGLangHTTPDouble(spec, behave_like="0.5.12") as server:
        server.receiver = receiver
        async with SGLangHTTPEngine(server.url) as control:
            engine = _local_engine(control, "wp_per_tensor", load_format=None, timeout_s=60)
            try:
                await load_sync(engine, [WeightBucket(tuple(tensors), 0, True, 3)])
            finally:
                await engine.close()
            assert await control.version() == 3
        _assert_received(server.weights, tensors)
        assert "/begin_weight_update" not in server.paths()
        announce = next(
            c.body for c in server.calls if c.path == "/update_weights_from_distributed"
        )
        assert announce["names"] == [n for n, _ in tensors]  # source order kept
        assert announce["load_format"] is None


async def test_refused_bucket_names_the_tensor_and_the_group_is_rebuilt(
    receiver: SubprocessReceiver,
) -> None:
    spec = _spec()
    del spec["lm_head.weight"]
    with SGLangHTTPDouble(spec) as server:
        server.receiver = receiver
        async with SGLangHTTPEngine(server.url) as control:
            engine = _local_engine(control, "wp_refused", timeout_s=60)
            try:
                error, _ = await failed_sync(engine, _buckets(1, _model()))
                assert "is not a parameter" in str(error)
                assert error.tensor == "lm_head.weight"
                assert await engine.version() is None
                assert not server.session_open
                # the next sync rebuilds the group and succeeds
                ok = [(n, t) for n, t in _model() if n != "lm_head.weight"]
                await load_sync(engine, _buckets(2, ok))
                assert await engine.version() == 2
                _assert_received(server.weights, ok)
            finally:
                await engine.close()
        assert server.paths().count("/init_weights_update_group") == 2


async def test_group_that_cannot_form_is_one_clear_error() -> None:
    with SGLangHTTPDouble(_spec()) as server:  # no receiver: the double refuses the group
        async with SGLangHTTPEngine(server.url) as control:
            engine = _local_engine(control, "wp_no_group", timeout_s=5)
            error, report = await failed_sync(engine, _buckets(1, _model()))
            assert "init_weights_update_group failed" in str(error)
            assert report.buckets == 0
            assert await engine.version() is None


async def test_in_process_control(receiver: SubprocessReceiver) -> None:
    fake = FakeSGLangEngine(_spec())
    fake.receiver = receiver
    engine = _local_engine(SGLangEngine(fake), "wp_in_process", timeout_s=60)
    try:
        await load_sync(engine, _buckets(5, _model()))
    finally:
        await engine.close()
    assert await engine.version() == 5
    _assert_received(fake.weights, _model())
    assert fake.flush_cache_args == [False, False]
    assert fake.calls[0] == "init_weights_update_group"
    assert fake.calls[-1] == "destroy_weights_update_group"


def test_bad_arguments() -> None:
    control = SGLangHTTPEngine("http://127.0.0.1:1")
    with pytest.raises(ValueError, match="engine_ranks"):
        SGLangDistributedEngine(control, master_address="x", master_port=1, engine_ranks=0)
    with pytest.raises(ValueError, match="load_format"):
        SGLangDistributedEngine(
            control,
            master_address="x",
            master_port=1,
            load_format="named_tensors",  # type: ignore[arg-type]
        )
