"""The Engine protocol: the one small surface the Load stage drives.

One sync is ``begin(version)`` -> ``load(bucket)`` for every bucket -> ``commit(version)``.
On any failure or cancellation the Load stage calls ``abort(version)`` (best effort) and
``resume()``; an engine must report the old version from ``version()`` until ``commit``
succeeded, so a half-applied sync is never visible as a new version. ``pause(mode)`` and
``resume()`` bracket the part of a sync during which generation must stop (the sync mode
decides which part). Every method may raise ``EngineError``, whose message names the
engine and, where one is at fault, the tensor.
"""

from __future__ import annotations

from typing import Literal, Protocol, runtime_checkable

from weightpipe.stages.bucket import WeightBucket

__all__ = ["Engine", "EngineError", "PauseMode", "SyncMode"]

PauseMode = Literal["abort", "retract", "in_place"]
"""How generation stops: drop running requests, retract them to the queue, or keep them
in place (SGLang's modes)."""

SyncMode = Literal["pause", "prefetch", "in_flight"]
"""``pause``: pause for the whole sync. ``prefetch``: fetch and quantize run during
generation, pause from the first load. ``in_flight``: never pause; buckets are applied
between decode steps."""


class EngineError(RuntimeError):
    """An engine refused or failed an operation.

    Attributes:
        engine: the engine's name.
        tensor: the offending tensor's name, when one is at fault.
        retryable: whether repeating the same call may succeed (5xx, reset, timeout).
    """

    def __init__(
        self, engine: str, message: str, *, tensor: str | None = None, retryable: bool = False
    ) -> None:
        where = f" (tensor {tensor!r})" if tensor else ""
        super().__init__(f"engine {engine!r}: {message}{where}")
        self.engine = engine
        self.tensor = tensor
        self.retryable = retryable


@runtime_checkable
class Engine(Protocol):
    """A running inference engine that can take new weights."""

    name: str

    async def begin(self, version: int) -> None:
        """Start a sync that will install ``version``."""

    async def load(self, bucket: WeightBucket) -> None:
        """Apply one bucket; validates every tensor before touching any of them."""

    async def commit(self, version: int) -> None:
        """Finish the sync; only now does ``version()`` report ``version``."""

    async def abort(self, version: int) -> None:
        """Abandon the sync (best effort); ``version()`` stays the old one."""

    async def version(self) -> int | None:
        """The weight version the engine serves now (``None`` before the first sync)."""

    async def pause(self, mode: PauseMode) -> None:
        """Stop generation in the given mode."""

    async def resume(self) -> None:
        """Continue generation."""
