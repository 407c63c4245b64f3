"""The timeline of one weight sync, written as a Chrome/Perfetto trace.

``SyncTrace`` is what ``sync_weights(..., trace=PATH)`` uses: its ``recorder`` is the
pipeline's observer (``weightpipe.pipeline.trace.SpanRecorder``, forwarding to the
caller's observer), so each stage worker gets a track with a slice per bucket; when the
engine takes ``GenerationListener``s (the local engine), a ``GenerationTrace`` hears
every decode step, weight switch and pause. ``build`` adds, from the ``LoadReport``, the
engine's track: every engine call Load made (``LoadReport.calls``) and the hard pause as
its own slice around the calls made while generation was stopped; and a ``sync`` track
with the whole sync and, when it failed, the error as an instant event. Every timestamp
is ``time.perf_counter()``, in microseconds since the sync began. Tracks, top to bottom:
``sync``, one per stage worker in pipeline order, ``engine <name>``, ``generation``.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

from weightpipe.pipeline import PipelineObserver, StageError
from weightpipe.pipeline.trace import JsonValue, Span, SpanRecorder, Trace, add_stage_tracks
from weightpipe.stages.load import LoadReport

if TYPE_CHECKING:
    import os

    from weightpipe.stages.engines.local.window import GenerationListener

__all__ = [
    "GenerationEvent",
    "GenerationTrace",
    "ListensToGeneration",
    "SyncTrace",
    "bucket_index",
]

_BUCKET = re.compile(r"\bbucket (\d+) of v")
"""How ``WeightBucket.describe()`` (and so Load's call names) say which bucket."""


def bucket_index(description: str) -> int | None:
    """The bucket index in a ``WeightBucket.describe()`` text (``bucket 3 of v7 (...)``)
    or an engine call naming one (``load of bucket 3 of v7 ...``), else ``None``."""
    match = _BUCKET.search(description)
    return None if match is None else int(match.group(1))


@runtime_checkable
class ListensToGeneration(Protocol):
    """An engine that tells ``GenerationListener``s what generation does (``LocalEngine``)."""

    def add_listener(self, listener: GenerationListener) -> None: ...
    def remove_listener(self, listener: GenerationListener) -> None: ...


@dataclass(frozen=True)
class GenerationEvent:
    """One thing the generation thread reported (``GenerationListener``'s callbacks).

    Attributes:
        kind: ``step`` (a forward pass ended), ``write`` (a weight switch ended),
            ``finish`` (requests finished), ``pause`` or ``resume``.
        at_s: ``time.perf_counter()`` when it happened (for ``write``: when it was heard,
            just after it ended).
        tokens: a step's new tokens; finished requests for ``finish``.
        seconds: a write's duration.
        versions: the weight versions a step read.
    """

    kind: Literal["step", "write", "finish", "pause", "resume"]
    at_s: float
    tokens: int = 0
    seconds: float = 0.0
    versions: tuple[int | None, ...] = ()


class GenerationTrace:
    """A ``GenerationListener`` that keeps what the generation thread did, in order.

    Each callback only appends under its own lock (they run with the engine's lock held,
    between decode steps).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: list[GenerationEvent] = []

    def on_step(self, now: float, tokens: int, versions: frozenset[int | None]) -> None:
        ordered = tuple(sorted(versions, key=lambda v: -1 if v is None else v))
        self._add(GenerationEvent("step", now, tokens=tokens, versions=ordered))

    def on_finish(self, now: float, requests: int) -> None:
        self._add(GenerationEvent("finish", now, tokens=requests))

    def on_write(self, seconds: float) -> None:
        self._add(GenerationEvent("write", time.perf_counter(), seconds=seconds))

    def on_pause(self, now: float) -> None:
        self._add(GenerationEvent("pause", now))

    def on_resume(self, now: float) -> None:
        self._add(GenerationEvent("resume", now))

    def events(self) -> list[GenerationEvent]:
        """What was heard so far, in order."""
        with self._lock:
            return list(self._events)

    def _add(self, event: GenerationEvent) -> None:
        with self._lock:
            self._events.append(event)


class SyncTrace:
    """Collects one sync's timeline; ``write`` turns it into a trace file.

    Args:
        version: the sync's version (names the trace's process).
        engine: the engine; when it ``ListensToGeneration``, ``attach`` adds a
            ``GenerationTrace`` to it and ``detach`` removes it.
        observer: the caller's pipeline observer, which ``recorder`` forwards to.
    """

    def __init__(
        self, *, version: int, engine: object, observer: PipelineObserver | None = None
    ) -> None:
        self.version = version
        self.origin_s = time.perf_counter()
        self.recorder = SpanRecorder(observer)
        self.generation = GenerationTrace() if isinstance(engine, ListensToGeneration) else None
        self._engine = engine
        self._attached = False

    def attach(self) -> None:
        """Start hearing generation (a no-op for an engine without listeners)."""
        if self.generation is not None and not self._attached:
            assert isinstance(self._engine, ListensToGeneration)
            self._engine.add_listener(self.generation)
            self._attached = True

    def detach(self) -> None:
        """Stop hearing generation (idempotent)."""
        if self.generation is not None and self._attached:
            assert isinstance(self._engine, ListensToGeneration)
            self._engine.remove_listener(self.generation)
            self._attached = False

    def build(self, load: LoadReport, *, end_s: float, error: BaseException | None = None) -> Trace:
        """The trace of the sync that ended at ``end_s`` with ``load`` (and ``error``)."""
        end_s = max(end_s, self.origin_s)
        trace = Trace(f"weightpipe sync v{self.version}", origin_s=self.origin_s)
        sync_track = trace.track("sync")
        add_stage_tracks(trace, self.recorder, span_name=_span_name, span_args=_bucket_args)
        trace.slice(
            sync_track,
            f"sync v{self.version}",
            self.origin_s,
            end_s,
            category="sync",
            args={
                "version": self.version,
                "engine": load.engine,
                "mode": load.mode,
                "pause_mode": load.pause_mode,
                "committed": load.committed,
                "aborted": load.aborted,
                "buckets": load.buckets,
                "bytes": load.bytes,
                "hard_pause_ms": load.hard_pause_s * 1e3,
                "engine_dirty": load.engine_dirty,
            },
        )
        if error is not None:
            trace.instant(sync_track, "error", end_s, category="error", args=_error_args(error))
        last_stage = self.recorder.stages[-1][0] if self.recorder.stages else None
        bucket_bytes = {
            index: span.bytes_out
            for span in self.recorder.spans
            if span.stage == last_stage and (index := bucket_index(span.item)) is not None
        }
        _engine_track(trace, trace.track(f"engine {load.engine}"), load, end_s, bucket_bytes)
        if self.generation is not None:
            _generation_track(trace, trace.track("generation"), self.generation.events())
        return trace

    def write(
        self,
        path: str | os.PathLike[str],
        load: LoadReport,
        *,
        end_s: float | None = None,
        error: BaseException | None = None,
    ) -> Path:
        """Build the trace (ending now unless ``end_s``) and write it to ``path``.

        Raises:
            OSError: the file could not be written.
        """
        end = time.perf_counter() if end_s is None else end_s
        return self.build(load, end_s=end, error=error).write(path)


def _span_name(span: Span) -> str:
    """``bucket 3``: one bucket has one name, so one colour, on every stage's track."""
    index = bucket_index(span.item)
    return span.stage if index is None else f"bucket {index}"


