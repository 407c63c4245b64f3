"""Pipeline runtime: backpressure, memory bounds, ordering, lifespans, errors at every phase
and position, cancellation, and the report.

Synchronisation is by events and ``wait_all_tasks_blocked``, never by sleeping; every wait
is bounded by ``fail_after`` so a regression shows as a failure, not a hung run.
"""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, ClassVar

import anyio
import anyio.to_thread
import pytest
import torch
from anyio import wait_all_tasks_blocked

from weightpipe.pipeline import Pipeline, RunReport, Stage, StageError


class Passthrough(Stage[Any, Any]):
    def __init__(self, name: str, workers: int = 1) -> None:
        self.name = name
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
    assert final.channels[0].peak == depth
    assert final.stages[0].items_in == 100
    assert final.channels[0].send_blocked_s > 0  # the source did wait: backpressure
    assert final.source_items == 100


class Tracked:
    """An item that counts how many of its kind are alive (CPython frees it at once)."""

    alive: ClassVar[int] = 0
    peak: ClassVar[int] = 0

    def __init__(self) -> None:
        Tracked.alive += 1
        Tracked.peak = max(Tracked.peak, Tracked.alive)

    def __del__(self) -> None:
        Tracked.alive -= 1


class Collect(Stage[Tracked, Tracked]):
    """Returns its input (a coroutine, so a multi-worker stage collects the outputs)."""

    def __init__(self, name: str, workers: int) -> None:
        self.name = name
        self.workers = workers

    async def process(self, item: Tracked) -> list[Tracked]:
        return [item]


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("workers", [2, 3])
async def test_items_alive_never_exceed_depth_plus_workers_per_stage(
    depth: int, workers: int
) -> None:
    # The bound the runner documents: a stage with k workers holds at most k items taken
    # from its input channel. With the sink stuck, everything upstream fills up: the
    # source's pump holds the item it cannot send, each channel `depth`, the serial stage
    # 1 and the k-worker stage k (the one in the sink among them). Any reference the
    # runner keeps beyond that (a stale local, a slot keeping its input) shows here.
    Tracked.alive = Tracked.peak = 0
    stuck = anyio.Event()

    async def source() -> AsyncGenerator[Tracked, None]:
        while True:
            yield Tracked()

    async def sink(item: Tracked) -> None:
        stuck.set()
        await anyio.sleep_forever()

    pipe = Pipeline([Collect("one", 1), Collect("many", workers)], depth=depth)
    expected = 1 + depth + 1 + depth + workers

    async def run() -> None:
        await pipe.run(source(), sink=sink)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as group:
            group.start_soon(run)
            await stuck.wait()
            await wait_all_tasks_blocked()
            live = pipe.statistics()
            assert live is not None
            assert [c.current for c in live.channels] == [depth, depth]
            assert Tracked.alive == expected
            assert Tracked.peak == expected
            group.cancel_scope.cancel()
    gc.collect()
    assert Tracked.alive == 0  # a cancelled run keeps nothing alive


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
        ({"stages": [Passthrough("sink")]}, "reserved"),
        ({"stages": [Passthrough("a", workers=0)]}, "workers must be"),
        ({"stages": [object()]}, "has no process"),
        ({"stages": [Passthrough("a")], "close_timeout_s": 0}, "close_timeout_s"),
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


# Lifespans: one exit stack, reverse order, shielded, bounded ----------------------------


class Resourceful(Stage[Any, Any]):
    """Holds a resource through ``lifespan()``; records enter/exit in a shared log."""

    def __init__(self, name: str, log: list[str], fail_at: str | None = None) -> None:
        self.name = name
        self.log = log
        self.fail_at = fail_at

    @asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        if self.fail_at == "enter":
            raise OSError(f"{self.name}: no device")
        self.log.append(f"enter {self.name}")
        try:
            yield
        except BaseException as exc:
            self.log.append(f"saw {type(exc).__name__}")
            raise
        finally:
            self.log.append(f"exit {self.name}")

    async def process(self, item: Any) -> list[Any]:
        return [item]


class OpenClose(Passthrough):
    """The older pair, logged like ``Resourceful``."""

    def __init__(self, name: str, log: list[str]) -> None:
        super().__init__(name)
        self.log = log

    async def open(self) -> None:
        self.log.append(f"enter {self.name}")

    async def close(self) -> None:
        self.log.append(f"exit {self.name}")


