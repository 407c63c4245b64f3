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

import mmap
import sys
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["HUGEPAGE_MIN_BYTES", "BufferPool", "allocate_host", "use_count"]

# Buffers at least this large are mapped with MADV_HUGEPAGE: first-touch page faults on
# fresh 4 KiB pages otherwise cost more than the copy itself.
HUGEPAGE_MIN_BYTES = 4 << 20


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
    ``pin``: page-locked (a device copies from or into it). Otherwise a buffer of at least
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
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
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
