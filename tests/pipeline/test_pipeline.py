"""Pipeline runtime: backpressure, ordering, errors at every phase and position, cancellation.

Synchronisation is by events and ``wait_all_tasks_blocked``, never by sleeping; every wait
is bounded by ``fail_after`` so a regression shows as a failure, not a hung run.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from typing import Any

import anyio
import anyio.to_thread
import pytest
import torch
from anyio import wait_all_tasks_blocked

from weightpipe.pipeline import Pipeline, RunReport, Stage, StageError


class Passthrough(Stage[Any, Any]):
    def __init__(self, name: str, workers: int = 1) -> None:
        self.name = name  # type: ignore[misc]
        self.workers = workers
        self.opened = 0
        self.closed = 0

    async def open(self) -> None:
        self.opened += 1

    async def close(self) -> None:
        self.closed += 1

    async def process(self, item: Any) -> AsyncIterator[Any]:
        yield item


class Gate(Passthrough):
    """Holds every item until ``release`` is set; counts what it has taken in."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.release = anyio.Event()
        self.taken = 0

    async def process(self, item: Any) -> AsyncIterator[Any]:
        self.taken += 1
        await self.release.wait()
        yield item


async def counting_source(n: int, produced: list[int]) -> AsyncGenerator[int, None]:
    for i in range(n):
        produced.append(i)
        yield i


@pytest.mark.parametrize("depth", [1, 3])
async def test_slow_consumer_stops_the_producer_at_depth(depth: int) -> None:
    produced: list[int] = []
    gate = Gate("gate")
    pipe = Pipeline([gate], depth=depth)
    report: list[RunReport] = []

    async def run() -> None:
        report.append(await pipe.run(counting_source(100, produced)))

    with anyio.fail_after(10):
        async with anyio.create_task_group() as group:
            group.start_soon(run)
            await wait_all_tasks_blocked()
            live = pipe.statistics()
            assert live is not None
            # One item in the gate, `depth` in the channel, one produced and waiting to send.
            assert gate.taken == 1
            assert live.channels[0].current == depth
            assert live.channels[0].peak == depth
            assert len(produced) == depth + 2
            gate.release.set()
    final = report[0]
    assert final.channels[0].peak <= depth
    assert final.stages[0].items_in == 100
    assert final.channels[0].send_blocked_s > 0  # the source did wait: backpressure
    assert final.source_items == 100


async def test_peak_never_exceeds_depth_in_a_chain() -> None:
    stages = [Passthrough("a"), Passthrough("b", workers=3), Passthrough("c")]
    report = await Pipeline(stages, depth=2).run(range(500))
    assert [c.capacity for c in report.channels] == [2, 2, 2]
    assert all(c.peak <= c.capacity for c in report.channels)
    assert [s.items_out for s in report.stages] == [500, 500, 500]


class ReverseRelease(Stage[int, int]):
    """Finishes items in reverse arrival order (each waits for the next one's release)."""

    name = "reverse"

    def __init__(self, n: int, workers: int) -> None:
        self.workers = workers
        self.started = [anyio.Event() for _ in range(n)]
        self.finished = [anyio.Event() for _ in range(n)]
        self.finish_order: list[int] = []

    async def process(self, item: int) -> list[int]:
        self.started[item].set()
        if item + 1 < len(self.finished) and item % self.workers != self.workers - 1:
            # Wait until a later item of the same window has finished.
            await self.finished[item + 1].wait()
        self.finish_order.append(item)
        self.finished[item].set()
        return [item, item * 10]


@pytest.mark.parametrize("workers", [2, 4])
async def test_outputs_keep_input_order_with_workers(workers: int) -> None:
    n = 16
    stage = ReverseRelease(n, workers)
    received: list[int] = []

    async def sink(x: int) -> None:
        received.append(x)

    with anyio.fail_after(10):
        report = await Pipeline([stage], depth=2).run(range(n), sink=sink)
    assert stage.finish_order != sorted(stage.finish_order)  # they did finish out of order
    assert received == [v for i in range(n) for v in (i, i * 10)]
    assert report.stages[0].items_in == n and report.stages[0].items_out == 2 * n


