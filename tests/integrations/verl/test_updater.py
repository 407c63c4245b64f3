"""The rollout-side updater against verl's own config classes and the SGLang HTTP double.

Runs in the verl environment (``.ci/test-verl``); skipped where verl is not installed.
Every sync here runs outside any torch.distributed process group, where verl's own
``quant_weights_by_name`` silently sends every weight in bf16.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import torch

pytest.importorskip("verl")
pytest.importorskip("sglang")

from verl.utils.sglang.sglang_fp8_utils import build_sglang_fp8_quant_config
from verl.workers.config import CheckpointEngineConfig, RolloutConfig
from verl.workers.rollout.sglang_rollout.utils import DEEPSEEK_V4_FUSION_GROUPS

from tests.fakes.sglang_http import SGLangHTTPDouble
from tests.integrations.verl._model import QUANTIZED_SUFFIXES, fp8_spec, llama_weights
from weightpipe.pipeline import Pipeline, StageError
from weightpipe.stages import SGLangHTTPEngine, WeightBucket, quantize_fp8
from weightpipe.stages.integrations.verl import (
    WeightpipeUpdater,
    lends_buffers,
    quantize_stage,
    updater_for_rollout,
)

BUCKET = 200_000  # bytes: several buckets for the test model


def _quant_config() -> dict[str, Any]:
    config: dict[str, Any] = build_sglang_fp8_quant_config(None)
    return config


def _updater(server: SGLangHTTPDouble, **kwargs: Any) -> WeightpipeUpdater:
    engine = SGLangHTTPEngine(server.url, retries=0, timeout_s=30)
    kwargs.setdefault("bucket_bytes", BUCKET)
    return WeightpipeUpdater(engine, **kwargs)


async def _lending(
    pairs: list[tuple[str, torch.Tensor]],
) -> AsyncIterator[tuple[str, torch.Tensor]]:
    """Like verl's NCCL engine: every tensor is a view of one buffer, rewritten per item."""
    buffer = torch.empty(max(t.nbytes for _, t in pairs), dtype=torch.uint8)
    for name, tensor in pairs:
        view = buffer[: tensor.nbytes].view(tensor.dtype).view(tensor.shape)
        view.copy_(tensor)
        yield name, view
        buffer.fill_(0xAB)  # the next broadcast lands here once the consumer asks for more


async def test_fp8_sync_outside_a_process_group_sends_fp8_with_global_steps_as_version() -> None:
    weights = llama_weights()
    with SGLangHTTPDouble(fp8_spec(weights)) as server:
        async with _updater(
            server, quantization_config=_quant_config(), lends_buffers=False
        ) as updater:
            report = await updater.update_weights(iter(weights), global_steps=7)
        assert server.weight_version == "7"
        assert report.version == 7
        paths = server.paths()
        # One cache flush per sync: its own call after the last update, or folded into
        # the last update (the server takes ``flush_cache`` there).
        updates = [c for c in server.calls if c.path == "/update_weights_from_tensor"]
        folded = [i for i, c in enumerate(updates) if c.body.get("flush_cache")]
        assert paths.count("/flush_cache") + len(folded) == 1
        if folded:
            assert folded == [len(updates) - 1]
        else:
            assert paths.index("/flush_cache") > max(
                i for i, p in enumerate(paths) if p == "/update_weights_from_tensor"
            )
        assert paths.count("/update_weights_from_tensor") == report.load.buckets > 1
        for name, tensor in weights:
            if name.endswith(QUANTIZED_SUFFIXES):
                want = quantize_fp8(tensor, block=(128, 128), arithmetic="verl")
                got = server.weights[name]
                assert got.dtype == torch.float8_e4m3fn, name
                assert torch.equal(got.view(torch.uint8), want.qweight.view(torch.uint8)), name
                assert torch.equal(server.weights[name + "_scale_inv"], want.scale), name
            else:
                assert torch.equal(server.weights[name], tensor), name


