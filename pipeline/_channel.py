"""Bounded channels: the only way items move between stages.

A channel is a (send, receive) pair over an anyio memory object stream with a fixed
capacity. The capacity is the pipeline's memory bound: a sender that finds the buffer full
waits, and that wait is the backpressure that keeps a fast fetch from piling buckets in
front of a slow load. Both ends try the non-blocking call first and only await on
``WouldBlock``, which keeps a hop at a few microseconds instead of a scheduler round trip
per item; the time each side spends waiting is recorded so a run can say which stage
was the bottleneck. End of stream is closing the last sender, never a sentinel value.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Generic, Protocol, TypeVar

import anyio
from anyio.streams.memory import (
    MemoryObjectReceiveStream,
    MemoryObjectSendStream,
    MemoryObjectStreamStatistics,
)

__all__ = [
    "ChannelReceiver",
    "ChannelSender",
    "ChannelStatistics",
    "open_channel",
]

T = TypeVar("T")


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
        send_blocked_s: seconds senders spent waiting for room (backpressure).
        receive_starved_s: seconds receivers spent waiting for an item.
    """

    name: str
    capacity: int
    current: int
    peak: int
    items: int
    send_blocked_s: float
    receive_starved_s: float


class _Meter:
    """Counters shared by both ends of one channel (one event loop, so no lock)."""

    __slots__ = ("capacity", "items", "name", "peak", "receive_starved_s", "send_blocked_s")

    def __init__(self, name: str, capacity: int) -> None:
        self.name = name
        self.capacity = capacity
        self.items = 0
        self.peak = 0
        self.send_blocked_s = 0.0
        self.receive_starved_s = 0.0


class _ChannelEnd(Generic[S]):
    """What both ends share: the stream, the channel's meter, closing, statistics."""

    __slots__ = ("_meter", "_stream")

    def __init__(self, stream: S, meter: _Meter) -> None:
        self._stream = stream
        self._meter = meter

    def close(self) -> None:
        self._stream.close()

    async def aclose(self) -> None:
        self._stream.close()

    def statistics(self) -> ChannelStatistics:
        return _snapshot(self._meter, self._stream.statistics().current_buffer_used)

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

        Raises:
            anyio.BrokenResourceError: every receiver is closed.
            anyio.ClosedResourceError: this sender is closed.
        """
        stream = self._stream
        try:
            stream.send_nowait(item)
        except anyio.WouldBlock:
            started = time.perf_counter()
            try:
                await stream.send(item)
            finally:
                self._meter.send_blocked_s += time.perf_counter() - started
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

        Raises:
            anyio.EndOfStream: every sender is closed and the buffer is empty.
        """
        stream = self._stream
        try:
            return stream.receive_nowait()
        except anyio.WouldBlock:
            started = time.perf_counter()
            try:
                return await stream.receive()
            finally:
                self._meter.receive_starved_s += time.perf_counter() - started

    def __aiter__(self) -> ChannelReceiver[T]:
        return self

    async def __anext__(self) -> T:
        try:
            return await self.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    def clone(self) -> ChannelReceiver[T]:
        return ChannelReceiver(self._stream.clone(), self._meter)


def _snapshot(meter: _Meter, current: int) -> ChannelStatistics:
    return ChannelStatistics(
        name=meter.name,
        capacity=meter.capacity,
        current=current,
        peak=meter.peak,
        items=meter.items,
        send_blocked_s=meter.send_blocked_s,
        receive_starved_s=meter.receive_starved_s,
    )


def open_channel(depth: int, name: str = "channel") -> tuple[ChannelSender[T], ChannelReceiver[T]]:
    """Open a bounded channel holding at most ``depth`` items.

    The depth trades memory for slack: each slot can hold one item (a whole weight bucket
    in a sync), so a channel pins at most ``depth`` items plus the one its receiver is
    working on. Depth 1 already lets two neighbouring stages overlap; more only helps when
    per-item costs jitter. A depth of 0 (rendezvous) or an unbounded channel is refused:
    the first can't overlap and the second has no memory bound.

    Raises:
        ValueError: ``depth`` is not an integer >= 1.
    """
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
