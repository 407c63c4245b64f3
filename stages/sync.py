"""One weight sync: a pipeline run in a sync mode, ending in the Load stage, and its report.

``sync_weights`` is the call a trainer makes every few steps: the pre-load stages it
built (typically Fetch and Fp8Quantize) followed by ``Load(engine)`` run as one pipeline
over the source, and the result is a frozen ``SyncReport`` with what moved, how long the
sync and its hard pause took, and, when the engine can measure it (the local engine),
how fast generation went meanwhile. A sync either commits the new version or raises the
pipeline's ``StageError`` with the engine still serving its old version and generating.
It knows the other stages and the engine only through two small protocols: a stage that
is ``SyncAware`` (Fetch) is told the version before the run, and an engine that
``MeasuresGeneration`` is asked for a generation window. With ``trace=PATH`` the sync's
timeline is written there as a Chrome/Perfetto trace (``stages/trace.py``), whether the
sync commits or fails.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import AsyncGenerator, AsyncIterable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import anyio
import anyio.to_thread

from weightpipe.pipeline import Pipeline, PipelineObserver, RunReport, StageError, as_async_iter
from weightpipe.stages.engines.base import (
    ChecksLaunchSettings,
    Engine,
    ExpectsFp8Block,
    MeasuresGeneration,
    PauseMode,
    SyncMode,
    SyncSettings,
    WritesWireBuffer,
    engine_name,
    wire_spec_of,
)
from weightpipe.stages.load import Load, LoadReport, OnPartialFailure
from weightpipe.stages.quantize import Fp8Quantize
from weightpipe.stages.trace import SyncTrace

__all__ = ["GenerationMeasurement", "SyncAware", "SyncReport", "sync_weights"]

logger = logging.getLogger(__name__)


@runtime_checkable
class SyncAware(Protocol):
    """A stage that must know the version of the sync it is about to run (Fetch stamps it
    on every bucket). ``sync_weights`` calls ``start_sync(version)`` on each such stage
    before the pipeline opens; the version is the one argument the caller gave."""

    def start_sync(self, version: int) -> None: ...


@runtime_checkable
class GenerationMeasurement(Protocol):
    """What a generation window's ``close()`` reports, as far as a ``SyncReport`` reads it
    (the local engine's ``GenerationStats`` is one; see its fields' documentation)."""

    @property
    def elapsed_s(self) -> float: ...
    @property
    def tokens(self) -> int: ...
    @property
    def tokens_per_s(self) -> float: ...
    @property
    def longest_gap_s(self) -> float: ...
    @property
    def median_step_s(self) -> float: ...
    @property
    def paused_s(self) -> float: ...
    @property
    def weight_write_s(self) -> float: ...
    @property
    def swap_s(self) -> float: ...
    @property
    def mixed_steps(self) -> int | None: ...


@dataclass(frozen=True)
class SyncReport:
    """What one committed sync did.

    Attributes:
        version: the version now served.
        mode / pause_mode: how the sync ran.
        engine: the engine's name.
        run: the pipeline's report (per-stage busy/blocked/starved time, channels).
        load: the Load stage's report (buckets, tensors, bytes, hard pause).
        bytes: bytes loaded into the engine.
        seconds: wall time of the whole sync.
        hard_pause_s: time generation was paused by the sync.
        generation: generation statistics during the sync, from an engine that
            ``MeasuresGeneration`` (the local engine); ``None`` from any other.
        tokens_per_s_during_sync: ``generation.tokens_per_s`` when measured.
        longest_gap_s: ``generation.longest_gap_s`` when measured.
        trace_path: where the sync's trace was written (``sync_weights(trace=...)``);
            ``None`` when none was asked for, or when writing it failed.
        trace_error: why the trace could not be written (the sync itself committed).
    """

    version: int
    mode: SyncMode
    pause_mode: PauseMode
    engine: str
    run: RunReport
    load: LoadReport
    bytes: int
    seconds: float
    hard_pause_s: float
    generation: GenerationMeasurement | None = None
    trace_path: Path | None = None
    trace_error: str | None = None

    @property
    def tokens_per_s_during_sync(self) -> float | None:
        return None if self.generation is None else self.generation.tokens_per_s

    @property
    def longest_gap_s(self) -> float | None:
        return None if self.generation is None else self.generation.longest_gap_s

    @property
    def swap_s(self) -> float | None:
        """The longest switch between two decode steps at commit (``generation.swap_s``)."""
        return None if self.generation is None else self.generation.swap_s

    @property
    def mixed_steps(self) -> int | None:
        """Decode steps that read two weight versions (``None``: not recorded)."""
        return None if self.generation is None else self.generation.mixed_steps

    def format(self) -> str:
        """A short plain-text summary followed by the pipeline's table."""
        line = (
            f"v{self.version} on {self.engine!r} ({self.mode}, pause {self.pause_mode}): "
            f"{self.load.buckets} buckets, {self.bytes / 1e6:.1f} MB in {self.seconds:.3f} s, "
            f"hard pause {self.hard_pause_s * 1e3:.1f} ms"
        )
        if self.generation is not None:
            line += (
                f", {self.generation.tokens_per_s:.0f} tokens/s during the sync, "
                f"longest gap {self.generation.longest_gap_s * 1e3:.1f} ms"
            )
        return line + "\n" + self.run.format()


