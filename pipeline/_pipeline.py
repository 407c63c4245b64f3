"""The pipeline runtime: stages joined by bounded channels in one task group.

``Pipeline.run(source)`` enters every stage's resources through one
``contextlib.AsyncExitStack``, starts one task for the source and one per stage (a stage
with k > 1 workers gets k + 2: a dispatcher, k workers and a reorderer) inside a single
anyio task group, and returns a frozen ``RunReport``. Memory is bounded by construction:
a stage with k workers holds at most k items taken from its input channel, so between
the source and the sink at most ``depth`` items per channel plus ``workers`` per stage
are alive. On the first error every task is cancelled, every entered stage is exited
(shielded, in reverse order, each exit bounded by ``close_timeout_s``), and one
``StageError`` names the stage, the phase and the item, with the original exception as
its cause.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Sequence,
)
from contextlib import (
    AbstractAsyncContextManager,
    AbstractContextManager,
    AsyncExitStack,
    nullcontext,
)
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol

import anyio

from weightpipe.pipeline._channel import (
    ChannelReceiver,
    ChannelSender,
    ChannelStatistics,
    _Wait,
    check_depth,
    open_channel,
)
from weightpipe.pipeline._errors import WeightpipeError, leaf_exceptions
from weightpipe.pipeline._iter import as_async_iter
from weightpipe.pipeline._stage import describe_item, item_nbytes, stage_lifespan, stage_name

__all__ = [
    "DEFAULT_CLOSE_TIMEOUT_S",
    "Pipeline",
    "PipelineObserver",
    "RunReport",
    "SpanObserver",
    "StageError",
    "StageReport",
]

SOURCE = "source"
SINK = "sink"

DEFAULT_CLOSE_TIMEOUT_S = 60.0
"""How long one stage's exit (``close`` or the end of ``lifespan``) may take by default."""