class Faulty(Passthrough):
    """Fails in one phase: open, process (on item ``at``), flush or close."""

    def __init__(self, name: str, phase: str | None, at: int = 3) -> None:
        super().__init__(name)
        self.phase = phase
        self.at = at

    async def open(self) -> None:
        await super().open()
        if self.phase == "open":
            raise OSError(f"{self.name} cannot open")

    async def close(self) -> None:
        await super().close()
        if self.phase == "close":
            raise OSError(f"{self.name} cannot close")

    async def process(self, item: Any) -> AsyncIterator[Any]:
        if self.phase == "process" and item == self.at:
            raise ValueError(f"bad item {item}")
        yield item

    async def flush(self) -> AsyncIterator[Any]:
        if self.phase == "flush":
            raise RuntimeError("flush failed")
        return
        yield


@pytest.mark.parametrize("position", [0, 1, 2])
@pytest.mark.parametrize("phase", ["open", "process", "flush", "close"])
async def test_error_names_stage_phase_and_item_and_closes_everything(
    position: int, phase: str
) -> None:
    stages: list[Passthrough] = [Passthrough("s0"), Passthrough("s1"), Passthrough("s2")]
    faulty = Faulty(f"s{position}", phase)
    stages[position] = faulty
    finalised = threading.Event()

    def source() -> Iterator[int]:
        try:
            yield from range(10)
        finally:
            finalised.set()

    with anyio.fail_after(10), pytest.raises(StageError) as info:
        await Pipeline(stages, depth=2).run(source())
    error = info.value
    assert error.stage == f"s{position}"
    assert error.phase == phase
    assert isinstance(error.__cause__, ValueError | OSError | RuntimeError)
    assert f"s{position}" in str(error)
    if phase == "process":
        assert error.item is not None and "(3)" in error.item
    # Every stage that opened is closed exactly once; none after a failed open.
    for index, stage in enumerate(stages):
        opened_ok = not (phase == "open" and index >= position)
        assert stage.closed == (1 if opened_ok else 0), (index, stage.closed)
    if phase != "open":
        assert finalised.is_set()


async def test_error_in_a_worker_stage_names_the_item() -> None:
    class Boom(Stage[int, int]):
        name = "boom"
        workers = 3

        async def process(self, item: int) -> list[int]:
            if item == 7:
                raise KeyError("tensor 'x.weight'")
            return [item]

    with pytest.raises(StageError) as info:
        await Pipeline([Passthrough("a"), Boom()], depth=1).run(range(20))
    assert info.value.stage == "boom"
    assert info.value.item is not None and "(7)" in info.value.item
    assert "x.weight" in str(info.value)


async def test_source_error_is_named_source() -> None:
    def source() -> Iterator[int]:
        yield 1
        raise OSError("disk gone")

    with pytest.raises(StageError) as info:
        await Pipeline([Passthrough("a")]).run(source())
    assert info.value.stage == "source"
    assert "after 1 items" in str(info.value)
    assert isinstance(info.value.__cause__, OSError)


async def test_sink_error_is_named_sink_not_hidden_as_a_closed_channel() -> None:
    async def sink(item: int) -> None:
        if item == 2:
            raise PermissionError("engine refused")

    with pytest.raises(StageError) as info:
        await Pipeline([Passthrough("a")]).run(range(5), sink=sink)
    assert info.value.stage == "sink"
    assert info.value.phase == "sink"
    assert isinstance(info.value.__cause__, PermissionError)


async def test_items_whose_nbytes_raises_reach_the_stage() -> None:
    sparse = torch.eye(3).to_sparse()
    with pytest.raises(RuntimeError):
        _ = sparse.nbytes
    report = await Pipeline([Passthrough("a")]).run([("w", sparse)])
    assert report.stages[0].items_in == 1
    assert report.stages[0].bytes_in == 0


async def test_non_iterable_source_is_refused_by_name() -> None:
    with pytest.raises(StageError, match="int"):
        await Pipeline([Passthrough("a")]).run(42)  # type: ignore[arg-type]


