"""Fault injection into an engine's protocol calls, shared by the soak and the fault matrix.

``FaultyEngine`` wraps any ``Engine`` (no real counterpart: it is an instrument, not a
double): one armed call of the next sync raises, hangs until Load's deadline ends it, or
cancels an outer scope. ``benchmarks.soak`` injects its faults through it and
``tests/fakes/faults.py`` re-exports it for the engine fault matrix.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

import anyio
import anyio.lowlevel

from weightpipe.stages.bucket import WeightBucket
from weightpipe.stages.engines.base import Engine, EngineError, PauseMode

__all__ = ["ENGINE_CALLS", "EngineCallName", "FaultyEngine", "StageFault"]

StageFault = Literal["raise", "hang", "cancel"]
"""``raise``: an exception; ``hang``: wait until cancelled; ``cancel``: the trial's outer
cancel scope is cancelled right at that point."""

EngineCallName = Literal[
    "version query",
    "pause",
    "begin",
    "load first",
    "load middle",
    "load last",
    "commit",
    "resume",
]
"""The protocol calls of one sync that ``FaultyEngine`` can fail (``abort`` is cleanup)."""
ENGINE_CALLS: tuple[EngineCallName, ...] = get_args(EngineCallName)


class FaultyEngine:
    """Wraps an ``Engine``; one call of the next sync fails as told.

    ``arm(call, fault, buckets=n)``: the next time ``call`` is made (for a ``load``, of
    the first bucket, the one marked last, or bucket ``n // 2`` of about ``n``; pass at
    most the real count) it raises a non-retryable ``EngineError``
    (``"raise"``), or waits until cancelled (``"hang"``: Load's deadline ends it), or
    cancels ``cancel_scope`` and checkpoints (``"cancel"``). Every other call goes to the
    wrapped engine unchanged; attributes not defined here (``rolls_back``,
    ``default_timeout_s``, ``open_window``...) are the wrapped engine's.
    """

    def __init__(self, engine: Engine) -> None:
        self.inner = engine
        self.name = engine.name
        self._armed: tuple[EngineCallName, StageFault] | None = None
        self._buckets = 0
        self.cancel_scope: anyio.CancelScope | None = None
        self.fired = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def arm(self, call: EngineCallName, fault: StageFault, *, buckets: int = 1) -> None:
        self._armed = (call, fault)
        self._buckets = buckets
        self.fired = False

    def disarm(self) -> None:
        self._armed = None

    async def _maybe(self, call: EngineCallName) -> None:
        if self._armed is None or self._armed[0] != call:
            return
        fault = self._armed[1]
        self._armed = None
        self.fired = True
        if fault == "raise":
            raise EngineError(self.name, f"injected failure of {call}")
        if fault == "hang":
            await anyio.sleep_forever()
        assert self.cancel_scope is not None, "a cancel fault needs cancel_scope"
        self.cancel_scope.cancel()
        await anyio.lowlevel.checkpoint()

    def _load_call(self, bucket: WeightBucket) -> EngineCallName | None:
        if bucket.index == 0:
            return "load first"
        if bucket.is_last:
            return "load last"
        if bucket.index == max(1, self._buckets // 2):
            return "load middle"
        return None

    async def begin(self, version: int) -> None:
        await self._maybe("begin")
        await self.inner.begin(version)

    async def load(self, bucket: WeightBucket) -> None:
        call = self._load_call(bucket)
        if call is not None:
            await self._maybe(call)
        await self.inner.load(bucket)

    async def commit(self, version: int) -> None:
        await self._maybe("commit")
        await self.inner.commit(version)

    async def abort(self, version: int) -> None:
        await self.inner.abort(version)

    async def version(self) -> int | None:
        await self._maybe("version query")
        return await self.inner.version()

    async def pause(self, mode: PauseMode) -> None:
        await self._maybe("pause")
        await self.inner.pause(mode)

    async def resume(self) -> None:
        await self._maybe("resume")
        await self.inner.resume()
