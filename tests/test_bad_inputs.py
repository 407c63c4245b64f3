"""The bad-input corpus: each kind is refused before the engine changes, naming its culprit.

One parametrized test drives the public API (``sync_weights`` with ``Fetch``,
``Fp8Quantize`` and ``Load``) against a real ``LocalEngine`` that is generating and already
serves v1. For every kind it checks that the sync raised an error whose text (the whole
cause chain) names the tensor, key or stage at fault, and that the engine is as it was: v1
with every parameter bit for bit, and generation still running. docs/reliability.md lists
the same kinds with the error each gets; a kind not yet refused as it should be is an
``xfail(strict=True)`` there and here, with the reason.
"""

from __future__ import annotations

import json
import re
import struct
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch
from safetensors.torch import save_file

from tests.fakes.local import local_engine, new_weights, snapshot
from tests.helpers import free_port
from weightpipe.pipeline import WeightpipeError
from weightpipe.stages.app.config import load_weightpipe_config
from weightpipe.stages.app.factory import build_fetch, build_quantize
from weightpipe.stages.engines.local import LocalEngine
from weightpipe.stages.fetch import Fetch
from weightpipe.stages.quantize import Fp8Quantize
from weightpipe.stages.sources import safetensors_source
from weightpipe.stages.sync import sync_weights

LINEAR = "model.layers.0.mlp.gate_proj.weight"
NORM = "model.layers.0.input_layernorm.weight"
EMBED = "model.embed_tokens.weight"

Weights = dict[str, torch.Tensor]


@dataclass
class Ctx:
    engine: LocalEngine
    weights: Weights
    tmp: Path
    teardown: list[Callable[[], None]] = field(default_factory=list)
    """Run by the test after its checks, last registered first (a case's own checks)."""


Case = Callable[[Ctx], Awaitable[Any]]


async def _sync(
    ctx: Ctx,
    source: Any,
    *,
    fp8: bool = True,
    version: Any = 2,
    bucket_bytes: int = 1 << 20,
    depth: int = 2,
    **quantize: Any,
) -> Any:
    stages: list[Any] = [Fetch(bucket_bytes)]
    if fp8:
        stages.append(Fp8Quantize(**quantize))
    return await sync_weights(
        source, ctx.engine, version=version, stages=stages, depth=depth, timeout_s=10.0
    )