class ThreadWorker(Passthrough):
    """Does its work in a worker thread; tracks threads still running."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.running = 0
        self.lock = threading.Lock()
        self.entered = anyio.Event()

    def _work(self, x: torch.Tensor) -> torch.Tensor:
        with self.lock:
            self.running += 1
        try:
            return (x * 2).sum().reshape(1)
        finally:
            with self.lock:
                self.running -= 1

    async def process(self, item: Any) -> AsyncIterator[Any]:
        self.entered.set()
        yield await anyio.to_thread.run_sync(self._work, item)


async def test_outer_cancellation_leaves_no_task_and_no_running_thread() -> None:
    finalised = threading.Event()

    def source() -> Iterator[torch.Tensor]:
        try:
            while True:
                yield torch.ones(256, 256)
        finally:
            finalised.set()

    worker = ThreadWorker("work")
    gate = Gate("gate")
    pipe = Pipeline([worker, gate], depth=2)
    before = {t.id for t in anyio.get_running_tasks()}
    with anyio.fail_after(10):
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as group:

                async def run() -> None:
                    await pipe.run(source())

                group.start_soon(run)
                await worker.entered.wait()
                await wait_all_tasks_blocked()
                scope.cancel()
        assert scope.cancelled_caught
    after = {t.id for t in anyio.get_running_tasks()}
    assert after <= before
    assert worker.running == 0
    assert finalised.is_set()
    assert worker.closed == 1 and gate.closed == 1
    assert pipe.statistics() is None


async def test_async_generator_source_is_aclosed_on_failure() -> None:
    closed = anyio.Event()

    async def receive_weights() -> AsyncGenerator[tuple[str, torch.Tensor], None]:
        try:
            for i in range(100):
                yield f"layer.{i}.weight", torch.zeros(4)
        finally:
            closed.set()

    with pytest.raises(StageError):
        await Pipeline([Faulty("q", "process", at=-1), Faulty("boom", "flush")]).run(
            receive_weights()
        )
    assert closed.is_set()


async def test_report_counts_bytes_and_busy_time() -> None:
    class Halve(Stage[torch.Tensor, torch.Tensor]):
        name = "halve"

        async def process(self, item: torch.Tensor) -> list[torch.Tensor]:
            return [item[: item.numel() // 2].clone()]

    tensors = [torch.zeros(1000, dtype=torch.float32) for _ in range(5)]
    report = await Pipeline([Halve()], depth=1).run(tensors)
    stage = report.stage("halve")
    assert stage.bytes_in == 5 * 4000
    assert stage.bytes_out == 5 * 2000
    assert stage.busy_s > 0
    assert report.bottleneck().name == "halve"
    assert "halve" in report.format()
    with pytest.raises(KeyError, match="halve"):
        report.stage("nope")


async def test_tuple_items_count_tensor_bytes() -> None:
    items = [(f"w{i}", torch.zeros(10, dtype=torch.bfloat16)) for i in range(3)]
    report = await Pipeline([Passthrough("a")]).run(items)
    assert report.stages[0].bytes_in == 60


async def test_plain_return_value_from_process_is_refused() -> None:
    class Wrong:
        name = "wrong"

        def process(self, item: int) -> int:
            return item

    with pytest.raises(StageError, match="async generator or a coroutine"):
        await Pipeline([Wrong()]).run([1])


async def test_second_concurrent_run_is_refused() -> None:
    gate = Gate("gate")
    pipe = Pipeline([gate])
    with anyio.fail_after(10):
        async with anyio.create_task_group() as group:
            group.start_soon(pipe.run, [1, 2])
            await wait_all_tasks_blocked()
            with pytest.raises(RuntimeError, match="already running"):
                await pipe.run([3])
            gate.release.set()
    # and it runs again once the first run is over
    gate.release.set()
    assert (await pipe.run([4])).stages[0].items_in == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"stages": []}, "at least one stage"),
        ({"stages": [Passthrough("a")], "depth": 0}, "depth must be >= 1"),
        ({"stages": [Passthrough("a")], "depth": float("inf")}, "unbounded"),
        ({"stages": [Passthrough("a"), Passthrough("a")]}, "two stages are named 'a'"),
        ({"stages": [Passthrough("sink")]}, "reserved"),
        ({"stages": [Passthrough("a", workers=0)]}, "workers must be"),
        ({"stages": [object()]}, "has no process"),
    ],
)
def test_construction_errors(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Pipeline(**kwargs)


async def test_flush_emits_after_last_item_with_workers() -> None:
    class Batcher(Stage[int, list[int]]):
        name = "batch"
        workers = 2

        def __init__(self) -> None:
            self.held: list[int] = []

        async def process(self, item: int) -> AsyncIterator[list[int]]:
            self.held.append(item)
            if len(self.held) == 3:
                batch, self.held = self.held, []
                yield batch

        async def flush(self) -> AsyncIterator[list[int]]:
            if self.held:
                yield self.held

    out: list[list[int]] = []

    async def sink(x: list[int]) -> None:
        out.append(x)

    await Pipeline([Batcher()], depth=1).run(range(7), sink=sink)
    assert sorted(v for batch in out for v in batch) == list(range(7))
    assert out[-1] == [6]
