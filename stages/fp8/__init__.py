"""FP8 (float8_e4m3fn) weight quantization as an SGLang FP8 checkpoint stores it.

This module is the numerical core of the ``Fp8Quantize`` stage and is public on its own:
block-wise (default ``[128, 128]`` over ``[out, in]``), per-channel and per-tensor
quantization, optional power-of-two (UE8M0) scales, dequantization and an error-bound
check. Every implementation in the library (the plain reference below, the fast CPU band
path, the batched CUDA path in ``quantize.py`` and the Triton kernel) computes exactly one
definition, bit for bit:

1. ``amax`` = the largest ``|w|`` of the block (row, tensor), in float32 (exact: the input
   is widened losslessly, and a maximum never rounds);
2. ``scale = max(amax, 1e-4) / 448`` as an IEEE float32 division (the epsilon is the
   DeepGEMM / SGLang ``per_block_cast_to_fp8`` one, so an all-zero block gets a finite,
   non-zero scale and quantizes to zeros, never NaN);
3. with ``scale_fmt="ue8m0"`` the scale is rounded *up* to a power of two by its float32
   bits (exponent + 1 when the mantissa is non-zero), so it never under-scales;
4. ``q = float8_e4m3fn(clamp(w_fp32 / scale, -448, 448))``: an IEEE float32 division
   (never a multiplication by ``1 / scale``, which rounds differently) and a
   round-to-nearest-even cast.

The float32 ``scale`` is what SGLang calls ``weight_scale_inv`` (the dequantization
multiplier: ``w ~= q * scale``). Inputs are never modified.

On CPU the work is split into row bands spread over a few worker threads, each band's
temporaries kept in reusable per-thread buffers and large outputs on huge pages. Block
scaling runs a numba kernel that fuses the passes over a cache-sized chunk when numba is
installed (torch's own float8 cast is a scalar loop that dominates otherwise), else
band-wise torch ops; ``WEIGHTPIPE_FP8_CPU_KERNEL=torch`` forces the latter. The numba
kernel and the Triton kernel round float32 to e4m3 on the integer bits; tests hold every
path to the plain reference (``quantize_fp8_reference``) bit for bit.
"""

from __future__ import annotations

import importlib
import itertools
import math
import mmap
import os
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import torch

from weightpipe.stages.fp8.spec import (
    FP8_DTYPE,
    FP8_EPSILON,
    FP8_MAX,
    Fp8Method,
    ScaleFormat,
    scale_shape,
)

__all__ = [
    "FP8_DTYPE",
    "FP8_EPSILON",
    "FP8_MAX",
    "Fp8CheckError",
    "Fp8Method",
    "Fp8Tensor",
    "NonFiniteWeightError",
    "ScaleFormat",
    "check_fp8",
    "dequantize_fp8",
    "fp8_error_bound",
    "fp8_output_bytes",
    "fp8_scale_from_amax",
    "quantize_block_fp8",
    "quantize_channel_fp8",
    "quantize_fp8",
    "quantize_fp8_many",
    "quantize_fp8_reference",
    "quantize_tensor_fp8",
    "reference_with_amax",
    "scale_shape",
    "warm_up_cpu_kernel",
]


_HIGH_PRECISION = (torch.bfloat16, torch.float16, torch.float32)
# The integer view of each input dtype and the mask that clears its sign bit: for finite
# floats the order of |w| equals the order of these integers, so a single integer max
# gives the block amax (and any NaN/Inf shows up as a maximum at or above the Inf bits).
_INT_VIEW = {
    torch.bfloat16: (torch.int16, 0x7FFF),
    torch.float16: (torch.int16, 0x7FFF),
    torch.float32: (torch.int32, 0x7FFFFFFF),
}


class Fp8Tensor(NamedTuple):
    """A quantized weight: ``qweight`` (float8_e4m3fn, the input's shape) and ``scale``.

    ``scale`` is float32, the dequantization multiplier SGLang loads as
    ``weight_scale_inv`` (block) or ``weight_scale`` (channel, tensor). Shapes for an input
    ``[..., out, in]``: block ``[..., ceil(out/bo), ceil(in/bi)]``; channel ``[..., out, 1]``;
    tensor ``[...]`` (a 0-dim tensor for a 2-D input).
    """

    qweight: torch.Tensor
    scale: torch.Tensor


class NonFiniteWeightError(ValueError):
    """A weight holds NaN or Inf, so it has no FP8 representation.

    Attributes:
        tensor: the offending tensor's name.
    """

    def __init__(self, tensor: str, detail: str = "") -> None:
        self.tensor = tensor
        more = f" ({detail})" if detail else ""
        super().__init__(f"tensor {tensor!r} contains NaN or Inf and cannot be quantized{more}")


class Fp8CheckError(AssertionError):
    """A quantized tensor does not reproduce its source within FP8's error bound.

    Attributes:
        tensor: the tensor's name.
    """

    def __init__(self, tensor: str, message: str) -> None:
        self.tensor = tensor
        super().__init__(f"tensor {tensor!r}: {message}")


# --------------------------------------------------------------------------- validation