async def sync_weights(
    source: Iterable[Any] | AsyncIterable[Any],
    engine: Engine,
    *,
    version: int,
    stages: Sequence[Any] = (),
    depth: int = 2,
    mode: SyncMode = "prefetch",
    pause_mode: PauseMode = "retract",
    timeout_s: float | None = None,
    prefetch_bytes: int | None = 0,
    observer: PipelineObserver | None = None,
    on_partial_failure: OnPartialFailure = "keep_paused",
    trace: str | os.PathLike[str] | None = None,
    source_timeout_s: float | None = None,
) -> SyncReport:
    """Install ``version`` from ``source`` into ``engine``: ``stages`` then ``Load``.

    ``source`` is what the first stage takes (``(name, tensor)`` pairs for Fetch, or
    ready ``WeightBucket``s when ``stages`` is empty); any form ``as_async_iter`` accepts.
    Each ``SyncAware`` stage (Fetch) is told ``version`` first, so its buckets carry it;
    Load checks that every bucket does. ``timeout_s`` is the deadline of each engine call
    (``None``: the engine's ``default_timeout_s``, see ``Load``); ``prefetch_bytes`` is
    Load's look-ahead in ``prefetch`` mode (0: pause at the first bucket; ``None``: fetch
    and quantize the whole sync before pausing). When the engine ``MeasuresGeneration``,
    a window is open for the whole sync and its statistics are in the report. When the
    engine sends flat buffers (``TakesFlatBuckets``, SGLang), the last stage before Load
    that can (``WritesWireBuffer``: Fp8Quantize, or Fetch alone) is told the engine's
    ``WireSpec`` and writes its output straight into such a buffer, so the bytes are
    written once; the other stages are told ``None``. ``on_partial_failure`` is Load's
    policy for a sync that fails after an engine that cannot roll back took a bucket.

    ``source_timeout_s`` is the source's deadline: the longest it may take to yield its
    next item (``None``: the engine-call deadline, ``timeout_s`` or the engine's
    ``default_timeout_s``; ``math.inf``: none). A sync source blocked past it (a
    generator waiting on a peer that never comes) fails the sync with a ``TimeoutError``
    naming the source and the deadline; its thread is left to finish ``next()`` and then
    closes the source. A list or tuple, which cannot block, is not timed. When the engine
    ``ChecksLaunchSettings`` (the SGLang adapters), it is asked, under ``timeout_s``
    and before the pipeline opens, whether this sync fits what it was launched with.

    ``trace`` is a file to write the sync's timeline to, as Chrome trace-event JSON
    (open it in Perfetto or chrome://tracing; see ``docs/trace.md``): one track per stage
    worker with a slice per bucket, the engine's calls and the hard pause, and, on an
    engine that takes ``GenerationListener``s (the local engine), every decode step. The
    pipeline's observer is then a recorder that passes every event on to ``observer``.
    The trace is written when the sync ends, committed or failed (a failure appears as
    an ``error`` instant); a trace that cannot be written never replaces the sync's
    outcome: a committed sync's report says why in ``trace_error``, a failed sync's
    error gets a note.

    Raises:
        StageError: a stage, the source or the engine failed (or timed out after
            ``timeout_s`` per engine call, or another sync holds the engine); names the
            stage, phase and bucket, with the original error as its cause. The engine
            then reports its old version. Generation is resumed, unless the engine took
            part of the sync and cannot roll back: it is then dirty (the error's
            ``engine_dirty`` is True and its message says so) and, under
            ``keep_paused``, stays paused until a full sync commits.
        ValueError: an unknown mode, a bad ``depth``, ``timeout_s``, ``source_timeout_s``,
            ``prefetch_bytes`` or version, or a block FP8 stage whose block is not the
            engine's (``ExpectsFp8Block``; checked before the engine is touched). Repeated
            stage names are numbered (``load``, ``load-2``).
        EngineError: the engine's launch settings say the sync cannot fit
            (``ChecksLaunchSettings``: an SGLang server of another ``tp_size``, or one
            quantized without FP8 for an FP8 sync); raised before the engine is touched.
    """
    _check_fp8_block(stages, engine)
    for stage in stages:
        if isinstance(stage, SyncAware):
            stage.start_sync(version)
    writers = [stage for stage in stages if isinstance(stage, WritesWireBuffer)]
    if writers:
        spec = wire_spec_of(engine)
        last = stages[-1] if stages else None
        for stage in writers:
            stage.use_wire(spec if stage is last else None)
    load = Load(
        engine,
        mode=mode,
        pause_mode=pause_mode,
        timeout_s=timeout_s,
        version=version,
        prefetch_bytes=prefetch_bytes,
        on_partial_failure=on_partial_failure,
    )
    source_deadline_s = _source_deadline(source_timeout_s, load.timeout_s)
    await _check_launch_settings(stages, engine, load.timeout_s)
    timeline = (
        None if trace is None else SyncTrace(version=version, engine=engine, observer=observer)
    )
    pipeline = Pipeline(
        [*stages, load], depth, observer=observer if timeline is None else timeline.recorder
    )
    window = engine.open_window() if isinstance(engine, MeasuresGeneration) else None
    started = time.perf_counter()
    try:
        try:
            if timeline is not None:
                timeline.attach()
            run = await pipeline.run(_with_deadline(source, source_deadline_s))
        except StageError as exc:
            # The first failure may come from a stage before Load while the engine already
            # holds part of the sync: the error the caller sees must say so too.
            if load.report.engine_dirty and not getattr(exc, "engine_dirty", False):
                exc.engine_dirty = True  # type: ignore[attr-defined]
                _add_note(
                    exc,
                    f"engine {load.report.engine!r} took part of this sync and cannot roll "
                    "back: "
                    + (
                        "it is left paused and marked dirty until a full sync commits"
                        if on_partial_failure == "keep_paused"
                        else "it is marked dirty and generation was resumed on it"
                    ),
                )
            raise
        finally:
            if timeline is not None:
                timeline.detach()  # first: every step it heard ended before the sync did
            ended = time.perf_counter()
            measured = window.close() if window is not None else None
    except (Exception, anyio.get_cancelled_exc_class()) as exc:
        if timeline is not None and trace is not None:
            written, why = await _write_trace(timeline, trace, load.report, ended, exc)
            _add_note(
                exc,
                f"the sync's trace is in {written}"
                if written is not None
                else f"the sync's trace could not be written to {os.fspath(trace)!r}: {why}",
            )
        raise
    generation = measured if isinstance(measured, GenerationMeasurement) else None
    seconds = ended - started
    report = load.report
    trace_path: Path | None = None
    trace_error: str | None = None
    if timeline is not None and trace is not None:
        trace_path, trace_error = await _write_trace(timeline, trace, report, ended, None)
    return SyncReport(
        version=version,
        mode=mode,
        pause_mode=pause_mode,
        engine=report.engine,
        run=run,
        load=report,
        bytes=report.bytes,
        seconds=seconds,
        hard_pause_s=report.hard_pause_s,
        generation=generation,
        trace_path=trace_path,
        trace_error=trace_error,
    )


