"""Fault injection for the fault matrices: one fault at one chosen point of a run or a sync.

- ``FaultPoint``: where (a position and a phase) and what (raise, hang until cancelled, an
  outside cancellation landing at that point); every fake below asks it at each of its
  points, so one trial injects exactly one fault and the test learns, by an event, when it
  was reached (never by timing).
- ``FaultySource`` / ``FaultyStage`` / ``FaultySink``: fakes of a pipeline's source (an
  async iterator with ``aclose``, like an async generator), of a stage (``open`` /
  ``process`` / ``flush`` / ``close``, counting each; optionally doing its work in a
  worker thread, like Fetch and Fp8Quantize), and of the ``sink`` callable.
- ``LeasePool`` / ``Lease``: a fake of ``weightpipe.stages._memory.BufferPool``'s rule
  that a buffer is free once nothing outside the pool holds it (weak references stand in
  for the storage use count), so a test can ask which buffers a run left checked out.
- ``FaultyEngine``: wraps any ``Engine`` and injects one fault into one protocol call
  (the local engine's matrix and the random cancellation trials).

The HTTP faults of the SGLang double live in ``sglang_faults`` (it imports ``sglang``).
"""

from __future__ import annotations

import gc
import threading
import weakref
from collections.abc import AsyncIterator
from typing import Any, Literal, TypeVar

import anyio
import anyio.lowlevel
import anyio.to_thread

from weightpipe.pipeline import Stage
from weightpipe.stages.bucket import WeightBucket
from weightpipe.stages.engines.base import Engine, EngineError, PauseMode

__all__ = [
    "ENGINE_CALLS",
    "PHASES",
    "STAGE_FAULTS",
    "EngineCallName",
    "FaultPoint",
    "FaultyEngine",
    "FaultySink",
    "FaultySource",
    "FaultyStage",
    "InjectedFault",
    "Lease",
    "LeasePool",
    "Phase",
    "StageFault",
]

T = TypeVar("T")

Phase = Literal["open", "first", "middle", "last", "flush", "close"]
"""Where in a stage's life a fault lands: its open, its process at the first, a middle or
the last item, its flush, its close."""
PHASES: tuple[Phase, ...] = ("open", "first", "middle", "last", "flush", "close")

StageFault = Literal["raise", "hang", "cancel"]
"""``raise``: an exception; ``hang``: wait until cancelled; ``cancel``: the trial's outer
cancel scope is cancelled right at that point."""
STAGE_FAULTS: tuple[StageFault, ...] = ("raise", "hang", "cancel")


class InjectedFault(RuntimeError):
    """The exception a ``raise`` fault raises (names where it was injected)."""


class FaultPoint:
    """One trial's fault: ``fault`` at ``phase`` of the part called ``where``.

    ``items`` is how many items the run carries: the first, middle and last item are
    1, ``items // 2 + 1`` and ``items``. ``reached`` is set when the point is hit;
    ``scope`` is the trial's outer cancel scope, which a ``cancel`` fault cancels.
    """

    def __init__(self, where: str, phase: Phase, fault: StageFault, *, items: int) -> None:
        self.where = where
        self.phase = phase
        self.fault = fault
        self.items = items
        self.reached = anyio.Event()
        self.scope: anyio.CancelScope | None = None

    def phase_of(self, index: int) -> Phase | None:
        """The phase of processing item ``index`` (1-based), if it is a chosen one."""
        if index == 1:
            return "first"
        if index == self.items // 2 + 1:
            return "middle"
        if index == self.items:
            return "last"
        return None

    async def hit(self, where: str, phase: Phase | None) -> None:
        """Inject the fault if this is its point; otherwise return at once."""
        if where != self.where or phase != self.phase:
            return
        self.reached.set()
        if self.fault == "raise":
            raise InjectedFault(f"injected at {where} {phase}")
        if self.fault == "hang":
            await anyio.sleep_forever()
        assert self.scope is not None, "a cancel fault needs the trial's scope"
        self.scope.cancel()
        await anyio.lowlevel.checkpoint()


