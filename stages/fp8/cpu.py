"""The CPU fast path: FP8 quantization of many tensors at once, in row bands on a few threads.

Each tensor is cut into row bands (whole row blocks for block scales) and the bands of
every tensor of a call go to one shared pool of band workers, so a bucket of many small
tensors keeps the cores as busy as one large tensor does. Each band's temporaries live in
reusable per-thread scratch buffers (hot in cache, no page faults per band); outputs go
into a caller's arena (``fp8_output_bytes`` / ``quantize_fp8_many(arena=...)``) or into
fresh host buffers from ``weightpipe.stages._memory``. Block scaling runs the numba kernel
of ``weightpipe.stages.fp8._numba`` when numba is installed (torch's own float8 cast is a
scalar loop that dominates otherwise), else band-wise torch ops;
``WEIGHTPIPE_FP8_CPU_KERNEL=torch`` forces the latter. Every path equals
``weightpipe.stages.fp8.reference`` bit for bit, for either arithmetic.
"""

from __future__ import annotations

import itertools
import math
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from weightpipe.stages._memory import allocate_host
from weightpipe.stages.fp8 import _numba
from weightpipe.stages.fp8.reference import fp8_scale_from_amax, verl_multiplier_from_amax
from weightpipe.stages.fp8.spec import (
    FP8_DTYPE,
    FP8_MAX,
    Fp8Arithmetic,
    Fp8Method,
    Fp8Tensor,
    ScaleFormat,
    check_quantizable,
    scale_shape,
)

__all__ = ["default_cpu_threads", "fp8_output_bytes", "quantize_fp8_many", "warm_up_cpu_kernel"]

# Which CPU kernel block quantization uses: "auto" (numba when importable, else torch),
# "torch" or "numba". Both compute the definition bit for bit; numba fuses the passes over
# a cache-sized chunk (about 2x faster per core on AVX-512 here), torch's own float8 cast
# being a scalar loop. Set WEIGHTPIPE_FP8_CPU_KERNEL=torch to force torch.
_CPU_KERNEL = os.environ.get("WEIGHTPIPE_FP8_CPU_KERNEL", "auto")

# The integer view of each input dtype and the mask that clears its sign bit: for finite
# floats the order of |w| equals the order of these integers, so a single integer max
# gives the block amax (and any NaN/Inf shows up as a maximum at or above the Inf bits).
_INT_VIEW = {
    torch.bfloat16: (torch.int16, 0x7FFF),
    torch.float16: (torch.int16, 0x7FFF),
    torch.float32: (torch.int32, 0x7FFFFFFF),
}


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
    *,
    multiply: bool = False,
) -> None:
    """``dst = e4m3(clamp(src_fp32 / divisor))`` through a float32 scratch band.

    ``grouped`` is the shape the division sees (rows split into row blocks), so that
    ``divisor`` broadcasts one row of scales per row block. ``multiply``: ``src_fp32 *
    divisor`` instead (verl's arithmetic, whose ``divisor`` is the multiplier).
    """
    tmp = _SCRATCH.get(torch.float32, src.numel()).view(src.shape)
    tmp.copy_(src)
    view = tmp.view(grouped) if grouped is not None else tmp
    if multiply:
        view.mul_(divisor)
    else:
        view.div_(divisor)
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
    arithmetic: Fp8Arithmetic = "sglang",
) -> None:
    """Quantize rows ``[r0, r0 + rows)`` (``r0`` on a block boundary) of 2-D ``w``.

    The block amax goes to ``amax_out`` so that the caller checks finiteness once per
    tensor instead of once per band (a NaN/Inf amax leaves garbage in ``q``, which the
    caller then discards).
    """
    bo = block[0]
    end = min(r0 + rows, w.shape[0])
    full_end = r0 + (end - r0) // bo * bo
    use_numba = (
        _CPU_KERNEL != "torch" and _numba.kernel(required=_CPU_KERNEL == "numba") is not None
    )
    spans = [(r0, full_end), (full_end, end)]  # whole row blocks, then a partial last one
    for lo, hi in spans:
        if hi <= lo:
            continue
        if use_numba:
            _numba.block_rows(w, q, s, amax_out, lo, hi, block, scale_fmt, _SCRATCH.get, arithmetic)
        else:
            _block_rows(w, q, s, amax_out, lo, hi, block, scale_fmt, arithmetic)