async def _write_trace(
    timeline: SyncTrace,
    path: str | os.PathLike[str],
    load: LoadReport,
    end_s: float,
    error: BaseException | None,
) -> tuple[Path | None, str | None]:
    """Write the trace of the sync that ended at ``end_s``, in a worker thread (shielded:
    a cancelled sync's trace is written too); returns the path, or ``None`` and why not.
    Never raises an ``Exception``: the sync's own outcome is what the caller must see."""
    try:
        with anyio.CancelScope(shield=True):
            written = await anyio.to_thread.run_sync(
                lambda: timeline.write(path, load, end_s=end_s, error=error)
            )
    except Exception as exc:
        why = f"{type(exc).__name__}: {exc}"
        logger.warning(
            "the trace of sync v%s could not be written to %r: %s",
            timeline.version,
            os.fspath(path),
            why,
        )
        return None, why
    return written, None


def _add_note(exc: BaseException, note: str) -> None:
    add_note = getattr(exc, "add_note", None)  # Python 3.11+
    if add_note is not None:
        add_note(note)


def _check_fp8_block(stages: Sequence[Any], engine: object) -> None:
    """Refuse a block FP8 stage whose block is not the one the engine reads scales with
    (``ExpectsFp8Block``), before anything is touched."""
    if not isinstance(engine, ExpectsFp8Block):
        return
    expected = tuple(engine.fp8_block_size)
    for stage in stages:
        blocked = isinstance(stage, Fp8Quantize) and stage.method == "block"
        if blocked and tuple(stage.block) != expected:
            raise ValueError(
                f"Fp8Quantize block {list(stage.block)} does not match engine "
                f"{engine_name(engine)!r}, which reads block scales of {list(expected)}: "
                "every scale would be applied to the wrong rows and columns "
                f"(quantize.block={list(expected)}, or launch the engine with that block)"
            )