def _check_args(
    weight: torch.Tensor, method: str, block: tuple[int, int], scale_fmt: str, name: str
) -> None:
    if method not in ("block", "channel", "tensor"):
        raise ValueError(f"tensor {name!r}: unknown FP8 method {method!r}")
    if scale_fmt not in ("float32", "ue8m0"):
        raise ValueError(f"tensor {name!r}: unknown scale_fmt {scale_fmt!r}")
    if len(block) != 2 or min(block) < 1:
        raise ValueError(f"tensor {name!r}: block must be two positive ints, got {block!r}")
    if weight.dtype not in _HIGH_PRECISION:
        raise TypeError(
            f"tensor {name!r}: dtype {weight.dtype} is not bfloat16, float16 or float32"
        )
    if weight.dim() < 2:
        raise ValueError(
            f"tensor {name!r}: FP8 quantization needs [..., out, in], got shape "
            f"{tuple(weight.shape)}"
        )


# --------------------------------------------------------------------------- definition


def fp8_scale_from_amax(amax: torch.Tensor, scale_fmt: ScaleFormat = "float32") -> torch.Tensor:
    """``max(amax, eps) / 448`` in float32, rounded up to a power of two for ``ue8m0``.

    ``amax`` is float32 (any shape, any device); returns a new float32 tensor of its shape.
    The division is by a tensor on ``amax``'s device because CUDA torch turns a division
    by a host scalar into a multiplication by its reciprocal, which rounds differently.
    """
    guarded = amax.to(torch.float32).clamp(min=FP8_EPSILON)
    scale = torch.div(guarded, torch.full((), FP8_MAX, dtype=torch.float32, device=amax.device))
    if scale_fmt == "ue8m0":
        bits = scale.view(torch.int32)
        exponent = (bits >> 23) & 0xFF
        exponent = exponent + ((bits & 0x7FFFFF) != 0).to(torch.int32)
        scale = (exponent.clamp(1, 254) << 23).view(torch.float32)
    return scale


def quantize_fp8_reference(
    weight: torch.Tensor,
    *,
    method: Fp8Method = "block",
    block: tuple[int, int] = (128, 128),
    scale_fmt: ScaleFormat = "float32",
    name: str = "weight",
) -> Fp8Tensor:
    """The definition in plain whole-tensor torch ops (slow, memory-hungry, obvious).

    Every fast path must match this bit for bit; tests hold them to it. Raises
    ``NonFiniteWeightError`` for NaN/Inf, ``ValueError``/``TypeError`` for bad arguments.
    """
    _check_args(weight, method, block, scale_fmt, name)
    result, amax = reference_with_amax(weight, method, block, scale_fmt)
    if not bool(torch.isfinite(amax).all()):
        raise NonFiniteWeightError(name)
    return result


def reference_with_amax(
    weight: torch.Tensor, method: Fp8Method, block: tuple[int, int], scale_fmt: ScaleFormat
) -> tuple[Fp8Tensor, torch.Tensor]:
    """The definition without validation or host syncs, plus the amax it scaled by.

    A NaN/Inf in the weight makes its amax non-finite (torch's max propagates NaN), so a
    device caller can flag it without synchronising; the result is then meaningless.
    """
    w = weight.to(torch.float32)
    *lead, out_dim, in_dim = w.shape
    if method == "block":
        bo, bi = block
        n_out, n_in = math.ceil(out_dim / bo), math.ceil(in_dim / bi)
        padded = w.new_zeros((*lead, n_out * bo, n_in * bi))
        padded[..., :out_dim, :in_dim] = w
        tiles = padded.view(*lead, n_out, bo, n_in, bi)
        amax = tiles.abs().amax(dim=(-3, -1))
        scale = fp8_scale_from_amax(amax, scale_fmt)
        q = (tiles / scale[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
        q = q.flatten(-2).flatten(-3, -2)[..., :out_dim, :in_dim].contiguous()
        return Fp8Tensor(q, scale), amax
    if method == "channel":
        amax = w.abs().amax(dim=-1, keepdim=True)
        scale = fp8_scale_from_amax(amax, scale_fmt)
        expanded = scale
    else:
        amax = w.abs().amax(dim=(-2, -1)) if w.numel() else w.new_zeros(lead)
        scale = fp8_scale_from_amax(amax, scale_fmt)
        expanded = scale[..., None, None]
    q = (w / expanded).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return Fp8Tensor(q, scale), amax


# --------------------------------------------------------------------------- CPU fast path


def _probe_saturating_cast() -> bool:
    """Whether this torch's float32 -> e4m3 cast already saturates like our clamp.

    When it does, ``clamp`` then cast equals the cast alone for every finite input, and
    the CPU path skips one pass; otherwise it clamps. Either way the bits are the same.
    """
    probe = torch.tensor([448.0, 448.00003, 463.9, 464.0, 470.0, 1e6, 3e38], dtype=torch.float32)
    probe = torch.cat([probe, -probe])
    got = probe.to(FP8_DTYPE).to(torch.float32)
    want = probe.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).to(torch.float32)
    return bool(torch.equal(got, want)) and bool(got.abs().eq(FP8_MAX).all())


_SATURATES = _probe_saturating_cast()


class _Scratch(threading.local):
    """Per-thread reusable band buffers: a band's temporaries stay hot in cache and no
    page faults are paid per band."""

    def __init__(self) -> None:
        self.buffers: dict[torch.dtype, torch.Tensor] = {}

    def get(self, dtype: torch.dtype, numel: int) -> torch.Tensor:
        buf = self.buffers.get(dtype)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, dtype=dtype)
            self.buffers[dtype] = buf
        return buf[:numel]


