"""The numba CPU kernel for block FP8: generated, compiled once, and warmed up on demand.

torch's own float32 -> float8 cast on CPU is a scalar loop that dominates block
quantization; this kernel fuses the passes (column max, block scale, divide and round) over
a cache-sized chunk of a row band, about 2x faster per core on AVX-512, and rounds to e4m3
on the integer bits as the Triton kernel does. It computes the definition in
``weightpipe.stages.fp8.reference`` bit for bit, for either arithmetic (the tests hold it
to that). numba is
optional: ``kernel()`` is None without it and ``weightpipe.stages.fp8.cpu`` falls back to
its torch band ops. Compilation is lazy (about 2 s, once per process); ``warm_up`` pays it
ahead of the first sync.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable
from typing import Any

import torch

from weightpipe.stages.fp8.spec import (
    FP8_EPSILON,
    FP8_MAX,
    HIGH_PRECISION_DTYPES,
    Fp8Arithmetic,
    ScaleFormat,
)

__all__ = ["Scratch", "block_rows", "kernel", "warm_up"]

Scratch = Callable[[torch.dtype, int], torch.Tensor]
"""A per-thread scratch buffer of ``numel`` elements of ``dtype`` (reused between calls)."""

_LOCK = threading.Lock()
_STATE: list[Any] = []  # [] = not tried yet; [None] = unavailable; [fn] = compiled
_WARMED_UP: list[bool] = []  # non-empty once every input dtype's signature is compiled
# Columns per kernel chunk: a 128 x 4096 bf16 chunk (1 MiB) is read twice, from cache.
_CHUNK_COLUMNS = 4096


def kernel(*, required: bool = False) -> Any:
    """The compiled band kernel, or None without numba (compiled once, ~2 s).

    Raises:
        ImportError: numba is missing and ``required`` (the user forced the numba kernel).
    """
    if not _STATE:
        with _LOCK:
            if not _STATE:
                try:
                    _STATE.append(_build())
                except ImportError:
                    _STATE.append(None)
    if _STATE[0] is None and required:
        raise ImportError("WEIGHTPIPE_FP8_CPU_KERNEL=numba, but numba is not installed")
    return _STATE[0]


def warm_up(*, required: bool = False) -> bool:
    """Compile every input dtype's signature now; True if the kernel is in use.

    numba compiles lazily, once per argument-type signature, on the first call: this runs
    a tiny block of every input dtype through ``block_rows`` (the call real bands make),
    so no real quantization (say the first sync, while an engine generates) pays for it.
    """
    if kernel(required=required) is None:
        return False
    if not _WARMED_UP:
        for dtype in HIGH_PRECISION_DTYPES:
            w = torch.ones(128, 128, dtype=dtype)
            q = torch.empty(128, 128, dtype=torch.float8_e4m3fn)
            s = torch.empty(1, 1, dtype=torch.float32)
            a = torch.empty(1, 1, dtype=torch.float32)
            block_rows(w, q, s, a, 0, 128, (128, 128), "float32", _fresh)
            block_rows(w, q, s, a, 0, 128, (128, 128), "float32", _fresh, "verl")
        _WARMED_UP.append(True)
    return True


def _fresh(dtype: torch.dtype, numel: int) -> torch.Tensor:
    return torch.empty(numel, dtype=dtype)


def block_rows(
    w: torch.Tensor,
    q: torch.Tensor,
    s: torch.Tensor,
    amax_out: torch.Tensor,
    r0: int,
    r1: int,
    block: tuple[int, int],
    scale_fmt: ScaleFormat,
    scratch: Scratch,
    arithmetic: Fp8Arithmetic = "sglang",
) -> None:
    """Rows ``[r0, r1)`` of 2-D ``w`` (whole row blocks, or exactly one partial one).

    Writes the FP8 bits to ``q``, the block scales to ``s`` and the block amax to
    ``amax_out`` (both indexed by row block from ``r0 // block[0]``; +Inf for a block
    that ``arithmetic="verl"`` cannot scale, as in ``reference_with_amax``).
    """
    import numpy as np

    band_kernel = kernel()
    bo, bi = block
    band = w[r0:r1]
    chunk = max(bi, _CHUNK_COLUMNS // bi * bi)
    colmax = scratch(torch.int32, chunk).numpy()
    scl = scratch(torch.uint8, 4 * chunk).view(torch.float32).numpy()
    dummy16 = np.zeros((1, 1), dtype=np.uint16)
    dummy32 = np.zeros((1, 1), dtype=np.int32)
    if band.dtype == torch.bfloat16:
        src16, src32, bf16 = band.view(torch.int16).numpy().view(np.uint16), dummy32, True
    elif band.dtype == torch.float32:
        src16, src32, bf16 = dummy16, band.view(torch.int32).numpy(), False
    else:  # float16: widen with torch first (exact), then the same kernel
        wide = scratch(torch.float32, band.numel()).view(band.shape)
        wide.copy_(band)
        src16, src32, bf16 = dummy16, wide.view(torch.int32).numpy(), False
    band_kernel(
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
        arithmetic == "verl",
        colmax,
        scl,
    )


def _build() -> Any:
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
    f1 = np.float32(1.0)
    f_inf = np.float32(np.inf)
    c16384 = np.float32(16384.0)

    # error_model="numpy": no ZeroDivisionError branch per division (it blocks SIMD).
    # Every float constant is float32, so nothing is computed in double precision.
    @numba.njit(nogil=True, boundscheck=False, error_model="numpy", cache=False)  # type: ignore[misc]
    def band(src16, src32, bf16, q, s, a, rb0, bo, bi, ue8m0, verl, colmax, scl):  # type: ignore[no-untyped-def]
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
                # 2. per block: amax, scale = max(amax, eps) / 448, ue8m0 rounding up;
                # verl: the multiplier 448 / amax (1 for 0 and Inf), scale = 1 / it
                for cs in range(0, w, bi):
                    ce = min(w, cs + bi)
                    m = np.int32(0)
                    for c in range(cs, ce):
                        m = cm[c] if cm[c] > m else m
                    amax = bits_f32(m)
                    cb = (c0 + cs) // bi
                    a[rb0 + rb, cb] = amax
                    if verl:
                        mult = f1 if amax == 0 or amax == f_inf else f448 / amax
                        if mult == f_inf:
                            a[rb0 + rb, cb] = f_inf  # too small to scale: the caller's flag
                        s[rb0 + rb, cb] = f1 / mult
                        for c in range(cs, ce):
                            scl[c] = mult
                        continue
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
                # 3. divide (verl: multiply), clamp, round to e4m3 on the bits (as the
                # Triton kernel does)
                sc = scl[:w]
                for r in range(rb_rows):
                    qr = q[rb * rb_rows + r, c0 : c0 + w]
                    if bf16:
                        sr = src16[rb * rb_rows + r, c0 : c0 + w]
                    else:
                        sr32 = src32[rb * rb_rows + r, c0 : c0 + w]
                    for c in range(w):
                        x = bits_f32(np.int32(sr[c]) << 16) if bf16 else bits_f32(sr32[c])
                        # No clamp needed here: |w| <= amax and scale = RN(amax / 448)
                        # (verl: multiplier RN(448 / amax)), so |y| <= 448 * (1 + 2**-23),
                        # i.e. at most one ulp above 448, which the rounding below maps
                        # to 448 exactly as clamping does.
                        yb = f32_bits(x * sc[c] if verl else x / sc[c])
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
