"""Bounded channels: the only way items move between stages.

A channel is a (send, receive) pair over an anyio memory object stream with a fixed
capacity. The capacity is the pipeline's memory bound: a sender that finds the buffer full
waits, and that wait is the backpressure that keeps a fast producer from piling items in
front of a slow consumer. Both ends try the non-blocking call first and only await on
``WouldBlock``, which keeps a hop at a few microseconds instead of a scheduler round trip
per item; so that a task that never has to wait still honours cancellation, each end
passes a checkpoint every ``CHECKPOINT_EVERY`` calls. The time each side spends waiting
is recorded, including a wait still in progress, so a run can say which stage is the
bottleneck while it runs. End of stream is closing the last sender, never a sentinel.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Generic, Protocol, TypeVar

import anyio
import anyio.lowlevel
from anyio.streams.memory import (
    MemoryObjectReceiveStream,
    MemoryObjectSendStream,
    MemoryObjectStreamStatistics,
)

__all__ = [
    "CHECKPOINT_EVERY",
    "ChannelReceiver",
    "ChannelSender",
    "ChannelStatistics",
    "open_channel",
]

T = TypeVar("T")

# A checkpoint costs a scheduler round trip (tens of microseconds); one per 64 calls keeps
# its share of a hop well under a microsecond while a cancelled task still stops within
# 64 items on either end.
CHECKPOINT_EVERY = 64


class _Stream(Protocol):
    """What ``_ChannelEnd`` needs of either anyio stream end."""

    def close(self) -> None: ...
    def statistics(self) -> MemoryObjectStreamStatistics: ...


S = TypeVar("S", bound=_Stream)
E = TypeVar("E", bound="_ChannelEnd[Any]")


@dataclass(frozen=True)
class ChannelStatistics:
    """A snapshot of one channel.

    Attributes:
        name: the channel's name (``"<upstream>-><downstream>"`` inside a pipeline).
        capacity: the most items the buffer holds (the depth).
        current: items in the buffer now.
        peak: the most items the buffer ever held; never above ``capacity``.
        items: items that went through the channel.
        send_blocked_s: seconds senders spent waiting for room (backpressure),
            including the waits still in progress when the snapshot was taken.
        receive_starved_s: seconds receivers spent waiting for an item, likewise
            including waits in progress.
        senders_open / receivers_open: ends (clones included) not yet closed; a
            receiver that waits forever while ``senders_open`` > 0 is a deadlock to hunt.
        senders_waiting / receivers_waiting: tasks waiting in ``send`` / ``receive`` now.
    """

    name: str
    capacity: int
    current: int
    peak: int
    items: int
    send_blocked_s: float
    receive_starved_s: float
    senders_open: int = 0
    receivers_open: int = 0
    senders_waiting: int = 0
    receivers_waiting: int = 0


class _Wait:
    """Seconds spent waiting on one side of a channel, ongoing waits included.

    The state is one tuple ``(finished seconds, waiters, sum of their start times)``,
    replaced whole on the event loop: a snapshot taken from another thread (a metrics
    scrape) reads one consistent state, so the total it sees never goes backwards.
    """

    __slots__ = ("state",)

    def __init__(self) -> None:
        self.state: tuple[float, int, float] = (0.0, 0, 0.0)

    def begin(self) -> float:
        started = time.perf_counter()
        done, waiters, since = self.state
        self.state = (done, waiters + 1, since + started)
        return started

    def end(self, started: float) -> None:
        ended = time.perf_counter()
        done, waiters, since = self.state
        waiters -= 1
        self.state = (done + (ended - started), waiters, since - started if waiters else 0.0)

    def seconds(self) -> float:
        done, waiters, since = self.state
        if not waiters:
            return done
        return done + max(0.0, waiters * time.perf_counter() - since)


class _Meter:
    """Counters shared by both ends of one channel (written on one event loop only)."""

    __slots__ = ("capacity", "items", "name", "peak", "receive_wait", "send_wait")

    def __init__(self, name: str, capacity: int) -> None:
        self.name = name
        self.capacity = capacity
        self.items = 0
        self.peak = 0
        self.send_wait = _Wait()
        self.receive_wait = _Wait()


class _ChannelEnd(Generic[S]):
    """What both ends share: the stream, the channel's meter, closing, statistics."""

    __slots__ = ("_calls", "_meter", "_stream")

    def __init__(self, stream: S, meter: _Meter) -> None:
        self._stream = stream
        self._meter = meter
        self._calls = 0  # calls since this end last passed a checkpoint

    def close(self) -> None:
        self._stream.close()

    async def aclose(self) -> None:
        self._stream.close()

    def statistics(self) -> ChannelStatistics:
        """A snapshot of the channel (both ends share it); safe to call from any thread."""
        return _snapshot(self._meter, self._stream.statistics())

    def __enter__(self: E) -> E:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class ChannelSender(_ChannelEnd[MemoryObjectSendStream[T]], Generic[T]):
    """The sending end. ``await send(item)`` waits while the buffer is full."""

    __slots__ = ()

    async def send(self, item: T) -> None:
        """Send one item, waiting for room if the channel is full.

        Unlike anyio's and trio's ``send``, this is not a checkpoint on every call: when
        there is room the item goes in without yielding to the scheduler. Every
        ``CHECKPOINT_EVERY``-th call on this end (and every call that has to wait) is a
        checkpoint, so a cancelled task stops within that many sends, before its item is
        sent.

        Raises:
            anyio.BrokenResourceError: every receiver is closed.
            anyio.ClosedResourceError: this sender is closed.
        """
        stream = self._stream
        self._calls += 1
        if self._calls >= CHECKPOINT_EVERY:
            self._calls = 0
            await anyio.lowlevel.checkpoint()
        try:
            stream.send_nowait(item)
        except anyio.BrokenResourceError:
            # A receiver closed because its task was cancelled: if this task is cancelled
            # too, that is the story (as a checkpoint first would have told it).
            await anyio.lowlevel.checkpoint_if_cancelled()
            raise
        except anyio.WouldBlock:
            self._calls = 0
            wait = self._meter.send_wait
            started = wait.begin()
            try:
                await stream.send(item)
            finally:
                wait.end(started)
        meter = self._meter
        meter.items += 1
        used = stream.statistics().current_buffer_used
        if used > meter.peak:
            meter.peak = used

    def clone(self) -> ChannelSender[T]:
        """Another sender on the same channel; the stream ends when all are closed."""
        return ChannelSender(self._stream.clone(), self._meter)


