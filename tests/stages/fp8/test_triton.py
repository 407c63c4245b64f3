"""The Triton kernel agrees bit for bit with the torch definition (TRITON_INTERPRET=1, CPU).

Triton decides between compiling and interpreting when a kernel is decorated, so the
kernel runs in a fresh interpreter with ``TRITON_INTERPRET=1`` set before anything
imports Triton; the child reports each comparison as JSON. Shapes stay small (the
interpreter runs a block in numpy).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

_CHILD = textwrap.dedent(
    """
    import json, math, torch, anyio
    from weightpipe.stages.fp8 import _triton as T
    from weightpipe.stages.fp8 import (
        FP8_ARITHMETICS, HIGH_PRECISION_DTYPES, SCALE_FORMATS, quantize_fp8_reference,
    )
    from weightpipe.stages.bucket import WeightBucket
    from weightpipe.stages.quantize import Fp8Quantize

    results = {}
    def same(key, got, ref):
        q, s = got
        results[key] = bool(
            torch.equal(q.view(torch.uint8), ref.qweight.view(torch.uint8))
            and s.shape == ref.scale.shape and torch.equal(s, ref.scale)
        )

    gen = torch.Generator().manual_seed(0)
    # Unaligned (scalar, 32-row chunks) and aligned (vector, whole block) launches: a
    # launch is aligned only if all of its matrices are, so each list is its own launch.
    unaligned = [(1, 1), (127, 129), (130, 260), (2, 3, 129)]
    aligned = [(128, 128), (130, 272), (2, 144, 16)]
    modes = [(f, a) for f in SCALE_FORMATS for a in FP8_ARITHMETICS if (f, a) != ("ue8m0", "verl")]
    for fmt, ar in modes:
        for dtype in HIGH_PRECISION_DTYPES:
            for kind, shapes in (("unaligned", unaligned), ("aligned", aligned)):
                ws = [(torch.randn(s, generator=gen) * 0.05).to(dtype) for s in shapes]
                ws.append(torch.zeros(64, 208 if kind == "aligned" else 200, dtype=dtype))
                # An all-zero block, then one whose amax is below the 1e-4 epsilon.
                edges = (torch.randn(130, 272, generator=gen) * 1e-6).to(dtype)
                edges[:128, :128] = 0
                ws.append(edges if kind == "aligned" else edges[:, :260].contiguous())
                outs, flags = T.quantize_block_batch(ws, (128, 128), fmt, ar)
                results[f"flags {kind} {fmt} {ar} {dtype}"] = flags.tolist() == [0] * len(ws)
                for w, got in zip(ws, outs):
                    ref = quantize_fp8_reference(w, scale_fmt=fmt, arithmetic=ar)
                    same(f"{tuple(w.shape)} {dtype} {fmt} {ar}", got, ref)
                # The zero block's scale tells the arithmetics apart (1 vs 1e-4 / 448).
                if fmt == "float32":
                    want = 1.0 if ar == "verl" else float(torch.tensor(1e-4) / 448.0)
                    results[f"zero block scale {kind} {ar} {dtype}"] = (
                        float(outs[-1].scale[0, 0]) == want
                    )

    # 16 columns but a base 4 bytes past an alignment boundary: the scalar path.
    shifted = (torch.randn(70 * 16 + 1, generator=gen) * 0.05)[1:].view(70, 16)
    outs, _ = T.quantize_block_batch([shifted], (128, 128), "float32")
    same("shifted base", outs[0], quantize_fp8_reference(shifted))

    # Every e4m3 rounding case with the scale exactly 1 (amax = 448): one 1 x 1024 block.
    codes = torch.arange(0, 0x7F, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    mid = (codes[:-1] + codes[1:]) / 2
    probes = torch.cat([
        torch.tensor([448.0, 1e-30, 2.0**-10, 0.0]), codes, mid,
        torch.nextafter(mid, torch.zeros_like(mid)),
        torch.nextafter(mid, torch.full_like(mid, 1e9)),
    ])
    probes = torch.cat([probes, -probes])
    row = torch.zeros(1, 1024)
    row[0, : probes.numel()] = probes
    outs, _ = T.quantize_block_batch([row], (1, 1024), "float32")
    same("rounding table", outs[0], quantize_fp8_reference(row, block=(1, 1024)))
    results["rounding scale is 1"] = float(outs[0].scale) == 1.0
    # verl multiplies: the same table through w * (448 / 448), in 1024 x 1024 blocks.
    square = torch.zeros(1024, 1024)
    square[0] = row[0]
    outs, _ = T.quantize_block_batch([square], (1024, 1024), "float32", "verl")
    ref = quantize_fp8_reference(square, block=(1024, 1024), arithmetic="verl")
    same("rounding table verl", outs[0], ref)
    # A product one ulp above 448 (amax * RN(448 / amax) > 448) still gives 448.
    amax = torch.rand(4096, generator=gen) * 10 + 0.01
    over = amax[amax * (torch.tensor(448.0) / amax) > 448.0][:16]
    col = torch.zeros(16, 16)
    col[: over.numel(), 0] = over
    outs, _ = T.quantize_block_batch([col], (1, 1), "float32", "verl")
    ref = quantize_fp8_reference(col, block=(1, 1), arithmetic="verl")
    same("product above 448 verl", outs[0], ref)
    results["product above 448 found"] = over.numel() > 0

    # NaN / Inf set the owner's flag only.
    bad = torch.randn(130, 140).bfloat16()
    bad[129, 139] = math.nan
    inf = torch.randn(3, 20, 20)
    inf[1, 2, 3] = -math.inf
    _, flags = T.quantize_block_batch([torch.ones(5, 5), bad, inf], (128, 128), "float32")
    results["nonfinite flags"] = flags.tolist() == [0, 1, 1]
    # ... on the aligned path too, in the second block row.
    bad16 = torch.randn(130, 144)
    bad16[100, 17] = math.inf
    _, flags = T.quantize_block_batch([torch.ones(16, 16), bad16], (128, 128), "float32")
    results["nonfinite flags aligned"] = flags.tolist() == [0, 1]
    # verl: 448 / amax overflows for 0 < amax < 448 / FLT_MAX: flagged, as on the CPU.
    tiny = torch.ones(130, 144)
    tiny[128:, 128:] = 1e-37
    _, flags = T.quantize_block_batch([torch.ones(16, 16), tiny], (128, 128), "float32", "verl")
    results["too small to scale flags verl"] = flags.tolist() == [0, 1]
    _, flags = T.quantize_block_batch([tiny], (128, 128), "float32", "sglang")
    results["too small is fine for sglang"] = flags.tolist() == [0]

    # The stage with backend="triton" on CPU tensors equals the default CPU path.
    tensors = tuple(
        (f"model.layers.0.mlp.{n}.weight", (torch.randn(s, generator=gen) * 0.1).bfloat16())
        for n, s in (("gate_proj", (150, 64)), ("down_proj", (64, 150)))
    )
    bucket = WeightBucket(tensors, 0, True, 1)

    async def both(ar):
        a, b = Fp8Quantize(backend="triton", arithmetic=ar), Fp8Quantize(arithmetic=ar)
        await a.open(); await b.open()
        (x,) = await a.process(bucket)
        (y,) = await b.process(bucket)
        return x, y
    for ar in FP8_ARITHMETICS:
        x, y = anyio.run(both, ar)
        results[f"stage triton == cpu {ar}"] = x.names == y.names and all(
            torch.equal(p.view(torch.uint8), q.view(torch.uint8))
            for (_, p), (_, q) in zip(x.tensors, y.tensors)
        )
    print("RESULTS " + json.dumps(results))
    """
)


@pytest.mark.slow
def test_triton_kernel_matches_torch_definition_under_the_interpreter() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULTS "))
    results = json.loads(line.removeprefix("RESULTS "))
    failed = sorted(k for k, ok in results.items() if not ok)
    assert not failed, failed
    assert len(results) >= 80


@pytest.mark.slow
@pytest.mark.parametrize(
    ("dtype_name", "ue8m0", "verl"),
    [("bfloat16", False, False), ("float32", True, False), ("bfloat16", False, True)],
)
def test_kernel_compiles_for_hopper_without_a_gpu(dtype_name: str, ue8m0: bool, verl: bool) -> None:
    """Ahead-of-time compile for sm_90: PTX with IEEE divisions, no FMA contraction."""
    triton = pytest.importorskip("triton")
    pytest.importorskip("triton.backends.nvidia")
    from triton.backends.compiler import GPUTarget

    from weightpipe.stages.fp8 import _triton as _fp8_triton

    table = {name: "*i64" for name in ("src", "dst", "scale", "rows", "cols", "owner")}
    signature = {f"{k}_table": v for k, v in table.items()}
    signature |= {"flags": "*i32", "eps": "fp32"}
    constants = ("SRC_DTYPE", "BLOCK_M", "BLOCK_N", "UE8M0", "ALIGNED", "CHUNK_M", "VERL")
    signature |= {k: "constexpr" for k in constants}
    source = triton.compiler.ASTSource(
        fn=_fp8_triton._fp8_block_kernel,
        signature=signature,
        constexprs={
            "SRC_DTYPE": getattr(triton.language, dtype_name),
            "BLOCK_M": 128,
            "BLOCK_N": 128,
            "UE8M0": ue8m0,
            "ALIGNED": True,
            "CHUNK_M": 128,
            "VERL": verl,
        },
    )
    kernel = triton.compile(
        source,
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": 8, "enable_fp_fusion": False},
    )
    ptx = kernel.asm["ptx"]
    assert "div.rn.f32" in ptx
    assert "fma.rn.f32" not in ptx


def test_scales_are_float32_whatever_the_default_dtype() -> None:
    # The kernel writes fp32 scales; a scale tensor of the default dtype (bf16 after
    # torch.set_default_dtype) was half as large, so the kernel wrote past its end.
    import torch

    from weightpipe.stages.fp8 import _triton

    launches: list[int] = []

    class _NoLaunch:
        def __getitem__(self, grid: object) -> object:
            return lambda *args, **kwargs: launches.append(1)

    previous = torch.get_default_dtype()
    original = _triton._fp8_block_kernel
    try:
        _triton._fp8_block_kernel = _NoLaunch()
        torch.set_default_dtype(torch.bfloat16)
        outs, _ = _triton.quantize_block_batch([torch.ones(130, 260, dtype=torch.bfloat16)])
    finally:
        torch.set_default_dtype(previous)
        _triton._fp8_block_kernel = original
    assert launches == [1]
    assert outs[0].scale.dtype == torch.float32 and outs[0].scale.shape == (2, 3)


@pytest.mark.parametrize(
    ("shapes", "offset", "aligned"),
    [
        ([(128, 128), (3, 130, 272)], 0, True),
        ([(128, 128), (130, 260)], 0, False),  # one matrix's rows are not 16-aligned
        ([(70, 16)], 1, False),  # the base is 2 bytes past a 16-byte boundary
    ],
)
def test_vector_path_only_where_every_row_starts_on_16_bytes(
    shapes: list[tuple[int, ...]], offset: int, aligned: bool
) -> None:
    import math

    import torch

    from weightpipe.stages.fp8 import _triton

    launches: list[dict[str, object]] = []

    class _NoLaunch:
        def __getitem__(self, grid: object) -> object:
            return lambda *args, **kwargs: launches.append(kwargs)

    weights = []
    for shape in shapes:
        flat = torch.ones(math.prod(shape) + offset, dtype=torch.bfloat16)
        weights.append(flat[offset:].view(shape))
    original = _triton._fp8_block_kernel
    try:
        _triton._fp8_block_kernel = _NoLaunch()
        _triton.quantize_block_batch(weights)
    finally:
        _triton._fp8_block_kernel = original
    (kwargs,) = launches
    assert kwargs["ALIGNED"] is aligned
    # Scalar accesses hold 32 rows at a time (a whole block spilled); vectors all 128.
    assert kwargs["CHUNK_M"] == (128 if aligned else 32)


def test_device_guard_names_the_weights_device() -> None:
    import contextlib

    import torch

    from weightpipe.stages.fp8 import _triton

    # Constructing torch.cuda.device does not touch the driver; entering it would.
    guard = _triton.device_guard(torch.device("cuda", 3))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 3
    assert isinstance(_triton.device_guard(torch.device("cpu")), contextlib.nullcontext)