async def test_lifespans_are_entered_in_order_and_exited_in_reverse_once() -> None:
    log: list[str] = []
    stages = [Resourceful("a", log), OpenClose("b", log), Resourceful("c", log)]
    report = await Pipeline(stages).run(range(3))
    assert report.stage("c").items_out == 3
    assert log == ["enter a", "enter b", "enter c", "exit c", "exit b", "exit a"]


async def test_a_failed_enter_exits_only_what_was_entered() -> None:
    log: list[str] = []
    stages = [Resourceful("a", log), Resourceful("b", log, fail_at="enter"), OpenClose("c", log)]
    with pytest.raises(StageError) as info:
        await Pipeline(stages).run(range(3))
    assert (info.value.stage, info.value.phase) == ("b", "open")
    assert isinstance(info.value.__cause__, OSError)
    assert log == ["enter a", "saw StageError", "exit a"]


async def test_a_lifespan_sees_the_run_failure_and_cannot_hide_it() -> None:
    log: list[str] = []

    class Swallow(Resourceful):
        @asynccontextmanager
        async def lifespan(self) -> AsyncIterator[None]:
            try:
                yield
            except BaseException:
                log.append("swallowed")  # and returns normally: "suppress" is ignored

    with pytest.raises(StageError) as info:
        await Pipeline([Swallow("s", log), Faulty("f", "process")]).run(range(10))
    assert info.value.stage == "f"
    assert log == ["swallowed"]


class HangingClose(Passthrough):
    """A close that never returns on its own (an engine that stopped answering)."""

    async def close(self) -> None:
        await super().close()
        await anyio.sleep_forever()


async def test_a_hanging_close_is_cut_at_close_timeout_and_named() -> None:
    log: list[str] = []
    stages = [OpenClose("first", log), HangingClose("stuck")]
    with anyio.fail_after(10), pytest.raises(StageError) as info:
        await Pipeline(stages, close_timeout_s=0.05).run(range(3))
    assert (info.value.stage, info.value.phase) == ("stuck", "close")
    assert isinstance(info.value.__cause__, TimeoutError)
    assert "0.05 s" in str(info.value)
    assert log == ["enter first", "exit first"]  # the stages before it still closed


async def test_a_stage_may_bound_its_own_close() -> None:
    stuck = HangingClose("stuck")
    stuck.close_timeout_s = 0.05  # type: ignore[attr-defined]
    with anyio.fail_after(10), pytest.raises(StageError, match=r"0\.05 s"):
        await Pipeline([stuck], close_timeout_s=3600).run(range(3))


async def test_a_hanging_close_cannot_hold_the_callers_cancellation_forever() -> None:
    stuck = HangingClose("stuck")
    gate = Gate("gate")
    pipe = Pipeline([stuck, gate], close_timeout_s=0.05)
    with anyio.fail_after(10):
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as group:
                group.start_soon(pipe.run, range(10))
                await wait_all_tasks_blocked()
                scope.cancel()
    assert scope.cancelled_caught
    assert stuck.closed == 1 and gate.closed == 1


# Names -------------------------------------------------------------------------------


async def test_stages_sharing_a_name_are_numbered_in_order() -> None:
    class Load(Stage[int, int]):
        """Two of these: the docs promise a second engine's loader may follow."""

        name = "load"

        async def process(self, item: int) -> list[int]:
            return [item]

    pipe = Pipeline([Load(), Passthrough("load-2"), Load(), Passthrough("x")])
    assert pipe.names == ("load", "load-2", "load-3", "x")
    report = await pipe.run(range(4))
    assert [s.name for s in report.stages] == ["load", "load-2", "load-3", "x"]
    assert [c.name for c in report.channels] == [
        "source->load",
        "load->load-2",
        "load-2->load-3",
        "load-3->x",
    ]
    assert report.stage("load-3").items_in == 4


async def test_a_second_stage_of_a_name_is_named_in_its_errors() -> None:
    with pytest.raises(StageError) as info:
        await Pipeline([Passthrough("q"), Faulty("q", "process")]).run(range(10))
    assert info.value.stage == "q-2"


# The sink has a time of its own ----------------------------------------------------------