class ChannelReceiver(_ChannelEnd[MemoryObjectReceiveStream[T]], Generic[T]):
    """The receiving end; iterate it with ``async for`` until every sender closed."""

    __slots__ = ()

    async def receive(self) -> T:
        """Receive one item, waiting for one if the channel is empty.

        Unlike anyio's and trio's ``receive``, this is not a checkpoint on every call:
        when an item is buffered it is returned without yielding to the scheduler.
        Every ``CHECKPOINT_EVERY``-th call on this end (and every call that has to wait)
        is a checkpoint, so a cancelled task stops within that many receives, without
        losing an item. ``async for`` over the receiver behaves the same.

        Raises:
            anyio.EndOfStream: every sender is closed and the buffer is empty.
        """
        stream = self._stream
        self._calls += 1
        if self._calls >= CHECKPOINT_EVERY:
            self._calls = 0
            await anyio.lowlevel.checkpoint()
        try:
            return stream.receive_nowait()
        except anyio.WouldBlock:
            self._calls = 0
            wait = self._meter.receive_wait
            started = wait.begin()
            try:
                return await stream.receive()
            finally:
                wait.end(started)

    def __aiter__(self) -> ChannelReceiver[T]:
        return self

    async def __anext__(self) -> T:
        try:
            return await self.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    def clone(self) -> ChannelReceiver[T]:
        return ChannelReceiver(self._stream.clone(), self._meter)


def _snapshot(meter: _Meter, stream: MemoryObjectStreamStatistics) -> ChannelStatistics:
    return ChannelStatistics(
        name=meter.name,
        capacity=meter.capacity,
        current=stream.current_buffer_used,
        peak=meter.peak,
        items=meter.items,
        send_blocked_s=meter.send_wait.seconds(),
        receive_starved_s=meter.receive_wait.seconds(),
        senders_open=stream.open_send_streams,
        receivers_open=stream.open_receive_streams,
        senders_waiting=stream.tasks_waiting_send,
        receivers_waiting=stream.tasks_waiting_receive,
    )


class open_channel(tuple[ChannelSender[T], ChannelReceiver[T]]):
    """Open a bounded channel holding at most ``depth`` items: a ``(send, receive)`` pair.

    Subscript it for the item type, as with anyio's ``create_memory_object_stream``:
    ``send, receive = open_channel[bytes](2, name="reads")``.

    The depth trades memory for slack: each slot holds one item, so a channel pins at
    most ``depth`` items (plus whatever its receiver holds while working on one). Depth 1
    already lets two neighbouring stages overlap; more only helps when per-item costs
    jitter. A depth of 0 (rendezvous) or an unbounded channel is refused: the first
    can't overlap and the second has no memory bound.

    Raises:
        ValueError: ``depth`` is not an integer >= 1.
    """

    # A class only so that open_channel[T](...) types the pair; calling it returns a
    # plain tuple (the same device anyio uses for create_memory_object_stream).
    def __new__(  # type: ignore[misc]
        cls, depth: int, name: str = "channel"
    ) -> tuple[ChannelSender[T], ChannelReceiver[T]]:
        check_depth(depth, name)
        send, receive = anyio.create_memory_object_stream[T](max_buffer_size=depth)
        meter = _Meter(name, depth)
        return ChannelSender(send, meter), ChannelReceiver(receive, meter)


def check_depth(depth: object, name: str) -> None:
    """Raise ``ValueError`` unless ``depth`` is an integer >= 1 (names the channel)."""
    if isinstance(depth, bool) or not isinstance(depth, int):
        if isinstance(depth, float) and math.isinf(depth):
            raise ValueError(f"channel {name!r}: an unbounded channel is refused; use depth >= 1")
        raise ValueError(f"channel {name!r}: depth must be an integer >= 1, got {depth!r}")
    if depth < 1:
        raise ValueError(f"channel {name!r}: depth must be >= 1, got {depth}")
