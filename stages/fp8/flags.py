"""NaN/Inf flags of CUDA buckets, read on the host without waiting on the device per bucket.

The quantize kernels leave one int32 flag per weight on the device. Reading it right away
would stop the host (and leave the GPU idle) once per bucket, so ``PendingFlags`` keeps
each bucket's flags, copied into pinned memory behind a recorded event, and reads them
only once that event has completed (``Event.query()``, which never blocks), at the next
bucket. The sync's last bucket is the one point where the host must wait anyway: the
engine commits after it, so every flag still pending is waited for there and a bad weight
fails the sync before its commit (the engine aborts the buckets it already took).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from weightpipe.stages.fp8.spec import NonFiniteWeightError

__all__ = ["PendingFlags"]


@dataclass(frozen=True, eq=False)
class _Entry:
    event: Any  # torch.cuda.Event recorded after the flags' device-to-host copy
    host_flags: Any  # pinned int32 tensor, one flag per name
    names: tuple[str, ...]
    bucket: int


class PendingFlags:
    """Flags not read yet, from any number of worker threads.

    Invariant: every entry added before ``add(..., last=True)`` returns has been read once
    that call returns, whichever thread added it: the last bucket's call waits for all
    entries present, and an entry added after it is waited for by its own ``add``.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: list[_Entry] = []
        self._draining = False

    def reset(self) -> None:
        """Forget every pending entry (a new run; the old run's outcome is decided)."""
        with self._lock:
            self._entries.clear()
            self._draining = False

    @property
    def pending(self) -> int:
        """Entries whose event had not completed when last looked at."""
        with self._lock:
            return len(self._entries)

    def add(
        self, event: Any, host_flags: Any, names: tuple[str, ...], bucket: int, *, last: bool
    ) -> None:
        """Keep bucket ``bucket``'s flags; read every entry whose event has completed.

        ``last``: this is the sync's final bucket, so wait (``event.synchronize()``) for
        all entries still pending.

        Raises:
            NonFiniteWeightError: a flag read is set, naming its tensor and bucket.
        """
        self._read(_Entry(event, host_flags, names, bucket), last)

    def wait_all(self) -> None:
        """Wait for and read every pending entry (the sync's last bucket had none to add).

        Raises:
            NonFiniteWeightError: as ``add``.
        """
        self._read(None, True)

    def _read(self, new: _Entry | None, last: bool) -> None:
        with self._lock:
            if new is not None:
                self._entries.append(new)
            self._draining = self._draining or last
            wait_all = self._draining
            done = [e for e in self._entries if wait_all or e.event.query()]
            self._entries = [e for e in self._entries if e not in done]
        for entry in sorted(done, key=lambda e: e.bucket):
            if wait_all:
                entry.event.synchronize()
            for name, bad in zip(entry.names, entry.host_flags.tolist(), strict=True):
                if bad:
                    raise NonFiniteWeightError(name, f"bucket {entry.bucket}")
