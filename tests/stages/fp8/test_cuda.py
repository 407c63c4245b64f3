"""FP8 on CUDA: Triton and torch paths equal the CPU definition; the stage's stream/event.

Skipped without a CUDA device; ``benchmarks/gpu_check.sh`` runs them on one.
"""

from __future__ import annotations

import math

import pytest
import torch

from weightpipe.stages.bucket import WeightBucket
from weightpipe.stages.fp8 import (
    FP8_DTYPE,
    Fp8Arithmetic,
    Fp8Method,
    Fp8Tensor,
    NonFiniteWeightError,
    ScaleFormat,
    check_fp8,
    quantize_fp8,
    quantize_fp8_reference,
    scale_name,
)
from weightpipe.stages.quantize import Fp8Quantize

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
SHAPES = [(1, 1), (127, 129), (128, 128), (4096, 11008), (8, 384, 520)]


def _weight(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * 0.02).to(dtype)


def _same(got: tuple[torch.Tensor, torch.Tensor], ref: Fp8Tensor) -> bool:
    q, s = got
    return bool(
        torch.equal(q.cpu().view(torch.uint8), ref.qweight.view(torch.uint8))
        and torch.equal(s.cpu(), ref.scale)
    )


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("scale_fmt", "arithmetic"), [("float32", "sglang"), ("ue8m0", "sglang"), ("float32", "verl")]
)
def test_cuda_paths_equal_the_cpu_definition(
    shape: tuple[int, ...], dtype: torch.dtype, scale_fmt: ScaleFormat, arithmetic: Fp8Arithmetic
) -> None:
    w = _weight(shape, dtype)
    if shape[-1] > 128:
        w[..., :128, :128] = 0.0  # an all-zero block (verl: scale 1)
        w[..., :128, 128:] *= 1e-3  # a block whose amax is below the 1e-4 epsilon
    ref = quantize_fp8_reference(w, scale_fmt=scale_fmt, arithmetic=arithmetic)
    wc = w.cuda()
    # Triton when installed
    assert _same(quantize_fp8(wc, scale_fmt=scale_fmt, arithmetic=arithmetic), ref)
    stage = Fp8Quantize(scale_fmt=scale_fmt, arithmetic=arithmetic, backend="torch")
    # A 3-D weight is quantized only as a stacked expert tensor (a plain q_proj is not).
    name = "m.mlp.experts.down_proj.weight" if len(shape) == 3 else "m.q_proj.weight"
    assert stage.selection.quantizes(name, w)
    out = stage.quantize_bucket(WeightBucket(((name, wc),), 0, True, 1))
    out.ready.synchronize()
    assert _same((out.tensors[0][1], out.tensors[1][1]), ref)


@pytest.mark.parametrize("method", ["channel", "tensor"])
def test_cuda_channel_and_tensor_equal_the_cpu_definition(method: Fp8Method) -> None:
    w = _weight((300, 520), torch.bfloat16)
    ref = quantize_fp8_reference(w, method=method)
    assert _same(quantize_fp8(w.cuda(), method=method), ref)


def test_rounding_table_on_the_gpu() -> None:
    codes = torch.arange(0, 0x7F, dtype=torch.uint8).view(FP8_DTYPE).float()
    mid = (codes[:-1] + codes[1:]) / 2
    probes = torch.cat(
        [
            torch.tensor([448.0, 1e-30, 2.0**-10, 0.0]),
            codes,
            mid,
            torch.nextafter(mid, torch.zeros_like(mid)),
            torch.nextafter(mid, torch.full_like(mid, 1e9)),
        ]
    )
    row = torch.zeros(1, 1024)
    row[0, : 2 * probes.numel()] = torch.cat([probes, -probes])
    ref = quantize_fp8_reference(row, block=(1, 1024))
    assert _same(quantize_fp8(row.cuda(), block=(1, 1024)), ref)


def test_stage_on_cuda_uses_its_stream_and_hands_an_event() -> None:
    names = [f"model.layers.0.mlp.experts.{e}.down_proj.weight" for e in range(16)]
    tensors = [(n, _weight((256, 384), torch.bfloat16, seed=i).cuda()) for i, n in enumerate(names)]
    tensors.append(("model.norm.weight", torch.ones(384, device="cuda")))
    producer = torch.cuda.Stream()  # type: ignore[no-untyped-call]
    with torch.cuda.stream(producer):
        ready = torch.cuda.Event()  # type: ignore[no-untyped-call]
        ready.record(producer)
    stage = Fp8Quantize()
    bucket = WeightBucket(tuple(tensors), 0, True, 1, ready=ready)
    out = stage.quantize_bucket(bucket)
    assert out.ready is not None
    torch.cuda.current_stream().wait_event(out.ready)
    got = dict(out.tensors)
    for name, w in tensors[:-1]:
        ref = quantize_fp8_reference(w.cpu())
        q, s = got[name], got[scale_name(name)]
        assert _same((q, s), ref)
        assert check_fp8(w.cpu(), Fp8Tensor(q.cpu(), s.cpu())) <= 1.0
    assert got["model.norm.weight"].dtype == torch.bfloat16
    assert out.meta["quantized"] == 16


def test_stage_on_cuda_nonfinite_error_and_keep() -> None:
    w = _weight((200, 300), torch.bfloat16).cuda()
    w[5, 5] = math.nan
    bucket = WeightBucket((("a.o_proj.weight", w),), 0, True, 1)
    with pytest.raises(NonFiniteWeightError, match=r"a\.o_proj\.weight"):
        Fp8Quantize().quantize_bucket(bucket)
    out = Fp8Quantize(nonfinite="keep").quantize_bucket(bucket)
    out.ready.synchronize()
    assert out.meta["nonfinite_kept"] == 1
    assert out.tensors[0][1].dtype == torch.bfloat16


def test_stage_on_cuda_defers_the_nan_check_to_the_last_bucket() -> None:
    w = _weight((200, 300), torch.bfloat16).cuda()
    w[5, 5] = math.nan
    stage = Fp8Quantize()
    # Bucket 0 is not waited for on the host: it goes on; the last bucket fails, naming it.
    stage.quantize_bucket(WeightBucket((("a.o_proj.weight", w),), 0, False, 1))
    ok = _weight((64, 64), torch.bfloat16).cuda()
    with pytest.raises(NonFiniteWeightError, match=r"a\.o_proj\.weight.*bucket 0"):
        stage.quantize_bucket(WeightBucket((("b.o_proj.weight", ok),), 1, True, 1))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_quantize_fp8_launches_on_the_tensors_device() -> None:
    w = _weight((256, 256), torch.bfloat16).to("cuda:1")
    with torch.cuda.device(0):
        got = quantize_fp8(w)
    assert got.qweight.device == w.device
    assert _same(got, quantize_fp8_reference(w.cpu()))