async def test_global_steps_none_counts_on_from_the_last_version() -> None:
    weights = llama_weights()
    with SGLangHTTPDouble(fp8_spec(weights)) as server:
        async with _updater(
            server, quantization_config=_quant_config(), lends_buffers=False
        ) as updater:
            await updater.update_weights(iter(weights), global_steps=4)
            await updater.update_weights(iter(weights))
        assert server.weight_version == "5"


async def test_a_weight_that_cannot_be_quantized_fails_the_sync_by_name() -> None:
    weights = llama_weights()
    bad = "model.layers.1.mlp.up_proj.weight"
    weights = [(n, t.clone().fill_(float("nan")) if n == bad else t) for n, t in weights]
    with SGLangHTTPDouble(fp8_spec(weights)) as server:
        async with _updater(
            server, quantization_config=_quant_config(), lends_buffers=False
        ) as updater:
            with pytest.raises(StageError, match=bad.replace(".", r"\.")) as caught:
                await updater.update_weights(iter(weights), global_steps=3)
        assert caught.value.stage == "quantize"
        assert server.weight_version == "default"  # never moved to 3
        assert bad not in server.weights  # neither in FP8 nor in bf16
        sent = [n for update in server.updates for n, _ in update[0]]
        assert bad not in sent


async def test_a_source_reusing_one_buffer_arrives_intact_when_declared_as_lending() -> None:
    weights = llama_weights()
    spec = {name: (tuple(t.shape), t.dtype) for name, t in weights}
    with SGLangHTTPDouble(spec) as server:
        async with _updater(server, lends_buffers=True) as updater:
            await updater.update_weights(_lending(weights), global_steps=2)
        for name, tensor in weights:
            assert torch.equal(server.weights[name], tensor), name


async def test_an_undeclared_lending_source_is_corrupted_so_the_declaration_matters() -> None:
    # The hazard the declaration exists for: a pipeline holds tensors past the point where
    # the lender overwrites them.
    weights = llama_weights()
    spec = {name: (tuple(t.shape), t.dtype) for name, t in weights}
    with SGLangHTTPDouble(spec) as server:
        async with _updater(server, lends_buffers=False) as updater:
            await updater.update_weights(_lending(weights), global_steps=2)
        intact = [torch.equal(server.weights[n], t) for n, t in weights]
        assert not all(intact)


async def test_owned_tensors_reach_the_buckets_without_a_copy_and_lent_ones_with_one() -> None:
    weights = llama_weights()
    engine = SGLangHTTPEngine("http://127.0.0.1:9", retries=0)  # never called
    seen: list[WeightBucket] = []

    async def sink(bucket: WeightBucket) -> None:
        seen.append(bucket)

    owned = WeightpipeUpdater(engine, bucket_bytes=BUCKET, lends_buffers=False)
    await Pipeline(owned.stages()).run(owned.source(iter(weights)), sink=sink)
    pointers = {name: t.data_ptr() for name, t in weights}
    got = {name: t.data_ptr() for bucket in seen for name, t in bucket.tensors}
    assert got == pointers

    seen.clear()
    lent = WeightpipeUpdater(engine, bucket_bytes=BUCKET, lends_buffers=True)
    await Pipeline(lent.stages()).run(lent.source(_lending(weights)), sink=sink)
    storages = {t.untyped_storage().data_ptr() for bucket in seen for _, t in bucket.tensors}
    assert len(storages) == len(weights)  # one fresh copy each, none sharing the lent buffer
    assert lent.fetch.stats.made_contiguous == 0


def _deepseek_v4_weights() -> list[tuple[str, torch.Tensor]]:
    pairs = []
    for layer in range(3):
        prefix = f"model.layers.{layer}.self_attn"
        pairs.append((f"{prefix}.wq_a.weight", torch.full((64, 256), layer + 1.0)))
        pairs.append((f"{prefix}.o_proj.weight", torch.full((256, 64), 0.5)))
        pairs.append((f"{prefix}.wkv.weight", torch.full((64, 256), -layer - 1.0)))
    return [(n, t.to(torch.bfloat16)) for n, t in pairs]