def _bucket_args(span: Span) -> Mapping[str, JsonValue]:
    index = bucket_index(span.item)
    return {} if index is None else {"bucket": index}


def _error_args(error: BaseException) -> dict[str, JsonValue]:
    args: dict[str, JsonValue] = {"type": type(error).__name__, "message": str(error)}
    if isinstance(error, StageError):
        args.update(stage=error.stage, phase=error.phase, item=error.item)
        cause = error.__cause__
        if cause is not None:
            args["cause"] = f"{type(cause).__name__}: {cause}"
    return args


def _engine_track(
    trace: Trace, track: int, load: LoadReport, end_s: float, bucket_bytes: Mapping[int, int]
) -> None:
    """Load's engine calls, and the hard pause around those made while paused.

    The pause runs from the end of the pause call (generation has stopped) to the end of
    the resume call, as ``LoadReport.hard_pause_s`` counts it, with its phases
    (``LoadReport.pause_phases``) in its arguments and the wait for the first payload as
    a slice inside it. It starts at the sync's beginning when a failed sync left the
    engine paused before this one (no pause call), and lasts to the end of the trace
    when this sync leaves it paused.
    """
    paused_from: float | None = None
    paused_to: float | None = None
    for call in load.calls:
        args: dict[str, JsonValue] = {"call": call.what}
        index = bucket_index(call.what) if call.kind == "load" else None
        if index is not None:
            args["bucket"] = index
            if index in bucket_bytes:
                args["bytes"] = bucket_bytes[index]
        if call.error is not None:
            args["error"] = call.error
        trace.slice(track, call.kind, call.start_s, call.end_s, category="engine", args=args)
        if call.kind == "pause" and paused_from is None:
            paused_from = call.end_s
        elif call.kind == "resume" and paused_to is None:
            paused_to = call.end_s
            if paused_from is None:
                paused_from = trace.origin_s
    if paused_from is None and load.left_paused:
        paused_from = trace.origin_s
    if paused_from is None:
        return
    left_paused = paused_to is None
    paused_end = max(end_s, paused_from) if paused_to is None else paused_to
    phases: dict[str, object] = {
        f"{name}_ms": seconds * 1e3 for name, seconds in load.pause_phases.as_dict().items()
    }
    trace.slice(
        track,
        "paused",
        paused_from,
        paused_end,
        category="pause",
        args={
            "pause_mode": load.pause_mode,
            "hard_pause_ms": load.hard_pause_s * 1e3,
            "left_paused": left_paused,
            "phases": phases,
        },
    )
    # The first phase of the pause, drawn inside it: generation has stopped and the
    # engine has not been handed the sync yet (``PausePhases.first_payload_s``).
    handover = next(
        (
            call.start_s
            for call in load.calls
            if call.kind in ("begin", "load") and paused_from <= call.start_s <= paused_end
        ),
        None,
    )
    if handover is not None and handover > paused_from:
        trace.slice(
            track,
            "waiting for the first payload",
            paused_from,
            handover,
            category="pause",
            args={"first_payload_ms": (handover - paused_from) * 1e3},
        )


