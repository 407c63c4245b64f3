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
  (the local engine's matrix and the random cancellation trials); it lives in
  ``weightpipe.benchmarks._faults``, which the soak shares.

The HTTP faults of the SGLang double live in ``sglang_faults`` (it imports ``sglang``).
"""

from __future__ import annotations

import gc
import threading
import weakref
from collections.abc import AsyncIterator
from typing import Any, Literal, TypeVar, get_args

import anyio
import anyio.lowlevel
import anyio.to_thread

from weightpipe.benchmarks._faults import ENGINE_CALLS, EngineCallName, FaultyEngine, StageFault
from weightpipe.pipeline import Stage

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
PHASES: tuple[Phase, ...] = get_args(Phase)


STAGE_FAULTS: tuple[StageFault, ...] = get_args(StageFault)


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