_SCRATCH = _Scratch()

# Elements of one band chunk: 128 x 4096 keeps the float32 temporary (2 MiB) within L2 +
# L3 reach while a wide matrix's band (14336 columns) is still cut into a few calls; the
# fixed cost of the ~20 small torch calls per chunk stays under a fifth of the chunk.
_CHUNK_ELEMENTS = 128 * 4096


def _abs_bits(src: torch.Tensor, numel_hint: int) -> torch.Tensor:
    """``|src|`` as sign-cleared integers (a per-thread scratch view of ``src``'s shape)."""
    int_dtype, mask = _INT_VIEW[src.dtype]
    out = _SCRATCH.get(int_dtype, numel_hint)[: src.numel()].view(src.shape)
    torch.bitwise_and(src.view(int_dtype), mask, out=out)
    return out


def _bits_to_amax(bits: torch.Tensor, src_dtype: torch.dtype) -> torch.Tensor:
    return bits.view(src_dtype).to(torch.float32)


def _divide_cast(
    src: torch.Tensor,
    divisor: torch.Tensor,
    dst: torch.Tensor,
    grouped: tuple[int, ...] | None = None,
) -> None:
    """``dst = e4m3(clamp(src_fp32 / divisor))`` through a float32 scratch band.

    ``grouped`` is the shape the division sees (rows split into row blocks), so that
    ``divisor`` broadcasts one row of scales per row block.
    """
    tmp = _SCRATCH.get(torch.float32, src.numel()).view(src.shape)
    tmp.copy_(src)
    (tmp.view(grouped) if grouped is not None else tmp).div_(divisor)
    if not _SATURATES:
        tmp.clamp_(-FP8_MAX, FP8_MAX)
    dst.copy_(tmp)