def _with(ctx: Ctx, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """The full good sync with ``name`` replaced by ``tensor``."""
    return [(n, tensor if n == name else t) for n, t in ctx.weights.items()]


def _poisoned(ctx: Ctx, name: str, value: float) -> list[tuple[str, torch.Tensor]]:
    bad = ctx.weights[name].clone()
    bad.view(-1)[3] = value
    return _with(ctx, name, bad)


def _raw_file(path: Path, header: object, data: bytes) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _linear_file(ctx: Ctx) -> Path:
    """A one-tensor safetensors file of the linear weight; returns its path."""
    path = ctx.tmp / "w.safetensors"
    save_file({LINEAR: ctx.weights[LINEAR].contiguous()}, str(path))
    return path


async def nan_quantized(ctx: Ctx) -> Any:
    return await _sync(ctx, _poisoned(ctx, LINEAR, float("nan")))


async def inf_quantized(ctx: Ctx) -> Any:
    return await _sync(ctx, _poisoned(ctx, LINEAR, float("inf")))


async def nan_in_a_norm(ctx: Ctx) -> Any:
    return await _sync(ctx, _poisoned(ctx, NORM, float("nan")))


async def inf_without_fp8(ctx: Ctx) -> Any:
    return await _sync(ctx, _poisoned(ctx, EMBED, float("inf")), fp8=False)


async def int_linear(ctx: Ctx) -> Any:
    return await _sync(ctx, _with(ctx, LINEAR, torch.ones(320, 192, dtype=torch.int32)))


async def complex_linear(ctx: Ctx) -> Any:
    return await _sync(ctx, _with(ctx, LINEAR, torch.ones(320, 192, dtype=torch.complex64)))


async def bool_linear(ctx: Ctx) -> Any:
    return await _sync(ctx, _with(ctx, LINEAR, torch.ones(320, 192, dtype=torch.bool)))


async def zero_d_linear(ctx: Ctx) -> Any:
    return await _sync(ctx, _with(ctx, LINEAR, torch.tensor(1.0, dtype=torch.bfloat16)))


async def one_d_linear(ctx: Ctx) -> Any:
    return await _sync(ctx, _with(ctx, LINEAR, torch.ones(320, dtype=torch.bfloat16)))


async def three_d_linear(ctx: Ctx) -> Any:
    return await _sync(ctx, _with(ctx, LINEAR, torch.ones(2, 320, 192, dtype=torch.bfloat16)))


async def empty_linear(ctx: Ctx) -> Any:
    return await _sync(ctx, _with(ctx, LINEAR, torch.ones(0, 192, dtype=torch.bfloat16)))


async def transposed_view(ctx: Ctx) -> Any:
    return await _sync(ctx, _with(ctx, LINEAR, ctx.weights[LINEAR].t()))


async def expanded_view_wrong_shape(ctx: Ctx) -> Any:
    row = ctx.weights[LINEAR][0]
    return await _sync(ctx, _with(ctx, LINEAR, row.expand(321, 192)))


async def sparse_linear(ctx: Ctx) -> Any:
    return await _sync(ctx, _with(ctx, LINEAR, ctx.weights[LINEAR].to_sparse()))


async def meta_linear(ctx: Ctx) -> Any:
    return await _sync(ctx, _with(ctx, LINEAR, torch.empty(320, 192, device="meta")))


async def fp8_without_scale(ctx: Ctx) -> Any:
    codes = ctx.weights[LINEAR].to(torch.float8_e4m3fn)
    return await _sync(ctx, _with(ctx, LINEAR, codes), fp8=False)


async def fp8_wrong_scale_shape(ctx: Ctx) -> Any:
    codes = ctx.weights[LINEAR].to(torch.float8_e4m3fn)
    pairs = _with(ctx, LINEAR, codes)
    at = [n for n, _ in pairs].index(LINEAR) + 1  # in the weight's bucket, as Fp8Quantize puts it
    pairs.insert(at, (LINEAR + "_scale_inv", torch.ones(5, 5)))
    return await _sync(ctx, pairs, fp8=False)


async def duplicate_name(ctx: Ctx) -> Any:
    pairs = list(ctx.weights.items())
    return await _sync(ctx, [*pairs, (LINEAR, ctx.weights[LINEAR])])


async def unknown_name(ctx: Ctx) -> Any:
    pairs = list(ctx.weights.items())
    return await _sync(ctx, [*pairs, ("model.layers.9.mlp.gate_proj.weight", torch.ones(2, 2))])


async def incomplete_sync(ctx: Ctx) -> Any:
    return await _sync(ctx, [(n, t) for n, t in ctx.weights.items() if n != NORM])


async def shape_mismatch(ctx: Ctx) -> Any:
    return await _sync(ctx, _with(ctx, NORM, torch.ones(191, dtype=torch.bfloat16)))


async def dtype_mismatch(ctx: Ctx) -> Any:
    return await _sync(ctx, _with(ctx, NORM, ctx.weights[NORM].double()), fp8=False)


async def bucket_bytes_zero(ctx: Ctx) -> Any:
    return await _sync(ctx, list(ctx.weights.items()), bucket_bytes=0)


async def bucket_bytes_negative(ctx: Ctx) -> Any:
    return await _sync(ctx, list(ctx.weights.items()), bucket_bytes=-1)


async def depth_zero(ctx: Ctx) -> Any:
    return await _sync(ctx, list(ctx.weights.items()), depth=0)


async def block_one_dim(ctx: Ctx) -> Any:
    return await _sync(ctx, list(ctx.weights.items()), block=(128,))


async def block_float(ctx: Ctx) -> Any:
    return await _sync(ctx, list(ctx.weights.items()), block=(128.9, 128))


async def block_mismatch(ctx: Ctx) -> Any:
    # 127-row blocks give the same scale shapes as the engine's 128 for these weights.
    return await _sync(ctx, list(ctx.weights.items()), block=(127, 128))


async def non_pairs(ctx: Ctx) -> Any:
    return await _sync(ctx, [*list(ctx.weights.items())[:2], "model.norm.weight"])


async def async_source_raises(ctx: Ctx) -> Any:
    async def trainer() -> AsyncIterator[tuple[str, torch.Tensor]]:
        for index, pair in enumerate(ctx.weights.items()):
            if index == 3:
                raise OSError("trainer lost its GPU")
            yield pair

    return await _sync(ctx, trainer())


async def version_backwards(ctx: Ctx) -> Any:
    return await _sync(ctx, list(ctx.weights.items()), version=0)


async def version_repeated(ctx: Ctx) -> Any:
    return await _sync(ctx, list(ctx.weights.items()), version=1)


async def version_negative(ctx: Ctx) -> Any:
    return await _sync(ctx, list(ctx.weights.items()), version=-1)


async def version_string(ctx: Ctx) -> Any:
    return await _sync(ctx, list(ctx.weights.items()), version="2")


async def version_bool(ctx: Ctx) -> Any:
    return await _sync(ctx, list(ctx.weights.items()), version=True)


def _file_source(path: Path, direct: bool) -> Iterator[Any]:
    yield from safetensors_source(path, direct=direct)


async def truncated_safetensors(ctx: Ctx) -> Any:
    path = _linear_file(ctx)
    path.write_bytes(path.read_bytes()[:-100])
    return await _sync(ctx, _file_source(path, direct=True))


async def corrupt_safetensors_header(ctx: Ctx) -> Any:
    path = _raw_file(ctx.tmp / "bad.safetensors", b"{not json at all", b"")
    return await _sync(ctx, _file_source(path, direct=False))


async def overlapping_safetensors_offsets(ctx: Ctx) -> Any:
    entry = {"dtype": "BF16", "shape": [192], "data_offsets": [0, 384]}
    header = {NORM: entry, "model.norm.weight": {**entry, "data_offsets": [192, 576]}}
    path = _raw_file(ctx.tmp / "overlap.safetensors", header, bytes(576))
    return await _sync(ctx, _file_source(path, direct=True), fp8=False)


async def _sync_from_config(ctx: Ctx, text: str) -> Any:
    """A sync built as the demo and the CLI build theirs: a YAML file through
    ``load_weightpipe_config``, then the factory's stages and the file's depth."""
    path = ctx.tmp / "weightpipe.yaml"
    path.write_text(text)
    config = load_weightpipe_config(path)
    stages: list[Any] = [build_fetch(config.fetch)]
    if config.quantize.enabled:
        stages.append(build_quantize(config.quantize))
    return await sync_weights(
        list(ctx.weights.items()), ctx.engine, version=2, stages=stages, depth=config.depth
    )


async def config_typo(ctx: Ctx) -> Any:
    return await _sync_from_config(ctx, "fetch:\n  bucket_byts: 1048576\n")


async def config_wrong_type(ctx: Ctx) -> Any:
    return await _sync_from_config(ctx, "depth: two\n")


async def config_block_not_a_list(ctx: Ctx) -> Any:
    return await _sync_from_config(ctx, "quantize:\n  block: 128\n")


async def config_wrong_choice(ctx: Ctx) -> Any:
    return await _sync_from_config(ctx, "quantize:\n  method: blok\n")


async def source_blocks_forever(ctx: Ctx) -> Any:
    release = threading.Event()
    closed = threading.Event()
    pairs = list(ctx.weights.items())

    def trainer() -> Iterator[tuple[str, torch.Tensor]]:
        try:
            for index, pair in enumerate(pairs):
                if index == 4:
                    release.wait()  # a peer that never comes, until the test ends
                yield pair
        finally:
            closed.set()

    def ended() -> None:
        release.set()
        # The abandoned next() returns, and its worker thread closes the generator.
        assert closed.wait(timeout=30.0), "the blocked source was never closed"

    ctx.teardown.append(ended)
    return await sync_weights(
        trainer(), ctx.engine, version=2, stages=[Fetch(1 << 20), Fp8Quantize()], timeout_s=1.0
    )


async def async_source_blocks_forever(ctx: Ctx) -> Any:
    async def trainer() -> AsyncIterator[tuple[str, torch.Tensor]]:
        for index, pair in enumerate(ctx.weights.items()):
            if index == 4:
                await anyio.sleep_forever()  # the deadline cancels it here
            yield pair

    return await sync_weights(
        trainer(), ctx.engine, version=2, stages=[Fetch(1 << 20), Fp8Quantize()], timeout_s=1.0
    )


async def dtensor_on_another_mesh(ctx: Ctx) -> Any:
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import Shard, distribute_tensor

    if not dist.is_initialized():
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{free_port()}",
            rank=0,
            world_size=1,
            timeout=timedelta(seconds=30),
        )
        ctx.teardown.append(dist.destroy_process_group)
    # A mesh of one rank the default group does not have: torch builds it, and this
    # process's shard of it is empty (full_tensor() used to return a (0,) tensor).
    mesh = DeviceMesh("cpu", torch.tensor([dist.get_world_size()]))
    sharded = distribute_tensor(ctx.weights[LINEAR], mesh, [Shard(0)])
    return await _sync(ctx, _with(ctx, LINEAR, sharded))


