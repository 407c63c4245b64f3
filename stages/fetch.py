"""The Fetch stage: named tensors in, byte-bounded WeightBuckets out.

Fetch is where a sync's memory is bounded first. It validates every ``(name, tensor)``
pair before the tensor joins a bucket, places it with the pure ``BucketPlanner`` rule
(no bucket over ``bucket_bytes`` unless it holds one larger tensor alone). Where a
single buffer is needed (a file read target, pinned staging for a device, an engine that
sends flat buffers) it copies each tensor into the bucket's uint8 buffer at an aligned
offset, so every tensor of the bucket is a view of that buffer and rebuilds bit-exactly;
otherwise (by default, ``flatten="auto"``) the bucket carries the source tensors
themselves and the next stage, which rewrites the bytes anyway, reads them once. Copies
run in the stage's own worker thread in batches, so the event loop never moves bytes. On
CUDA the buffer is assembled in pinned host memory and sent with one ``non_blocking``
copy on a dedicated copy stream; downstream gets the event recorded after it
(``bucket.ready``), never a host synchronisation per tensor. On CPU the same path runs
without streams; CUDA source tensors bound for a CPU Fetch are copied into pinned host
memory on the stream that produced them (an asynchronous DMA, ordered after their
writer and nothing else), and the worker thread waits for those copies once per bucket.
A source may hand Fetch ``FileSpan``s instead of tensors (``safetensors_source(direct=True)``):
those are read from the file straight into the bucket buffer, one kernel copy each.

Memory invariant (why ``is_last`` is exact): a bucket is emitted only when the first
tensor of the next bucket has arrived (then ``is_last=False``) or at ``flush`` (then
``is_last=True``). So Fetch holds at most one open bucket (at most ``bucket_bytes``, or
one oversize tensor) plus up to ``_COPY_BATCH_BYTES`` of source tensors not yet copied;
with a pipeline of depth ``d`` behind it, ``(d + 2) * bucket_bytes`` bounds what a
Fetch-to-sink run keeps alive. Buffers come from a pool of at most ``keep_buffers`` and
are reused once downstream has dropped every view of them; the pool outlives a sync
(fresh pages and pinning are what make a cold copy slow) unless ``retain_buffers=False``.
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import anyio
import anyio.to_thread
import torch

from weightpipe.pipeline import Stage
from weightpipe.stages import _memory
from weightpipe.stages._layout import (
    BucketPlanner,
    TensorLayout,
    copy_into,
    tensor_alignment,
    unflatten,
)
from weightpipe.stages._memory import BufferPool
from weightpipe.stages.bucket import WeightBucket
from weightpipe.stages.engines.base import WireSpec
from weightpipe.stages.sources import FileSpan, materialise

__all__ = ["EmptySource", "Fetch", "FetchStats"]

EmptySource = Literal["error", "empty"]

# Small tensors are copied in batches of about this many bytes per worker-thread hop, so
# a model of ~18k small expert matrices does not pay one thread round trip per tensor.
_COPY_BATCH_BYTES = 16 << 20

# FileSpans are placed at their file offset modulo this (see process()).
_READ_PHASE_BYTES = 64


@dataclass(frozen=True)
class FetchStats:
    """What a Fetch stage has done since it was built (monotonic counters).

    Attributes:
        tensors: tensors admitted into buckets.
        bytes: their bytes (alignment padding excluded).
        made_contiguous: non-contiguous tensors that were copied into place element-wise.
        buckets: buckets emitted.
        syncs: syncs started (``open``/``reset`` calls).
    """

    tensors: int = 0
    bytes: int = 0
    made_contiguous: int = 0
    buckets: int = 0
    syncs: int = 0


class _OpenBucket:
    """The bucket being filled; only the stage's worker thread copies into it."""

    __slots__ = (
        "d2h",
        "device_sources",
        "flat",
        "host",
        "index",
        "layouts",
        "made_contiguous",
        "pending",
        "pending_bytes",
        "producers",
        "source_streams",
        "tensor_bytes",
        "tensors",
        "used",
    )

    def __init__(self, index: int, flat: bool) -> None:
        self.index = index
        self.flat = flat  # one buffer (True) or the tensors themselves (False)
        self.layouts: list[TensorLayout] = []
        self.tensors: list[tuple[str, torch.Tensor]] = []  # unflattened buckets only
        self.pending: list[tuple[TensorLayout, torch.Tensor | FileSpan]] = []
        self.device_sources: list[tuple[TensorLayout, torch.Tensor]] = []
        # CPU Fetch only: CUDA sources and the stream each was produced on, copied at seal.
        self.d2h: list[tuple[TensorLayout, torch.Tensor, Any]] = []
        # Unpacked buckets: the producing stream of each tensor (None: a host tensor).
        self.source_streams: list[Any] = []
        # The streams CUDA sources were produced on, as the event-loop thread saw them
        # current (a worker thread's current stream is its own, the default one).
        self.producers: list[Any] = []
        self.pending_bytes = 0
        self.host: torch.Tensor | None = None
        self.used = 0
        self.tensor_bytes = 0
        self.made_contiguous = 0


