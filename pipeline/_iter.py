"""Turn whatever a producer hands us into one kind of thing: an async iterator.

Producers come in many shapes: a list, a generator that gathers one item at a time (and
may block on a collective or a disk read), another library's async generator.
``as_async_iter`` accepts all of them. A sync iterator is advanced in a worker
thread so a slow or blocking producer never stalls the event loop, and whatever the
source holds (an open file, a generator's ``finally``) is released when the run ends,
early or not: async generators get ``aclose()``, sync generators ``close()``. That close
is shielded from cancellation but bounded (``SOURCE_CLOSE_TIMEOUT_S``, or the source's own
``close_timeout_s`` attribute), so a source that hangs in its ``finally`` cannot hold the
caller's cancellation forever.
"""

from __future__ import annotations

import collections.abc as cabc
import logging
import threading
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Iterable, Iterator
from typing import Any, TypeVar, cast

import anyio
import anyio.lowlevel
import anyio.to_thread

__all__ = ["SOURCE_CLOSE_TIMEOUT_S", "aclose_iterator", "as_async_iter"]

logger = logging.getLogger(__name__)

SOURCE_CLOSE_TIMEOUT_S = 60.0
"""How long closing a source (``aclose()``, a generator's ``finally``) may take by default;
a source may set its own ``close_timeout_s`` attribute (``math.inf``: unbounded)."""

T = TypeVar("T")

_DONE: Any = object()

# Materialised containers can't block on next(), so they are iterated on the loop; this
# many items go by between checkpoints so a long list still lets other tasks run.
_CHECKPOINT_EVERY = 64


def _next_or_done(iterator: Iterator[T]) -> T:
    # StopIteration can't cross a future (it would end the awaiting coroutine instead), so
    # it is turned into a sentinel on the worker thread.
    try:
        return next(iterator)
    except StopIteration:
        return cast(T, _DONE)


# Iterators over those containers (``iter(a_list)``, ``iter(d.items())``): their next()
# only reads memory, so they need no thread either.
_EMPTY_CONTAINERS: tuple[Iterable[object], ...] = (
    [],
    (),
    range(0),
    {}.keys(),
    {}.values(),
    {}.items(),
    set(),
)
_CONTAINER_ITERATORS: frozenset[type] = frozenset(type(iter(c)) for c in _EMPTY_CONTAINERS)


def _is_materialised(source: object) -> bool:
    return (
        isinstance(
            source,
            list
            | tuple
            | range
            | cabc.KeysView
            | cabc.ValuesView
            | cabc.ItemsView
            | set
            | frozenset,
        )
        or type(source) in _CONTAINER_ITERATORS
    )


def as_async_iter(source: Iterable[T] | AsyncIterable[T]) -> AsyncGenerator[T, None]:
    """Iterate ``source`` asynchronously, whatever it is.

    Accepts sync iterables (lists, generators, any iterator), async iterables and async
    generators. A materialised container (a list, a tuple, a dict's items, ...) or a
    built-in iterator over one is iterated on the loop; any other sync iterator is advanced
    one item at a time in a dedicated worker thread. When the returned generator is closed (the
    run ended, failed or was cancelled), the source is finalised: ``aclose()`` on an
    async generator, ``close()`` on a sync generator, both shielded from cancellation.

    Raises:
        TypeError: ``source`` is neither iterable nor async iterable (names its type).
    """
    if isinstance(source, AsyncIterable):
        return _from_async(source)
    if isinstance(source, Iterable):
        if _is_materialised(source):
            return _from_container(source)
        return _from_sync(source)
    raise TypeError(
        f"as_async_iter: expected an iterable or async iterable of items, "
        f"got {type(source).__qualname__}"
    )