async def _check_launch_settings(stages: Sequence[Any], engine: object, timeout_s: float) -> None:
    """Ask an engine that ``ChecksLaunchSettings`` whether this sync fits it, before the
    pipeline opens. A check that does not answer within ``timeout_s`` is not a refusal:
    it is logged, and the sync's own calls meet the engine under their deadlines."""
    if not isinstance(engine, ChecksLaunchSettings):
        return
    quantize = next((stage for stage in stages if isinstance(stage, Fp8Quantize)), None)
    settings = SyncSettings(
        fp8_method=None if quantize is None else quantize.method,
        fp8_block=(
            None
            if quantize is None or quantize.method != "block"
            else (int(quantize.block[0]), int(quantize.block[1]))
        ),
    )
    with anyio.move_on_after(timeout_s) as scope:
        await engine.check_launch_settings(settings)
    if scope.cancelled_caught:
        logger.warning(
            "engine %r did not report its launch settings within %s s; the sync is not "
            "checked against them",
            engine_name(engine),
            timeout_s,
        )


def _source_deadline(source_timeout_s: float | None, timeout_s: float) -> float:
    if source_timeout_s is None:
        return timeout_s
    if isinstance(source_timeout_s, bool) or not isinstance(source_timeout_s, (int, float)):
        raise ValueError(f"source_timeout_s must be a number of seconds, got {source_timeout_s!r}")
    if not source_timeout_s > 0:
        raise ValueError(f"source_timeout_s must be > 0, got {source_timeout_s!r}")
    return float(source_timeout_s)


def _source_name(source: object) -> str:
    name = getattr(source, "__qualname__", None)
    kind = type(source).__name__
    return f"{kind} {name!r}" if isinstance(name, str) and name else kind


def _with_deadline(
    source: Iterable[Any] | AsyncIterable[Any], deadline_s: float
) -> Iterable[Any] | AsyncIterable[Any]:
    """``source``, each of its items awaited under ``deadline_s`` (a list or tuple, which
    cannot block, and an infinite deadline pass it on as it is)."""
    if math.isinf(deadline_s) or isinstance(source, (list, tuple)):
        return source
    return _timed(source, deadline_s)


async def _timed(
    source: Iterable[Any] | AsyncIterable[Any], deadline_s: float
) -> AsyncGenerator[Any, None]:
    # as_async_iter advances a sync source in a worker thread and abandons that wait when
    # cancelled, so the deadline takes effect while next() still blocks; that thread then
    # closes the source once next() returns (pipeline._iter).
    items = as_async_iter(source)
    count = 0
    try:
        while True:
            with anyio.move_on_after(deadline_s) as scope:
                try:
                    item = await items.__anext__()
                except StopAsyncIteration:
                    return
            if scope.cancelled_caught:
                raise TimeoutError(
                    f"the source ({_source_name(source)}) yielded no item within the sync's "
                    f"source deadline of {deadline_s:g} s (source_timeout_s, by default "
                    f"timeout_s) after {count} items"
                )
            count += 1
            yield item
    finally:
        with anyio.CancelScope(shield=True):
            await items.aclose()