def _block_rows(
    w: torch.Tensor,
    q: torch.Tensor,
    s: torch.Tensor,
    amax_out: torch.Tensor,
    r0: int,
    r1: int,
    block: tuple[int, int],
    scale_fmt: ScaleFormat,
    arithmetic: Fp8Arithmetic = "sglang",
) -> None:
    """Rows ``[r0, r1)``: whole row blocks, or exactly one partial row block.

    A block that ``arithmetic="verl"`` cannot scale gets +Inf in ``amax_out`` (the
    caller's NaN/Inf flag), as in ``reference_with_amax``.
    """
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
        if arithmetic == "verl":
            operand, scale = verl_multiplier_from_amax(amax)
            amax = torch.where(torch.isfinite(operand), amax, torch.inf)
        else:
            operand = scale = fp8_scale_from_amax(amax, scale_fmt)
        amax_out[rb0 : rb0 + n_rb, b0 : b0 + nb] = amax
        s[rb0 : rb0 + n_rb, b0 : b0 + nb] = scale
        per_column = operand.repeat_interleave(bi, dim=1)[:, None, :width]
        _divide_cast(
            src,
            per_column,
            q[r0:r1, c0:c1],
            (n_rb, rb_rows, width),
            multiply=arithmetic == "verl",
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


def default_cpu_threads() -> int:
    """Band threads when the caller does not say: the cores, at most 4.

    Past 4 the bands of a typical bucket no longer keep more threads busy, and the cores
    are better left to the stages around quantization.
    """
    return max(1, min(4, os.cpu_count() or 1))


def warm_up_cpu_kernel() -> bool:
    """Compile the numba CPU kernel now (about 2 s, once per process); True if in use.

    numba compiles lazily, once per argument-type signature, on the first call: this
    compiles every input dtype's now, so no real quantization (say the first sync, while
    an engine generates) pays for it. Optional: the first CPU block quantization of each
    dtype compiles it otherwise.
    """
    if _CPU_KERNEL == "torch":
        return False
    return _numba.warm_up(required=_CPU_KERNEL == "numba")


def _empty_fp8(shape: Sequence[int]) -> torch.Tensor:
    # Not prefaulted: the band workers' first writes touch the pages, in parallel.
    buffer = allocate_host(math.prod(shape), pin=False, prefault=False)
    return buffer.view(FP8_DTYPE).view(tuple(shape))


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
        scale: torch.Tensor | None = None,
        arithmetic: Fp8Arithmetic = "sglang",
    ) -> None:
        self.name = name
        self.method = method
        self.block = block
        self.scale_fmt: ScaleFormat = scale_fmt
        self.arithmetic: Fp8Arithmetic = arithmetic
        self.nonfinite = False
        # detach: a Parameter that requires grad is read as plain data (no autograd graph).
        src = weight.detach()
        src = src if src.is_contiguous() else src.contiguous()
        *_, out_dim, in_dim = src.shape
        self.matrices = src.reshape(-1, out_dim, in_dim)
        self.qweight = _empty_fp8(src.shape) if qweight is None else qweight
        shape = scale_shape(src.shape, method, block)
        self.scale = torch.empty(shape, dtype=torch.float32) if scale is None else scale
        self.q3 = self.qweight.view(-1, out_dim, in_dim)
        # Block and channel amax, one per scale entry: checked once when the job ends.
        # float32 always: torch.set_default_dtype(bfloat16) must not change the numbers
        # (the numba kernel takes float32 arrays only).
        amax_shape = self.scale.shape if method != "tensor" else (0,)
        self.amax = torch.zeros(amax_shape, dtype=torch.float32)
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
            amax = torch.zeros(n_mat, dtype=torch.float32)
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
                _block_band(
                    w, q, s3[e], a3[e], r0, self.rows, self.block, self.scale_fmt, self.arithmetic
                )
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