def _generation_track(trace: Trace, track: int, events: list[GenerationEvent]) -> None:
    """Decode steps, weight switches and pauses as slices, finished requests as instants.

    The engine reports when a step ended, not when it began: a step's slice starts where
    the generation thread's previous event (a step, a switch, a pause or resume) ended, or at the
    trace's origin, so one step's slice may also hold a short idle time before it. The
    boundary only moves forward, so the track's slices never overlap, whatever order
    threads reported in.
    """
    boundary = trace.origin_s
    paused_since: float | None = None
    for event in events:
        at = max(event.at_s, boundary)
        if event.kind == "step":
            trace.slice(
                track,
                "step",
                boundary,
                at,
                category="generation",
                args={
                    "tokens": event.tokens,
                    "versions": list(event.versions),
                    "mixed": len(event.versions) > 1,
                },
            )
        elif event.kind == "write":
            trace.slice(
                track,
                "swap",
                max(boundary, at - event.seconds),
                at,
                category="generation",
                args={"swap_ms": event.seconds * 1e3},
            )
        elif event.kind == "finish":
            # The engine reports a step's finished requests before the step itself, at
            # the same time: the step's slice still starts at the boundary before both.
            trace.instant(
                track, "finished", at, category="generation", args={"requests": event.tokens}
            )
            continue
        elif event.kind == "pause":
            paused_since = at
        elif paused_since is not None:  # resume
            trace.slice(track, "paused", paused_since, at, category="pause")
            paused_since = None
        # No step runs across a pause or a resume: each moves the boundary.
        boundary = at
