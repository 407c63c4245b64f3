"""Fp8Quantize: selection rules on real model names, the SGLang config, and the stage."""

from __future__ import annotations

import itertools
import math
import re
import threading
from collections.abc import AsyncIterator, Sequence

import anyio
import pytest
import torch

from tests.fakes import FakeCudaEvent
from weightpipe.pipeline import Pipeline, StageError
from weightpipe.stages._layout import views_layout
from weightpipe.stages._memory import BufferPool
from weightpipe.stages.bucket import WeightBucket
from weightpipe.stages.engines.base import WireSpec
from weightpipe.stages.fp8 import (
    FP8_ARITHMETICS,
    FP8_DTYPE,
    FP8_METHODS,
    SCALE_FORMATS,
    Fp8Method,
    Fp8Tensor,
    NonFiniteWeightError,
    ScaleFormat,
    check_fp8,
    quantize_fp8_reference,
)
from weightpipe.stages.quantize import Fp8Quantize, Fp8Selection, scale_name, select_for_fp8


def _meta_params(kind: str) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of a tiny transformers model built on the meta device."""
    transformers = pytest.importorskip("transformers")
    common = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 100,
    }
    if kind == "llama":
        config = transformers.LlamaConfig(num_hidden_layers=1, **common)
    elif kind == "qwen2_moe":
        config = transformers.Qwen2MoeConfig(
            num_hidden_layers=1,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=64,
            num_experts=4,
            num_experts_per_tok=2,
            **common,
        )
    else:
        config = transformers.DeepseekV3Config(
            num_hidden_layers=2,
            first_k_dense_replace=1,
            moe_intermediate_size=32,
            n_routed_experts=4,
            n_shared_experts=1,
            num_experts_per_tok=2,
            q_lora_rank=32,
            kv_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
            n_group=1,
            topk_group=1,
            **{**common, "num_key_value_heads": 4},
        )
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def _quantized(params: dict[str, tuple[int, ...]], sel: Fp8Selection) -> set[str]:
    return {name for name, shape in params.items() if sel(name, shape)}


LLAMA_LINEAR = {
    f"model.layers.0.{m}.weight"
    for m in (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    )
}


def test_selection_on_llama() -> None:
    params = _meta_params("llama")
    assert _quantized(params, Fp8Selection()) == LLAMA_LINEAR


def test_selection_on_qwen2_moe() -> None:
    params = _meta_params("qwen2_moe")
    got = _quantized(params, Fp8Selection())
    assert got == {
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.0.self_attn.v_proj.weight",
        "model.layers.0.self_attn.o_proj.weight",
        "model.layers.0.mlp.experts.gate_up_proj",  # 3-D stack, per expert matrix
        "model.layers.0.mlp.experts.down_proj",
        "model.layers.0.mlp.shared_expert.gate_proj.weight",
        "model.layers.0.mlp.shared_expert.up_proj.weight",
        "model.layers.0.mlp.shared_expert.down_proj.weight",
    }
    # Router and shared-expert gate, biases, norms, embeddings and lm_head stay.
    for kept in (
        "model.layers.0.mlp.gate.weight",
        "model.layers.0.mlp.shared_expert_gate.weight",
        "model.layers.0.self_attn.q_proj.bias",
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.norm.weight",
    ):
        assert kept in params and kept not in got
    # Checkpoint (HF) names of single experts, as SGLang loads them.
    sel = Fp8Selection()
    assert sel("model.layers.3.mlp.experts.17.gate_proj.weight", (32, 64))
    assert sel("model.layers.3.mlp.experts.17.down_proj.weight", (64, 32))


def test_selection_on_deepseek_style_names() -> None:
    params = _meta_params("deepseek")
    got = _quantized(params, Fp8Selection())
    for layer in (0, 1):
        for m in ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"):
            assert f"model.layers.{layer}.self_attn.{m}.weight" in got
        assert f"model.layers.{layer}.self_attn.q_a_layernorm.weight" not in got
        assert f"model.layers.{layer}.self_attn.kv_a_layernorm.weight" not in got
    assert "model.layers.1.mlp.gate.weight" not in got  # the router
    assert "model.layers.1.mlp.experts.gate_up_proj" in got
    assert "model.layers.1.mlp.shared_experts.down_proj.weight" in got
    assert "model.layers.0.mlp.gate_proj.weight" in got  # dense MLP's gate_proj is linear
    assert Fp8Selection().why_not("model.layers.1.mlp.gate.e_score_correction_bias", (4,))


def test_selection_ignored_layers_follow_sglang_matching() -> None:
    params = _meta_params("llama")
    sel = Fp8Selection(ignored_layers=("layers.0.mlp.down_proj",))  # no "model." prefix
    assert _quantized(params, sel) == LLAMA_LINEAR - {"model.layers.0.mlp.down_proj.weight"}
    # A fused SGLang name covers its checkpoint shards.
    sel = Fp8Selection(ignored_layers=("model.layers.0.self_attn.qkv_proj",))
    assert _quantized(params, sel) == LLAMA_LINEAR - {
        f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkv"
    }
    # Dotted boundaries: "mlp.gate" is not "mlp.gate_proj" nor "mlp.gate_up_proj".
    sel = Fp8Selection(ignored_layers=("mlp.gate",))
    assert _quantized(params, sel) == LLAMA_LINEAR
    # A layer prefix ignores the whole layer; re: uses re.match on the module name.
    assert _quantized(params, Fp8Selection(ignored_layers=("model.layers.0",))) == set()
    sel = Fp8Selection(ignored_layers=(r"re:.*\.(o|down)_proj$",))
    assert _quantized(params, sel) == LLAMA_LINEAR - {
        "model.layers.0.self_attn.o_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
    }


def test_selection_include_and_exclude_patterns() -> None:
    params = _meta_params("llama")
    sel = Fp8Selection(include=("*.mlp.*",))
    assert _quantized(params, sel) == {n for n in LLAMA_LINEAR if ".mlp." in n}
    sel = Fp8Selection(exclude=("re:.*self_attn",))
    assert _quantized(params, sel) == {n for n in LLAMA_LINEAR if ".mlp." in n}
    # Include never overrides the structural rules.
    assert not select_for_fp8("lm_head.weight", (100, 64), include=("*",))
    assert select_for_fp8("x.q_proj.weight", (4, 4), include=("*",), exclude=("y.*",))
    with pytest.raises(ValueError, match="re:"):
        Fp8Selection(exclude=("re:(",))
    with pytest.raises(ValueError, match="non-empty"):
        Fp8Selection(include=("",))


def test_quantization_config_default_matches_sglang_fp8() -> None:
    stage = Fp8Quantize(ignored_layers=["model.layers.0.mlp.down_proj"])
    assert stage.quantization_config() == {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [128, 128],
        "ignored_layers": ["model.layers.0.mlp.down_proj"],
    }
    assert Fp8Quantize(scale_fmt="ue8m0").quantization_config()["scale_fmt"] == "ue8m0"
    assert Fp8Quantize(block=(64, 32)).quantization_config()["weight_block_size"] == [64, 32]
    tensor = Fp8Quantize(method="tensor").quantization_config()
    assert "weight_block_size" not in tensor and tensor["quant_method"] == "fp8"
    channel = Fp8Quantize(method="channel").quantization_config()
    assert channel["quant_method"] == "compressed-tensors"
    assert channel["config_groups"]["group_0"]["weights"]["strategy"] == "channel"


def test_quantization_config_expands_rules_against_the_model() -> None:
    params = _meta_params("qwen2_moe")
    stage = Fp8Quantize(ignored_layers=[r"re:.*\.o_proj"], exclude=["*.shared_expert.*"])
    with pytest.raises(ValueError, match="parameters"):
        stage.quantization_config()
    config = stage.quantization_config(params.items())
    ignored = set(config["ignored_layers"])
    assert "model.layers.0.self_attn.o_proj" in ignored
    assert "model.layers.0.mlp.shared_expert.down_proj" in ignored
    assert "model.layers.0.mlp.gate" in ignored and "lm_head" in ignored
    assert not any(entry.startswith("re:") for entry in ignored)
    # Everything the stage quantizes is a module SGLang will not skip, and vice versa.
    for name, shape in params.items():
        if name.endswith(".weight") and len(shape) == 2:
            module = name.removesuffix(".weight")
            assert stage.selection(name, shape) == (module not in ignored)


def test_quantization_config_refuses_to_split_a_fused_layer() -> None:
    params = _meta_params("llama")
    stage = Fp8Quantize(exclude=["*.k_proj.weight"])
    with pytest.raises(ValueError, match="qkv_proj"):
        stage.quantization_config(params.items())


# ------------------------------------------------------------------ the stage


def _bucket(
    tensors: Sequence[tuple[str, torch.Tensor]],
    index: int = 0,
    is_last: bool = True,
    version: int = 7,
) -> WeightBucket:
    return WeightBucket(tuple(tensors), index, is_last, version)


def _llama_tensors(
    dtype: torch.dtype = torch.bfloat16, seed: int = 0
) -> list[tuple[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    shapes = {
        "model.embed_tokens.weight": (100, 64),
        "model.layers.0.self_attn.q_proj.weight": (64, 64),
        "model.layers.0.self_attn.q_proj.bias": (64,),
        "model.layers.0.mlp.down_proj.weight": (130, 200),
        "model.layers.0.input_layernorm.weight": (64,),
        "model.layers.0.mlp.gate.weight": (4, 64),
        "model.layers.0.mlp.experts.gate_up_proj": (3, 70, 64),
        "lm_head.weight": (100, 64),
    }
    return [
        (name, (torch.randn(shape, generator=gen) * 0.05).to(dtype))
        for name, shape in shapes.items()
    ]


async def test_stage_output_layout_and_bits() -> None:
    tensors = _llama_tensors(torch.float32)
    before = [t.clone() for _, t in tensors]
    stage = Fp8Quantize()
    await stage.open()
    try:
        (out,) = await stage.process(_bucket(tensors, index=3, is_last=False, version=9))
    finally:
        await stage.close()
    assert (out.index, out.is_last, out.version) == (3, False, 9)
    assert out.names == [
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.q_proj.weight_scale_inv",
        "model.layers.0.self_attn.q_proj.bias",
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.0.mlp.down_proj.weight_scale_inv",
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.mlp.gate.weight",
        "model.layers.0.mlp.experts.gate_up_proj",
        "model.layers.0.mlp.experts.gate_up_proj_scale_inv",
        "lm_head.weight",
    ]
    assert out.meta["quantized"] == 3 and out.meta["kept"] == 5
    assert out.meta["nonfinite_kept"] == 0
    got = dict(out.tensors)
    for name, source in tensors:
        if name in (
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.0.mlp.down_proj.weight",
            "model.layers.0.mlp.experts.gate_up_proj",
        ):
            ref = quantize_fp8_reference(source)
            assert got[name].dtype == FP8_DTYPE
            assert torch.equal(got[name].view(torch.uint8), ref.qweight.view(torch.uint8))
            assert torch.equal(got[scale_name(name)], ref.scale)
            assert check_fp8(source, Fp8Tensor(got[name], got[scale_name(name)])) <= 1.0
        else:
            assert got[name].dtype == torch.bfloat16  # keep_dtype
            assert torch.equal(got[name], source.to(torch.bfloat16))
    for (_, t), b in zip(tensors, before, strict=True):
        assert torch.equal(t, b)  # inputs untouched


async def test_stage_keep_dtype_none_and_passthrough_of_other_dtypes() -> None:
    fp8 = torch.zeros(4, 4, dtype=FP8_DTYPE)
    ids = torch.arange(5)
    w = torch.randn(64, 64, dtype=torch.float16)
    stage = Fp8Quantize(keep_dtype=None, method="tensor")
    out = stage.quantize_bucket(
        _bucket(
            [
                ("a.q_proj.weight", w),
                ("b.ids", ids),
                ("c.k_proj.weight", fp8),
                ("d.norm.weight", torch.ones(64, dtype=torch.float32)),
            ]
        )
    )
    got = dict(out.tensors)
    assert got["a.q_proj.weight"].dtype == FP8_DTYPE
    assert got["a.q_proj.weight_scale"].shape == ()  # SGLang's per-tensor name
    assert got["b.ids"] is ids
    assert got["c.k_proj.weight"] is fp8  # already FP8: passes through
    assert got["d.norm.weight"].dtype == torch.float32


async def test_stage_matches_the_functions_for_every_method_and_format() -> None:
    tensors = _llama_tensors()
    name = tensors[3][0]
    for method, fmt, arithmetic in itertools.product(FP8_METHODS, SCALE_FORMATS, FP8_ARITHMETICS):
        if arithmetic == "verl" and (method, fmt) != ("block", "float32"):
            with pytest.raises(ValueError, match="Fp8Quantize: arithmetic='verl'"):
                Fp8Quantize(method=method, scale_fmt=fmt, arithmetic=arithmetic)
            continue
        ref = quantize_fp8_reference(
            tensors[3][1], method=method, scale_fmt=fmt, arithmetic=arithmetic
        )
        for wire in (None, WireSpec()):  # output arena; or the packed wire buffer
            stage = Fp8Quantize(
                method=method, scale_fmt=fmt, arithmetic=arithmetic, cpu_threads=2, wire=wire
            )
            got = dict(stage.quantize_bucket(_bucket(tensors)).tensors)
            assert torch.equal(got[name].view(torch.uint8), ref.qweight.view(torch.uint8))
            assert torch.equal(got[scale_name(name, method)], ref.scale)


async def test_nonfinite_keep_counts_and_keeps_high_precision() -> None:
    tensors = _llama_tensors()
    bad = tensors[3][1].clone()
    bad[0, 0] = math.inf
    tensors[3] = (tensors[3][0], bad)
    out = Fp8Quantize(nonfinite="keep").quantize_bucket(_bucket(tensors))
    got = dict(out.tensors)
    assert got["model.layers.0.mlp.down_proj.weight"].dtype == torch.bfloat16
    assert "model.layers.0.mlp.down_proj.weight_scale_inv" not in got
    assert out.meta["nonfinite_kept"] == 1 and out.meta["quantized"] == 2


async def _source(buckets: list[WeightBucket]) -> AsyncIterator[WeightBucket]:
    for bucket in buckets:
        yield bucket


async def test_nonfinite_error_mid_stream_names_stage_bucket_and_tensor() -> None:
    good = _llama_tensors(seed=1)
    bad = _llama_tensors(seed=2)
    broken = bad[1][1].clone()
    broken[3, 3] = math.nan
    bad[1] = (bad[1][0], broken)
    buckets = [_bucket(good, 0, False), _bucket(bad, 1, False), _bucket(good, 2, True)]
    seen: list[int] = []

    async def sink(bucket: WeightBucket) -> None:
        seen.append(bucket.index)

    with pytest.raises(StageError) as info:
        await Pipeline([Fp8Quantize()]).run(_source(buckets), sink=sink)
    err = info.value
    assert err.stage == "quantize" and err.phase == "process"
    assert "bucket 1" in str(err)
    assert isinstance(err.__cause__, NonFiniteWeightError)
    assert err.__cause__.tensor == "model.layers.0.self_attn.q_proj.weight"
    assert seen == [0]


async def test_error_at_open_for_an_impossible_backend() -> None:
    stage = Fp8Quantize(backend="triton", block=(100, 128))
    with pytest.raises(StageError) as info:
        await Pipeline([stage]).run([_bucket(_llama_tensors())])
    assert info.value.phase == "open"


async def test_error_at_close_is_reported() -> None:
    class FailingClose(Fp8Quantize):
        async def close(self) -> None:
            await super().close()
            raise RuntimeError("close broke")

    with pytest.raises(StageError) as info:
        await Pipeline([FailingClose()]).run([_bucket(_llama_tensors())])
    assert info.value.phase == "close"


async def test_pipeline_keeps_order_with_concurrent_workers() -> None:
    buckets = [_bucket(_llama_tensors(seed=i), i, i == 5) for i in range(6)]
    out: list[WeightBucket] = []

    async def sink(bucket: WeightBucket) -> None:
        out.append(bucket)

    report = await Pipeline([Fp8Quantize(workers=2, cpu_threads=2)], depth=2).run(
        buckets, sink=sink
    )
    assert [b.index for b in out] == list(range(6))
    assert out[-1].is_last and report.stages[0].items_out == 6
    ref = quantize_fp8_reference(buckets[4].tensors[3][1])
    assert torch.equal(
        dict(out[4].tensors)[buckets[4].tensors[3][0]].view(torch.uint8),
        ref.qweight.view(torch.uint8),
    )


async def test_cancellation_while_the_source_is_blocked() -> None:
    started = anyio.Event()
    release = anyio.Event()
    closed: list[bool] = []

    class Tracked(Fp8Quantize):
        async def close(self) -> None:
            closed.append(True)
            await super().close()

    async def source() -> AsyncIterator[WeightBucket]:
        yield _bucket(_llama_tensors(), 0, False)
        started.set()
        await release.wait()  # never released: the run is cancelled here
        yield _bucket(_llama_tensors(), 1, True)

    got: list[int] = []

    async def sink(bucket: WeightBucket) -> None:
        got.append(bucket.index)

    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            pipeline = Pipeline([Tracked()])

            async def run() -> None:
                await pipeline.run(source(), sink=sink)

            tg.start_soon(run)
            await started.wait()
            scope.cancel()
    assert scope.cancelled_caught
    assert closed == [True]


def test_constructor_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="method"):
        Fp8Quantize(method="row")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="nonfinite"):
        Fp8Quantize(nonfinite="drop")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="keep_dtype"):
        Fp8Quantize(keep_dtype=torch.int8)
    with pytest.raises(ValueError, match="workers"):
        Fp8Quantize(workers=0)
    with pytest.raises(ValueError, match="arithmetic"):
        Fp8Quantize(arithmetic="ieee")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="square block"):
        Fp8Quantize(arithmetic="verl", block=(128, 64))
    with pytest.raises(ValueError, match="block"):
        Fp8Quantize(block=(0, 128))
    assert Fp8Quantize.name == "quantize"


@pytest.mark.parametrize("block", [(128.9, 128), (128,), (64, 64, 64)])
def test_a_block_that_is_not_two_ints_is_refused_naming_it(block: object) -> None:
    # Before: (128.9, 128) was silently truncated to (128, 128); (128,) an IndexError.
    with pytest.raises(ValueError, match=r"Fp8Quantize: block .*" + re.escape(repr(block))):
        Fp8Quantize(block=block)  # type: ignore[arg-type]
    assert Fp8Quantize(block=[64, 32]).block == (64, 32)  # type: ignore[arg-type]


async def test_two_quantize_stages_can_be_named_apart() -> None:
    bad = _llama_tensors()
    broken = bad[1][1].clone()
    broken[0, 0] = math.nan
    bad[1] = (bad[1][0], broken)
    pipeline = Pipeline([Fp8Quantize(method="tensor", nonfinite="keep"), Fp8Quantize(name="q2")])
    with pytest.raises(StageError) as info:
        await pipeline.run([_bucket(bad)])
    assert info.value.stage == "q2"


def test_output_arenas_are_recycled_only_once_released() -> None:
    gen = torch.Generator().manual_seed(3)
    tensors = tuple(
        (f"model.layers.0.mlp.{n}.weight", torch.randn(256, 384, generator=gen).bfloat16())
        for n in ("up_proj", "down_proj")
    )
    bucket = WeightBucket(tensors, index=0, is_last=True, version=1)
    stage = Fp8Quantize()
    first = stage.quantize_bucket(bucket)
    kept = {n: t.clone() for n, t in first.tensors}
    second = stage.quantize_bucket(bucket)  # `first` is still held: a new arena
    first_ptr = first.tensors[0][1].data_ptr()
    assert second.tensors[0][1].data_ptr() != first_ptr
    for name, tensor in first.tensors:
        assert torch.equal(tensor.view(torch.uint8), kept[name].view(torch.uint8)), name
    ptrs = {first_ptr, second.tensors[0][1].data_ptr()}
    del first, second, tensor
    third = stage.quantize_bucket(bucket)  # both released: one of them is reused
    assert third.tensors[0][1].data_ptr() in ptrs
    for name, tensor in third.tensors:
        assert torch.equal(tensor.view(torch.uint8), kept[name].view(torch.uint8)), name


def test_arena_too_small_is_refused() -> None:
    from weightpipe.stages.fp8 import fp8_output_bytes, quantize_fp8_many

    named = [("w", torch.ones(128, 300, dtype=torch.bfloat16))]
    need = fp8_output_bytes(named)
    assert need >= 128 * 300 and need % 256 == 0
    with pytest.raises(ValueError, match="arena holds"):
        quantize_fp8_many(named, arena=torch.empty(need - 1, dtype=torch.uint8))
    (result,) = quantize_fp8_many(named, arena=torch.empty(need, dtype=torch.uint8))
    assert result is not None and result.qweight.shape == (128, 300)


def test_pool_never_reuses_a_buffer_whose_use_count_is_unknown(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Without torch's storage use count nothing tells a released buffer from one that a
    # downstream view still reads: the pool must treat it as busy. It used to count every
    # such buffer as free and hand the same memory out twice.
    monkeypatch.delattr(torch._C, "_storage_Use_Count")
    pool = BufferPool(4096, keep=4, pin=False)
    first = pool.take(4096)
    view = first[:16]
    view.fill_(7)
    second = pool.take(4096)
    assert second.data_ptr() != first.data_ptr()
    second.fill_(0)
    assert bool((view == 7).all())
    pool.reserve(2)
    assert pool.retained_bytes == 0  # nothing kept that could never be known free


def test_output_arenas_are_not_recycled_when_use_counts_are_unknown(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delattr(torch._C, "_storage_Use_Count")
    stage = Fp8Quantize()
    buckets = [
        WeightBucket(
            (("model.layers.0.mlp.up_proj.weight", torch.full((256, 384), v).bfloat16()),),
            index=i,
            is_last=i == 1,
            version=1,
        )
        for i, v in enumerate((0.5, -3.0))
    ]
    first = stage.quantize_bucket(buckets[0])
    kept = first.tensors[0][1].clone()
    stage.quantize_bucket(buckets[1])  # `first` still held downstream
    assert torch.equal(first.tensors[0][1].view(torch.uint8), kept.view(torch.uint8))


def test_pool_waits_for_the_copy_out_of_a_buffer() -> None:
    pool = BufferPool(4096, keep=2, pin=False)
    buffer = pool.take(4096)
    address = buffer.data_ptr()
    copy = FakeCudaEvent()
    copy.done = False
    pool.mark_copied(buffer, copy)
    del buffer
    assert pool.take(4096).data_ptr() != address  # the device still reads it
    copy.done = True
    assert pool.take(4096).data_ptr() == address


# -- writing straight into the wire buffer (use_wire) -------------------------------------


def _mixed_bucket(seed: int = 0) -> WeightBucket:
    g = torch.Generator().manual_seed(seed)
    tensors = (
        ("model.layers.0.mlp.up_proj.weight", torch.randn(300, 260, generator=g).bfloat16()),
        ("model.norm.weight", torch.randn(260, generator=g).bfloat16()),
        ("model.layers.0.self_attn.q_proj.weight", torch.randn(256, 130, generator=g)),
        ("model.layers.0.self_attn.rotary.inv_freq", torch.arange(7, dtype=torch.int64)),
        ("model.embed_tokens.weight", torch.randn(64, 32, generator=g).half()),
    )
    return WeightBucket(tensors, 0, True, 3)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == FP8_DTYPE else t


@pytest.mark.parametrize(
    ("method", "scale_fmt"), [("block", "float32"), ("block", "ue8m0"), ("channel", "float32")]
)
@pytest.mark.parametrize("shared", [False, True])
def test_packed_output_is_the_unpacked_output_in_one_aligned_buffer(
    method: Fp8Method, scale_fmt: ScaleFormat, shared: bool
) -> None:
    bucket = _mixed_bucket()
    plain = Fp8Quantize(method=method, scale_fmt=scale_fmt).quantize_bucket(bucket)
    stage = Fp8Quantize(method=method, scale_fmt=scale_fmt)
    stage.use_wire(WireSpec(align_bytes=16, shared_memory=shared))
    packed = stage.quantize_bucket(bucket)
    assert [n for n, _ in packed.tensors] == [n for n, _ in plain.tensors]
    for (name, a), (_, b) in zip(plain.tensors, packed.tensors, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(_bits(a), _bits(b)), name
    buffer = packed.buffer
    assert buffer is not None and buffer.is_shared() == shared  # type: ignore[no-untyped-call]
    layout = views_layout(buffer, packed.tensors)  # what the SGLang wire sends as it is
    assert layout is not None
    assert all(entry.offset % max(16, entry.dtype.itemsize) == 0 for entry in layout)
    assert stage.written_bytes == sum(entry.nbytes for entry in layout)
    assert packed.meta["quantized"] == plain.meta["quantized"] == 2
    storage = buffer.untyped_storage().data_ptr()
    for name, tensor in bucket.tensors:  # no output aliases an input
        assert tensor.untyped_storage().data_ptr() != storage, name


def test_packed_buffers_are_not_reused_while_a_bucket_holds_them() -> None:
    stage = Fp8Quantize()
    stage.use_wire(WireSpec())
    first = stage.quantize_bucket(_mixed_bucket(1))
    snapshot = [(n, _bits(t).clone()) for n, t in first.tensors]
    second = stage.quantize_bucket(_mixed_bucket(2))
    assert first.buffer is not None and second.buffer is not None
    assert first.buffer.data_ptr() != second.buffer.data_ptr()
    for (name, before), (_, now) in zip(snapshot, first.tensors, strict=True):
        assert torch.equal(before, _bits(now)), name
    ptr = first.buffer.data_ptr()
    del first, now, snapshot
    third = stage.quantize_bucket(_mixed_bucket(3))
    assert third.buffer is not None and third.buffer.data_ptr() == ptr  # recycled once free


def test_packed_nonfinite_weight_is_named_or_kept_unpacked() -> None:
    tensors = list(_mixed_bucket().tensors)
    bad = tensors[2][1].clone()
    bad[5, 7] = float("nan")
    tensors[2] = (tensors[2][0], bad)
    bucket = WeightBucket(tuple(tensors), 0, True, 3)
    strict = Fp8Quantize()
    strict.use_wire(WireSpec())
    with pytest.raises(NonFiniteWeightError, match="q_proj"):
        strict.quantize_bucket(bucket)
    lenient = Fp8Quantize(nonfinite="keep")
    lenient.use_wire(WireSpec())
    out = lenient.quantize_bucket(bucket)
    assert out.buffer is None  # fell back to separate tensors: the layout changed
    assert out.meta["nonfinite_kept"] == 1
    assert dict(out.tensors)["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16


def test_written_bytes_count_outputs_not_pass_throughs() -> None:
    stage = Fp8Quantize(keep_dtype=None)
    bucket = _mixed_bucket()
    out = stage.quantize_bucket(bucket)
    fp8 = [t for n, t in out.tensors if t.dtype == FP8_DTYPE or "scale" in n]
    assert stage.written_bytes == sum(t.nbytes for t in fp8)  # kept tensors were not copied
    cast = Fp8Quantize()  # keep_dtype bf16: the fp16 embedding is cast, a write
    cast.quantize_bucket(bucket)
    embed = dict(bucket.tensors)["model.embed_tokens.weight"]
    assert cast.written_bytes == stage.written_bytes + embed.numel() * 2


def test_concurrent_workers_share_one_stream_per_device(monkeypatch: pytest.MonkeyPatch) -> None:
    # With workers > 1 two buckets can ask for a device's stream at once. The first
    # creation lets a second worker in before it returns: unlocked, that worker made a
    # second stream for the same device (and its events were recorded on another stream).
    stage = Fp8Quantize(workers=2)
    made: list[object] = []
    seen: dict[str, object] = {}
    second = threading.Thread(target=lambda: seen.update(second=stage._stream(device)))
    device = torch.device("cuda", 1)

    class Stream:
        def __init__(self, device: int) -> None:
            made.append(self)
            if len(made) == 1:
                second.start()
                # Unlocked, the second worker creates its own stream meanwhile; locked,
                # it waits for this one, and this join gives up after the timeout.
                second.join(timeout=2)

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    seen["first"] = stage._stream(device)
    second.join(timeout=30)
    assert not second.is_alive()
    assert len(made) == 1 and seen["first"] is seen["second"] is made[0]


def test_a_nonfinite_weight_kept_on_cuda_makes_the_event_be_recorded_again() -> None:
    # nonfinite="keep": a selected CUDA weight that held NaN has a None result and is cast
    # after the quantize event; the bucket's ready event must come after that cast. The
    # old rule looked only at unselected tensors (no result at all) and missed it.
    from weightpipe.stages.quantize import _kept_after_event

    q = Fp8Tensor(torch.zeros(1, 1, dtype=FP8_DTYPE), torch.ones(1, 1))
    assert not _kept_after_event([0, 1], {0: q, 1: q})
    assert _kept_after_event([0, 1], {0: q, 1: None})  # kept: non-finite
    assert _kept_after_event([0, 1], {0: q})  # kept: not selected
