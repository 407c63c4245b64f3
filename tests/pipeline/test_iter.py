"""as_async_iter: every source shape a trainer has, finalised on early exit."""

from __future__ import annotations

import threading
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Iterable, Iterator
from contextlib import aclosing
from typing import NoReturn, TypeVar

import anyio
import pytest
import torch

from weightpipe.pipeline import as_async_iter

T = TypeVar("T")


async def collect(source: Iterable[T] | AsyncIterable[T]) -> list[T]:
    return [item async for item in as_async_iter(source)]


async def test_checkpoint_engine_async_generator_is_accepted() -> None:
    # The seed bug: a quantizer handed receive_weights() raised
    # "TypeError: 'async_generator' object is not iterable".
    async def receive_weights() -> AsyncGenerator[tuple[str, torch.Tensor], None]:
        for i in range(3):
            yield f"model.layers.{i}.mlp.up_proj.weight", torch.full((2, 2), float(i))

    items = await collect(receive_weights())
    assert [name for name, _ in items] == [f"model.layers.{i}.mlp.up_proj.weight" for i in range(3)]


async def test_async_iterable_that_is_not_a_generator() -> None:
    class Countdown:
        def __aiter__(self) -> AsyncIterator[int]:
            return self._gen()

        async def _gen(self) -> AsyncIterator[int]:
            for i in (3, 2, 1):
                yield i

    assert await collect(Countdown()) == [3, 2, 1]


async def test_containers_are_iterated_directly(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_threads(*args: object, **kwargs: object) -> NoReturn:
        raise AssertionError("a container's items went through a worker thread")

    monkeypatch.setattr(anyio.to_thread, "run_sync", no_threads)
    assert await collect([1, 2, 3]) == [1, 2, 3]
    assert await collect(range(200)) == list(range(200))
    assert await collect({"a": 1}.items()) == [("a", 1)]
    # Built-in iterators over containers only read memory: no thread either.
    assert await collect(iter([4, 5])) == [4, 5]
    assert await collect(iter({"b": 2}.items())) == [("b", 2)]
    assert await collect(iter((6,))) == [6]
    with pytest.raises(AssertionError, match="worker thread"):
        await collect(x for x in [1])  # a generator may block: it gets a thread


async def test_sync_generator_runs_in_a_worker_thread() -> None:
    loop_thread = threading.get_ident()
    seen: list[int] = []

    def gen() -> Iterator[int]:
        for i in range(3):
            seen.append(threading.get_ident())
            yield i

    assert await collect(gen()) == [0, 1, 2]
    assert seen and all(ident != loop_thread for ident in seen)


async def test_blocking_producer_does_not_stall_the_event_loop() -> None:
    # The producer blocks until a task on the event loop sets the flag. If next() ran on
    # the loop, that task could never run and the test would hit fail_after.
    unblock = threading.Event()

    def blocking_source() -> Iterator[str]:
        yield "first"
        unblock.wait()
        yield "second"

    async def release() -> None:
        unblock.set()

    with anyio.fail_after(10):
        async with anyio.create_task_group() as group:
            items = as_async_iter(blocking_source())
            assert await items.__anext__() == "first"
            group.start_soon(release)
            assert await items.__anext__() == "second"
            await items.aclose()


async def test_sync_generator_is_closed_on_early_exit() -> None:
    closed = threading.Event()

    def gen() -> Iterator[int]:
        try:
            yield from range(1000)
        finally:
            closed.set()

    items = as_async_iter(gen())
    assert await items.__anext__() == 0
    await items.aclose()
    assert closed.is_set()


async def test_async_generator_is_aclosed_on_early_exit() -> None:
    closed = anyio.Event()

    async def gen() -> AsyncGenerator[int, None]:
        try:
            for i in range(1000):
                yield i
        finally:
            closed.set()

    items = as_async_iter(gen())
    assert await items.__anext__() == 0
    await items.aclose()
    assert closed.is_set()


async def test_async_generator_is_aclosed_on_cancellation() -> None:
    closed = anyio.Event()
    started = anyio.Event()

    async def gen() -> AsyncGenerator[int, None]:
        try:
            yield 0
            started.set()
            await anyio.sleep_forever()
            yield 1
        finally:
            closed.set()

    async def consume() -> None:
        async with aclosing(as_async_iter(gen())) as items:
            async for _ in items:
                pass

    with anyio.fail_after(10):
        async with anyio.create_task_group() as group:
            group.start_soon(consume)
            await started.wait()
            group.cancel_scope.cancel()
    assert closed.is_set()


def test_non_iterable_is_refused_with_its_type() -> None:
    with pytest.raises(TypeError, match="got int"):
        as_async_iter(3)  # type: ignore[arg-type]
