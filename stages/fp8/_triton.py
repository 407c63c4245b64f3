"""Triton kernel for block FP8 quantization of a whole bucket in one launch.

Imported lazily (only when a CUDA tensor is quantized, or a test asks): Triton is an
optional dependency. One launch covers every matrix of one input dtype in a bucket: the
matrices are described by tables of device pointers and sizes, the grid is
``(max blocks per matrix, matrices)`` and programs past a matrix's last block are masked
off. Each program quantizes one ``[block_out, block_in]`` block with the definition in
``weightpipe.stages.fp8.reference``: IEEE divisions (``div_rn``, not Triton's approximate
``/``) and a round-to-nearest-even float32 -> e4m3 conversion done on the integer bits, so
the result is the same on a GPU and under ``TRITON_INTERPRET=1`` (whose own float8 cast
rounds differently) and equals torch's cast bit for bit; ``arithmetic="verl"`` takes the
multiplier ``div_rn(448, amax)`` and a plain (IEEE) multiplication instead. NaN/Inf (and,
under verl arithmetic, a block too small to scale) set a per-tensor flag instead of
raising, so no host sync happens inside the batch.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any

import torch

from weightpipe.stages.fp8.spec import (
    FP8_DTYPE,
    FP8_EPSILON,
    FP8_MAX,
    Fp8Arithmetic,
    Fp8Tensor,
    ScaleFormat,
    as_block,
    scale_shape,
)

__all__ = [
    "NUM_WARPS",
    "available",
    "device_guard",
    "launch_chunk_m",
    "quantize_block_batch",
    "supports_block",
]

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where Triton is absent
    triton = None
    tl = None


def available() -> bool:
    """Whether Triton imported (the kernel also needs CUDA tensors or TRITON_INTERPRET)."""
    return triton is not None


def supports_block(block: tuple[int, int]) -> bool:
    """Whether the kernel handles ``block`` (``tl.arange`` needs powers of two)."""
    return all(b > 0 and b & (b - 1) == 0 for b in block)


if triton is not None:

    @triton.jit  # type: ignore[untyped-decorator]
    def _amax_and_bad(x):  # type: ignore[no-untyped-def]
        ax = tl.abs(x)
        # NaN fails ax == ax; Inf is above the largest float32.
        nonfinite = (ax != ax) | (ax > 3.4028234663852886e38)
        bad = tl.max(tl.max(nonfinite.to(tl.int32), axis=1), axis=0)
        amax = tl.max(tl.max(ax, axis=1), axis=0)
        return amax, bad

    @triton.jit  # type: ignore[untyped-decorator]
    def _e4m3_codes(x, operand, VERL: tl.constexpr):  # type: ignore[no-untyped-def]
        # sglang: x / scale (IEEE division); verl: x * multiplier (no FMA: fusion is off).
        y = x * operand if VERL else tl.math.div_rn(x, operand)
        y = tl.minimum(tl.maximum(y, -448.0), 448.0)
        # Round-to-nearest-even float32 -> e4m3fn on the bits. Normal results (|y| >=
        # 2**-6): keep 3 mantissa bits, the carry of the rounding may bump the exponent,
        # then rebias 127 -> 7 (960 = 120 << 3). Subnormals: multiples of 2**-9, found by
        # the add-and-subtract of 2**14 whose ulp is 2**-9 (exact, single rounding).
        bits = y.to(tl.int32, bitcast=True)
        mag = bits & 0x7FFFFFFF
        normal = ((mag + 0x7FFFF + ((mag >> 20) & 1)) >> 20) - 960
        ay = mag.to(tl.float32, bitcast=True)
        sub = (((ay + 16384.0) - 16384.0) * 512.0).to(tl.int32)
        code = tl.where(mag >= 0x3C800000, normal, sub) | ((bits >> 24) & 0x80)
        return code.to(tl.uint8)

    @triton.jit  # type: ignore[untyped-decorator]
    def _fp8_block_kernel(  # type: ignore[no-untyped-def]
        src_table,
        dst_table,
        scale_table,
        rows_table,
        cols_table,
        owner_table,
        flags,
        eps,
        SRC_DTYPE: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        UE8M0: tl.constexpr,
        ALIGNED: tl.constexpr,
        CHUNK_M: tl.constexpr,
        VERL: tl.constexpr,
    ):
        pid = tl.program_id(0)
        mat = tl.program_id(1)
        rows = tl.load(rows_table + mat).to(tl.int32)
        cols = tl.load(cols_table + mat).to(tl.int32)
        if ALIGNED:
            # The host checked that cols is a multiple of 16 and every base pointer is
            # 16-byte aligned: each thread's run of the block is one vector load/store.
            cols = tl.multiple_of(cols, 16)
        n_bn = tl.cdiv(cols, BLOCK_N)
        valid = pid < tl.cdiv(rows, BLOCK_M) * n_bn
        bm = pid // n_bn
        bn = pid % n_bn
        src = tl.load(src_table + mat).to(tl.pointer_type(SRC_DTYPE))
        dst = tl.load(dst_table + mat).to(tl.pointer_type(tl.uint8))
        out_scale = tl.load(scale_table + mat).to(tl.pointer_type(tl.float32))
        if ALIGNED:
            src = tl.multiple_of(src, 16)
            dst = tl.multiple_of(dst, 16)
        # One 64-bit offset per program; offsets inside the block are int32 (the host
        # keeps BLOCK_M * cols below 2**31): 64-bit offsets per element cost two registers
        # each and made the kernel spill.
        start = (bm * BLOCK_M).to(tl.int64) * cols + bn * BLOCK_N
        src = src + start
        dst = dst + start
        offs_n = tl.arange(0, BLOCK_N)
        # Programs past this matrix's last block see zero rows: every access is masked.
        live_rows = tl.where(valid, rows - bm * BLOCK_M, 0)
        col_mask = offs_n[None, :] < cols - bn * BLOCK_N

        if CHUNK_M == BLOCK_M:
            # One pass: the block stays in registers between its amax and its codes.
            offs_m = tl.arange(0, BLOCK_M)
            mask = (offs_m[:, None] < live_rows) & col_mask
            index = offs_m[:, None] * cols + offs_n[None, :]
            x = tl.load(src + index, mask=mask, other=0.0).to(tl.float32)
            amax, bad = _amax_and_bad(x)
        else:
            # Scalar loads need an address per element: a whole block does not fit in
            # registers, so take CHUNK_M rows at a time, the amax first, then the codes
            # (the second read of a chunk comes from cache).
            amax = 0.0
            bad = 0
            for r in range(0, BLOCK_M, CHUNK_M):
                offs_m = r + tl.arange(0, CHUNK_M)
                mask = (offs_m[:, None] < live_rows) & col_mask
                index = offs_m[:, None] * cols + offs_n[None, :]
                x = tl.load(src + index, mask=mask, other=0.0).to(tl.float32)
                chunk_amax, chunk_bad = _amax_and_bad(x)
                amax = tl.maximum(amax, chunk_amax)
                bad = tl.maximum(bad, chunk_bad)

        if VERL:
            # verl: m = 448 / amax (1 for an all-zero or Inf block), scale = 1 / m; an
            # overflowing m (0 < amax < 448 / FLT_MAX) flags the tensor.
            operand = tl.math.div_rn(tl.full((), 448.0, tl.float32), amax)
            operand = tl.where((amax == 0.0) | (amax > 3.4028234663852886e38), 1.0, operand)
            bad = tl.maximum(bad, (operand > 3.4028234663852886e38).to(tl.int32))
            scale = tl.math.div_rn(tl.full((), 1.0, tl.float32), operand)
        else:
            scale = tl.math.div_rn(tl.maximum(amax, eps), 448.0)
            if UE8M0:
                sbits = scale.to(tl.int32, bitcast=True)
                exponent = ((sbits >> 23) & 0xFF) + ((sbits & 0x7FFFFF) != 0).to(tl.int32)
                exponent = tl.minimum(tl.maximum(exponent, 1), 254)
                scale = (exponent << 23).to(tl.float32, bitcast=True)
            operand = scale

        if CHUNK_M == BLOCK_M:
            tl.store(dst + index, _e4m3_codes(x, operand, VERL), mask=mask)
        else:
            for r in range(0, BLOCK_M, CHUNK_M):
                offs_m = r + tl.arange(0, CHUNK_M)
                mask = (offs_m[:, None] < live_rows) & col_mask
                index = offs_m[:, None] * cols + offs_n[None, :]
                x = tl.load(src + index, mask=mask, other=0.0).to(tl.float32)
                tl.store(dst + index, _e4m3_codes(x, operand, VERL), mask=mask)

        tl.store(out_scale + pid, scale, mask=valid)
        tl.atomic_max(flags + tl.load(owner_table + mat), bad, mask=valid)


_TRITON_DTYPES: dict[torch.dtype, Any] = {}
if tl is not None:
    _TRITON_DTYPES = {
        torch.bfloat16: tl.bfloat16,
        torch.float16: tl.float16,
        torch.float32: tl.float32,
    }

# Triton's second grid dimension is capped at 65535 matrices per launch.
_MAX_MATRICES = 65535
NUM_WARPS = 8
"""Warps per program (``benchmarks.kernel_report`` compiles with the same figure)."""
_UNALIGNED_CHUNK_M = 32


def quantize_block_batch(
    weights: Sequence[torch.Tensor],
    block: tuple[int, int] = (128, 128),
    scale_fmt: ScaleFormat = "float32",
    arithmetic: Fp8Arithmetic = "sglang",
) -> tuple[list[Fp8Tensor], torch.Tensor]:
    """Block-quantize ``weights`` (each ``[..., out, in]``) on the current stream.

    One launch per input dtype (more only past 65535 matrices). Returns the results in
    order and an int32 flag per weight, on the device, set to 1 where the weight holds
    NaN/Inf (that weight's result is then meaningless; with ``arithmetic="verl"`` also
    where a block is too small to scale). Nothing waits on the device.
    Everything is enqueued on the weights' device (its current stream), whatever the
    calling thread's current device is. Inputs whose rows all start on 16 bytes (columns a
    multiple of 16, aligned bases) get 16-byte vector accesses; others a slower scalar
    path that takes 32 block rows at a time.

    Raises:
        RuntimeError: Triton is not installed.
        ValueError: a weight is not bf16/fp16/fp32 or has fewer than 2 dims, or the block
            is not a pair of powers of two, or ``block[0] * in`` reaches 2**31.
    """
    if triton is None:
        raise RuntimeError("Triton is not installed")
    block = as_block(block)
    if not supports_block(block):
        raise ValueError(f"block {list(block)} is not a pair of powers of two")
    if not weights:
        return [], torch.zeros(0, dtype=torch.int32)
    device = weights[0].device
    # The launch, the table's copy and the current stream belong to the weights' device,
    # not to the calling thread's current one (cuda:0 in a fresh worker thread).
    with device_guard(device):
        return _enqueue(weights, device, block, scale_fmt, arithmetic)


def device_guard(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """``torch.cuda.device(device)`` for a CUDA device, else a context that does nothing."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _enqueue(
    weights: Sequence[torch.Tensor],
    device: torch.device,
    block: tuple[int, int],
    scale_fmt: ScaleFormat,
    arithmetic: Fp8Arithmetic,
) -> tuple[list[Fp8Tensor], torch.Tensor]:
    flags = torch.zeros(len(weights), dtype=torch.int32, device=device)
    results: list[Fp8Tensor] = []
    groups: dict[torch.dtype, list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
    for i, weight in enumerate(weights):
        if weight.dtype not in _TRITON_DTYPES or weight.dim() < 2:
            raise ValueError(
                f"weight {i}: cannot block-quantize dtype {weight.dtype}, shape "
                f"{tuple(weight.shape)}"
            )
        src = weight if weight.is_contiguous() else weight.contiguous()
        q = torch.empty(src.shape, dtype=FP8_DTYPE, device=device)
        # float32 always: the kernel writes fp32 scales whatever the default dtype is.
        scale = torch.empty(
            scale_shape(src.shape, "block", block), dtype=torch.float32, device=device
        )
        results.append(Fp8Tensor(q, scale))
        groups.setdefault(src.dtype, []).append((i, src, q, scale))

    for dtype, members in groups.items():
        src_ptrs: list[int] = []
        dst_ptrs: list[int] = []
        scale_ptrs: list[int] = []
        rows: list[int] = []
        cols: list[int] = []
        owners: list[int] = []
        max_blocks = 0
        for i, src, q, scale in members:
            *_, out_dim, in_dim = src.shape
            if out_dim == 0 or in_dim == 0:
                continue
            n_blocks = math.ceil(out_dim / block[0]) * math.ceil(in_dim / block[1])
            max_blocks = max(max_blocks, n_blocks)
            if block[0] * in_dim >= 2**31:
                raise ValueError(
                    f"weight {i}: {in_dim} columns x {block[0]} block rows do not fit the "
                    "kernel's int32 in-block offsets"
                )
            for e in range(src.numel() // (out_dim * in_dim)):
                src_ptrs.append(src.data_ptr() + e * out_dim * in_dim * src.element_size())
                dst_ptrs.append(q.data_ptr() + e * out_dim * in_dim)
                scale_ptrs.append(scale.data_ptr() + e * n_blocks * 4)
                rows.append(out_dim)
                cols.append(in_dim)
                owners.append(i)
        for start in range(0, len(src_ptrs), _MAX_MATRICES):
            part = slice(start, start + _MAX_MATRICES)
            columns = (src_ptrs, dst_ptrs, scale_ptrs, rows, cols, owners)
            # One [6, n] table, one host-to-device copy; its rows are the kernel's tables.
            table = _device_table([values[part] for values in columns], device)
            aligned = _aligned(src_ptrs[part], dst_ptrs[part], cols[part])
            _fp8_block_kernel[(max_blocks, table.shape[1])](
                *table.unbind(0),
                flags,
                FP8_EPSILON,
                SRC_DTYPE=_TRITON_DTYPES[dtype],
                BLOCK_M=block[0],
                BLOCK_N=block[1],
                UE8M0=scale_fmt == "ue8m0",
                ALIGNED=aligned,
                CHUNK_M=launch_chunk_m(block, aligned),
                VERL=arithmetic == "verl",
                num_warps=NUM_WARPS,
                # No FMA contraction: the definition is separately rounded IEEE ops.
                enable_fp_fusion=False,
            )
    assert FP8_MAX == 448.0  # the kernel's literal; change both together
    return results, flags


def launch_chunk_m(block: tuple[int, int], aligned: bool) -> int:
    """Rows of the block a program holds at once: all of them on aligned inputs (vector
    accesses), else 32 (scalar accesses need a register pair per element for the address,
    and a whole 128 x 128 block then spills)."""
    return block[0] if aligned else min(block[0], _UNALIGNED_CHUNK_M)


def _aligned(src_ptrs: Sequence[int], dst_ptrs: Sequence[int], cols: Sequence[int]) -> bool:
    # Every row of every matrix starts on 16 bytes iff the bases are 16-byte aligned and
    # the row length is a multiple of 16 elements (so of 16 bytes for 1-byte FP8 too).
    return (
        all(p % 16 == 0 for p in src_ptrs)
        and all(p % 16 == 0 for p in dst_ptrs)
        and all(c % 16 == 0 for c in cols)
    )


def _device_table(values: Sequence[Sequence[int]], device: torch.device) -> torch.Tensor:
    table = torch.tensor(values, dtype=torch.int64)
    if device.type == "cuda":
        # Pinned + non_blocking: the copy is ordered on the current stream, the host
        # does not wait, and torch keeps the pinned block alive until the copy ran.
        return table.pin_memory().to(device, non_blocking=True)
    return table