async def test_sink_time_is_reported_apart_from_the_last_stage() -> None:
    entered = anyio.Event()
    release = anyio.Event()

    async def sink(item: int) -> None:
        entered.set()
        await release.wait()

    pipe = Pipeline([Passthrough("a"), Passthrough("last")], depth=1)
    reports: list[RunReport] = []

    async def run() -> None:
        reports.append(await pipe.run(range(3), sink=sink))

    with anyio.fail_after(10):
        async with anyio.create_task_group() as group:
            group.start_soon(run)
            await entered.wait()
            await wait_all_tasks_blocked()
            live = pipe.statistics()
            assert live is not None and not live.ended
            assert live.sink_s > 0  # a sink call in progress counts already
            live_sink_s = live.sink_s
            assert live.stage("last").blocked_s == 0
            release.set()
    report = reports[0]
    assert report.ended
    assert report.sink_s >= live_sink_s
    assert report.stage("last").blocked_s == 0
    assert "sink" in report.format()


# KeyboardInterrupt and SystemExit stay themselves ----------------------------------------

_INTERRUPTED_RUN = """
import anyio
from weightpipe.pipeline import Pipeline, Stage


class Fails(Stage):
    name = "fails"

    async def process(self, item):
        if item == 2:
            await anyio.sleep(0)
            raise ValueError("a real failure")
        return [item]


class Interrupted(Stage):
    name = "interrupted"

    async def process(self, item):
        try:
            await anyio.sleep_forever()
        finally:
            raise {exc}


async def main():
    try:
        await Pipeline([Fails(), Interrupted()], depth=1).run([1, 2])
    except BaseException as exc:
        print("raised", type(exc).__name__, getattr(exc, "__notes__", []))


try:
    anyio.run(main)
except BaseException:
    pass  # asyncio re-raises a task's KeyboardInterrupt from the loop as well
"""


@pytest.mark.parametrize("exc", ["KeyboardInterrupt", "SystemExit"])
def test_an_interrupt_beside_a_stage_failure_stays_an_interrupt(exc: str, tmp_path: Path) -> None:
    # In a subprocess: asyncio lets a task's KeyboardInterrupt escape the event loop, which
    # would end this pytest session too.
    script = tmp_path / "interrupted.py"
    script.write_text(textwrap.dedent(_INTERRUPTED_RUN).format(exc=exc))
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=False
    )
    assert f"raised {exc} " in done.stdout, done.stdout + done.stderr
    assert "a real failure" in done.stdout  # the stage's failure is kept as a note


# Cancellation of a run that never has to wait ------------------------------------------


async def test_a_run_that_never_waits_is_cancelled_by_an_outer_scope() -> None:
    async def source() -> AsyncGenerator[int, None]:
        count = 0
        while True:  # never awaits: only the channels can notice the cancellation
            count += 1
            yield count

    pipe = Pipeline([Passthrough("a"), Passthrough("b", workers=2)], depth=64)
    with anyio.fail_after(30):
        with anyio.CancelScope() as scope:
            scope.cancel()
            await pipe.run(source())
    assert scope.cancelled_caught
    assert pipe.statistics() is None


@pytest.mark.parametrize("workers", [1, 2])
async def test_a_failed_source_is_never_followed_by_a_flush(workers: int) -> None:
    # A stage whose flush emits without awaiting anything: when the source fails, its
    # input channel closes as if the stream were done, and the group's cancellation may
    # reach this task only later. The flush must not run: its "last" item would tell the
    # sink the stream was complete.
    class Collect(Stage[int, list[int]]):
        name = "collect"

        def __init__(self) -> None:
            self.workers = workers
            self.held: list[int] = []
            self.flushed = False

        async def process(self, item: int) -> list[list[int]]:
            self.held.append(item)
            return []

        async def flush(self) -> AsyncIterator[list[int]]:
            self.flushed = True
            yield list(self.held)

    def broken() -> Iterator[int]:
        yield 1
        yield 2
        raise OSError("disk gone")

    stage = Collect()
    seen: list[list[int]] = []

    async def sink(item: list[int]) -> None:
        seen.append(item)

    with pytest.raises(StageError, match="disk gone") as info:
        await Pipeline([stage]).run(broken(), sink=sink)
    assert info.value.stage == "source"
    assert not stage.flushed and seen == []