async def aclose_iterator(
    iterator: object, *, timeout_s: float | None = None, quiet: bool = False
) -> None:
    """Close an async iterator if it can be closed, shielded from cancellation.

    The one place a source is closed: a cancelled run still runs the source's
    ``finally`` blocks (a producer releasing its buffers). The close is bounded by
    ``timeout_s`` (default: the iterator's ``close_timeout_s`` attribute, else
    ``SOURCE_CLOSE_TIMEOUT_S``), since a shielded wait nothing bounds would hold the
    caller's cancellation for as long as the source hangs.

    ``quiet``: the caller is already failing or cancelled, so that is the story; a close
    that fails or overruns is logged instead of raised.

    Raises:
        TimeoutError: the close overran (not ``quiet``).
        Exception: whatever the iterator's ``aclose`` raised (not ``quiet``).
    """
    aclose = getattr(iterator, "aclose", None)
    if aclose is None:
        return
    if timeout_s is None:
        timeout_s = _close_timeout(iterator)
    try:
        with anyio.CancelScope(shield=True) as scope:
            scope.deadline = anyio.current_time() + timeout_s
            await aclose()
        if scope.cancelled_caught:
            raise TimeoutError(
                f"closing the source {type(iterator).__qualname__} did not finish within "
                f"{timeout_s} s"
            )
    except Exception as exc:
        if not quiet:
            raise
        logger.warning("closing a source failed while its run was failing: %r", exc)


def _close_timeout(source: object) -> float:
    own = getattr(source, "close_timeout_s", None)
    if isinstance(own, int | float) and not isinstance(own, bool) and own > 0:
        return float(own)
    return SOURCE_CLOSE_TIMEOUT_S


async def _from_async(source: AsyncIterable[T]) -> AsyncGenerator[T, None]:
    iterator: AsyncIterator[T] = aiter(source)
    timeout_s = _close_timeout(source)
    try:
        async for item in iterator:
            yield item
    except BaseException:
        # Failing, cancelled or closed early (GeneratorExit): that is the story.
        await aclose_iterator(iterator, timeout_s=timeout_s, quiet=True)
        raise
    await aclose_iterator(iterator, timeout_s=timeout_s)


async def _from_container(source: Iterable[T]) -> AsyncGenerator[T, None]:
    for count, item in enumerate(source, 1):
        if count % _CHECKPOINT_EVERY == 0:
            await anyio.lowlevel.checkpoint()
        yield item


class _SyncSource:
    """A sync iterator shared by the loop and the worker threads that advance it.

    ``lock`` is held while a thread runs ``next()`` or ``close()`` (a generator refuses
    to run twice at once). ``abandoned``: the loop stopped waiting (the run was cancelled
    or closed) while a ``next()`` ran; that thread then closes the iterator itself once
    ``next()`` returns, since the loop does not wait for it.
    """

    __slots__ = ("abandoned", "closed", "iterator", "lock")

    def __init__(self, iterator: Iterator[Any]) -> None:
        self.iterator = iterator
        self.lock = threading.Lock()
        self.abandoned = False
        self.closed = False

    def next_or_done(self) -> Any:
        with self.lock:
            if self.closed:
                return _DONE
            item = _next_or_done(self.iterator)
            if self.abandoned:  # nobody waits for this item: release the source now
                self._close()
                return _DONE
            return item

    def close_if_idle(self) -> bool:
        """Close the iterator unless a ``next()`` still runs; whether it was closed here."""
        if not self.lock.acquire(blocking=False):
            return False  # that thread sees ``abandoned`` and closes it when it returns
        try:
            self._close()
        finally:
            self.lock.release()
        return True

    def _close(self) -> None:
        if self.closed:
            return
        self.closed = True
        close = getattr(self.iterator, "close", None)
        if close is not None:
            close()


async def _from_sync(source: Iterable[T]) -> AsyncGenerator[T, None]:
    # Each next() runs in a worker thread, one at a time (the state's lock). A cancelled
    # wait is abandoned at once, so the caller's cancellation takes effect without waiting
    # for a producer blocked in next() (a collective, a disk read, a sleep); that thread
    # keeps running the producer until next() returns and then closes it.
    state = _SyncSource(iter(source))
    timeout_s = _close_timeout(source)
    try:
        while True:
            item = await anyio.to_thread.run_sync(state.next_or_done, abandon_on_cancel=True)
            if item is _DONE:
                return
            yield item
    finally:
        state.abandoned = True  # before the close: see _SyncSource
        with anyio.CancelScope(shield=True) as scope:
            scope.deadline = anyio.current_time() + timeout_s
            await anyio.to_thread.run_sync(state.close_if_idle, abandon_on_cancel=True)
        if scope.cancelled_caught:
            logger.warning(
                "closing the source %s did not finish within %s s; left to its thread",
                type(source).__qualname__,
                timeout_s,
            )
