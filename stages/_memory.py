"""Host buffers: the one allocator (huge pages, optional pinning) and the pool that recycles.

A fresh large buffer costs first-touch page faults that can rival the work done in it
(copying a bucket, writing FP8 outputs). ``allocate_host`` is the only place weightpipe
allocates large host buffers: pinned when a device copies from it, in named shared memory
when another process on the node reads it, else huge-page advised.
Fetch keeps its bucket buffers and Fp8Quantize its output arenas in a ``BufferPool``; a
buffer is handed out again only when nothing outside the pool is known to hold a view of
it, so recycling never overwrites data downstream still reads. Where torch cannot tell a
storage's use count, a buffer counts as busy forever: the pool then allocates and retains
nothing, rather than guess.
"""

from __future__ import annotations

import ctypes
import mmap
import sys
import weakref
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "HUGEPAGE_MIN_BYTES",
    "PIN_ROUND_BYTES",
    "BufferPool",
    "allocate_host",
    "pinned_size",
    "use_count",
]

# Buffers at least this large are mapped with MADV_HUGEPAGE: first-touch page faults on
# fresh 4 KiB pages otherwise cost more than the copy itself.
HUGEPAGE_MIN_BYTES = 4 << 20

PIN_ROUND_BYTES = 2 << 20
"""A large pinned buffer is this multiple (one huge page), not the next power of two:
torch's ``CachingHostAllocator`` rounds every request up to a power of two, so a 4.2 GB
tensor would pin 8 GiB (and the pool would keep them)."""


def pinned_size(nbytes: int) -> int:
    """The bytes a pinned buffer of ``nbytes`` really takes (see ``PIN_ROUND_BYTES``)."""
    if nbytes < HUGEPAGE_MIN_BYTES:
        return 1 << max(nbytes - 1, 0).bit_length() if nbytes else 0  # torch's allocator
    return -(-nbytes // PIN_ROUND_BYTES) * PIN_ROUND_BYTES


def _pin_small(nbytes: int) -> torch.Tensor:
    """A small pinned buffer from torch's ``CachingHostAllocator`` (a seam for the fake
    CUDA layer): under ``HUGEPAGE_MIN_BYTES`` its power-of-two rounding costs little."""
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)


def _register_host(address: int, nbytes: int) -> None:
    """Page-lock ``nbytes`` of host memory at ``address`` (``cudaHostRegister``; a seam for
    the fake CUDA layer). Pinning goes through the calling thread's current device."""
    error = torch.cuda.cudart().cudaHostRegister(address, nbytes, 0)  # type: ignore[no-untyped-call]
    if int(error) != 0:
        raise RuntimeError(f"allocate_host: cudaHostRegister of {nbytes} bytes failed: {error}")


def _unregister_host(address: int) -> None:
    """Undo ``_register_host`` (``cudaHostUnregister``; a seam for the fake CUDA layer)."""
    torch.cuda.cudart().cudaHostUnregister(address)  # type: ignore[no-untyped-call]


def _allocate_pinned(nbytes: int) -> torch.Tensor:
    """A pinned buffer of ``pinned_size(nbytes)`` bytes.

    Small ones come from torch's allocator. A large one is an anonymous huge-page mapping,
    faulted in, then registered with CUDA; it is unregistered when its last view goes
    (the finalizer runs while the mapping still exists: the ctypes array that exports it
    to torch is what the storage holds, and it holds the mapping).
    """
    if nbytes < HUGEPAGE_MIN_BYTES or not sys.platform.startswith("linux"):
        return _pin_small(nbytes)
    size = pinned_size(nbytes)
    region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    advise = getattr(mmap, "MADV_HUGEPAGE", None)
    if advise is not None:
        region.madvise(advise)
    array = (ctypes.c_uint8 * size).from_buffer(region)
    buffer = torch.frombuffer(array, dtype=torch.uint8)  # keeps the array (and mapping)
    buffer.fill_(0)  # fault the pages in from user space before the driver locks them
    address = ctypes.addressof(array)
    _register_host(address, size)
    weakref.finalize(array, _unregister_host, address)
    return buffer


def use_count(tensor: torch.Tensor) -> int:
    """How many references the storage of ``tensor`` has, or -1 where torch cannot tell."""
    count = getattr(torch._C, "_storage_Use_Count", None)
    if count is None:
        return -1
    return int(count(tensor.untyped_storage()._cdata))