def _column_chunks(rows: int, cols: int, unit: int) -> list[tuple[int, int]]:
    width = max(unit, (_CHUNK_ELEMENTS // max(rows, 1)) // unit * unit)
    return [(c, min(cols, c + width)) for c in range(0, cols, width)]


def _block_band(
    w: torch.Tensor,
    q: torch.Tensor,
    s: torch.Tensor,
    amax_out: torch.Tensor,
    r0: int,
    rows: int,
    block: tuple[int, int],
    scale_fmt: ScaleFormat,
) -> None:
    """Quantize rows ``[r0, r0 + rows)`` (``r0`` on a block boundary) of 2-D ``w``.

    The block amax goes to ``amax_out`` so that the caller checks finiteness once per
    tensor instead of once per band (a NaN/Inf amax leaves garbage in ``q``, which the
    caller then discards).
    """
    bo = block[0]
    end = min(r0 + rows, w.shape[0])
    full_end = r0 + (end - r0) // bo * bo
    kernel = _numba_kernel() if _CPU_KERNEL != "torch" else None
    run = _block_rows if kernel is None else _block_rows_numba
    if full_end > r0:
        run(w, q, s, amax_out, r0, full_end, block, scale_fmt)
    if end > full_end:  # the matrix's partial last row block
        run(w, q, s, amax_out, full_end, end, block, scale_fmt)


def _block_rows(
    w: torch.Tensor,
    q: torch.Tensor,
    s: torch.Tensor,
    amax_out: torch.Tensor,
    r0: int,
    r1: int,
    block: tuple[int, int],
    scale_fmt: ScaleFormat,
) -> None:
    """Rows ``[r0, r1)``: whole row blocks, or exactly one partial row block."""
    bo, bi = block
    rows = r1 - r0
    n_rb = max(1, rows // bo)
    rb_rows = rows // n_rb
    rb0 = r0 // bo
    band = w[r0:r1]
    for c0, c1 in _column_chunks(rows, band.shape[1], bi):
        src = band[:, c0:c1]
        width = c1 - c0
        bits = _abs_bits(src, rows * width)
        n_full = width // bi
        parts = []
        if n_full:
            head = bits[:, : n_full * bi].view(n_rb, rb_rows, n_full, bi)
            parts.append(head.amax(dim=3).amax(dim=1))
        if n_full * bi < width:
            tail = bits[:, n_full * bi :].reshape(n_rb, -1)
            parts.append(tail.amax(dim=1, keepdim=True))
        amax = _bits_to_amax(parts[0] if len(parts) == 1 else torch.cat(parts, dim=1), w.dtype)
        b0 = c0 // bi
        nb = amax.shape[1]
        amax_out[rb0 : rb0 + n_rb, b0 : b0 + nb] = amax
        scale = fp8_scale_from_amax(amax, scale_fmt)
        s[rb0 : rb0 + n_rb, b0 : b0 + nb] = scale
        divisor = scale.repeat_interleave(bi, dim=1)[:, None, :width]
        _divide_cast(src, divisor, q[r0:r1, c0:c1], (n_rb, rb_rows, width))


# --------------------------------------------------------------------------- numba kernel

# Which CPU kernel block quantization uses: "auto" (numba when importable, else torch),
# "torch" or "numba". Both compute the module's definition bit for bit; numba fuses the
# passes over a cache-sized chunk (about 2x faster per core on AVX-512 here), torch's
# own float8 cast being a scalar loop. Set WEIGHTPIPE_FP8_CPU_KERNEL=torch to force torch.
_CPU_KERNEL = os.environ.get("WEIGHTPIPE_FP8_CPU_KERNEL", "auto")
_NUMBA_LOCK = threading.Lock()
_NUMBA_STATE: list[Any] = []  # [] = not tried yet; [None] = unavailable; [fn] = compiled
_WARMED_UP: list[bool] = []  # non-empty once every input dtype's signature is compiled
# Columns per kernel chunk: a 128 x 4096 bf16 chunk (1 MiB) is read twice, from cache.
_NUMBA_CHUNK_COLUMNS = 4096


def _numba_kernel() -> Any:
    """The compiled band kernel, or None without numba (compiled once, ~2 s)."""
    if _NUMBA_STATE:
        return _NUMBA_STATE[0]
    with _NUMBA_LOCK:
        if not _NUMBA_STATE:
            try:
                _NUMBA_STATE.append(_build_numba_kernel())
            except ImportError:
                if _CPU_KERNEL == "numba":
                    raise
                _NUMBA_STATE.append(None)
    return _NUMBA_STATE[0]


def warm_up_cpu_kernel() -> bool:
    """Compile the numba CPU kernel now (about 2 s, once per process); True if in use.

    numba compiles lazily, once per argument-type signature, on the first call: this
    quantizes a tiny matrix of every input dtype so no real quantization (say the first
    sync, while an engine generates) pays for compilation. Optional: the first CPU block
    quantization of each dtype compiles it otherwise.
    """
    if _CPU_KERNEL == "torch" or _numba_kernel() is None:
        return False
    if not _WARMED_UP:
        for dtype in _HIGH_PRECISION:
            quantize_fp8(torch.ones(128, 128, dtype=dtype), name="warm-up")
        _WARMED_UP.append(True)
    return True


def _build_numba_kernel() -> Any:
    import numpy as np

    numba = importlib.import_module("numba")
    llvm_ir = importlib.import_module("llvmlite.ir")
    nb_types = numba.core.types

    # Scalar bit casts (numba has no scalar ``view``): float32 <-> int32 as LLVM bitcasts.
    @numba.extending.intrinsic  # type: ignore[misc]
    def f32_bits(typingctx, x):  # type: ignore[no-untyped-def]
        def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
            return builder.bitcast(args[0], llvm_ir.IntType(32))

        return nb_types.int32(nb_types.float32), codegen

    @numba.extending.intrinsic  # type: ignore[misc]
    def bits_f32(typingctx, x):  # type: ignore[no-untyped-def]
        def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
            return builder.bitcast(args[0], llvm_ir.FloatType())

        return nb_types.float32(nb_types.int32), codegen

    f448 = np.float32(FP8_MAX)
    eps = np.float32(FP8_EPSILON)
    c16384 = np.float32(16384.0)

    # error_model="numpy": no ZeroDivisionError branch per division (it blocks SIMD).
    # Every float constant is float32, so nothing is computed in double precision.
    @numba.njit(nogil=True, boundscheck=False, error_model="numpy", cache=False)  # type: ignore[misc]
    def band(src16, src32, bf16, q, s, a, rb0, bo, bi, ue8m0, colmax, scl):  # type: ignore[no-untyped-def]
        rows = src16.shape[0] if bf16 else src32.shape[0]
        n = src16.shape[1] if bf16 else src32.shape[1]
        n_rb = max(1, rows // bo)
        rb_rows = rows // n_rb
        chunk = colmax.shape[0]
        for rb in range(n_rb):
            for c0 in range(0, n, chunk):
                w = min(n, c0 + chunk) - c0
                # 1. column max of |bits| over the row block (bf16 bits widen by << 16)
                cm = colmax[:w]
                for c in range(w):
                    cm[c] = 0
                for r in range(rb_rows):
                    if bf16:
                        sr = src16[rb * rb_rows + r, c0 : c0 + w]
                        for c in range(w):
                            m = (np.int32(sr[c]) << 16) & np.int32(0x7FFFFFFF)
                            cm[c] = m if m > cm[c] else cm[c]
                    else:
                        sr32 = src32[rb * rb_rows + r, c0 : c0 + w]
                        for c in range(w):
                            m = sr32[c] & np.int32(0x7FFFFFFF)
                            cm[c] = m if m > cm[c] else cm[c]
                # 2. per block: amax, scale = max(amax, eps) / 448, ue8m0 rounding up
                for cs in range(0, w, bi):
                    ce = min(w, cs + bi)
                    m = np.int32(0)
                    for c in range(cs, ce):
                        m = cm[c] if cm[c] > m else m
                    amax = bits_f32(m)
                    cb = (c0 + cs) // bi
                    a[rb0 + rb, cb] = amax
                    scale = (amax if amax > eps else eps) / f448
                    if ue8m0:
                        sb = f32_bits(scale)
                        e = (sb >> 23) & np.int32(0xFF)
                        if sb & np.int32(0x7FFFFF):
                            e += 1
                        e = min(max(e, np.int32(1)), np.int32(254))
                        scale = bits_f32(e << 23)
                    s[rb0 + rb, cb] = scale
                    for c in range(cs, ce):
                        scl[c] = scale
                # 3. divide, clamp, round to e4m3 on the bits (as the Triton kernel does)
                sc = scl[:w]
                for r in range(rb_rows):
                    qr = q[rb * rb_rows + r, c0 : c0 + w]
                    if bf16:
                        sr = src16[rb * rb_rows + r, c0 : c0 + w]
                    else:
                        sr32 = src32[rb * rb_rows + r, c0 : c0 + w]
                    for c in range(w):
                        x = bits_f32(np.int32(sr[c]) << 16) if bf16 else bits_f32(sr32[c])
                        # No clamp needed here: |w| <= amax and scale = RN(amax / 448),
                        # so |y| <= 448 * (1 + 2**-23), i.e. at most one ulp above 448,
                        # which the rounding below maps to 448 exactly as clamping does.
                        yb = f32_bits(x / sc[c])
                        mag = yb & np.int32(0x7FFFFFFF)
                        # Normal: keep 3 mantissa bits (RTNE), rebias 127 -> 7 (-960 << 20).
                        normal = (
                            mag + np.int32(0x7FFFF - (960 << 20)) + ((mag >> 20) & np.int32(1))
                        ) >> 20
                        # Below 2**-6: |y| + 2**14 rounds |y| to a multiple of 2**-9 (the ulp
                        # of 2**14); the low byte of its bits counts them (2**14's is 0).
                        sub = f32_bits(bits_f32(mag) + c16384)
                        code = normal if mag >= np.int32(0x3C800000) else sub
                        # uint8() keeps the low byte: the code, with the sign bit or'ed in.
                        qr[c] = np.uint8(code | ((yb >> 24) & np.int32(0x80)))

    return band


def _block_rows_numba(
    w: torch.Tensor,
    q: torch.Tensor,
    s: torch.Tensor,
    amax_out: torch.Tensor,
    r0: int,
    r1: int,
    block: tuple[int, int],
    scale_fmt: ScaleFormat,
) -> None:
    """``_block_rows`` through the numba kernel (same arguments, same bits)."""
    import numpy as np

    kernel = _numba_kernel()
    bo, bi = block
    band = w[r0:r1]
    chunk = max(bi, _NUMBA_CHUNK_COLUMNS // bi * bi)
    colmax = _SCRATCH.get(torch.int32, chunk).numpy()
    scl = _SCRATCH.get(torch.uint8, 4 * chunk).view(torch.float32).numpy()
    dummy16 = np.zeros((1, 1), dtype=np.uint16)
    dummy32 = np.zeros((1, 1), dtype=np.int32)
    if band.dtype == torch.bfloat16:
        src16, src32, bf16 = band.view(torch.int16).numpy().view(np.uint16), dummy32, True
    elif band.dtype == torch.float32:
        src16, src32, bf16 = dummy16, band.view(torch.int32).numpy(), False
    else:  # float16: widen with torch first (exact), then the same kernel
        wide = _SCRATCH.get(torch.float32, band.numel()).view(band.shape)
        wide.copy_(band)
        src16, src32, bf16 = dummy16, wide.view(torch.int32).numpy(), False
    kernel(
        src16,
        src32,
        bf16,
        q[r0:r1].view(torch.uint8).numpy(),
        s.numpy(),
        amax_out.numpy(),
        r0 // bo,
        bo,
        bi,
        scale_fmt == "ue8m0",
        colmax,
        scl,
    )


def _channel_band(
    w: torch.Tensor,
    q: torch.Tensor,
    s: torch.Tensor,
    amax_out: torch.Tensor,
    r0: int,
    rows: int,
    scale_fmt: ScaleFormat,
) -> None:
    band = w[r0 : r0 + rows]
    amax = _bits_to_amax(_abs_bits(band, band.numel()).amax(dim=1, keepdim=True), w.dtype)
    amax_out[r0 : r0 + rows] = amax
    scale = fp8_scale_from_amax(amax, scale_fmt)
    s[r0 : r0 + rows] = scale
    _divide_cast(band, scale, q[r0 : r0 + rows])


def _band_amax(w: torch.Tensor, r0: int, rows: int) -> torch.Tensor:
    band = w[r0 : r0 + rows]
    return _bits_to_amax(_abs_bits(band, band.numel()).amax(), w.dtype)


def _tensor_band(w: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, r0: int, rows: int) -> None:
    _divide_cast(w[r0 : r0 + rows], scale, q[r0 : r0 + rows])


# Outputs at least this large are mapped with MADV_HUGEPAGE: on fresh 4 KiB pages the
# first-touch page faults of a large output cost as much as quantizing it.
_HUGEPAGE_MIN_BYTES = 4 << 20


def _empty_output(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    numel = math.prod(shape)
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    advise = getattr(mmap, "MADV_HUGEPAGE", None)
    if nbytes < _HUGEPAGE_MIN_BYTES or advise is None or not sys.platform.startswith("linux"):
        return torch.empty(tuple(shape), dtype=dtype)
    region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    region.madvise(advise)
    # The tensor holds the mapping alive; it is unmapped when the last view is freed.
    return torch.frombuffer(region, dtype=torch.uint8).view(dtype).view(tuple(shape))


_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _single_threaded_torch() -> None:
    # Thread-local (an OpenMP ICV): the caller's threads keep their own setting. Each
    # band worker runs its ops on one core; parallelism comes from the band workers.
    torch.set_num_threads(1)


def _pool(threads: int) -> ThreadPoolExecutor:
    with _POOLS_LOCK:
        pool = _POOLS.get(threads)
        if pool is None:
            pool = ThreadPoolExecutor(
                threads, thread_name_prefix="weightpipe-fp8", initializer=_single_threaded_torch
            )
            _POOLS[threads] = pool
        return pool


def _run_tasks(tasks: Sequence[Callable[[], None]], threads: int) -> None:
    """Run ``tasks`` on ``threads`` band workers pulling from one shared counter.

    Dynamic pulling keeps both cores busy when tensors differ in size or another process
    takes a core for a while. Even one worker runs in the pool: its torch ops are
    single-threaded, which on a loaded machine beats OpenMP teams whose every op waits for
    its slowest thread. The first exception is re-raised after all workers stop.
    """
    if not tasks:
        return
    counter = itertools.count()
    failed = threading.Event()

    def worker() -> None:
        while not failed.is_set():
            i = next(counter)
            if i >= len(tasks):
                return
            try:
                tasks[i]()
            except BaseException:
                failed.set()
                raise

    futures = [_pool(threads).submit(worker) for _ in range(min(threads, len(tasks)))]
    errors = [f.exception() for f in futures]
    for error in errors:
        if error is not None:
            raise error


class _Job:
    """One tensor's quantization, split into band tasks that write preallocated outputs."""

    def __init__(
        self,
        name: str,
        weight: torch.Tensor,
        method: Fp8Method,
        block: tuple[int, int],
        scale_fmt: ScaleFormat,
        qweight: torch.Tensor | None = None,
    ) -> None:
        self.name = name
        self.method = method
        self.block = block
        self.scale_fmt: ScaleFormat = scale_fmt
        self.nonfinite = False
        # detach: a Parameter that requires grad is read as plain data (no autograd graph).
        src = weight.detach()
        src = src if src.is_contiguous() else src.contiguous()
        *_, out_dim, in_dim = src.shape
        self.matrices = src.reshape(-1, out_dim, in_dim)
        self.qweight = _empty_output(src.shape, FP8_DTYPE) if qweight is None else qweight
        self.scale = torch.empty(scale_shape(src.shape, method, block), dtype=torch.float32)
        self.q3 = self.qweight.view(-1, out_dim, in_dim)
        # Block and channel amax, one per scale entry: checked once when the job ends.
        self.amax = torch.zeros(self.scale.shape if method != "tensor" else (0,))
        # Rows per task: whole row blocks for block scales, filling about one chunk.
        per_chunk = max(1, _CHUNK_ELEMENTS // max(in_dim, 1))
        rows = block[0] * max(1, per_chunk // block[0]) if method == "block" else per_chunk
        self.rows = rows
        self.bands = [
            (e, r0)
            for e in range(self.matrices.shape[0])
            for r0 in range(0, out_dim, rows)
            if out_dim > 0 and in_dim > 0
        ]
        self.partial_amax = torch.zeros(len(self.bands), dtype=torch.float32)

    def amax_tasks(self) -> list[Callable[[], None]]:
        """Tensor method only: the per-band amax pass that precedes division."""

        def task(i: int) -> None:
            e, r0 = self.bands[i]
            self.partial_amax[i] = _band_amax(self.matrices[e], r0, self.rows)

        return [lambda i=i: task(i) for i in range(len(self.bands))]  # type: ignore[misc]

    def finish_amax(self) -> None:
        n_mat = self.matrices.shape[0]
        per_band = len(self.bands) // max(n_mat, 1)
        if per_band == 0:
            amax = torch.zeros(n_mat)
        else:
            amax = self.partial_amax.view(n_mat, per_band).amax(dim=1)
        if not bool(torch.isfinite(amax).all()):
            self.nonfinite = True
        self.tensor_scale = fp8_scale_from_amax(amax, self.scale_fmt)
        self.scale.view(-1).copy_(self.tensor_scale)

    def quant_tasks(self) -> list[Callable[[], None]]:
        if self.nonfinite:
            return []
        n_mat = self.matrices.shape[0]
        if self.method == "tensor":
            s3 = a3 = self.scale.view(-1)
        else:
            s3 = self.scale.view(n_mat, *self.scale.shape[-2:])
            a3 = self.amax.view(n_mat, *self.scale.shape[-2:])

        def task(i: int) -> None:
            e, r0 = self.bands[i]
            w, q = self.matrices[e], self.q3[e]
            if self.method == "block":
                _block_band(w, q, s3[e], a3[e], r0, self.rows, self.block, self.scale_fmt)
            elif self.method == "channel":
                _channel_band(w, q, s3[e], a3[e], r0, self.rows, self.scale_fmt)
            else:
                _tensor_band(w, q, self.tensor_scale[e], r0, self.rows)

        return [lambda i=i: task(i) for i in range(len(self.bands))]  # type: ignore[misc]

    def finish(self) -> Fp8Tensor | None:
        """The result, or None when the tensor holds NaN/Inf."""
        if self.nonfinite or not bool(torch.isfinite(self.amax).all()):
            return None
        return Fp8Tensor(self.qweight, self.scale)


_ARENA_ALIGN = 256


def fp8_output_bytes(named: Sequence[tuple[str, torch.Tensor]]) -> int:
    """Bytes of an ``arena`` that holds the FP8 outputs of ``named`` (see quantize_fp8_many)."""
    return sum(-(-weight.numel() // _ARENA_ALIGN) * _ARENA_ALIGN for _, weight in named)


def _carve(
    arena: torch.Tensor, named: Sequence[tuple[str, torch.Tensor]]
) -> list[torch.Tensor | None]:
    need = fp8_output_bytes(named)
    if arena.dtype != torch.uint8 or arena.device.type != "cpu" or arena.dim() != 1:
        raise ValueError(f"arena must be a 1-D uint8 CPU tensor, got {arena.dtype} {arena.shape}")
    if arena.numel() < need:
        raise ValueError(f"arena holds {arena.numel()} bytes; these outputs need {need}")
    views: list[torch.Tensor | None] = []
    offset = 0
    for _, weight in named:
        numel = weight.numel()
        views.append(arena[offset : offset + numel].view(FP8_DTYPE).view(weight.shape))
        offset += -(-numel // _ARENA_ALIGN) * _ARENA_ALIGN
    return views


def quantize_fp8_many(
    named: Sequence[tuple[str, torch.Tensor]],
    *,
    method: Fp8Method = "block",
    block: tuple[int, int] = (128, 128),
    scale_fmt: ScaleFormat = "float32",
    threads: int = 1,
    arena: torch.Tensor | None = None,
) -> list[Fp8Tensor | None]:
    """Quantize several CPU tensors at once, splitting all of them into row bands.

    The bands of every tensor go to ``threads`` workers together, so a bucket of many
    small tensors keeps the cores as busy as one large tensor does. Returns one result per
    input in order: an ``Fp8Tensor``, or ``None`` where the tensor holds NaN/Inf (the caller
    decides whether that is an error; ``quantize_fp8`` raises). The work runs on a shared
    pool of ``threads`` band workers (each with single-threaded torch ops) and the calling
    thread waits for it.

    ``arena``: a uint8 CPU buffer of at least ``fp8_output_bytes(named)`` bytes; the FP8
    outputs are then views into it (each at a 256-byte boundary) instead of fresh
    allocations, so a caller that recycles arenas (the Fp8Quantize stage) skips the
    first-touch page faults of new output memory.

    Raises:
        ValueError, TypeError: a bad argument, naming the tensor; the input is untouched;
            an ``arena`` that is too small or not uint8.
    """
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    for name, weight in named:
        _check_args(weight, method, block, scale_fmt, name)
        if weight.device.type != "cpu":
            raise ValueError(f"tensor {name!r}: quantize_fp8_many takes CPU tensors")
    outputs = _carve(arena, named) if arena is not None else [None] * len(named)
    jobs = [
        _Job(name, weight, method, block, scale_fmt, out)
        for (name, weight), out in zip(named, outputs, strict=True)
    ]
    tensor_jobs = [job for job in jobs if job.method == "tensor"]
    if tensor_jobs:
        _run_tasks([t for job in tensor_jobs for t in job.amax_tasks()], threads)
        for job in tensor_jobs:
            job.finish_amax()
    _run_tasks([t for job in jobs for t in job.quant_tasks()], threads)
    return [job.finish() for job in jobs]


# --------------------------------------------------------------------------- public API


def quantize_fp8(
    weight: torch.Tensor,
    *,
    method: Fp8Method = "block",
    block: tuple[int, int] = (128, 128),
    scale_fmt: ScaleFormat = "float32",
    name: str = "weight",
    threads: int = 1,
) -> Fp8Tensor:
    """Quantize one ``[..., out, in]`` weight (leading dims: a stack, e.g. MoE experts).

    CPU tensors take the band path (``threads`` workers); CUDA tensors use the Triton
    kernel when Triton is installed, else the reference ops, on the current stream.

    Raises:
        NonFiniteWeightError: the weight holds NaN or Inf (named ``name``).
        ValueError, TypeError: bad method/block/scale_fmt, dtype or rank.
    """
    _check_args(weight, method, block, scale_fmt, name)
    if weight.device.type == "cpu":
        (result,) = quantize_fp8_many(
            [(name, weight)], method=method, block=block, scale_fmt=scale_fmt, threads=threads
        )
        if result is None:
            raise NonFiniteWeightError(name)
        return result
    if method == "block" and weight.is_cuda:
        from weightpipe.stages.fp8 import _triton as _fp8_triton

        if _fp8_triton.available() and _fp8_triton.supports_block(block):
            results, bad = _fp8_triton.quantize_block_batch([weight], block, scale_fmt)
            if bool(bad[0].item()):
                raise NonFiniteWeightError(name)
            return results[0]
    return quantize_fp8_reference(
        weight, method=method, block=block, scale_fmt=scale_fmt, name=name
    )


def quantize_block_fp8(
    weight: torch.Tensor,
    block: tuple[int, int] = (128, 128),
    *,
    scale_fmt: ScaleFormat = "float32",
    name: str = "weight",
    threads: int = 1,
) -> Fp8Tensor:
    """Block-wise FP8: scale ``[..., ceil(out/bo), ceil(in/bi)]``; see ``quantize_fp8``."""
    return quantize_fp8(
        weight, method="block", block=block, scale_fmt=scale_fmt, name=name, threads=threads
    )


def quantize_channel_fp8(
    weight: torch.Tensor,
    *,
    scale_fmt: ScaleFormat = "float32",
    name: str = "weight",
    threads: int = 1,
) -> Fp8Tensor:
    """Per-output-channel FP8: scale ``[..., out, 1]``; see ``quantize_fp8``."""
    return quantize_fp8(weight, method="channel", scale_fmt=scale_fmt, name=name, threads=threads)


def quantize_tensor_fp8(
    weight: torch.Tensor,
    *,
    scale_fmt: ScaleFormat = "float32",
    name: str = "weight",
    threads: int = 1,
) -> Fp8Tensor:
    """Per-tensor (per matrix of a stack) FP8: scale ``[...]``; see ``quantize_fp8``."""
    return quantize_fp8(weight, method="tensor", scale_fmt=scale_fmt, name=name, threads=threads)


def _expand_scale(
    scale: torch.Tensor, shape: Sequence[int], block: tuple[int, int], name: str
) -> torch.Tensor:
    """The per-element scale for a weight of ``shape``, whatever the method."""
    *lead, out_dim, in_dim = shape
    for method in ("block", "channel", "tensor"):
        if tuple(scale.shape) == scale_shape(shape, method, block):  # type: ignore[arg-type]
            break
    else:
        raise ValueError(
            f"tensor {name!r}: scale shape {tuple(scale.shape)} fits no FP8 method for a "
            f"weight of shape {tuple(shape)} with block {list(block)}"
        )
    s = scale.to(torch.float32)
    if method == "block":
        s = s.repeat_interleave(block[0], dim=-2)[..., :out_dim, :]
        return s.repeat_interleave(block[1], dim=-1)[..., :in_dim]
    if method == "channel":
        return s.expand(*lead, out_dim, in_dim)
    return s[..., None, None].expand(*lead, out_dim, in_dim)


def dequantize_fp8(
    qweight: torch.Tensor,
    scale: torch.Tensor,
    *,
    block: tuple[int, int] = (128, 128),
    dtype: torch.dtype = torch.float32,
    name: str = "weight",
) -> torch.Tensor:
    """``qweight * scale`` (float32 maths) as ``dtype``; the method is read off the shapes.

    Raises:
        ValueError: the scale's shape fits neither block, channel nor tensor scaling.
        TypeError: ``qweight`` is not float8_e4m3fn.
    """
    if qweight.dtype != FP8_DTYPE:
        raise TypeError(f"tensor {name!r}: expected float8_e4m3fn, got {qweight.dtype}")
    full = _expand_scale(scale, qweight.shape, block, name)
    return (qweight.to(torch.float32) * full).to(dtype)


def fp8_error_bound(weight: torch.Tensor, full_scale: torch.Tensor) -> torch.Tensor:
    """Largest ``|dequant - w|`` FP8 allows per element, in float64.

    Round-to-nearest e4m3 loses at most half a unit in the last place: ``|y| * 2**-4`` for
    normal values (3 mantissa bits) and ``2**-10`` below 2**-6 (subnormal spacing 2**-9),
    in units of the scale; the float32 division and the dequantizing product add relative
    ``2**-24`` each, covered by the ``2**-20`` slack.
    """
    w = weight.to(torch.float64).abs()
    s = full_scale.to(torch.float64)
    return w * (2.0**-4 + 2.0**-20) + s * (2.0**-10) * (1 + 2.0**-20)


def check_fp8(
    weight: torch.Tensor,
    quantized: Fp8Tensor,
    *,
    block: tuple[int, int] = (128, 128),
    name: str = "weight",
) -> float:
    """Check ``quantized`` against its source ``weight``; returns the worst error/bound.

    Also checks dtypes, shapes and that every scale is finite and positive. Runs in
    row chunks so a large matrix never needs float64 copies of the whole of it.

    Raises:
        Fp8CheckError: naming the tensor and the worst element, when any check fails.
    """
    q, scale = quantized
    if q.dtype != FP8_DTYPE or scale.dtype != torch.float32:
        raise Fp8CheckError(name, f"dtypes {q.dtype}/{scale.dtype}, want e4m3fn/float32")
    if tuple(q.shape) != tuple(weight.shape):
        raise Fp8CheckError(name, f"shape {tuple(q.shape)} != source {tuple(weight.shape)}")
    if not bool((torch.isfinite(scale) & (scale > 0)).all()):
        raise Fp8CheckError(name, "a scale is zero, negative, NaN or Inf")
    try:
        full = _expand_scale(scale.cpu(), q.shape, block, name)
    except ValueError as exc:
        raise Fp8CheckError(name, str(exc)) from exc
    *_, out_dim, in_dim = q.shape
    w3 = weight.cpu().reshape(-1, out_dim, in_dim)
    q3 = q.cpu().reshape(-1, out_dim, in_dim)
    s3 = full.reshape(-1, out_dim, in_dim)
    worst = 0.0
    step = max(1, (1 << 22) // max(in_dim, 1))
    for e in range(w3.shape[0]):
        for r0 in range(0, out_dim, step):
            w = w3[e, r0 : r0 + step]
            s = s3[e, r0 : r0 + step]
            deq = q3[e, r0 : r0 + step].to(torch.float64) * s.to(torch.float64)
            err = (deq - w.to(torch.float64)).abs()
            ratio = err / fp8_error_bound(w, s)
            if ratio.numel() == 0:
                continue
            top = float(ratio.max())
            if not math.isfinite(top) or top > 1.0:
                flat = int(ratio.nan_to_num(math.inf).argmax())
                row, col = divmod(flat, in_dim)
                raise Fp8CheckError(
                    name,
                    f"element [{e}, {r0 + row}, {col}] = {float(w[row, col])} dequantizes to "
                    f"{float(deq[row, col])}, {top:.3g}x the FP8 error bound",
                )
            worst = max(worst, top)
    return worst