def _check_outputs(
    named: Sequence[tuple[str, torch.Tensor]],
    outputs: Sequence[tuple[torch.Tensor, torch.Tensor]],
    method: Fp8Method,
    block: tuple[int, int],
) -> list[tuple[torch.Tensor | None, torch.Tensor | None]]:
    if len(outputs) != len(named):
        raise ValueError(f"{len(outputs)} outputs given for {len(named)} tensors")
    for (name, weight), (q, scale) in zip(named, outputs, strict=True):
        want = (
            (q, FP8_DTYPE, tuple(weight.shape), "qweight"),
            (scale, torch.float32, scale_shape(weight.shape, method, block), "scale"),
        )
        for out, dtype, shape, what in want:
            if (
                out.dtype != dtype
                or tuple(out.shape) != tuple(shape)
                or out.device.type != "cpu"
                or not out.is_contiguous()
            ):
                raise ValueError(
                    f"tensor {name!r}: its {what} output must be a contiguous CPU {dtype} "
                    f"tensor of shape {tuple(shape)}, got {out.dtype} {tuple(out.shape)} "
                    f"on {out.device}"
                )
    return [(q, scale) for q, scale in outputs]


def quantize_fp8_many(
    named: Sequence[tuple[str, torch.Tensor]],
    *,
    method: Fp8Method = "block",
    block: tuple[int, int] = (128, 128),
    scale_fmt: ScaleFormat = "float32",
    threads: int = 1,
    arena: torch.Tensor | None = None,
    outputs: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
    arithmetic: Fp8Arithmetic = "sglang",
) -> list[Fp8Tensor | None]:
    """Quantize several CPU tensors at once, splitting all of them into row bands.

    The bands of every tensor go to ``threads`` workers together, so a bucket of many
    small tensors keeps the cores as busy as one large tensor does. Returns one result per
    input in order: an ``Fp8Tensor``, or ``None`` where the tensor holds NaN/Inf, or where
    ``arithmetic="verl"`` meets a block too small to scale (the caller decides whether
    that is an error; ``quantize_fp8`` raises). ``arithmetic``: ``sglang`` or ``verl``
    (``weightpipe.stages.fp8.reference`` defines both). The work runs on a shared
    pool of ``threads`` band workers (each with single-threaded torch ops) and the calling
    thread waits for it.

    ``arena``: a uint8 CPU buffer of at least ``fp8_output_bytes(named)`` bytes; the FP8
    outputs are then views into it (each at a 256-byte boundary) instead of fresh
    allocations, so a caller that recycles arenas (the Fp8Quantize stage) skips the
    first-touch page faults of new output memory.

    ``outputs``: instead of ``arena``, one ``(qweight, scale)`` pair per input, each a
    contiguous CPU tensor of the result's dtype and shape (float8_e4m3fn and float32),
    written in place: the Fp8Quantize stage passes views into the bucket's final wire
    buffer, so the FP8 bytes are written once, where the engine reads them.

    Raises:
        ValueError, TypeError: a bad argument, naming the tensor; the input is untouched;
            an ``arena`` that is too small or not uint8; both ``arena`` and ``outputs``;
            an ``outputs`` entry of the wrong dtype, shape or layout.
    """
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    for name, weight in named:
        block = check_quantizable(weight, method, block, scale_fmt, name, arithmetic)
        if weight.device.type != "cpu":
            raise ValueError(f"tensor {name!r}: quantize_fp8_many takes CPU tensors")
    if arena is not None and outputs is not None:
        raise ValueError("pass an arena or outputs, not both")
    pairs: list[tuple[torch.Tensor | None, torch.Tensor | None]]
    if outputs is not None:
        pairs = _check_outputs(named, outputs, method, block)
    else:
        carved = _carve(arena, named) if arena is not None else [None] * len(named)
        pairs = [(q, None) for q in carved]
    jobs = [
        _Job(name, weight, method, block, scale_fmt, q, scale, arithmetic)
        for (name, weight), (q, scale) in zip(named, pairs, strict=True)
    ]
    tensor_jobs = [job for job in jobs if job.method == "tensor"]
    if tensor_jobs:
        _run_tasks([t for job in tensor_jobs for t in job.amax_tasks()], threads)
        for job in tensor_jobs:
            job.finish_amax()
    _run_tasks([t for job in jobs for t in job.quant_tasks()], threads)
    return [job.finish() for job in jobs]
