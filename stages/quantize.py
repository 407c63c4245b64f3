"""The Fp8Quantize stage: each WeightBucket's selected weights become FP8 plus their scales.

A thin stage over ``weightpipe.stages.fp8``, which owns the numbers, the selection rules
(``Fp8Selection``) and the SGLang ``quantization_config``: this module owns the stage's
lifecycle, its worker thread, its CUDA streams and the output bucket's layout (each
selected ``X.weight`` directly followed by its float32 scale). On CPU the work runs in the
stage's worker thread, which spreads all of a bucket's row bands over a few band threads
and writes them into a recycled output arena; on CUDA it is enqueued on the stage's own
stream (one Triton launch per bucket and input dtype, or the plain torch ops without
Triton) and the output bucket carries the recorded event. Every path is bit-identical.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from typing import Any

import anyio
import anyio.to_thread
import torch

from weightpipe.pipeline import Stage
from weightpipe.stages._layout import layout_of, unflatten
from weightpipe.stages._memory import BufferPool
from weightpipe.stages.bucket import WeightBucket
from weightpipe.stages.engines.base import WireSpec
from weightpipe.stages.fp8 import (
    FP8_DTYPE,
    FP8_METHODS,
    NONFINITE_POLICIES,
    QUANTIZE_BACKENDS,
    SCALE_FORMATS,
    Fp8Arithmetic,
    Fp8Method,
    Fp8Selection,
    Fp8Tensor,
    NonFinitePolicy,
    NonFiniteWeightError,
    QuantizeBackend,
    ScaleFormat,
    as_block,
    check_arithmetic,
    check_backend,
    default_cpu_threads,
    fp8_output_bytes,
    quantize_fp8_batch,
    quantize_fp8_many,
    scale_name,
    scale_shape,
    select_for_fp8,
    sglang_quantization_config,
    warm_up_cpu_kernel,
)
from weightpipe.stages.fp8.flags import PendingFlags

__all__ = [
    "Backend",
    "Fp8Quantize",
    "Fp8Selection",
    "NonFinitePolicy",
    "scale_name",
    "select_for_fp8",
]

_WIRE_ROUND = 4 << 20

Backend = QuantizeBackend
"""The former name of ``weightpipe.stages.fp8.spec.QuantizeBackend``."""


class Fp8Quantize(Stage[WeightBucket, WeightBucket]):
    """FP8-quantize the selected weights of each bucket; cast the rest to ``keep_dtype``.

    Each selected ``X.weight`` is replaced by ``X.weight`` (float8_e4m3fn, same shape)
    directly followed by its scale (``X.weight_scale_inv`` for block, ``X.weight_scale``
    for channel/tensor; float32); other floating-point tensors are cast to ``keep_dtype``
    (``None``: left as they are), anything else passes through. The output bucket keeps
    the input's index, is_last and version and adds ``meta`` counts ``quantized``,
    ``kept`` (not quantized) and ``nonfinite_kept``. Input tensors are never modified.

    Args:
        block: FP8 block ``[out, in]`` for ``method="block"``.
        method: ``block`` (SGLang/DeepSeek block FP8), ``channel`` or ``tensor``.
        scale_fmt: ``float32``, or ``ue8m0`` (power-of-two scales, for DeepGEMM).
        arithmetic: ``sglang`` (``scale = max(amax, 1e-4) / 448``, ``q = w / scale``) or
            ``verl`` (verl 0.9.1's quantizer: ``q = w * (448 / amax)``; block, square
            blocks, float32 scales); ``weightpipe.stages.fp8.reference`` defines both.
        nonfinite: a weight with NaN/Inf: ``error`` raises ``NonFiniteWeightError`` naming
            it (on CUDA at a later bucket, the sync's last at the latest, so before the
            commit: the flags are read without a host wait per bucket); ``keep`` sends it
            unquantized (cast to ``keep_dtype``) and counts it.
        keep_dtype: dtype of the floating-point tensors left unquantized.
        ignored_layers, include, exclude: see ``Fp8Selection``.
        workers: concurrent ``process`` calls the pipeline may run (buckets in flight).
        backend: ``auto`` (CPU: band threads; CUDA: Triton if installed, else torch),
            ``torch``, or ``triton`` (CUDA, or CPU under ``TRITON_INTERPRET=1``).
        cpu_threads: band threads per CPU bucket (default: the cores, at most 4).
        wire: write each CPU bucket's outputs (FP8 codes, scales and the kept tensors,
            in output order) straight into one flat buffer laid out to this ``WireSpec``
            (aligned starts, shared memory if asked), which becomes the bucket's
            ``buffer``: an engine that sends flattened buckets (SGLang) then passes it on
            without another copy. ``sync_weights`` sets it from the engine (``use_wire``)
            when this is the last stage before Load. None: separate output tensors.
        name: the stage's name in reports, errors and metrics (default ``quantize``).

    ``written_bytes`` counts the bytes the stage has written (FP8 codes, scales, cast or
    packed copies of kept tensors; a tensor passed on as it is costs nothing).
    """

    name: str = "quantize"

    def __init__(
        self,
        *,
        block: tuple[int, int] = (128, 128),
        method: Fp8Method = "block",
        scale_fmt: ScaleFormat = "float32",
        arithmetic: Fp8Arithmetic = "sglang",
        nonfinite: NonFinitePolicy = "error",
        keep_dtype: torch.dtype | None = torch.bfloat16,
        ignored_layers: Sequence[str] = (),
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
        workers: int = 1,
        backend: QuantizeBackend = "auto",
        cpu_threads: int | None = None,
        wire: WireSpec | None = None,
        name: str | None = None,
    ) -> None:
        if name is not None:
            self.name = name
        block = as_block(block, what="Fp8Quantize: block")
        for what, value, choices in (
            ("method", method, FP8_METHODS),
            ("scale_fmt", scale_fmt, SCALE_FORMATS),
            ("nonfinite", nonfinite, NONFINITE_POLICIES),
            ("backend", backend, QUANTIZE_BACKENDS),
        ):
            if value not in choices:
                raise ValueError(f"Fp8Quantize: {what} {value!r} is not one of {choices}")
        check_arithmetic(arithmetic, method, block, scale_fmt, what="Fp8Quantize")
        if keep_dtype is not None and not keep_dtype.is_floating_point:
            raise ValueError(f"Fp8Quantize: keep_dtype {keep_dtype} is not a floating dtype")
        if workers < 1:
            raise ValueError(f"Fp8Quantize: workers must be >= 1, got {workers}")
        if cpu_threads is not None and cpu_threads < 1:
            raise ValueError(f"Fp8Quantize: cpu_threads must be >= 1, got {cpu_threads}")
        self.block = block
        self.method: Fp8Method = method
        self.scale_fmt: ScaleFormat = scale_fmt
        self.arithmetic: Fp8Arithmetic = arithmetic
        self.nonfinite: NonFinitePolicy = nonfinite
        self.keep_dtype = keep_dtype
        self.selection = Fp8Selection(tuple(ignored_layers), tuple(include), tuple(exclude))
        self.workers = workers
        self.backend: QuantizeBackend = backend
        self.cpu_threads = cpu_threads if cpu_threads is not None else default_cpu_threads()
        self._limiter: anyio.CapacityLimiter | None = None
        self._streams: dict[int, Any] = {}
        # Workers create the stream of a device lazily; one lock, so two workers never
        # make two streams for one device (each bucket's event would then be on another).
        self._streams_lock = threading.Lock()
        self._flags = PendingFlags()
        # Output arenas of CPU buckets: buckets in flight here and downstream (a few
        # channel slots) plus one being written.
        self._arenas = BufferPool(0, keep=workers + 4, pin=False)
        self._arena_lock = threading.Lock()
        self.wire: WireSpec | None = None
        self._wire_pool: BufferPool | None = None
        self.use_wire(wire)
        self.written_bytes = 0
        self._written_lock = threading.Lock()

    def use_wire(self, spec: WireSpec | None) -> None:
        """Write CPU buckets into one flat buffer laid out to ``spec`` (None: do not).

        ``sync_weights`` calls this with the engine's ``WireSpec`` when this stage is the
        last one before Load (``WritesWireBuffer``)."""
        if spec != self.wire or self._wire_pool is None:
            # Band workers and copies write every byte of a packed buffer: no prefault.
            shared = spec is not None and spec.shared_memory
            self._wire_pool = BufferPool(
                0, keep=self.workers + 4, pin=False, shared=shared, prefault=False
            )
        self.wire = spec

    def _count(self, nbytes: int) -> None:
        with self._written_lock:
            self.written_bytes += nbytes

    # ------------------------------------------------------------------ engine config

    def quantization_config(
        self, parameters: Iterable[tuple[str, Sequence[int]]] | None = None
    ) -> dict[str, Any]:
        """The ``quantization_config`` to launch SGLang with (``quantization="fp8"``).

        ``weightpipe.stages.fp8.sglang_quantization_config`` with this stage's settings;
        ``parameters`` (``(name, shape)`` of the model, e.g. from ``named_parameters``)
        lets ``re:`` / include / exclude rules be spelled out as plain ``ignored_layers``.

        Raises:
            ValueError: the rules use ``re:`` patterns or include/exclude but
                ``parameters`` was not given (SGLang could not apply them), or they would
                split a fused layer's shards.
        """
        return sglang_quantization_config(
            self.selection,
            method=self.method,
            block=self.block,
            scale_fmt=self.scale_fmt,
            parameters=parameters,
        )

    # ------------------------------------------------------------------ stage

    async def open(self) -> None:
        check_backend(self.backend, self.method, self.block, what="Fp8Quantize")
        self._limiter = anyio.CapacityLimiter(self.workers)
        self._flags.reset()
        if self.method == "block" and self.backend != "triton" and not torch.cuda.is_available():
            # Compile the CPU kernel (numba, ~2 s once per process) before the first
            # bucket rather than inside the first sync.
            await anyio.to_thread.run_sync(warm_up_cpu_kernel)

    async def close(self) -> None:
        with self._streams_lock:
            self._streams.clear()
        self._flags.reset()

    async def process(self, item: WeightBucket) -> list[WeightBucket]:
        limiter = self._limiter if self._limiter is not None else anyio.CapacityLimiter(1)
        return [await anyio.to_thread.run_sync(self.quantize_bucket, item, limiter=limiter)]

    def quantize_bucket(self, bucket: WeightBucket) -> WeightBucket:
        """The blocking body of ``process`` (callable directly, from any thread).

        Raises:
            NonFiniteWeightError: with ``nonfinite="error"``, naming the first bad tensor.
            ValueError: a weight selected for FP8 has no elements (naming it).
        """
        plan = [self.selection.quantizes(name, tensor) for name, tensor in bucket.tensors]
        for (name, tensor), chosen in zip(bucket.tensors, plan, strict=True):
            if chosen and tensor.numel() == 0:
                # Refused here, by name: the kernels would fail on it with a reshape error
                # naming nothing, and no engine has a linear layer without weights.
                raise ValueError(
                    f"tensor {name!r}: a weight selected for FP8 has no elements "
                    f"(shape {tuple(tensor.shape)})"
                )
        if (
            self.wire is not None
            and self.backend != "triton"
            and bucket.tensors
            and not any(t.is_cuda for _, t in bucket.tensors)
        ):
            packed = self._quantize_packed(bucket, plan, self.wire)
            if packed is not None:
                return packed
        cuda_idx = [i for i, (_, t) in enumerate(bucket.tensors) if t.is_cuda]
        results: dict[int, Fp8Tensor | None] = {}
        ready = None
        if cuda_idx:
            ready = self._quantize_cuda(bucket, plan, cuda_idx, results)
        cpu_idx = [i for i, (_, t) in enumerate(bucket.tensors) if not t.is_cuda and plan[i]]
        if cpu_idx:
            self._quantize_cpu(bucket, cpu_idx, results)

        out: list[tuple[str, torch.Tensor]] = []
        quantized = kept = nonfinite_kept = 0
        for i, (name, tensor) in enumerate(bucket.tensors):
            result = results.get(i)
            if plan[i] and result is None:
                if self.nonfinite == "error":
                    raise NonFiniteWeightError(name)
                nonfinite_kept += 1
            if result is not None:
                out.append((name, result.qweight))
                out.append((scale_name(name, self.method), result.scale))
                quantized += 1
            else:
                out.append((name, self._keep(tensor)))
                kept += 1
        self._count(
            sum(r.qweight.nbytes + r.scale.nbytes for r in results.values() if r is not None)
        )
        if bucket.is_last:
            # Flags of earlier CUDA buckets, when this one added none: read before commit.
            self._flags.wait_all()
        if ready is not None and _kept_after_event(cuda_idx, results):
            # Casts of kept CUDA tensors were enqueued after the event: record again.
            ready = self._record(bucket.tensors[cuda_idx[0]][1].device)
        return bucket.with_tensors(
            tuple(out),
            ready=ready,
            quantized=quantized,
            kept=kept,
            nonfinite_kept=nonfinite_kept,
        )

    # ------------------------------------------------------------------ internals

    def _kept_dtype(self, tensor: torch.Tensor) -> torch.dtype:
        if self.keep_dtype is None or not tensor.is_floating_point() or tensor.dtype == FP8_DTYPE:
            return tensor.dtype
        return self.keep_dtype

    def _keep(self, tensor: torch.Tensor) -> torch.Tensor:
        dtype = self._kept_dtype(tensor)
        if dtype == tensor.dtype:
            return tensor
        self._count(tensor.numel() * dtype.itemsize)
        if tensor.is_cuda:
            with torch.cuda.stream(self._stream(tensor.device)):
                return tensor.to(dtype)
        return tensor.to(dtype)

    def _quantize_packed(
        self, bucket: WeightBucket, plan: list[bool], wire: WireSpec
    ) -> WeightBucket | None:
        """Quantize a CPU bucket straight into one flat buffer laid out to ``wire``.

        Every output (FP8 codes and scale of each selected weight, then each kept tensor
        in its kept dtype) gets its aligned place; the band workers write the FP8 bytes
        and scales there, kept tensors are copied (and cast) there once. Returns None when
        a weight turned out non-finite under ``nonfinite="keep"`` (its output then has
        another dtype): the caller quantizes the bucket the unpacked way instead.
        """
        specs: list[tuple[str, torch.Tensor]] = []  # meta tensors: shapes and dtypes only
        for i, (name, tensor) in enumerate(bucket.tensors):
            if plan[i]:
                shape = scale_shape(tensor.shape, self.method, self.block)
                specs.append((name, torch.empty(tensor.shape, dtype=FP8_DTYPE, device="meta")))
                specs.append(
                    (
                        scale_name(name, self.method),
                        torch.empty(shape, dtype=torch.float32, device="meta"),
                    )
                )
            else:
                dtype = self._kept_dtype(tensor)
                specs.append((name, torch.empty(tensor.shape, dtype=dtype, device="meta")))
        layouts, total = layout_of(specs, wire.align_bytes)
        assert self._wire_pool is not None
        with self._arena_lock:
            # Sized to this bucket (rounded up, so similar buckets share buffers), not to
            # the largest one seen: a lone oversize tensor must not make every later
            # (shared-memory, prefaulted) allocation that large.
            buffer = self._wire_pool.take(-(-total // _WIRE_ROUND) * _WIRE_ROUND)[:total]
        views = unflatten(buffer, layouts)
        selected: list[tuple[str, torch.Tensor]] = []
        outputs: list[tuple[torch.Tensor, torch.Tensor]] = []
        kept: list[tuple[torch.Tensor, torch.Tensor]] = []
        at = 0
        for i, (name, tensor) in enumerate(bucket.tensors):
            if plan[i]:
                selected.append((name, tensor))
                outputs.append((views[at][1], views[at + 1][1]))
                at += 2
            else:
                kept.append((views[at][1], tensor))
                at += 1
        results = (
            quantize_fp8_many(
                selected,
                method=self.method,
                block=self.block,
                scale_fmt=self.scale_fmt,
                threads=self.cpu_threads,
                outputs=outputs,
                arithmetic=self.arithmetic,
            )
            if selected
            else []
        )
        for (name, _), result in zip(selected, results, strict=True):
            if result is None:
                if self.nonfinite == "error":
                    raise NonFiniteWeightError(name)
                return None
        for view, tensor in kept:
            view.copy_(tensor.detach())
        self._count(sum(layout.nbytes for layout in layouts))
        return bucket.with_tensors(
            tuple(views),
            buffer=buffer,
            quantized=len(selected),
            kept=len(kept),
            nonfinite_kept=0,
        )

    def _quantize_cpu(
        self, bucket: WeightBucket, idx: list[int], results: dict[int, Fp8Tensor | None]
    ) -> None:
        named = [bucket.tensors[i] for i in idx]
        if self.backend == "triton":  # on CPU: Triton's interpreter (TRITON_INTERPRET=1)
            outs, flags = self._batch([t for _, t in named])
            for i, result, bad in zip(idx, outs, flags.tolist(), strict=True):
                results[i] = None if bad else result
            return
        arena = self._take_arena(fp8_output_bytes(named))
        many = quantize_fp8_many(
            named,
            method=self.method,
            block=self.block,
            scale_fmt=self.scale_fmt,
            threads=self.cpu_threads,
            arena=arena,
            arithmetic=self.arithmetic,
        )
        results.update(zip(idx, many, strict=True))

    def _take_arena(self, nbytes: int) -> torch.Tensor:
        # One recycled buffer holds a bucket's FP8 outputs. It is reused only once every
        # view of it downstream is gone (the pool checks the storage's use count), so a
        # bucket still waiting to be loaded is never overwritten; at most `keep` arenas
        # are retained, the rest freed when dropped.
        with self._arena_lock:
            self._arenas.capacity = max(self._arenas.capacity, nbytes)
            return self._arenas.take(nbytes)

    def _stream(self, device: torch.device) -> Any:
        index = device.index if device.index is not None else torch.cuda.current_device()
        with self._streams_lock:
            stream = self._streams.get(index)
            if stream is None:
                stream = torch.cuda.Stream(device=index)  # type: ignore[no-untyped-call]
                self._streams[index] = stream
            return stream

    def _record(self, device: torch.device) -> Any:
        event = torch.cuda.Event()  # type: ignore[no-untyped-call]
        event.record(self._stream(device))
        return event

    def _quantize_cuda(
        self,
        bucket: WeightBucket,
        plan: list[bool],
        idx: list[int],
        results: dict[int, Fp8Tensor | None],
    ) -> Any:
        """Enqueue the bucket's CUDA quantization on this stage's stream.

        No host sync per tensor: everything is enqueued, the NaN/Inf flags are copied to
        pinned memory and one event is recorded. With ``nonfinite="keep"`` the host waits
        for that event (in this worker thread) because the flags decide the output's
        tensors; with ``"error"`` it does not: ``PendingFlags`` reads them once the event
        has completed, at a later bucket, and waits only at the sync's last bucket, so
        a NaN fails the sync before its commit, naming the tensor and its bucket.
        """
        device = bucket.tensors[idx[0]][1].device
        stream = self._stream(device)
        chosen = [i for i in idx if plan[i]]
        producer = torch.cuda.current_stream(device)
        with torch.cuda.device(device), torch.cuda.stream(stream):
            if bucket.ready is not None:
                bucket.wait_ready(stream)
            else:
                # No event: the tensors were made on this thread's current stream (the
                # default one unless the caller chose another); order after it.
                stream.wait_stream(producer)
            for i in idx:
                # The inputs were allocated on the producer's stream and are read on ours.
                bucket.tensors[i][1].record_stream(stream)
            if not chosen:
                return self._record(device)
            weights = [bucket.tensors[i][1] for i in chosen]
            outs, flags = self._batch(weights)
            host_flags = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
            host_flags.copy_(flags, non_blocking=True)
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record(stream)
        if self.nonfinite == "error":
            results.update(zip(chosen, outs, strict=True))
            names = tuple(bucket.tensors[i][0] for i in chosen)
            self._flags.add(event, host_flags, names, bucket.index, last=bucket.is_last)
            return event
        event.synchronize()
        for i, result, bad in zip(chosen, outs, host_flags.tolist(), strict=True):
            results[i] = None if bad else result
        return event

    def _batch(self, weights: list[torch.Tensor]) -> tuple[list[Fp8Tensor], torch.Tensor]:
        return quantize_fp8_batch(
            weights,
            method=self.method,
            block=self.block,
            scale_fmt=self.scale_fmt,
            backend=self.backend,
            arithmetic=self.arithmetic,
        )


def _kept_after_event(cuda_idx: list[int], results: dict[int, Fp8Tensor | None]) -> bool:
    """Whether a CUDA tensor of the bucket is sent unquantized, so its cast to
    ``keep_dtype`` was enqueued after the quantize event: not selected (no result), or
    selected but non-finite under ``nonfinite="keep"`` (its result is None)."""
    return any(results.get(i) is None for i in cuda_idx)