def allocate_host(
    nbytes: int, *, pin: bool, prefault: bool = True, shared: bool = False
) -> torch.Tensor:
    """A 1-D uint8 CPU buffer of ``nbytes`` bytes (contents undefined unless prefaulted).

    ``shared``: in named shared memory (torch's ``file_system`` strategy), so pickling it
    for another process on this node (an SGLang server's ``update_weights_from_tensor``)
    sends a handle instead of first copying the bytes into shared memory.
    ``pin``: page-locked (a device copies from or into it), ``pinned_size(nbytes)`` long:
    a multiple of 2 MiB when large, never the next power of two. Otherwise a buffer of at least
    ``HUGEPAGE_MIN_BYTES`` on Linux is an anonymous mapping advised for huge pages, freed
    when its last view goes. ``prefault`` touches its pages now, from user space: faults
    taken inside a ``read()`` into the buffer were measured to stall several times longer;
    a caller whose own parallel writes touch every page first (the FP8 band workers) passes
    False.
    """
    if shared and pin:
        raise ValueError("allocate_host: a buffer is either pinned or shared, not both")
    if shared:
        storage = torch.UntypedStorage._new_using_filename_cpu(nbytes)  # type: ignore[attr-defined]
        buffer = torch.empty(0, dtype=torch.uint8).set_(storage)
        if prefault:
            buffer.fill_(0)
        return buffer
    if pin:
        return _allocate_pinned(nbytes)
    if nbytes >= HUGEPAGE_MIN_BYTES and sys.platform.startswith("linux"):
        region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        advise = getattr(mmap, "MADV_HUGEPAGE", None)
        if advise is not None:
            region.madvise(advise)
        buffer = torch.frombuffer(region, dtype=torch.uint8)  # keeps the mapping alive
        if prefault:
            buffer.fill_(0)
        return buffer
    return torch.empty(nbytes, dtype=torch.uint8)


@dataclass
class _Entry:
    buffer: torch.Tensor
    idle: int  # the storage's use count while only the pool holds it (-1: unknown)
    event: Any = None  # the CUDA event of the last copy out of it, if any

    def free(self) -> bool:
        if self.idle < 0 or use_count(self.buffer) != self.idle:
            return False
        return self.event is None or bool(self.event.query())


class BufferPool:
    """Host buffers reused once nothing but the pool holds them.

    A buffer is free when its storage has no user beyond the pool's own reference (every
    bucket view downstream is gone) and, on CUDA, the copy that last read it finished.
    The smallest free buffer that fits is reused; otherwise a new one of
    ``max(nbytes, capacity)`` bytes is allocated (so a lone oversize tensor's buffer is
    reused by the next sync's). At most ``keep`` buffers are retained: past that the
    oldest is forgotten, and freed as soon as downstream drops it. A buffer whose use
    count torch cannot report is never retained (it could not be known to be free).
    """

    def __init__(
        self, capacity: int, keep: int, *, pin: bool, shared: bool = False, prefault: bool = True
    ) -> None:
        self.capacity = capacity
        self.keep = keep
        self.pin = pin
        self.shared = shared
        self.prefault = prefault
        self._entries: list[_Entry] = []

    def take(self, nbytes: int) -> torch.Tensor:
        """A buffer of at least ``nbytes`` bytes that nothing downstream still reads."""
        best: _Entry | None = None
        for entry in self._entries:
            if entry.buffer.numel() < nbytes or not entry.free():
                continue
            if best is None or entry.buffer.numel() < best.buffer.numel():
                best = entry
        if best is not None:
            best.event = None
            return best.buffer
        buffer = self._allocate(max(nbytes, self.capacity))
        self._retain(buffer)
        return buffer

    def _allocate(self, nbytes: int) -> torch.Tensor:
        return allocate_host(nbytes, pin=self.pin, prefault=self.prefault, shared=self.shared)

    def reserve(self, count: int) -> None:
        """Allocate buffers of ``capacity`` bytes until ``count`` are retained."""
        while len(self._entries) < count:
            if not self._retain(self._allocate(self.capacity)):
                return

    def mark_copied(self, buffer: torch.Tensor, event: Any) -> None:
        """``buffer`` is free again only once ``event`` (a copy out of it) completed."""
        for entry in self._entries:
            if entry.buffer is buffer:
                entry.event = event

    @property
    def retained_bytes(self) -> int:
        """Bytes of the buffers the pool keeps for reuse."""
        return sum(int(entry.buffer.numel()) for entry in self._entries)

    def clear(self) -> None:
        """Forget every buffer (each is freed once downstream drops it)."""
        self._entries.clear()

    def _retain(self, buffer: torch.Tensor) -> bool:
        idle = use_count(buffer)
        if idle < 0:
            return False
        if len(self._entries) >= self.keep:
            self._entries.pop(0)
        self._entries.append(_Entry(buffer, idle))
        return True
