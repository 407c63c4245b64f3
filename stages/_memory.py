"""Recycled host buffers: large buffers are allocated once and reused, not re-faulted.

A fresh large buffer costs first-touch page faults that can rival the work done in it
(copying a bucket, writing FP8 outputs). Fetch keeps its bucket buffers and Fp8Quantize its
output arenas in a ``BufferPool``; a buffer is handed out again only when nothing outside
the pool still holds a view of it, so recycling never overwrites data downstream still
reads.
"""

from __future__ import annotations

import mmap
import sys
from typing import Any

import torch

__all__ = ["HUGEPAGE_MIN_BYTES", "BufferPool", "allocate_host", "use_count"]

# Buffers at least this large are mapped with MADV_HUGEPAGE: first-touch page faults on
# fresh 4 KiB pages otherwise cost more than the copy itself.
HUGEPAGE_MIN_BYTES = 4 << 20


def use_count(tensor: torch.Tensor) -> int:
    count = getattr(torch._C, "_storage_Use_Count", None)
    if count is None:  # pragma: no cover - older torch: never recycle
        return -1
    return int(count(tensor.untyped_storage()._cdata))


def allocate_host(nbytes: int, *, pin: bool) -> torch.Tensor:
    if pin:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    if nbytes >= HUGEPAGE_MIN_BYTES and sys.platform.startswith("linux"):
        region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        advise = getattr(mmap, "MADV_HUGEPAGE", None)
        if advise is not None:
            region.madvise(advise)
        buffer = torch.frombuffer(region, dtype=torch.uint8)  # keeps the mapping alive
        # Fault the pages in now, from user space: faults taken inside a read() into the
        # buffer were measured to stall several times longer.
        buffer.fill_(0)
        return buffer
    return torch.empty(nbytes, dtype=torch.uint8)


class BufferPool:
    """Host buffers reused once nothing but the pool holds them.

    A buffer is free when its storage has no user beyond the pool's own reference (every
    bucket view downstream is gone) and, on CUDA, the copy that last read it finished.
    The smallest free buffer that fits is reused; otherwise a new one of
    ``max(nbytes, capacity)`` bytes is allocated (so a lone oversize tensor's buffer is
    reused by the next sync's). At most ``keep`` buffers are retained: past that the
    oldest is forgotten, and freed as soon as downstream drops it.
    """

    def __init__(self, capacity: int, keep: int, *, pin: bool) -> None:
        self.capacity = capacity
        self.keep = keep
        self.pin = pin
        # [buffer, use count when idle, event of the last copy out of it]
        self._entries: list[list[Any]] = []

    def take(self, nbytes: int) -> torch.Tensor:
        best: list[Any] | None = None
        for entry in self._entries:
            buffer, idle, event = entry
            if buffer.numel() < nbytes or use_count(buffer) != idle:
                continue
            if event is not None and not event.query():
                continue
            if best is None or buffer.numel() < best[0].numel():
                best = entry
        if best is not None:
            best[2] = None
            return best[0]  # type: ignore[no-any-return]
        buffer = allocate_host(max(nbytes, self.capacity), pin=self.pin)
        if len(self._entries) >= self.keep:
            self._entries.pop(0)
        self._entries.append([buffer, use_count(buffer), None])
        return buffer

    def reserve(self, count: int) -> None:
        while len(self._entries) < count:
            buffer = allocate_host(self.capacity, pin=self.pin)
            self._entries.append([buffer, use_count(buffer), None])

    def mark_copied(self, buffer: torch.Tensor, event: Any) -> None:
        for entry in self._entries:
            if entry[0] is buffer:
                entry[2] = event

    @property
    def retained_bytes(self) -> int:
        return sum(int(entry[0].numel()) for entry in self._entries)

    def clear(self) -> None:
        self._entries.clear()
