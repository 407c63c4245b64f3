"""WeightBucket: the item every weight-sync stage passes to the next.

A bucket is an ordered group of named tensors bounded in bytes by the Fetch stage's
``bucket_bytes`` (a single larger tensor travels alone). It carries where it sits in the
sync (``index``, ``is_last``), which weight version it belongs to, and on CUDA the event
that marks its tensors ready on the producing stage's stream: a consumer waits on that
event on its own stream instead of synchronising the host.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch

__all__ = ["WeightBucket"]


@dataclass(frozen=True)
class WeightBucket:
    """Named tensors of one sync, bounded in bytes.

    Attributes:
        tensors: ``(name, tensor)`` pairs in source order; names are unique in a sync.
        index: 0-based position of the bucket in its sync.
        is_last: True on the sync's final bucket (Load commits after it).
        version: the weight version this sync installs.
        buffer: the contiguous uint8 buffer the tensors are views of, when flattened.
        ready: a CUDA event recorded after the producer's last kernel, or ``None``
            (CPU, or already synchronised).
        meta: free-form per-bucket facts a stage adds (e.g. counts of skipped tensors).
    """

    tensors: tuple[tuple[str, torch.Tensor], ...]
    index: int
    is_last: bool
    version: int
    buffer: torch.Tensor | None = None
    ready: Any = None  # torch.cuda.Event; Any so CPU-only builds type-check the same
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data (the buffer's size when flattened, padding included)."""
        if self.buffer is not None:
            return int(self.buffer.nbytes)
        return sum(int(t.nbytes) for _, t in self.tensors)

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.tensors]

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def wait_ready(self, stream: Any = None) -> None:
        """Make ``stream`` wait for this bucket; returns at once (never blocks the host).

        Without ``stream``, the calling thread's current stream *of the bucket's device*
        (the device ``ready`` was recorded on, else that of its first CUDA tensor, else
        the current device) waits:
        not the current device's, which in a worker thread is cuda:0 whatever device the
        bucket lives on. A consumer that then works on another stream must pass it.

        The bucket's CUDA tensors are also recorded on the waiting stream: they were
        allocated on the producer's stream, and without the record the caching allocator
        could hand their memory out again while that stream still reads it. No-op on
        CPU.
        """
        if self.ready is None:
            return
        target = stream if stream is not None else torch.cuda.current_stream(self.cuda_device())
        target.wait_event(self.ready)
        for _, tensor in self.tensors:
            if tensor.is_cuda:
                tensor.record_stream(target)
        if self.buffer is not None and self.buffer.is_cuda:
            self.buffer.record_stream(target)

    def cuda_device(self) -> torch.device | None:
        """The CUDA device the bucket lives on: the ready event's, else its tensors'."""
        device = getattr(self.ready, "device", None)
        if isinstance(device, torch.device) and device.type == "cuda":
            return device
        candidates = [t for _, t in self.tensors]
        if self.buffer is not None:
            candidates.insert(0, self.buffer)
        for tensor in candidates:
            if tensor.is_cuda:
                return tensor.device
        return None

    def with_tensors(
        self,
        tensors: tuple[tuple[str, torch.Tensor], ...],
        *,
        ready: Any = None,
        buffer: torch.Tensor | None = None,
        **meta: Any,
    ) -> WeightBucket:
        """A bucket at the same position with new tensors (by default no flattened buffer;
        ``buffer``: the one uint8 buffer the new tensors are views of)."""
        return replace(
            self, tensors=tensors, buffer=buffer, ready=ready, meta={**self.meta, **meta}
        )

    def describe(self) -> str:
        """Used in errors: ``bucket 3 of v7 (12 tensors, first 'model.layers.0...')``."""
        first = f", first {self.tensors[0][0]!r}" if self.tensors else ""
        last = ", last" if self.is_last else ""
        return f"bucket {self.index} of v{self.version} ({len(self.tensors)} tensors{first}{last})"