async def test_fusion_groups_share_one_bucket() -> None:
    weights = _deepseek_v4_weights()
    spec = {name: (tuple(t.shape), t.dtype) for name, t in weights}
    with SGLangHTTPDouble(spec) as server:
        # 40 KB buckets: one 32 KB matrix each, so every group would straddle a boundary.
        async with _updater(
            server,
            bucket_bytes=40_000,
            fusion_groups=DEEPSEEK_V4_FUSION_GROUPS,
            lends_buffers=False,
        ) as updater:
            await updater.update_weights(iter(weights), global_steps=1)
        for update in server.updates:
            names = [n for n, _ in update[0]]
            for name in names:
                if name.endswith(".wq_a.weight"):
                    assert name.replace(".wq_a.", ".wkv.") in names
        assert {n for n, _ in weights} == set(server.weights)


async def test_an_incomplete_fusion_group_fails_the_sync_naming_it() -> None:
    weights = [p for p in _deepseek_v4_weights() if "layers.2.self_attn.wkv" not in p[0]]
    spec = {name: (tuple(t.shape), t.dtype) for name, t in weights}
    with SGLangHTTPDouble(spec) as server:
        async with _updater(
            server, fusion_groups=DEEPSEEK_V4_FUSION_GROUPS, lends_buffers=False
        ) as updater:
            with pytest.raises(StageError, match=r"layers\.2\.self_attn\.wq_a"):
                await updater.update_weights(iter(weights), global_steps=1)
        assert server.weight_version == "default"


async def test_delta_flush_wire_format_is_refused() -> None:
    engine = SGLangHTTPEngine("http://127.0.0.1:9", retries=0)
    updater = WeightpipeUpdater(engine, bucket_bytes=BUCKET)
    with pytest.raises(ValueError, match="delta_flush"):
        await updater.update_weights(iter([]), global_steps=1, wire_format="delta_flush")


def test_quantize_stage_follows_verls_sglang_config() -> None:
    config = build_sglang_fp8_quant_config(None, ignored_layers=["model.layers.0.mlp.down_proj"])
    stage = quantize_stage(config)
    assert stage.block == (128, 128)
    assert stage.arithmetic == "verl"
    assert stage.method == "block"
    assert stage.keep_dtype is None
    assert not stage.selection("model.layers.0.mlp.down_proj.weight", (256, 320))
    assert stage.selection("model.layers.1.mlp.down_proj.weight", (256, 320))
    with pytest.raises(ValueError, match="weight_block_size"):
        quantize_stage({"quant_method": "fp8"})
    with pytest.raises(ValueError, match="awq"):
        quantize_stage({"quant_method": "awq"})


def test_only_backends_that_give_owned_tensors_skip_the_copy() -> None:
    assert not lends_buffers("weightpipe")
    assert not lends_buffers("naive")
    for backend in ("nccl", "nixl", "hccl", "mooncake", "kimi", "something_new"):
        assert lends_buffers(backend)


def test_updater_for_rollout_reads_verls_rollout_config() -> None:
    config = RolloutConfig(
        name="sglang",
        quantization="fp8",
        checkpoint_engine=CheckpointEngineConfig(
            backend="nccl",
            update_weights_bucket_megabytes=3,
            engine_kwargs={"weightpipe": {"depth": 3, "fp8_arithmetic": "sglang"}},
        ),
    )

    class HFConfig:
        model_type = "deepseek_v4"
        quantization_config = _quant_config()

    engine = SGLangHTTPEngine("http://127.0.0.1:9", retries=0)
    updater = updater_for_rollout(config, HFConfig(), engine)
    assert updater.fetch.bucket_bytes == 3 << 20
    assert updater.lends_buffers
    assert updater.depth == 3
    assert updater.quantize is not None and updater.quantize.block == (128, 128)
    assert updater.quantize.arithmetic == "sglang"  # engine_kwargs override verl's default
    assert updater.keep_fused is not None
    assert [type(s).__name__ for s in updater.stages()] == ["Fetch", "KeepFused", "Fp8Quantize"]

    plain = RolloutConfig(
        name="sglang", checkpoint_engine=CheckpointEngineConfig(backend="weightpipe")
    )
    updater = updater_for_rollout(plain, object(), engine)
    assert updater.quantize is None and updater.keep_fused is None
    assert not updater.lends_buffers