class StageError(WeightpipeError, RuntimeError):
    """A stage failed; the one exception a failed run raises.

    Attributes:
        stage: the stage's name (``"source"`` for the source iterator).
        phase: ``"open"``, ``"process"``, ``"flush"``, ``"close"``, ``"source"`` or
            ``"sink"`` (the ``sink`` callable given to ``run``, reported as stage "sink").
            ``open`` and ``close`` are the two halves of the stage's ``lifespan``.
        item: a description of the item being processed, or ``None``.
    The original exception is ``__cause__`` (a ``TimeoutError`` for a close that
    overran ``close_timeout_s``).
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
        name: the stage's name in this pipeline (numbered ``name-2``... for repeats).
        workers: concurrent ``process`` calls allowed.
        items_in / items_out: items received and emitted.
        bytes_in / bytes_out: their ``nbytes`` (items that carry that attribute).
        busy_s: seconds inside ``process``/``flush``, summed over workers (excluding
            time spent waiting for room downstream).
        blocked_s: seconds waiting for room in the output channel (backpressure),
            including a wait in progress. Always 0 for the last stage: its outputs go
            to the sink, whose time is ``RunReport.sink_s``.
        starved_s: seconds waiting for an input item, including a wait in progress.
        written_bytes: bytes the stage wrote into buffers it filled during the run, from
            its ``written_bytes`` counter (0 for a stage without one). Unlike
            ``bytes_out`` it does not count items passed on unchanged.
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
    written_bytes: int = 0


@dataclass(frozen=True)
class RunReport:
    """A run's statistics: one ``StageReport`` per stage, one snapshot per channel.

    ``channels[i]`` feeds ``stages[i]`` (``channels[0]`` carries the source's items).

    Attributes:
        sink_s: seconds spent in the ``sink`` callable given to ``run`` (0 without
            one), including a call in progress.
        ended: ``False`` in a live snapshot (``Pipeline.statistics()``), ``True`` in
            the report of a finished run, whose figures no longer change.
    """

    stages: tuple[StageReport, ...]
    channels: tuple[ChannelStatistics, ...]
    wall_s: float
    source_items: int
    depth: int
    sink_s: float = 0.0
    ended: bool = True

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
        """A plain-text table of the report; the sink gets its own line."""
        lines = [
            f"{'stage':<14}{'items in':>10}{'items out':>10}{'MB in':>10}{'MB written':>11}"
            f"{'busy s':>9}{'blocked s':>11}{'starved s':>11}{'peak/depth':>12}"
        ]
        for stage, channel in zip(self.stages, self.channels, strict=True):
            lines.append(
                f"{stage.name:<14}{stage.items_in:>10}{stage.items_out:>10}"
                f"{stage.bytes_in / 1e6:>10.1f}{stage.written_bytes / 1e6:>11.1f}"
                f"{stage.busy_s:>9.3f}{stage.blocked_s:>11.3f}"
                f"{stage.starved_s:>11.3f}{f'{channel.peak}/{channel.capacity}':>12}"
            )
        slowest = self.bottleneck()
        # The sink runs on the last stage's task, one call at a time: it is the
        # bottleneck when it took longer than the busiest stage's worker did.
        bottleneck = SINK if self.sink_s > slowest.busy_s / slowest.workers else slowest.name
        lines.append(f"{SINK:<14}{'':>10}{'':>10}{'':>10}{'':>11}{self.sink_s:>9.3f}")
        lines.append(f"wall {self.wall_s:.3f} s, bottleneck: {bottleneck}")
        return "\n".join(lines)


class PipelineObserver(Protocol):
    """Receives live events from a run (``weightpipe.pipeline.metrics`` implements it).

    Calls happen on the event loop and must be cheap and non-blocking. An observer that
    also has ``on_span`` (``SpanObserver``) is told each output's span as well.
    """

    def on_run_start(self, statistics: Callable[[], RunReport]) -> None:
        """A run started. ``statistics()`` is a snapshot of it, ongoing waits included.

        It may be called from any thread (a metrics scrape) at any time, also after the
        run ended; once its ``ended`` is ``True`` its figures are final and equal the
        report passed to ``on_run_end``.
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


class SpanObserver(PipelineObserver, Protocol):
    """An observer that is also told when each output item was worked on (a trace draws
    these spans: ``weightpipe.pipeline.trace``). The pipeline looks for ``on_span`` on
    its observer, so a plain ``PipelineObserver`` pays nothing for it."""

    def on_span(
        self,
        stage: str,
        worker: int,
        start_s: float,
        end_s: float,
        item: str,
        bytes_out: int,
    ) -> None:
        """Worker ``worker`` (0 to ``workers - 1``) of ``stage`` produced one output item.

        ``item`` is its description (``describe_item``), ``bytes_out`` its ``nbytes``.
        ``start_s`` and ``end_s`` are ``time.perf_counter()`` seconds: the span runs from
        the start of the call that produced it (``process`` or ``flush``), or from the
        moment the worker's previous output was handed downstream if that was later in
        the same call, to the moment the output was produced (before it was handed on,
        so waiting for room downstream is in no span). A one-worker stage that gathers
        several inputs into one output (a call that yields nothing) carries its span
        over into the next call, so that span also holds the waits for those inputs.
        One worker's spans never overlap.
        """


@dataclass
class _StageMeter:
    name: str
    workers: int
    items_in: int = 0
    items_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    busy_s: float = 0.0


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

SpanCallback = Callable[[str, int, float, float, str, int], None]


class _Spans:
    """One worker's span clock: when its work toward the next output began.

    ``carry``: a call that produced nothing leaves its start for the next call's output
    (a one-worker stage may gather inputs); otherwise, and after any call that produced
    something, each call starts afresh.
    """

    __slots__ = ("_carry", "_nbytes", "_on_span", "_produced", "_since", "_stage", "_worker")

    def __init__(
        self,
        on_span: SpanCallback,
        stage: str,
        worker: int,
        nbytes: Callable[[Any], int],
        *,
        carry: bool,
    ) -> None:
        self._on_span = on_span
        self._stage = stage
        self._worker = worker
        self._nbytes = nbytes
        self._carry = carry
        self._since: float | None = None
        self._produced = False

    def begin(self, now: float) -> None:
        """A ``process``/``flush`` call starts."""
        if self._since is None or not self._carry:
            self._since = now
        self._produced = False

    def produced(self, now: float, out: Any) -> None:
        """The call produced ``out`` (before it is handed downstream)."""
        since = now if self._since is None else self._since
        self._on_span(self._stage, self._worker, since, now, describe_item(out), self._nbytes(out))
        self._since = now
        self._produced = True

    def resumed(self, now: float) -> None:
        """The last output was handed downstream; work toward the next one starts."""
        self._since = now

    def ended(self) -> None:
        """The call returned: a call that produced something carries nothing over."""
        if self._produced or not self._carry:
            self._since = None


def _span_callback(observer: object) -> SpanCallback | None:
    on_span = getattr(observer, "on_span", None)
    return on_span if callable(on_span) else None


def _no_counter() -> int:
    return 0


def _written_counter(stage: object) -> Callable[[], int]:
    """A reader of the stage's optional ``written_bytes`` counter (an int attribute)."""

    def read() -> int:
        value = getattr(stage, "written_bytes", 0)
        return value if isinstance(value, int) and not isinstance(value, bool) else 0

    return read


class _Run:
    """State of one run; lives only inside ``Pipeline.run`` (and observers' snapshots)."""

    def __init__(
        self,
        names: Sequence[str],
        workers: Sequence[int],
        depth: int,
        written: Sequence[Callable[[], int]] = (),
    ) -> None:
        self.started = time.perf_counter()
        self.depth = depth
        # Each stage's written_bytes counter, read live; the report shows the run's share.
        self.written = list(written) or [_no_counter] * len(names)
        self.written_start = [read() for read in self.written]
        self.meters = [_StageMeter(n, w) for n, w in zip(names, workers, strict=True)]
        self.channels: list[tuple[ChannelSender[Any], ChannelReceiver[Any]]] = []
        upstream = [SOURCE, *names]
        for i, name in enumerate(names):
            self.channels.append(open_channel(depth, name=f"{upstream[i]}->{name}"))
        self.source_items = 0
        self.sink_wait = _Wait()
        self.failures: list[StageError] = []
        self.close_errors: list[StageError] = []
        self.final: RunReport | None = None

    def close_channels(self) -> None:
        # Tasks close their own ends; this catches the ones never started (a failed open).
        for send, receive in self.channels:
            send.close()
            receive.close()

    def statistics(self) -> RunReport:
        """A snapshot; reads only, so an observer may call it from another thread."""
        final = self.final
        if final is not None:
            return final
        return self._report(time.perf_counter() - self.started, ended=False)

    def finish(self) -> RunReport:
        self.final = self._report(time.perf_counter() - self.started, ended=True)
        return self.final

    def _report(self, wall_s: float, *, ended: bool) -> RunReport:
        channels = tuple(send.statistics() for send, _ in self.channels)
        # A stage's backpressure is its output channel's send wait; the last stage has
        # no output channel (its outputs go to the sink, reported as sink_s).
        blocked = [c.send_blocked_s for c in channels[1:]] + [0.0]
        stages = tuple(
            StageReport(
                name=meter.name,
                workers=meter.workers,
                items_in=meter.items_in,
                items_out=meter.items_out,
                bytes_in=meter.bytes_in,
                bytes_out=meter.bytes_out,
                busy_s=meter.busy_s,
                blocked_s=blocked[i],
                starved_s=channels[i].receive_starved_s,
                written_bytes=self.written[i]() - self.written_start[i],
            )
            for i, meter in enumerate(self.meters)
        )
        return RunReport(
            stages=stages,
            channels=channels,
            wall_s=wall_s,
            source_items=self.source_items,
            depth=self.depth,
            sink_s=self.sink_wait.seconds(),
            ended=ended,
        )


class _Lifespan:
    """One stage's resources on the run's exit stack: entered once, exited once.

    Entering maps a failure to ``StageError(phase="open")``. Exiting is shielded from
    cancellation and bounded by the close deadline; its failures (and an overrun) are
    recorded as ``StageError(phase="close")`` on the run instead of raised, so they never
    replace the run's own error and every other stage still gets closed.
    """

    def __init__(self, run: _Run, name: str, stage: object, close_timeout_s: float) -> None:
        self._run = run
        self._name = name
        self._stage = stage
        self._close_timeout_s = close_timeout_s
        self._manager: AbstractAsyncContextManager[Any] | None = None

    async def __aenter__(self) -> None:
        try:
            manager = stage_lifespan(self._stage)
            await manager.__aenter__()
        except Exception as exc:
            raise StageError(self._name, "open", None, exc) from exc
        self._manager = manager

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        manager = self._manager
        if manager is None:  # pragma: no cover - the stack exits only what it entered
            return False
        self._manager = None
        with anyio.CancelScope(shield=True) as scope:
            scope.deadline = anyio.current_time() + self._close_timeout_s
            try:
                # The stage's manager sees the run's exception, as any context manager
                # would; whether it claims to suppress it is ignored: a stage can't
                # swallow a run's failure or cancellation.
                await manager.__aexit__(exc_type, exc, tb)
            except Exception as close_exc:
                if close_exc is not exc:
                    self._run.close_errors.append(StageError(self._name, "close", None, close_exc))
        if scope.cancelled_caught:
            overrun = TimeoutError(f"close did not finish within {self._close_timeout_s} s")
            self._run.close_errors.append(StageError(self._name, "close", None, overrun))
        return False


def _start_outputs(result: object) -> AsyncIterator[Any] | Awaitable[Any] | None:
    if hasattr(result, "__anext__") or hasattr(result, "__await__"):
        return result  # type: ignore[return-value]
    return None


def _unique_names(stages: Sequence[Any]) -> list[str]:
    """Each stage's name, repeats numbered in order: ``load``, ``load-2``, ``load-3``."""
    names: list[str] = []
    for position, stage in enumerate(stages):
        base = stage_name(stage)
        if base in (SOURCE, SINK):
            raise ValueError(f"stage {position}: the name {base!r} is reserved")
        name, number = base, 1
        while name in names:
            number += 1
            name = f"{base}-{number}"
        names.append(name)
    return names


def _check_timeout(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"{what} must be a number of seconds > 0, got {value!r}")
    return float(value)


class Pipeline:
    """Stages joined by bounded channels of ``depth`` items.

    Example::

        report = await Pipeline([Parse(), Enrich(workers=4), Store(name="store")],
                                depth=2).run(lines)

    ``depth`` bounds memory: a stage with k workers holds at most k items taken from its
    input channel, so at most ``depth`` items wait in front of each stage and
    ``sum(workers)`` are in hand. A larger depth only absorbs jitter in per-item costs.

    Stages may share a name (two stages of the same class, say): the later ones are
    named ``name-2``, ``name-3``, ... in order, in ``names``, reports, errors and metrics.

    ``close_timeout_s`` bounds each stage's exit (``close()`` or the end of its
    ``lifespan``), which runs shielded from cancellation: a close still running after
    that long is cancelled and reported as ``StageError(phase="close")`` caused by a
    ``TimeoutError``, so a hung close cannot hold the caller's cancellation forever. A
    stage may set its own ``close_timeout_s`` attribute (a close that must outlast a
    long deadline of its own); ``math.inf`` disables the bound. A close blocked in a
    thread that cannot be cancelled still holds the run until that thread returns.

    Raises:
        ValueError: no stages, ``depth`` < 1, a stage without ``process``, a stage named
            ``source`` or ``sink``, ``workers`` < 1, or a ``close_timeout_s`` <= 0.
    """

    def __init__(
        self,
        stages: Sequence[Any],
        depth: int = 2,
        *,
        observer: PipelineObserver | None = None,
        nbytes: Callable[[Any], int] = item_nbytes,
        close_timeout_s: float = DEFAULT_CLOSE_TIMEOUT_S,
    ) -> None:
        if not stages:
            raise ValueError("a pipeline needs at least one stage")
        check_depth(depth, "pipeline")
        names = _unique_names(stages)
        close_timeouts: list[float] = []
        default_close = _check_timeout(close_timeout_s, "close_timeout_s")
        for position, (stage, name) in enumerate(zip(stages, names, strict=True)):
            if not callable(getattr(stage, "process", None)):
                raise ValueError(f"stage {position} ({name!r}) has no process() method")
            workers = getattr(stage, "workers", 1)
            if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
                raise ValueError(
                    f"stage {name!r}: workers must be an integer >= 1, got {workers!r}"
                )
            own = getattr(stage, "close_timeout_s", None)
            close_timeouts.append(
                default_close
                if own is None
                else _check_timeout(own, f"stage {name!r}: close_timeout_s")
            )
        self.stages: tuple[Any, ...] = tuple(stages)
        self.names: tuple[str, ...] = tuple(names)
        self.depth = depth
        self.observer = observer
        self.close_timeout_s = default_close
        self._close_timeouts = tuple(close_timeouts)
        self._nbytes = nbytes
        self._run: _Run | None = None

    def statistics(self) -> RunReport | None:
        """A live snapshot of the run in progress, or ``None`` between runs."""
        run = self._run
        return None if run is None else run.statistics()

    async def run(
        self, source: Iterable[Any] | AsyncIterable[Any], *, sink: Sink | None = None
    ) -> RunReport:
        """Stream ``source`` through every stage and return the run's report.

        ``source`` is anything ``as_async_iter`` accepts. The last stage's outputs go to
        ``sink`` (an async callable) if given, else are dropped after being counted.
        Cancellation (an outer cancel scope) stops every task and exits every entered
        stage, as a failure does, and propagates unchanged; so do ``KeyboardInterrupt``
        and ``SystemExit`` raised anywhere in the run.

        Raises:
            StageError: a stage (or the source, or the sink) failed, or a stage's close
                failed or overran ``close_timeout_s``; names the stage, phase and item.
            RuntimeError: the pipeline is already running.
        """
        if self._run is not None:
            raise RuntimeError("this pipeline is already running; build one per concurrent run")
        run = self._run = _Run(
            self.names,
            [getattr(s, "workers", 1) for s in self.stages],
            self.depth,
            [_written_counter(s) for s in self.stages],
        )
        observer = self.observer
        if observer is not None:
            observer.on_run_start(run.statistics)
        error: BaseException | None = None
        try:
            async with AsyncExitStack() as stack:
                for index, stage in enumerate(self.stages):
                    await stack.enter_async_context(
                        _Lifespan(run, self.names[index], stage, self._close_timeouts[index])
                    )
                async with anyio.create_task_group() as group:
                    group.start_soon(self._pump, run, source)
                    for index in range(len(self.stages)):
                        group.start_soon(self._drive, run, index, sink)
        except BaseException as exc:
            error = exc
        finally:
            run.close_channels()
            report = run.finish()
            self._run = None
        close_errors = run.close_errors
        if error is not None:
            root = self._root_failure(run, error)
            if observer is not None and isinstance(root, StageError):
                observer.on_error(root.stage, type(root.__cause__).__name__)
            if observer is not None:
                observer.on_run_end(report)
            raised = error if root is None else root
            # A close that failed or overran while the run was failing or being cancelled
            # is not the story, but it must not vanish either.
            for extra in close_errors:
                _add_note(raised, f"also, while closing: {extra}")
            raise raised
        if observer is not None:
            if close_errors:
                observer.on_error(close_errors[0].stage, type(close_errors[0].__cause__).__name__)
            observer.on_run_end(report)
        if close_errors:
            for extra in close_errors[1:]:
                _add_note(close_errors[0], f"also, while closing: {extra}")
            raise close_errors[0]
        return report

    @staticmethod
    def _root_failure(run: _Run, error: BaseException) -> BaseException | None:
        """The one exception to raise for ``error``, or ``None`` to raise it unchanged."""
        leaves = leaf_exceptions(error)
        for leaf in leaves:
            # A KeyboardInterrupt or SystemExit stays itself, even beside a stage's
            # failure in the same group: the caller's `except KeyboardInterrupt` must see it.
            if isinstance(leaf, KeyboardInterrupt | SystemExit):
                if run.failures:
                    _add_note(leaf, f"while the run was failing: {run.failures[0]}")
                return leaf
        if isinstance(error, StageError):
            return error
        grouped = len(leaves) != 1 or leaves[0] is not error
        if run.failures and grouped:
            # The first failure is the cause; later ones (a closed channel seen by a
            # neighbour) are its consequences.
            return run.failures[0]
        return None

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
                    # Not kept while the source makes the next one: memory is bounded by
                    # what the channels and stages hold, not by the pump's locals.
                    del item
            finally:
                with anyio.CancelScope(shield=True):
                    await items.aclose()

    def _emitter(
        self, run: _Run, index: int, sink: Sink | None
    ) -> Callable[[Any], Awaitable[None]]:
        meter = run.meters[index]
        nbytes = self._nbytes
        if index + 1 < len(self.stages):
            send = run.channels[index + 1][0].send

            async def emit(out: Any) -> None:
                meter.items_out += 1
                meter.bytes_out += nbytes(out)
                await send(out)

            return emit

        sink_wait = run.sink_wait

        async def emit_last(out: Any) -> None:
            meter.items_out += 1
            meter.bytes_out += nbytes(out)
            if sink is not None:
                started = sink_wait.begin()
                try:
                    await sink(out)
                except Exception as exc:
                    raise self._fail(run, SINK, "sink", describe_item(out), exc) from exc
                finally:
                    sink_wait.end(started)

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
        spans: _Spans | None = None,
    ) -> float:
        """Run one ``process``/``flush`` call, emitting its outputs; returns busy seconds.

        Emission errors (a closed downstream channel) propagate unchanged; errors raised
        by the stage's own code become a recorded ``StageError``. ``spans`` (when the
        observer takes spans) is told when the call began and each output was produced.
        """
        name = self.names[index]
        busy = 0.0
        started = time.perf_counter()
        if spans is not None:
            spans.begin(started)
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
            exhausted = False
            try:
                while True:
                    try:
                        out = await iterator.__anext__()
                    except StopAsyncIteration:
                        exhausted = True
                        break
                    except Exception as exc:
                        raise self._fail(run, name, phase, item_text(), exc) from exc
                    produced = time.perf_counter()
                    busy += produced - started
                    if spans is not None:
                        spans.produced(produced, out)
                    await emit(out)
                    del out  # released while the stage makes its next output
                    started = time.perf_counter()
                    if spans is not None:
                        spans.resumed(started)
            finally:
                # An async generator that ran to its end is finalised already: closing it
                # again costs a shielded scope per item for nothing (the hot path).
                aclose = getattr(iterator, "aclose", None)
                if aclose is not None and not (exhausted and inspect.isasyncgen(iterator)):
                    with anyio.CancelScope(shield=True):
                        await aclose()
            if spans is not None:
                spans.ended()
            return busy + time.perf_counter() - started
        try:
            outputs = await result  # type: ignore[misc]
        except Exception as exc:
            raise self._fail(run, name, phase, item_text(), exc) from exc
        produced = time.perf_counter()
        busy = produced - started
        if outputs is not None:
            if spans is not None:
                outputs = list(outputs)
                for out in outputs:
                    spans.produced(produced, out)
            for out in outputs:
                await emit(out)
        if spans is not None:
            spans.ended()
        return busy

    async def _drive_serial(
        self, run: _Run, index: int, stage: Any, receiver: ChannelReceiver[Any], sink: Sink | None
    ) -> None:
        # One worker: the stage holds at most 1 item taken from its input channel (the one
        # it is processing, or whose outputs it is emitting).
        meter = run.meters[index]
        emit = self._emitter(run, index, sink)
        nbytes = self._nbytes
        process = stage.process
        on_span = _span_callback(self.observer)
        spans = None if on_span is None else _Spans(on_span, meter.name, 0, nbytes, carry=True)
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
                spans,
            )
            del item  # not held while waiting for the next one
            self._item_done(meter, receiver, busy, bytes_in, out_before, bytes_before)
        await self._flush(run, index, stage, emit, spans)

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
        self,
        run: _Run,
        index: int,
        stage: Any,
        emit: Callable[[Any], Awaitable[None]],
        spans: _Spans | None,
    ) -> None:
        flush = getattr(stage, "flush", None)
        if flush is None:
            return
        if run.failures:
            # The input ended because a stage upstream (or the source) failed and closed
            # its channel, not because it was done: a flush would emit a "last" item of a
            # stream that is not complete. The group's cancellation may not have reached
            # this task yet, so this is checked rather than left to the next checkpoint.
            return
        meter = run.meters[index]
        out_before, bytes_before = meter.items_out, meter.bytes_out
        busy = await self._call(run, index, "flush", lambda: None, flush, emit, spans)
        meter.busy_s += busy
        if self.observer is not None:
            self.observer.on_flush(
                meter.name, busy, meter.bytes_out - bytes_before, meter.items_out - out_before
            )

    async def _drive_parallel(
        self, run: _Run, index: int, stage: Any, receiver: ChannelReceiver[Any], sink: Sink | None
    ) -> None:
        """Run ``workers`` concurrent ``process`` calls, emitting outputs in input order.

        The bound, enforced by ``window``: a stage with k workers holds at most k items
        taken from its input channel, counting each item from the moment the dispatcher
        takes it until its last output has been emitted downstream. The dispatcher takes
        an item only after a place in the window is free, and the reorderer frees the
        place only after emitting that item's outputs, so an item waiting for a place
        stays in the input channel, where ``depth`` already counts it.

        Outputs do not stream here: each call's outputs (all that an async-generator
        ``process`` yields) are collected in a list and emitted, in input order, once the
        call has returned and every earlier item has been emitted. A stage whose single
        call yields many large outputs should run with one worker, where they stream.
        """
        meter = run.meters[index]
        workers = meter.workers
        name = self.names[index]
        emit = self._emitter(run, index, sink)
        nbytes = self._nbytes
        on_span = _span_callback(self.observer)
        window = anyio.Semaphore(workers)
        # Both channels hold only slots inside the window, so neither send ever waits.
        order_send: ChannelSender[_Slot]
        order_receive: ChannelReceiver[_Slot]
        order_send, order_receive = open_channel(workers, name=f"{name}.order")
        work_send: ChannelSender[_Slot]
        work_receive: ChannelReceiver[_Slot]
        work_send, work_receive = open_channel(workers, name=f"{name}.work")

        async def dispatch() -> None:
            with order_send, work_send:
                count = 0
                while True:
                    try:
                        window.acquire_nowait()
                    except anyio.WouldBlock:
                        await window.acquire()
                    try:
                        item = await receiver.receive()
                    except anyio.EndOfStream:
                        window.release()
                        return
                    count += 1
                    bytes_in = nbytes(item)
                    meter.items_in += 1
                    meter.bytes_in += bytes_in
                    slot = _Slot(item, count, bytes_in)
                    del item
                    await order_send.send(slot)
                    await work_send.send(slot)
                    del slot

        async def work(slots: ChannelReceiver[_Slot], worker: int) -> None:
            spans = None if on_span is None else _Spans(on_span, name, worker, nbytes, carry=False)
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
                        spans,
                    )
                    # The input is not needed once processed; its outputs wait in the slot.
                    slot.item = None
                    slot.outputs = collected
                    slot.done.set()
                    del slot, collected

        async def reorder() -> None:
            with order_receive:
                async for slot in order_receive:
                    await slot.done.wait()
                    out_before, bytes_before = meter.items_out, meter.bytes_out
                    outputs, slot.outputs = slot.outputs, []
                    for out in outputs:
                        await emit(out)
                    del outputs
                    self._item_done(
                        meter, receiver, slot.busy_s, slot.bytes_in, out_before, bytes_before
                    )
                    del slot
                    window.release()
            # Every worker is done by now: the flush's outputs count as worker 0's.
            spans = None if on_span is None else _Spans(on_span, name, 0, nbytes, carry=False)
            await self._flush(run, index, stage, emit, spans)

        async with anyio.create_task_group() as group:
            group.start_soon(dispatch)
            with work_receive:
                for worker in range(workers):
                    group.start_soon(work, work_receive.clone(), worker, name=f"{name}-worker")
            group.start_soon(reorder)


async def _append(outputs: list[Any], out: Any) -> None:
    outputs.append(out)


def _add_note(exc: BaseException, note: str) -> None:
    add_note = getattr(exc, "add_note", None)
    if add_note is not None:
        add_note(note)