XFAIL: dict[str, str] = {}

CASES: dict[str, tuple[Case, str]] = {
    # kind: (the sync, a regex the error chain must match: the culprit's name)
    "nan_quantized": (nan_quantized, LINEAR),
    "inf_quantized": (inf_quantized, LINEAR),
    "nan_in_a_norm": (nan_in_a_norm, NORM),
    "inf_without_fp8": (inf_without_fp8, EMBED),
    "int_linear": (int_linear, LINEAR),
    "complex_linear": (complex_linear, LINEAR),
    "bool_linear": (bool_linear, LINEAR),
    "zero_d_linear": (zero_d_linear, LINEAR),
    "one_d_linear": (one_d_linear, LINEAR),
    "three_d_linear": (three_d_linear, LINEAR),
    "empty_linear": (empty_linear, LINEAR),
    "transposed_view": (transposed_view, LINEAR),
    "expanded_view_wrong_shape": (expanded_view_wrong_shape, LINEAR),
    "sparse_linear": (sparse_linear, LINEAR),
    "meta_linear": (meta_linear, LINEAR),
    "fp8_without_scale": (fp8_without_scale, LINEAR),
    "fp8_wrong_scale_shape": (fp8_wrong_scale_shape, f"{LINEAR}_scale_inv|{LINEAR}"),
    "duplicate_name": (duplicate_name, LINEAR),
    "unknown_name": (unknown_name, "model.layers.9.mlp.gate_proj.weight"),
    "incomplete_sync": (incomplete_sync, NORM),
    "shape_mismatch": (shape_mismatch, NORM),
    "dtype_mismatch": (dtype_mismatch, NORM),
    "bucket_bytes_zero": (bucket_bytes_zero, "bucket_bytes"),
    "bucket_bytes_negative": (bucket_bytes_negative, "bucket_bytes"),
    "depth_zero": (depth_zero, "depth"),
    "block_one_dim": (block_one_dim, "block"),
    "block_float": (block_float, "block"),
    "block_mismatch": (block_mismatch, r"block \[127, 128\] does not match engine"),
    "non_pairs": (non_pairs, "stage 'fetch'|source"),
    "async_source_raises": (async_source_raises, "source"),
    "version_backwards": (version_backwards, "version 0 is not greater than the version 1"),
    "version_repeated": (version_repeated, "version 1 is not greater than the version 1"),
    "version_negative": (version_negative, "version must be >= 0"),
    "version_string": (version_string, "version must be an int"),
    "version_bool": (version_bool, "version must be an int"),
    "truncated_safetensors": (truncated_safetensors, f"{LINEAR}.*truncated"),
    "corrupt_safetensors_header": (corrupt_safetensors_header, "bad.safetensors.*corrupt"),
    "overlapping_safetensors_offsets": (overlapping_safetensors_offsets, "overlap"),
    "config_typo": (
        config_typo,
        r"config key 'fetch.bucket_byts': unknown key .*did you mean 'fetch.bucket_bytes'\?",
    ),
    "config_wrong_type": (config_wrong_type, r"config key 'depth': wrong type.*expected int"),
    "config_block_not_a_list": (
        config_block_not_a_list,
        r"config key 'quantize.block': wrong type .*got int 128; expected list\[int\]",
    ),
    "config_wrong_choice": (
        config_wrong_choice,
        r"config key 'quantize.method': 'blok' is not one of the choices.*did you mean 'block'",
    ),
    "source_blocks_forever": (
        source_blocks_forever,
        r"stage 'source'.*\(generator '.*trainer'\) yielded no item within the sync's source "
        r"deadline of 1 s",
    ),
    "async_source_blocks_forever": (
        async_source_blocks_forever,
        r"stage 'source'.*\(async_generator '.*trainer'\) yielded no item within the sync's "
        r"source deadline of 1 s",
    ),
    "dtensor_on_another_mesh": (
        dtensor_on_another_mesh,
        rf"tensor '{LINEAR}': a DTensor on DeviceMesh\('cpu', ranks \[1\]\).*"
        r"default group \(gloo, rank 0 of world size 1\)",
    ),
}


