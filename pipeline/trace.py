"""A timeline of a run in Chrome's trace-event JSON format (Perfetto, chrome://tracing).

``SpanRecorder`` is a ``SpanObserver``: it records the span of every output item each
stage worker produced (and passes every event on to another observer, if given).
``Trace`` builds the JSON: one process, named tracks (a ``tid`` each, labelled and
ordered by ``"M"`` metadata events), complete slices (``"ph": "X"``) and instant events
(``"ph": "i"``), timestamps in microseconds of ``time.perf_counter()`` since the trace's
origin. ``add_stage_tracks`` puts a recorder's spans on one track per stage worker.
Nothing here knows what the items are; a caller adds its own tracks beside the stages'.

Timestamps and durations are whole microseconds, each end rounded on its own: rounding
is monotonic, so slices that nest or follow each other in ``perf_counter`` time still
do after rounding (a span under a microsecond has ``dur`` 0). Events are written sorted
by timestamp, a longer slice before a shorter one starting at the same microsecond, so
an enclosing slice precedes what it encloses.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from weightpipe.pipeline._channel import ChannelStatistics
from weightpipe.pipeline._pipeline import PipelineObserver, RunReport

__all__ = [
    "JsonValue",
    "Span",
    "SpanRecorder",
    "Trace",
    "TraceEvent",
    "add_stage_tracks",
    "write_atomically",
]

TraceEvent = dict[str, object]
"""One trace event, as written to the JSON (``name``, ``ph``, ``ts``, ``pid``, ``tid``...)."""

JsonValue = str | int | float | bool | None | list[object] | dict[str, object]
"""What an event's ``args`` may hold (anything ``json.dumps`` writes)."""


@dataclass(frozen=True)
class Span:
    """One output item of one stage worker (see ``SpanObserver.on_span``).

    Attributes:
        stage: the stage's name in the run.
        worker: the worker, 0 to ``workers - 1``.
        start_s / end_s: ``time.perf_counter()`` seconds.
        item: the output's description.
        bytes_out: the output's ``nbytes``.
    """

    stage: str
    worker: int
    start_s: float
    end_s: float
    item: str
    bytes_out: int


class SpanRecorder:
    """A ``SpanObserver`` that keeps every span of a run, and forwards every event.

    Args:
        inner: another observer (the Prometheus one, say) told everything this one is;
            its ``on_span`` too, when it has one.

    Attributes:
        spans: the spans so far, in the order they were produced.
        stages: ``(name, workers)`` of each stage, known once the run started.
        errors: ``(stage, exception type)`` of each failure the run reported.
    """

    def __init__(self, inner: PipelineObserver | None = None) -> None:
        self.inner = inner
        self.spans: list[Span] = []
        self.stages: tuple[tuple[str, int], ...] = ()
        self.errors: list[tuple[str, str]] = []
        on_span = getattr(inner, "on_span", None)
        self._inner_span: Callable[[str, int, float, float, str, int], None] | None = (
            on_span if callable(on_span) else None
        )

    def on_run_start(self, statistics: Callable[[], RunReport]) -> None:
        self.stages = tuple((stage.name, stage.workers) for stage in statistics().stages)
        if self.inner is not None:
            self.inner.on_run_start(statistics)

    def on_span(
        self, stage: str, worker: int, start_s: float, end_s: float, item: str, bytes_out: int
    ) -> None:
        self.spans.append(Span(stage, worker, start_s, end_s, item, bytes_out))
        if self._inner_span is not None:
            self._inner_span(stage, worker, start_s, end_s, item, bytes_out)

    def on_item(
        self, stage: str, seconds: float, bytes_in: int, bytes_out: int, items_out: int
    ) -> None:
        if self.inner is not None:
            self.inner.on_item(stage, seconds, bytes_in, bytes_out, items_out)

    def on_flush(self, stage: str, seconds: float, bytes_out: int, items_out: int) -> None:
        if self.inner is not None:
            self.inner.on_flush(stage, seconds, bytes_out, items_out)

    def on_channel(self, stats: ChannelStatistics) -> None:
        if self.inner is not None:
            self.inner.on_channel(stats)

    def on_error(self, stage: str, kind: str) -> None:
        self.errors.append((stage, kind))
        if self.inner is not None:
            self.inner.on_error(stage, kind)

    def on_run_end(self, report: RunReport) -> None:
        if self.inner is not None:
            self.inner.on_run_end(report)


