"""weightpipe's ``arithmetic="verl"`` against verl 0.9.1's own FP8 block quantizer, bit for bit.

verl's SGLang rollout quantizes with ``verl.utils.kernel.fp8_kernel.scaled_fp8_blockwise``,
which runs its PyTorch path where Triton is absent (or ``VERL_DISABLE_TRITON_FP8=1``):
the path forced here. The same weights (an all-zero block, a block whose amax is below
SGLang's 1e-4 epsilon, partial edge blocks; bf16, fp16 and fp32) go through it and
through every weightpipe entry the verl integration uses, and the codes and scales must
be the same bits. SGLang's arithmetic, on the same weights, must not be (else this test
could not tell the arithmetics apart).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("verl")

from verl.utils.kernel import fp8_kernel
from verl.utils.sglang.sglang_fp8_utils import build_sglang_fp8_quant_config

from weightpipe.stages import WeightBucket
from weightpipe.stages.engines.base import WireSpec
from weightpipe.stages.fp8 import (
    NonFiniteWeightError,
    cpu,
    quantize_fp8,
    quantize_fp8_reference,
)
from weightpipe.stages.integrations.verl import quantize_stage

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
SHAPES = [(1, 1), (128, 128), (300, 260), (257, 1030)]


@pytest.fixture(autouse=True)
def verl_pytorch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """verl's quantizer as it runs without Triton (the path weightpipe reproduces)."""
    monkeypatch.setattr(fp8_kernel, "_DISABLE_TRITON_FP8", True)


def _weight(shape: tuple[int, int], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    rows = torch.logspace(-3, 1, shape[0])[:, None]  # magnitudes over four decades
    w = torch.randn(shape, generator=gen) * 0.02 * rows
    if shape[1] > 128:
        w[:128, :128] = 0.0  # all zero: verl's multiplier and scale are 1
        w[:128, 128:256] *= 1e-4  # amax far below 1e-4: no epsilon in verl's rule
    return w.to(dtype)


def _verl(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    # clone: verl's quantizer scales some float32 inputs in place.
    q, scale = fp8_kernel.scaled_fp8_blockwise(w.clone(), weight_block_size=[block, block])
    return q.view(torch.uint8), scale.squeeze(-1)


def _bits(q: torch.Tensor) -> torch.Tensor:
    return q.view(torch.uint8)


@pytest.mark.parametrize("kernel", ["torch", "numba"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_verl_arithmetic_is_verls_quantizer_bit_for_bit(
    shape: tuple[int, int], dtype: torch.dtype, kernel: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if kernel == "numba":
        pytest.importorskip("numba")
    monkeypatch.setattr(cpu, "_CPU_KERNEL", kernel)
    w = _weight(shape, dtype)
    before = w.clone()
    want_q, want_s = _verl(w)
    for got in (
        quantize_fp8(w, arithmetic="verl", threads=2),
        quantize_fp8_reference(w, arithmetic="verl"),
    ):
        assert torch.equal(_bits(got.qweight), want_q)
        assert torch.equal(got.scale, want_s)
    assert torch.equal(w, before)
    if shape[1] > 128:
        assert float(want_s[0, 0]) == 1.0  # the all-zero block, in verl's own output
        sglang = quantize_fp8(w)
        assert not torch.equal(sglang.scale, want_s)


@pytest.mark.parametrize("block", [64, 128])
def test_the_updaters_stage_sends_what_verl_sends(block: int) -> None:
    # The stage the updater and the checkpoint-engine backend build from verl's own
    # quantization_config, on a bucket with a weight of each dtype and an unquantized one.
    config = build_sglang_fp8_quant_config(None) | {"weight_block_size": [block, block]}
    stage = quantize_stage(config)
    assert stage.arithmetic == "verl"
    quantized = [
        (f"model.layers.{i}.mlp.down_proj.weight", _weight((300, 1030), dtype, seed=i))
        for i, dtype in enumerate(DTYPES)
    ]
    tensors = (*quantized, ("model.norm.weight", torch.ones(300, dtype=torch.bfloat16)))
    for wire in (None, WireSpec()):  # the output arena; the packed wire buffer
        stage.use_wire(wire)
        got = dict(stage.quantize_bucket(WeightBucket(tensors, 0, True, 1)).tensors)
        for name, w in tensors[:3]:
            want_q, want_s = _verl(w, block)
            assert torch.equal(_bits(got[name]), want_q), name
            assert torch.equal(got[name + "_scale_inv"], want_s), name
        assert torch.equal(got["model.norm.weight"], tensors[3][1])
    sglang = quantize_stage(config, arithmetic="sglang")
    assert sglang.arithmetic == "sglang"
    out = dict(sglang.quantize_bucket(WeightBucket(tensors, 0, True, 1)).tensors)
    name, w = tensors[0]
    assert not torch.equal(out[name + "_scale_inv"], _verl(w, block)[1])


def test_a_block_verl_cannot_scale_is_refused_not_sent() -> None:
    # Below 448 / FLT_MAX, verl's multiplier overflows: it sends scale 0 and NaN codes.
    w = torch.zeros(128, 256, dtype=torch.bfloat16)
    w[:, 128:] = torch.randn(128, 128) * 0.02
    w[0, 3] = 1e-37
    q, scale = _verl(w)
    assert float(scale[0, 0]) == 0.0
    assert bool(torch.isnan(q.view(torch.float8_e4m3fn)[:, :128].float()).any())
    with pytest.raises(NonFiniteWeightError, match="down_proj"):
        quantize_fp8(w, arithmetic="verl", name="model.layers.0.mlp.down_proj.weight")


def test_combinations_verls_quantizer_lacks_are_refused() -> None:
    config = build_sglang_fp8_quant_config(None)
    with pytest.raises(ValueError, match="square block"):
        quantize_stage(config | {"weight_block_size": [128, 64]}, arithmetic="verl")
    with pytest.raises(ValueError, match="float32 scales only"):
        quantize_stage(config | {"scale_fmt": "ue8m0"}, arithmetic="verl")
    # Without an explicit choice those configs keep SGLang's arithmetic.
    assert quantize_stage(config | {"scale_fmt": "ue8m0"}).arithmetic == "sglang"
    assert quantize_stage(config | {"weight_block_size": [128, 64]}).arithmetic == "sglang"