def _chain(error: BaseException) -> str:
    texts: list[str] = []
    current: BaseException | None = error
    while current is not None and len(texts) < 10:
        texts.append(f"{type(current).__name__}: {current}")
        current = current.__cause__ or current.__context__
    return "\n".join(texts)


@pytest.mark.parametrize(
    "kind",
    [
        pytest.param(kind, marks=pytest.mark.xfail(strict=True, reason=XFAIL[kind]))
        if kind in XFAIL
        else kind
        for kind in CASES
    ],
)
async def test_a_bad_input_is_refused_before_the_engine_changes(kind: str, tmp_path: Path) -> None:
    case, names = CASES[kind]
    async with local_engine() as engine:
        weights = new_weights(engine, seed=1)
        await sync_weights(
            list(weights.items()), engine, version=1, stages=[Fetch(1 << 20), Fp8Quantize()]
        )
        before = snapshot(engine)
        ctx = Ctx(engine, new_weights(engine, seed=2), tmp_path)
        try:
            with pytest.raises((WeightpipeError, ValueError, TypeError)) as info:
                await case(ctx)
            assert re.search(names, _chain(info.value)), _chain(info.value)
            assert await engine.version() == 1
            after = snapshot(engine)
            assert all(torch.equal(after[name], before[name]) for name in before)
            assert not engine.paused
            await engine.wait_for_tokens(engine.tokens_generated + 1, timeout_s=30.0)
        finally:
            for step in reversed(ctx.teardown):
                step()


def test_the_corpus_has_at_least_25_kinds() -> None:
    assert len(CASES) >= 25