class Fetch(Stage[tuple[str, torch.Tensor], WeightBucket]):
    """Turn ``(name, tensor)`` pairs into byte-bounded ``WeightBucket``s.

    Args:
        bucket_bytes: the most bytes a bucket's buffer holds (padding included); a single
            larger tensor travels alone in a bucket of its own size.
        version: the weight version stamped on every bucket; set the attribute (or call
            ``reset(version)``) before each sync, since one Fetch serves many syncs.
        align_bytes: each tensor starts at a multiple of ``max(align_bytes, element
            size)`` in the buffer (a power of two). A ``FileSpan`` starts that far plus
            its file offset modulo 64 when that keeps it a multiple of its element size
            (a read into a buffer misaligned with the file runs ~20% slower).
        device: where bucket tensors live (``"cpu"`` or a CUDA device). An unindexed
            ``"cuda"`` is resolved once, at the first ``open``, to the device current on
            the thread that opens the stage (``torch.cuda.current_device()``: under
            torchrun, the rank's device once it called ``set_device``) and stays that
            device for the stage's life; pass ``"cuda:k"`` to say it at construction.
            The copy stream, the pinned staging and every copy run on that device, in
            every worker thread (a thread's current device is its own, 0 by default).
        empty_source: what a sync with no tensors does: ``"error"`` raises; ``"empty"``
            emits one empty bucket with ``is_last=True`` so Load still commits.
        allow: optional allow-list of names; entries with ``*?[`` are fnmatch patterns.
        flatten: ``"auto"`` (the default) packs a bucket into one buffer only where a
            buffer is needed: a ``FileSpan`` needs a read target, a host tensor bound for
            a CUDA device needs pinned staging, and an engine that sends flat buffers
            asks for one when Fetch is the last stage before Load (``use_wire``).
            Otherwise the bucket carries the source tensors themselves (views, made
            contiguous, moved to ``device`` only where they are not already), since the
            next stage (Fp8Quantize) rewrites the bytes anyway: those tensors stay alive
            until the bucket is consumed, so the source must not change them during the
            sync (a lending source goes through ``borrowed_tensors``). True always packs;
            False never does.
        keep_buffers: the most host buffers kept for reuse (each ``bucket_bytes``, or one
            oversize tensor): a buffer is reused once downstream has dropped every view
            of it, so fresh allocations (page faults; pinning on CUDA) happen only while
            the pool warms up. Use ``depth + 2`` or more to avoid churn when stages behind
            Fetch hold buckets.
        retain_buffers: keep the pool between syncs (the default: a trainer syncs
            often); False releases it at ``close``. ``release_buffers()`` drops it now.

    Each bucket's ``meta`` has ``made_contiguous``, ``tensor_bytes`` and
    ``padding_bytes``. ``written_bytes`` counts the bytes Fetch has written into buffers
    (packed copies, host-to-device copies, contiguous copies; a tensor passed on as it
    is costs nothing). The stage is stateful: ``workers`` is 1.

    Raises:
        ValueError: a non-positive ``bucket_bytes``, an ``align_bytes`` that is not a
            power of two, an unknown ``empty_source``, or ``keep_buffers`` < 1.
    """

    name = "fetch"

    def __init__(
        self,
        bucket_bytes: int = 256 << 20,
        *,
        version: int = 0,
        align_bytes: int = 256,
        device: str | torch.device = "cpu",
        empty_source: EmptySource = "error",
        allow: Sequence[str] | None = None,
        flatten: bool | Literal["auto"] = "auto",
        keep_buffers: int = 4,
        retain_buffers: bool = True,
    ) -> None:
        if isinstance(bucket_bytes, bool) or not isinstance(bucket_bytes, int) or bucket_bytes < 1:
            raise ValueError(
                f"fetch: bucket_bytes must be a positive integer, got {bucket_bytes!r}"
            )
        if align_bytes < 1 or align_bytes & (align_bytes - 1):
            raise ValueError(f"fetch: align_bytes must be a power of two, got {align_bytes!r}")
        if empty_source not in ("error", "empty"):
            raise ValueError(
                f"fetch: empty_source must be 'error' or 'empty', got {empty_source!r}"
            )
        if keep_buffers < 1:
            raise ValueError(f"fetch: keep_buffers must be >= 1, got {keep_buffers!r}")
        if flatten not in (True, False, "auto"):
            raise ValueError(f"fetch: flatten must be True, False or 'auto', got {flatten!r}")
        self.bucket_bytes = bucket_bytes
        self.version = version
        self.align_bytes = align_bytes
        self.device = torch.device(device)
        self.empty_source: EmptySource = empty_source
        self.flatten = flatten
        self.retain_buffers = retain_buffers
        self.allow: tuple[str, ...] | None = None if allow is None else tuple(allow)
        allowed = self.allow or ()
        self._allow_exact = frozenset(a for a in allowed if not any(c in a for c in "*?["))
        self._allow_patterns = tuple(a for a in allowed if any(c in a for c in "*?["))
        self._cuda = self.device.type == "cuda"
        self._limiter = anyio.CapacityLimiter(1)
        self._pool = BufferPool(bucket_bytes, keep_buffers, pin=self._cuda)
        self._d2h_pool: BufferPool | None = None  # CPU Fetch of CUDA sources: pinned
        self.wire: WireSpec | None = None
        self.written_bytes = 0
        self._stream: Any = None
        self._counts = {"tensors": 0, "bytes": 0, "made_contiguous": 0, "buckets": 0, "syncs": 0}
        self._names: set[str] = set()
        self._planner = BucketPlanner(bucket_bytes)
        self._open_bucket: _OpenBucket | None = None
        self._emitted = 0

    @property
    def stats(self) -> FetchStats:
        """A snapshot of the stage's counters."""
        return FetchStats(**self._counts)

    def reset(self, version: int | None = None) -> None:
        """Start a new sync (bucket index 0, no names seen), optionally at ``version``.

        ``open`` calls this, so a plain ``Pipeline.run`` starts a fresh sync by itself.
        """
        if version is not None:
            self.version = version
        self._names = set()
        self._planner = BucketPlanner(self.bucket_bytes)
        self._open_bucket = None
        self._emitted = 0
        self._counts["syncs"] += 1

    def start_sync(self, version: int) -> None:
        """Stamp the next sync's buckets with ``version`` (``sync_weights`` calls this:
        Fetch is ``SyncAware``). Only the version is set here: ``open`` resets the rest,
        so ``stats.syncs`` still counts one per sync."""
        self.version = version

    def use_wire(self, spec: WireSpec | None) -> None:
        """Pack every bucket into one buffer laid out to ``spec`` (None: as ``flatten``
        says). ``sync_weights`` calls this with the engine's ``WireSpec`` when Fetch is the
        last stage before Load (``WritesWireBuffer``)."""
        if spec is not None and spec.align_bytes > self.align_bytes:
            raise ValueError(
                f"fetch: the engine needs starts aligned to {spec.align_bytes} bytes, "
                f"more than align_bytes={self.align_bytes}"
            )
        shared = spec is not None and spec.shared_memory and not self._cuda
        if shared != self._pool.shared:
            self._pool = BufferPool(self.bucket_bytes, self._pool.keep, pin=False, shared=shared)
        self.wire = spec

    def _packs(self, first: torch.Tensor | FileSpan) -> bool:
        """Whether a bucket opened by ``first`` is packed into one buffer."""
        if self.flatten != "auto":
            return bool(self.flatten)
        if self.wire is not None or isinstance(first, FileSpan):
            return True
        # Host -> device needs pinned staging; device -> host a pinned target.
        return self._cuda != (self._source_device(first).type == "cuda")

    async def open(self) -> None:
        """Start a sync; on CUDA, create the copy stream.

        Raises:
            RuntimeError: a CUDA device was asked for and CUDA is not available.
        """
        if self._cuda:
            if not torch.cuda.is_available():
                raise RuntimeError(
                    f"fetch: device {self.device} asked for, but CUDA is unavailable"
                )
            if self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
            if self._stream is None:
                self._stream = torch.cuda.Stream(device=self.device)  # type: ignore[no-untyped-call]
        self.reset()

    async def close(self) -> None:
        """Drop the open bucket, and the buffer pool unless ``retain_buffers``."""
        self._open_bucket = None
        if not self.retain_buffers:
            self._pool.clear()

    def reserve(self, buffers: int = 2) -> None:
        """Allocate (and fault in) ``buffers`` host buffers now, before the first sync.

        The first sync otherwise pays for them; with transparent huge pages that can
        mean compaction stalls. Blocking: call it at set-up or from a thread. On CUDA
        the buffers are pinned.

        Raises:
            ValueError: ``buffers`` is not between 1 and ``keep_buffers``.
        """
        if not 1 <= buffers <= self._pool.keep:
            raise ValueError(f"fetch: reserve 1 to {self._pool.keep} buffers, not {buffers}")
        self._pool.reserve(buffers)

    def release_buffers(self) -> None:
        """Forget the pooled host buffers (each is freed once downstream drops it)."""
        self._pool.clear()

    @property
    def retained_bytes(self) -> int:
        """Bytes of host buffers the pool keeps for reuse."""
        return self._pool.retained_bytes

    async def process(
        self, item: tuple[str, torch.Tensor | FileSpan]
    ) -> AsyncIterator[WeightBucket]:
        """Admit one pair; yields the previous bucket when this tensor opens a new one.

        The value is a tensor or a ``FileSpan`` (read straight into the bucket buffer).

        Raises:
            TypeError: the item is not a ``(str, Tensor)`` pair (names the tensor).
            OSError: a ``FileSpan`` could not be read.
            ValueError: a duplicate name, a name outside ``allow``, or a sparse, meta,
                quantized or complex tensor (names the tensor).
        """
        name, tensor = self._validate(item)
        if isinstance(tensor, torch.Tensor) and hasattr(tensor, "full_tensor"):
            # A DTensor shard: gather it (a collective every rank joins in this order).
            tensor = await anyio.to_thread.run_sync(materialise, name, tensor)
        self._names.add(name)
        nbytes = (
            tensor.nbytes
            if isinstance(tensor, FileSpan)
            else tensor.numel() * tensor.element_size()
        )
        align = tensor_alignment(tensor.dtype, self.align_bytes)
        phase = 0
        itemsize = tensor.dtype.itemsize
        if isinstance(tensor, FileSpan) and tensor.offset % _READ_PHASE_BYTES % itemsize == 0:
            # Land the bytes at the same offset modulo 64 as in the file: the kernel's
            # copy into a buffer misaligned with the page cache was measured ~20% slower.
            # The start stays a multiple of the element size, so the view still rebuilds.
            phase = tensor.offset % _READ_PHASE_BYTES
        opens, offset = self._planner.place(nbytes + phase, align)
        offset += phase
        if opens and self._open_bucket is not None:
            yield await self._finish(is_last=False)
        if opens:
            self._open_bucket = _OpenBucket(self._emitted, self._packs(tensor))
        bucket = self._open_bucket
        assert bucket is not None
        producer = None
        if isinstance(tensor, torch.Tensor) and self._source_device(tensor).type == "cuda":
            producer = torch.cuda.current_stream(self._source_device(tensor))
            if all(p is not producer for p in bucket.producers):
                bucket.producers.append(producer)
        if isinstance(tensor, FileSpan) and not bucket.flat:
            tensor = await anyio.to_thread.run_sync(tensor.load, limiter=self._limiter)
            self.written_bytes += nbytes
        layout = TensorLayout(name, tensor.dtype, tuple(tensor.shape), offset, nbytes)
        self._counts["tensors"] += 1
        self._counts["bytes"] += nbytes
        bucket.tensor_bytes += nbytes
        bucket.used = offset + nbytes
        if isinstance(tensor, torch.Tensor) and not tensor.is_contiguous():
            bucket.made_contiguous += 1
            self._counts["made_contiguous"] += 1
        bucket.layouts.append(layout)
        if not bucket.flat:
            assert isinstance(tensor, torch.Tensor)
            bucket.tensors.append((name, tensor))
            bucket.source_streams.append(producer)
            return
        if producer is not None:
            assert isinstance(tensor, torch.Tensor)
            if self._cuda:
                bucket.device_sources.append((layout, tensor))
            else:
                bucket.d2h.append((layout, tensor, producer))
            return
        bucket.pending.append((layout, tensor))
        bucket.pending_bytes += nbytes
        if bucket.pending_bytes >= _COPY_BATCH_BYTES:
            await anyio.to_thread.run_sync(self._copy_pending, bucket, limiter=self._limiter)

    async def flush(self) -> AsyncIterator[WeightBucket]:
        """Emit the last bucket with ``is_last=True`` (or handle an empty source).

        Raises:
            ValueError: the source yielded no tensors and ``empty_source="error"``.
        """
        if self._open_bucket is not None:
            yield await self._finish(is_last=True)
            return
        if self.empty_source == "error":
            raise ValueError(
                f"fetch: the source yielded no tensors for version {self.version} "
                "(pass empty_source='empty' to commit an empty sync)"
            )
        self._counts["buckets"] += 1
        self._emitted += 1
        packs = self.flatten is True or self.wire is not None
        empty = None
        if packs:
            with self._device_guard():
                empty = self._device_empty(0) if self._cuda else torch.empty(0, dtype=torch.uint8)
        yield WeightBucket(
            (),
            0,
            True,
            self.version,
            buffer=empty,
            meta={"made_contiguous": 0, "tensor_bytes": 0, "padding_bytes": 0},
        )

    # -- validation ---------------------------------------------------------------------

    def _validate(self, item: object) -> tuple[str, torch.Tensor | FileSpan]:
        if not isinstance(item, tuple | list) or len(item) != 2 or not isinstance(item[0], str):
            text = repr(item)
            text = text if len(text) <= 80 else text[:77] + "..."
            raise TypeError(f"fetch: expected a (name, tensor) pair, got {text}")
        name, tensor = item
        if not isinstance(tensor, torch.Tensor | FileSpan):
            raise TypeError(
                f"tensor {name!r}: expected a torch.Tensor, got {type(tensor).__qualname__}"
            )
        if name in self._names:
            raise ValueError(
                f"tensor {name!r}: duplicate name in the sync of version {self.version}"
            )
        if self.allow is not None and not self._allowed(name):
            raise ValueError(f"tensor {name!r}: not in the allow-list")
        if isinstance(tensor, FileSpan):
            if tensor.dtype.is_complex:
                raise ValueError(f"tensor {name!r}: complex dtype {tensor.dtype} is not supported")
            return name, tensor
        if tensor.layout != torch.strided:
            raise ValueError(f"tensor {name!r}: {tensor.layout} tensors are not supported")
        if tensor.is_meta:
            raise ValueError(f"tensor {name!r}: is on the meta device and has no data")
        if tensor.is_complex():
            raise ValueError(f"tensor {name!r}: complex dtype {tensor.dtype} is not supported")
        if tensor.is_quantized:
            raise ValueError(f"tensor {name!r}: quantized dtype {tensor.dtype} is not supported")
        return name, tensor

    def _allowed(self, name: str) -> bool:
        if name in self._allow_exact:
            return True
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self._allow_patterns)

    # -- copies (worker thread) ---------------------------------------------------------

    def _device_guard(self) -> contextlib.AbstractContextManager[Any]:
        """Select the stage's device for a worker-thread section (no-op on CPU).

        A thread's current CUDA device is its own (0 in a new thread); without this the
        pinning, allocations and copies of a ``cuda:k`` stage would act on cuda:0.
        """
        if not self._cuda:
            return contextlib.nullcontext()
        return torch.cuda.device(self.device.index)

    # The three device calls below are the seams tests.fakes.cuda replaces (a CPU tensor
    # stands in for device memory there); they run with the stage's device selected.

    def _device_empty(self, nbytes: int) -> torch.Tensor:
        """A uint8 buffer on the stage's device, given to the current stream."""
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def _copy_to_device(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Enqueue ``src`` (pinned host) into ``dst`` on the current stream."""
        dst.copy_(src, non_blocking=True)

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` on the stage's device, copied on the current stream."""
        return tensor.to(self.device, non_blocking=True)

    @staticmethod
    def _source_device(tensor: torch.Tensor) -> torch.device:
        """Where a source tensor lives (a seam: the fake's stand-ins say cpu)."""
        return tensor.device

    def _host_pool(self, bucket: _OpenBucket) -> BufferPool:
        """The pool a bucket's host buffer comes from: pinned when a device copies from
        it (a CUDA Fetch) or into it (CUDA sources of a CPU Fetch), unless the engine
        needs shared memory (a buffer is pinned or shared, not both; sharing it saves the
        pickler's copy, pinning only makes the device-to-host copy asynchronous)."""
        if self._cuda or not bucket.d2h or self._pool.shared:
            return self._pool
        if self._d2h_pool is None:
            self._d2h_pool = BufferPool(self.bucket_bytes, self._pool.keep, pin=True)
        return self._d2h_pool

    def _copy_from_devices(self, copies: list[tuple[torch.Tensor, Any, Any]]) -> None:
        """``(host target, CUDA source, producing stream)``: each copy is enqueued on its
        producer's stream (after the writer, nothing else), then waited for once per
        stream: a CPU consumer reads the bytes as soon as it gets the bucket."""
        if not copies:
            return
        events = []
        for target, tensor, stream in copies:
            with torch.cuda.stream(stream):
                target.copy_(tensor, non_blocking=True)
        for stream in {id(stream): stream for _, _, stream in copies}.values():
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record(stream)
            events.append(event)
        for event in events:
            event.synchronize()
        self.written_bytes += sum(t.numel() * t.element_size() for _, t, _ in copies)

    def _capacity_for(self, bucket: _OpenBucket) -> int:
        # The planner already decided: only a lone oversize tensor exceeds bucket_bytes.
        first = bucket.layouts[0]
        return max(self.bucket_bytes, first.end)

    def _copy_pending(self, bucket: _OpenBucket) -> None:
        with self._device_guard():  # pinning goes through the current device's context
            if bucket.host is None:
                bucket.host = self._host_pool(bucket).take(self._capacity_for(bucket))
            host = bucket.host
            for layout, tensor in bucket.pending:
                if isinstance(tensor, FileSpan):
                    tensor.read_into(host[layout.offset : layout.end])
                else:
                    copy_into(host, layout, tensor)
                self.written_bytes += layout.nbytes
            bucket.pending = []  # drop the source tensors as soon as their bytes are copied
            bucket.pending_bytes = 0

    def _wait_for_producers(self, bucket: _OpenBucket) -> None:
        """Order the copy stream after the kernels that wrote the bucket's CUDA sources.

        Only those streams: a bucket staged from host memory waits for nothing on the
        device, so the trainer's unrelated kernels never delay its copy.
        """
        for producer in bucket.producers:
            self._stream.wait_stream(producer)
        bucket.producers = []

    def _seal(self, bucket: _OpenBucket) -> tuple[torch.Tensor, Any]:
        """Finish the copies; returns the bucket's buffer and its ready event (or None)."""
        used = bucket.used
        if not self._cuda:
            if bucket.pending or bucket.host is None:
                self._copy_pending(bucket)
            host = bucket.host
            assert host is not None
            if bucket.d2h:
                self._copy_from_devices(
                    [
                        (
                            host[layout.offset : layout.end].view(layout.dtype).view(layout.shape),
                            tensor,
                            stream,
                        )
                        for layout, tensor, stream in bucket.d2h
                        if layout.nbytes
                    ]
                )
                bucket.d2h = []
            return host[:used], None
        with self._device_guard():
            if bucket.pending:
                self._copy_pending(bucket)
            host = bucket.host  # None when every tensor of the bucket was already on a GPU
            stream = self._stream
            self._wait_for_producers(bucket)
            with torch.cuda.stream(stream):
                # Allocated on the copy stream itself, so the allocator cannot reuse the
                # block before the copy ends; consumers record their own streams on it
                # (WeightBucket.wait_ready).
                device_buffer = self._device_empty(used)
                if used and host is not None:
                    # One H2D copy for the whole bucket; GPU-resident tensors then
                    # overwrite their own ranges, in stream order.
                    self._copy_to_device(device_buffer, host[:used])
                if host is not None:
                    self.written_bytes += used
                for layout, tensor in bucket.device_sources:
                    tensor.record_stream(stream)
                    copy_into(device_buffer, layout, tensor)
                    self.written_bytes += layout.nbytes
                event = torch.cuda.Event()  # type: ignore[no-untyped-call]
                event.record(stream)
            if host is not None:
                # The pinned buffer goes to the next bucket only once this copy is done.
                self._pool.mark_copied(host, event)
            bucket.device_sources = []
            return device_buffer, event

    def _seal_unflattened(self, bucket: _OpenBucket) -> tuple[list[tuple[str, torch.Tensor]], Any]:
        moved: list[tuple[str, torch.Tensor]] = []
        if not self._cuda:
            copies = []
            for (name, tensor), stream in zip(bucket.tensors, bucket.source_streams, strict=True):
                if stream is not None:
                    # A CUDA source: into pinned memory, on its producer's stream.
                    nbytes = tensor.numel() * tensor.element_size()
                    target = _memory.allocate_host(nbytes, pin=True)[:nbytes]
                    target = target.view(tensor.dtype).view(tensor.shape)
                    copies.append((target, tensor, stream))
                    moved.append((name, target))
                    continue
                if tensor.device != self.device or not tensor.is_contiguous():
                    self.written_bytes += tensor.numel() * tensor.element_size()
                moved.append((name, tensor.to(self.device).contiguous()))
            if copies:
                self._copy_from_devices(copies)
            return moved, None
        with self._device_guard():
            stream = self._stream
            self._wait_for_producers(bucket)
            with torch.cuda.stream(stream):
                for name, tensor in bucket.tensors:
                    nbytes = tensor.numel() * tensor.element_size()
                    if self._source_device(tensor).type == "cuda":
                        tensor.record_stream(stream)  # the copy stream reads it
                    source = tensor.contiguous()
                    if source is not tensor:
                        self.written_bytes += nbytes
                    if self._source_device(source) != self.device:
                        self.written_bytes += nbytes
                        source = self._to_device(source)
                    moved.append((name, source))
                event = torch.cuda.Event()  # type: ignore[no-untyped-call]
                event.record(stream)
            return moved, event

    async def _finish(self, *, is_last: bool) -> WeightBucket:
        bucket = self._open_bucket
        assert bucket is not None
        self._open_bucket = None
        buffer: torch.Tensor | None
        if bucket.flat:
            flat, ready = await anyio.to_thread.run_sync(self._seal, bucket, limiter=self._limiter)
            tensors = unflatten(flat, bucket.layouts)
            buffer = flat
        elif not self._cuda and all(
            stream is None and tensor.device == self.device and tensor.is_contiguous()
            for (_, tensor), stream in zip(bucket.tensors, bucket.source_streams, strict=True)
        ):
            # Host tensors passed on as they are: nothing to copy, so no thread round trip.
            tensors, ready, buffer = list(bucket.tensors), None, None
        else:
            tensors, ready = await anyio.to_thread.run_sync(
                self._seal_unflattened, bucket, limiter=self._limiter
            )
            buffer = None
        self._counts["buckets"] += 1
        self._emitted += 1
        return WeightBucket(
            tuple(tensors),
            bucket.index,
            is_last,
            self.version,
            buffer=buffer,
            ready=ready,
            meta={
                "made_contiguous": bucket.made_contiguous,
                "tensor_bytes": bucket.tensor_bytes,
                "padding_bytes": bucket.used - bucket.tensor_bytes if bucket.flat else 0,
            },
        )
