"""The pipeline runtime: stages joined by bounded channels in one task group.

``Pipeline.run(source)`` opens every stage, starts one task for the source and one (or
``workers`` + 2) per stage inside a single anyio task group, and returns a frozen
``RunReport``. Memory is bounded by construction: between two stages there are at most
``depth`` items in the channel plus one in each worker, so a stage with one worker pins at
most ``depth + 1`` of its inputs. On the first error every task is cancelled, every opened
stage is closed (shielded, in reverse order), and one ``StageError`` names the stage, the
phase and the item, with the original exception as its cause.
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Sequence,
)
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio

from weightpipe.pipeline._channel import (
    ChannelReceiver,
    ChannelSender,
    ChannelStatistics,
    check_depth,
    open_channel,
)
from weightpipe.pipeline._errors import WeightpipeError
from weightpipe.pipeline._iter import as_async_iter
from weightpipe.pipeline._stage import describe_item, item_nbytes, stage_name

if sys.version_info < (3, 11):  # pragma: no cover - exercised on 3.10 only
    from exceptiongroup import BaseExceptionGroup  # type: ignore[import-not-found,unused-ignore]

__all__ = [
    "Pipeline",
    "PipelineObserver",
    "RunReport",
    "StageError",
    "StageReport",
]

SOURCE = "source"
SINK = "sink"


class StageError(WeightpipeError, RuntimeError):
    """A stage failed; the one exception a failed run raises.

    Attributes:
        stage: the stage's name (``"source"`` for the source iterator).
        phase: ``"open"``, ``"process"``, ``"flush"``, ``"close"``, ``"source"`` or
            ``"sink"`` (the ``sink`` callable given to ``run``, reported as stage "sink").
        item: a description of the item being processed, or ``None``.
    The original exception is ``__cause__``.
    """

    def __init__(self, stage: str, phase: str, item: str | None, cause: BaseException) -> None:
        where = f" on {item}" if item else ""
        super().__init__(
            f"stage {stage!r} failed at {phase}{where}: {type(cause).__name__}: {cause}"
        )
        self.stage = stage
        self.phase = phase
        self.item = item
        self.__cause__ = cause


@dataclass(frozen=True)
class StageReport:
    """What one stage did in a run.

    Attributes:
        name: the stage's name.
        workers: concurrent ``process`` calls allowed.
        items_in / items_out: items received and emitted.
        bytes_in / bytes_out: their ``nbytes`` (tensors and buckets carry it).
        busy_s: seconds inside ``process``/``flush``, summed over workers (excluding
            time spent waiting for room downstream).
        blocked_s: seconds waiting for room in the output channel (backpressure).
        starved_s: seconds waiting for an input item.
    """

    name: str
    workers: int
    items_in: int
    items_out: int
    bytes_in: int
    bytes_out: int
    busy_s: float
    blocked_s: float
    starved_s: float


@dataclass(frozen=True)
class RunReport:
    """A run's statistics: one ``StageReport`` per stage, one snapshot per channel.

    ``channels[i]`` feeds ``stages[i]`` (``channels[0]`` carries the source's items).
    """

    stages: tuple[StageReport, ...]
    channels: tuple[ChannelStatistics, ...]
    wall_s: float
    source_items: int
    depth: int

    def stage(self, name: str) -> StageReport:
        """The report of the stage called ``name``.

        Raises:
            KeyError: no such stage (lists the names there are).
        """
        for report in self.stages:
            if report.name == name:
                return report
        raise KeyError(f"no stage {name!r}; stages are {[s.name for s in self.stages]}")

    def bottleneck(self) -> StageReport:
        """The stage with the most busy time per worker."""
        return max(self.stages, key=lambda s: s.busy_s / s.workers)

    def format(self) -> str:
        """A plain-text table of the report."""
        lines = [
            f"{'stage':<14}{'items in':>10}{'items out':>10}{'MB in':>10}{'busy s':>9}"
            f"{'blocked s':>11}{'starved s':>11}{'peak/depth':>12}"
        ]
        for stage, channel in zip(self.stages, self.channels, strict=True):
            lines.append(
                f"{stage.name:<14}{stage.items_in:>10}{stage.items_out:>10}"
                f"{stage.bytes_in / 1e6:>10.1f}{stage.busy_s:>9.3f}{stage.blocked_s:>11.3f}"
                f"{stage.starved_s:>11.3f}{f'{channel.peak}/{channel.capacity}':>12}"
            )
        lines.append(f"wall {self.wall_s:.3f} s, bottleneck: {self.bottleneck().name}")
        return "\n".join(lines)


class PipelineObserver(Protocol):
    """Receives live events from a run (the metrics module implements it).

    Calls happen on the event loop and must be cheap and non-blocking.
    """

    def on_item(
        self, stage: str, seconds: float, bytes_in: int, bytes_out: int, items_out: int
    ) -> None:
        """A stage finished one input item after ``seconds`` of work."""

    def on_flush(self, stage: str, seconds: float, bytes_out: int, items_out: int) -> None:
        """A stage's ``flush`` ran after its last input and emitted ``items_out`` items."""

    def on_channel(self, stats: ChannelStatistics) -> None:
        """A channel's occupancy after a receive."""

    def on_error(self, stage: str, kind: str) -> None:
        """A run failed in ``stage`` with an exception of type ``kind``."""

    def on_run_end(self, report: RunReport) -> None:
        """A run ended (successfully or not) with this report."""


@dataclass
class _StageMeter:
    name: str
    workers: int
    items_in: int = 0
    items_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    busy_s: float = 0.0
    blocked_s: float = 0.0

    def report(self, starved_s: float) -> StageReport:
        return StageReport(
            name=self.name,
            workers=self.workers,
            items_in=self.items_in,
            items_out=self.items_out,
            bytes_in=self.bytes_in,
            bytes_out=self.bytes_out,
            busy_s=self.busy_s,
            blocked_s=self.blocked_s,
            starved_s=starved_s,
        )


@dataclass
class _Slot:
    """One item in flight through a multi-worker stage; filled by a worker."""

    item: Any
    index: int
    bytes_in: int
    done: anyio.Event = field(default_factory=anyio.Event)
    outputs: list[Any] = field(default_factory=list)
    busy_s: float = 0.0


Sink = Callable[[Any], Awaitable[None]]


class _Run:
    """State of one run; lives only inside ``Pipeline.run``."""

    def __init__(self, names: list[str], workers: list[int], depth: int) -> None:
        self.started = time.perf_counter()
        self.depth = depth
        self.meters = [_StageMeter(n, w) for n, w in zip(names, workers, strict=True)]
        self.channels: list[tuple[ChannelSender[Any], ChannelReceiver[Any]]] = []
        upstream = [SOURCE, *names]
        for i, name in enumerate(names):
            self.channels.append(open_channel(depth, name=f"{upstream[i]}->{name}"))
        self.source_items = 0
        self.failures: list[StageError] = []

    def close_channels(self) -> None:
        # Tasks close their own ends; this catches the ones never started (a failed open).
        for send, receive in self.channels:
            send.close()
            receive.close()

    def report(self) -> RunReport:
        channel_stats = tuple(send.statistics() for send, _ in self.channels)
        return RunReport(
            stages=tuple(
                meter.report(stats.receive_starved_s)
                for meter, stats in zip(self.meters, channel_stats, strict=True)
            ),
            channels=channel_stats,
            wall_s=time.perf_counter() - self.started,
            source_items=self.source_items,
            depth=self.depth,
        )


def _start_outputs(result: object) -> AsyncIterator[Any] | Awaitable[Any] | None:
    if hasattr(result, "__anext__") or hasattr(result, "__await__"):
        return result  # type: ignore[return-value]
    return None


class Pipeline:
    """Stages joined by bounded channels of ``depth`` items.

    Example::

        report = await Pipeline([Fetch(bucket_bytes=256 << 20), Fp8Quantize(), load],
                                depth=2).run(model.named_parameters())

    ``depth`` bounds memory: a stage with one worker holds at most ``depth`` items in its
    input channel and one in hand, so the items alive between the first and the last stage
    are at most ``len(stages) * (depth + 1)``. A larger depth only absorbs jitter in
    per-item costs.

    Raises:
        ValueError: no stages, ``depth`` < 1, a stage without ``process``, two stages
            with the same name, or ``workers`` < 1.
    """

    def __init__(
        self,
        stages: Sequence[Any],
        depth: int = 2,
        *,
        observer: PipelineObserver | None = None,
        nbytes: Callable[[Any], int] = item_nbytes,
    ) -> None:
        if not stages:
            raise ValueError("a pipeline needs at least one stage")
        check_depth(depth, "pipeline")
        names: list[str] = []
        for position, stage in enumerate(stages):
            name = stage_name(stage)
            if not callable(getattr(stage, "process", None)):
                raise ValueError(f"stage {position} ({name!r}) has no process() method")
            if name in (SOURCE, SINK):
                raise ValueError(f"stage {position}: the name {name!r} is reserved")
            if name in names:
                raise ValueError(f"two stages are named {name!r}; give each a unique name")
            workers = getattr(stage, "workers", 1)
            if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
                raise ValueError(
                    f"stage {name!r}: workers must be an integer >= 1, got {workers!r}"
                )
            names.append(name)
        self.stages: tuple[Any, ...] = tuple(stages)
        self.names: tuple[str, ...] = tuple(names)
        self.depth = depth
        self.observer = observer
        self._nbytes = nbytes
        self._run: _Run | None = None

    def statistics(self) -> RunReport | None:
        """A live snapshot of the run in progress, or ``None`` between runs."""
        return None if self._run is None else self._run.report()

    async def run(
        self, source: Iterable[Any] | AsyncIterable[Any], *, sink: Sink | None = None
    ) -> RunReport:
        """Stream ``source`` through every stage and return the run's report.

        ``source`` is anything ``as_async_iter`` accepts. The last stage's outputs go to
        ``sink`` (an async callable) if given, else are dropped after being counted.

        Raises:
            StageError: a stage (or the source) failed; names the stage, phase and item.
            RuntimeError: the pipeline is already running.
        """
        if self._run is not None:
            raise RuntimeError("this pipeline is already running; build one per concurrent run")
        run = self._run = _Run(
            list(self.names), [getattr(s, "workers", 1) for s in self.stages], self.depth
        )
        opened: list[int] = []
        error: BaseException | None = None
        try:
            for index, stage in enumerate(self.stages):
                opener = getattr(stage, "open", None)
                if opener is not None:
                    try:
                        await opener()
                    except Exception as exc:
                        raise StageError(self.names[index], "open", None, exc) from exc
                opened.append(index)
            async with anyio.create_task_group() as group:
                group.start_soon(self._pump, run, source)
                for index in range(len(self.stages)):
                    group.start_soon(self._drive, run, index, sink)
        except BaseException as exc:
            error = exc
        run.close_channels()
        close_errors = await self._close(opened)
        report = run.report()
        self._run = None
        if error is not None:
            root = self._root_failure(run, error)
            if self.observer is not None and root is not None:
                self.observer.on_error(root.stage, type(root.__cause__).__name__)
            if self.observer is not None:
                self.observer.on_run_end(report)
            if root is None:
                raise error
            for extra in close_errors:
                _add_note(root, f"also, while closing: {extra}")
            raise root
        if self.observer is not None:
            if close_errors:
                self.observer.on_error(
                    close_errors[0].stage, type(close_errors[0].__cause__).__name__
                )
            self.observer.on_run_end(report)
        if close_errors:
            raise close_errors[0]
        return report

    @staticmethod
    def _root_failure(run: _Run, error: BaseException) -> StageError | None:
        if isinstance(error, StageError):
            return error
        if run.failures and isinstance(error, BaseExceptionGroup):
            # The first failure is the cause; later ones (a closed channel seen by a
            # neighbour) are its consequences.
            return run.failures[0]
        return None

    async def _close(self, opened: list[int]) -> list[StageError]:
        errors: list[StageError] = []
        with anyio.CancelScope(shield=True):
            for index in reversed(opened):
                closer = getattr(self.stages[index], "close", None)
                if closer is None:
                    continue
                try:
                    await closer()
                except Exception as exc:
                    errors.append(StageError(self.names[index], "close", None, exc))
        return errors

    def _fail(
        self, run: _Run, stage: str, phase: str, item: str | None, exc: Exception
    ) -> StageError:
        failure = StageError(stage, phase, item, exc)
        run.failures.append(failure)
        return failure

    async def _pump(self, run: _Run, source: Iterable[Any] | AsyncIterable[Any]) -> None:
        sender = run.channels[0][0]
        with sender:
            try:
                items = as_async_iter(source)
            except TypeError as exc:
                raise self._fail(run, SOURCE, "source", None, exc) from exc
            try:
                while True:
                    try:
                        item = await items.__anext__()
                    except StopAsyncIteration:
                        break
                    except Exception as exc:
                        where = f"after {run.source_items} items"
                        raise self._fail(run, SOURCE, "source", where, exc) from exc
                    run.source_items += 1
                    try:
                        await sender.send(item)
                    except (anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
                        if run.failures:  # downstream failed first; its error is the story
                            return
                        raise self._fail(run, SOURCE, "source", describe_item(item), exc) from exc
            finally:
                with anyio.CancelScope(shield=True):
                    await items.aclose()

    def _emitter(
        self, run: _Run, index: int, sink: Sink | None
    ) -> Callable[[Any], Awaitable[None]]:
        meter = run.meters[index]
        nbytes = self._nbytes
        if index + 1 < len(self.stages):
            sender = run.channels[index + 1][0]

            async def emit(out: Any) -> None:
                meter.items_out += 1
                meter.bytes_out += nbytes(out)
                started = time.perf_counter()
                await sender.send(out)
                meter.blocked_s += time.perf_counter() - started

            return emit

        async def emit_last(out: Any) -> None:
            meter.items_out += 1
            meter.bytes_out += nbytes(out)
            if sink is not None:
                started = time.perf_counter()
                try:
                    await sink(out)
                except Exception as exc:
                    raise self._fail(run, SINK, "sink", describe_item(out), exc) from exc
                finally:
                    meter.blocked_s += time.perf_counter() - started

        return emit_last

    async def _drive(self, run: _Run, index: int, sink: Sink | None) -> None:
        stage = self.stages[index]
        receiver = run.channels[index][1]
        out_sender = run.channels[index + 1][0] if index + 1 < len(self.stages) else None
        closing: AbstractContextManager[Any] = out_sender if out_sender else nullcontext()
        with receiver, closing:
            try:
                if run.meters[index].workers == 1:
                    await self._drive_serial(run, index, stage, receiver, sink)
                else:
                    await self._drive_parallel(run, index, stage, receiver, sink)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                if not run.failures:
                    raise
                # A neighbour failed and closed its end; its failure is already recorded.

    async def _call(
        self,
        run: _Run,
        index: int,
        phase: str,
        item_text: Callable[[], str | None],
        produce: Callable[[], object],
        emit: Callable[[Any], Awaitable[None]],
    ) -> float:
        """Run one ``process``/``flush`` call, emitting its outputs; returns busy seconds.

        Emission errors (a closed downstream channel) propagate unchanged; errors raised
        by the stage's own code become a recorded ``StageError``.
        """
        name = self.names[index]
        busy = 0.0
        started = time.perf_counter()
        try:
            result = _start_outputs(produce())
        except Exception as exc:
            raise self._fail(run, name, phase, item_text(), exc) from exc
        if result is None:
            raise self._fail(
                run,
                name,
                phase,
                item_text(),
                TypeError(
                    f"{phase}() must be an async generator or a coroutine, got a plain value"
                ),
            )
        if hasattr(result, "__anext__"):
            iterator: AsyncIterator[Any] = result  # type: ignore[assignment]
            try:
                while True:
                    try:
                        out = await iterator.__anext__()
                    except StopAsyncIteration:
                        break
                    except Exception as exc:
                        raise self._fail(run, name, phase, item_text(), exc) from exc
                    busy += time.perf_counter() - started
                    await emit(out)
                    started = time.perf_counter()
            finally:
                aclose = getattr(iterator, "aclose", None)
                if aclose is not None:
                    with anyio.CancelScope(shield=True):
                        await aclose()
            return busy + time.perf_counter() - started
        try:
            outputs = await result  # type: ignore[misc]
        except Exception as exc:
            raise self._fail(run, name, phase, item_text(), exc) from exc
        busy = time.perf_counter() - started
        if outputs is not None:
            for out in outputs:
                await emit(out)
        return busy

    async def _drive_serial(
        self, run: _Run, index: int, stage: Any, receiver: ChannelReceiver[Any], sink: Sink | None
    ) -> None:
        meter = run.meters[index]
        emit = self._emitter(run, index, sink)
        nbytes = self._nbytes
        process = stage.process
        count = 0
        async for item in receiver:
            count += 1
            bytes_in = nbytes(item)
            meter.items_in += 1
            meter.bytes_in += bytes_in
            out_before, bytes_before = meter.items_out, meter.bytes_out
            busy = await self._call(
                run,
                index,
                "process",
                functools.partial(describe_item, item, count),
                functools.partial(process, item),
                emit,
            )
            self._item_done(meter, receiver, busy, bytes_in, out_before, bytes_before)
        await self._flush(run, index, stage, emit)

    def _item_done(
        self,
        meter: _StageMeter,
        receiver: ChannelReceiver[Any],
        busy: float,
        bytes_in: int,
        items_before: int,
        bytes_before: int,
    ) -> None:
        """Account one finished input item (its outputs already emitted)."""
        meter.busy_s += busy
        if self.observer is not None:
            self.observer.on_channel(receiver.statistics())
            self.observer.on_item(
                meter.name,
                busy,
                bytes_in,
                meter.bytes_out - bytes_before,
                meter.items_out - items_before,
            )

    async def _flush(
        self, run: _Run, index: int, stage: Any, emit: Callable[[Any], Awaitable[None]]
    ) -> None:
        flush = getattr(stage, "flush", None)
        if flush is None:
            return
        meter = run.meters[index]
        out_before, bytes_before = meter.items_out, meter.bytes_out
        busy = await self._call(run, index, "flush", lambda: None, flush, emit)
        meter.busy_s += busy
        if self.observer is not None:
            self.observer.on_flush(
                meter.name, busy, meter.bytes_out - bytes_before, meter.items_out - out_before
            )

    async def _drive_parallel(
        self, run: _Run, index: int, stage: Any, receiver: ChannelReceiver[Any], sink: Sink | None
    ) -> None:
        meter = run.meters[index]
        workers = meter.workers
        name = self.names[index]
        emit = self._emitter(run, index, sink)
        nbytes = self._nbytes
        # Slots leave in input order; at most `workers` are in flight, so the stage holds
        # at most `workers` items beyond its input channel.
        order_send: ChannelSender[_Slot]
        order_receive: ChannelReceiver[_Slot]
        order_send, order_receive = open_channel(workers, name=f"{name}.order")
        work_send: ChannelSender[_Slot]
        work_receive: ChannelReceiver[_Slot]
        work_send, work_receive = open_channel(workers, name=f"{name}.work")

        async def dispatch() -> None:
            with order_send, work_send:
                count = 0
                async for item in receiver:
                    count += 1
                    bytes_in = nbytes(item)
                    meter.items_in += 1
                    meter.bytes_in += bytes_in
                    slot = _Slot(item, count, bytes_in)
                    await order_send.send(slot)
                    await work_send.send(slot)

        async def work(slots: ChannelReceiver[_Slot]) -> None:
            with slots:
                async for slot in slots:
                    collected: list[Any] = []
                    slot.busy_s = await self._call(
                        run,
                        index,
                        "process",
                        functools.partial(describe_item, slot.item, slot.index),
                        functools.partial(stage.process, slot.item),
                        functools.partial(_append, collected),
                    )
                    slot.outputs = collected
                    slot.done.set()

        async def reorder() -> None:
            with order_receive:
                async for slot in order_receive:
                    await slot.done.wait()
                    out_before, bytes_before = meter.items_out, meter.bytes_out
                    for out in slot.outputs:
                        await emit(out)
                    self._item_done(
                        meter, receiver, slot.busy_s, slot.bytes_in, out_before, bytes_before
                    )
                    slot.outputs = []
            await self._flush(run, index, stage, emit)

        async with anyio.create_task_group() as group:
            group.start_soon(dispatch)
            with work_receive:
                for _ in range(workers):
                    group.start_soon(work, work_receive.clone(), name=f"{name}-worker")
            group.start_soon(reorder)


async def _append(outputs: list[Any], out: Any) -> None:
    outputs.append(out)


def _add_note(exc: BaseException, note: str) -> None:
    add_note = getattr(exc, "add_note", None)
    if add_note is not None:
        add_note(note)