class Lease:
    """One buffer of a ``LeasePool``, carried as a run's item."""

    __slots__ = ("__weakref__", "index", "nbytes")

    def __init__(self, index: int) -> None:
        self.index = index
        self.nbytes = 64

    def describe(self) -> str:
        return f"lease {self.index}"


class LeasePool:
    """Hands out ``Lease``s; one is checked out while anything outside the pool holds it."""

    def __init__(self) -> None:
        self._out: weakref.WeakSet[Lease] = weakref.WeakSet()

    def take(self, index: int) -> Lease:
        lease = Lease(index)
        self._out.add(lease)
        return lease

    def checked_out(self) -> list[int]:
        """The indices of the leases still held somewhere, after a garbage collection (a
        failed run leaves reference cycles through its exceptions and frames): the young
        generations first, the full one only if a lease still looks held."""
        gc.collect(1)
        if len(self._out):
            gc.collect()
        return sorted(lease.index for lease in self._out)


class FaultySource:
    """An async iterator of ``items`` leases: ``open`` is the first ``__anext__``, item k
    its k-th, ``flush`` the call that ends the stream, ``close`` its ``aclose`` (bounded by
    ``close_timeout_s``, which ``as_async_iter`` honours)."""

    def __init__(self, point: FaultPoint, pool: LeasePool, *, close_timeout_s: float) -> None:
        self.point = point
        self.close_timeout_s = close_timeout_s
        self.pool = pool
        self.produced = 0
        self.started = False
        self.closes = 0

    def __aiter__(self) -> FaultySource:
        return self

    async def __anext__(self) -> Lease:
        if not self.started:
            self.started = True
            await self.point.hit("source", "open")
        if self.produced == self.point.items:
            await self.point.hit("source", "flush")
            raise StopAsyncIteration
        index = self.produced + 1
        await self.point.hit("source", self.point.phase_of(index))
        self.produced = index
        return self.pool.take(index)

    async def aclose(self) -> None:
        self.closes += 1
        await self.point.hit("source", "close")


class FaultyStage(Stage[Lease, Lease]):
    """Passes each lease on; counts opens, closes and items; ``in_thread``: each item's
    work runs in a worker thread (counted in ``threads_busy`` while it runs)."""

    def __init__(
        self, name: str, point: FaultPoint, *, workers: int = 1, in_thread: bool = False
    ) -> None:
        self.name = name
        self.point = point
        self.workers = workers
        self.in_thread = in_thread
        self.opens = 0
        self.opened = 0
        self.closes = 0
        self.seen = 0
        self.threads_busy = 0
        self._lock = threading.Lock()

    async def open(self) -> None:
        self.opens += 1
        await self.point.hit(self.name, "open")
        self.opened += 1

    async def close(self) -> None:
        self.closes += 1
        await self.point.hit(self.name, "close")

    async def process(self, item: Lease) -> list[Lease]:
        self.seen += 1
        await self.point.hit(self.name, self.point.phase_of(self.seen))
        if self.in_thread:
            await anyio.to_thread.run_sync(self._work)
        return [item]

    async def flush(self) -> AsyncIterator[Lease]:
        await self.point.hit(self.name, "flush")
        return
        yield

    def _work(self) -> None:
        with self._lock:
            self.threads_busy += 1
        with self._lock:
            self.threads_busy -= 1


class FaultySink:
    """The ``sink`` callable of ``Pipeline.run``: item k is its k-th call."""

    def __init__(self, point: FaultPoint) -> None:
        self.point = point
        self.seen = 0

    async def __call__(self, item: Any) -> None:
        self.seen += 1
        await self.point.hit("sink", self.point.phase_of(self.seen))


# -- engines ---------------------------------------------------------------------------

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
ENGINE_CALLS: tuple[EngineCallName, ...] = (
    "version query",
    "pause",
    "begin",
    "load first",
    "load middle",
    "load last",
    "commit",
    "resume",
)


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