class Trace:
    """Builds one process's trace-event JSON: named tracks, slices and instants.

    Args:
        process: the process's name (what Perfetto shows above its tracks).
        origin_s: the ``time.perf_counter()`` that is timestamp 0.
        pid: the process id written on every event.
    """

    def __init__(self, process: str, *, origin_s: float, pid: int = 1) -> None:
        self.process = process
        self.origin_s = origin_s
        self.pid = pid
        self._tracks: list[str] = []
        self._events: list[TraceEvent] = []

    def track(self, name: str) -> int:
        """A new track named ``name``; its ``tid``. Tracks are shown in creation order."""
        self._tracks.append(name)
        return len(self._tracks)

    @property
    def tracks(self) -> tuple[str, ...]:
        """The tracks' names, by ``tid - 1``."""
        return tuple(self._tracks)

    def us(self, seconds: float) -> int:
        """``time.perf_counter()`` seconds as whole microseconds since the origin."""
        return round((seconds - self.origin_s) * 1e6)

    def slice(
        self,
        track: int,
        name: str,
        start_s: float,
        end_s: float,
        *,
        category: str = "",
        args: Mapping[str, JsonValue] | None = None,
    ) -> None:
        """A complete slice on ``track`` from ``start_s`` to ``end_s`` (perf_counter s).

        Raises:
            ValueError: an unknown track, or ``end_s`` before ``start_s``.
        """
        self._check_track(track)
        if end_s < start_s:
            raise ValueError(f"slice {name!r} ends ({end_s}) before it starts ({start_s})")
        ts = self.us(start_s)
        event: TraceEvent = {
            "name": name,
            "cat": category or name,
            "ph": "X",
            "ts": ts,
            "dur": self.us(end_s) - ts,
            "pid": self.pid,
            "tid": track,
        }
        if args:
            event["args"] = dict(args)
        self._events.append(event)

    def instant(
        self,
        track: int,
        name: str,
        at_s: float,
        *,
        category: str = "",
        args: Mapping[str, JsonValue] | None = None,
    ) -> None:
        """An instant event on ``track`` at ``at_s`` (perf_counter seconds).

        Raises:
            ValueError: an unknown track.
        """
        self._check_track(track)
        event: TraceEvent = {
            "name": name,
            "cat": category or name,
            "ph": "i",
            "s": "t",
            "ts": self.us(at_s),
            "pid": self.pid,
            "tid": track,
        }
        if args:
            event["args"] = dict(args)
        self._events.append(event)

    def events(self) -> list[TraceEvent]:
        """Metadata (process and track names, track order) first, then every event by
        timestamp, the longer of two slices starting together first."""
        meta = [self._meta("process_name", 0, {"name": self.process})]
        for tid, name in enumerate(self._tracks, start=1):
            meta.append(self._meta("thread_name", tid, {"name": name}))
            meta.append(self._meta("thread_sort_index", tid, {"sort_index": tid}))
        timed = sorted(self._events, key=_order)
        return meta + timed

    def to_json(self) -> dict[str, object]:
        """The JSON object format: ``traceEvents`` plus what produced them."""
        return {
            "traceEvents": self.events(),
            "displayTimeUnit": "ms",
            "otherData": {"process": self.process, "clock": "time.perf_counter", "unit": "us"},
        }

    def write(self, path: str | os.PathLike[str]) -> Path:
        """Write the JSON to ``path`` (a temporary file renamed over it, so a reader never
        sees half a trace); returns the path.

        Raises:
            OSError: the file could not be written (its folder is missing, say).
        """
        data = json.dumps(self.to_json(), separators=(",", ":")).encode("utf-8")
        return write_atomically(path, lambda file: file.write(data))

    def _meta(self, name: str, tid: int, args: dict[str, object]) -> TraceEvent:
        return {"name": name, "ph": "M", "ts": 0, "pid": self.pid, "tid": tid, "args": args}

    def _check_track(self, track: int) -> None:
        if not 1 <= track <= len(self._tracks):
            raise ValueError(f"no track {track}; there are {len(self._tracks)}")


def _order(event: TraceEvent) -> tuple[int, int]:
    ts = event["ts"]
    dur = event.get("dur", 0)
    assert isinstance(ts, int) and isinstance(dur, int)
    return ts, -dur


def add_stage_tracks(
    trace: Trace,
    recorder: SpanRecorder,
    *,
    span_name: Callable[[Span], str] | None = None,
    span_args: Callable[[Span], Mapping[str, JsonValue]] | None = None,
) -> dict[tuple[str, int], int]:
    """One track per stage worker (``quantize``, or ``quantize #1``, ``quantize #2``...
    for a stage with several), in pipeline order, each span a slice named by
    ``span_name`` (default: its stage), with ``item``, ``bytes`` and whatever
    ``span_args`` adds in its args, in category ``stage``. Returns the tracks by
    ``(stage, worker)``. Perfetto and chrome://tracing colour slices by name, so a
    ``span_name`` naming the item colours one item alike on every track.

    A stage seen only in spans (a recorder whose run never reported its stages) gets its
    track after the known ones.
    """
    tracks: dict[tuple[str, int], int] = {}
    known = list(recorder.stages)
    for span in recorder.spans:
        if all(name != span.stage for name, _ in known):
            known.append((span.stage, 1))
    for name, workers in known:
        for worker in range(workers):
            label = name if workers == 1 else f"{name} #{worker + 1}"
            tracks[(name, worker)] = trace.track(label)
    for span in recorder.spans:
        key = (span.stage, span.worker)
        if key not in tracks:
            tracks[key] = trace.track(f"{span.stage} #{span.worker + 1}")
        trace.slice(
            tracks[key],
            span.stage if span_name is None else span_name(span),
            span.start_s,
            span.end_s,
            category="stage",
            args={
                "stage": span.stage,
                "worker": span.worker,
                "item": span.item,
                "bytes": span.bytes_out,
                **(span_args(span) if span_args is not None else {}),
            },
        )
    return tracks


def write_atomically(path: str | os.PathLike[str], write: Callable[[BinaryIO], object]) -> Path:
    """Call ``write`` on a temporary file beside ``path`` and rename it over ``path``, so a
    reader never sees half a file (and a failed write leaves no file); returns the path.

    Raises:
        OSError: the file could not be written (its folder is missing, say); whatever
            ``write`` raises.
    """
    target = Path(path)
    handle, temporary = tempfile.mkstemp(
        prefix=f".{target.name}.", suffix=".tmp", dir=target.parent
    )
    try:
        with os.fdopen(handle, "wb") as file:
            write(file)
        # mkstemp's file is private (0600); these are ordinary output files.
        os.chmod(temporary, 0o644)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return target
