"""A PNG timeline of one sync, drawn from its Chrome trace (``sync_weights(trace=...)``).

What a person looks at first after ``weightpipe demo``: one row per track of the trace
but the ``sync`` one (each stage worker, the engine, generation), x in milliseconds
since the sync began, each bucket's slices in the bucket's colour on every row (so one
bucket can be followed down the pipeline), the engine's other calls dark grey, decode
steps light grey, the weight switch black, the hard pause shaded across every row and
a failed sync's error as a dashed red line. ``timeline_rows`` reads the trace into rows (no
plotting library needed); ``write_timeline`` draws them with matplotlib's Agg canvas,
imported only then, without pyplot's global state.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from weightpipe.pipeline.trace import write_atomically

__all__ = [
    "DEFAULT_TIMELINE",
    "Bar",
    "Row",
    "Timeline",
    "read_trace",
    "timeline_rows",
    "write_timeline",
]

DEFAULT_TIMELINE = "weightpipe-demo-timeline.png"
"""Where ``weightpipe demo`` draws its last sync's timeline unless told (``--timeline``):
the working folder, beside ``weightpipe bench``'s ``weightpipe-sweep.png``."""

_BUCKET_COLOURS = 20
"""Buckets share the ``tab20`` colours: bucket i gets colour i mod 20."""
_FIXED = {
    "engine": "#4d4d4d",
    "step": "#c8c8c8",
    "swap": "#000000",
    "other": "#8c8c8c",
}
_LEGEND_BUCKETS = 8
"""Buckets named in the legend; later ones repeat the colours (mod 20)."""


@dataclass(frozen=True)
class Bar:
    """One slice on a row: ``start_ms`` / ``dur_ms`` since the sync began; ``kind`` is
    ``bucket`` (with ``bucket``), ``engine``, ``step``, ``swap`` or ``other``."""

    start_ms: float
    dur_ms: float
    kind: str
    bucket: int | None = None


@dataclass(frozen=True)
class Row:
    """One track of the trace, top to bottom in the trace's order."""

    name: str
    bars: tuple[Bar, ...]


@dataclass(frozen=True)
class Timeline:
    """What ``write_timeline`` draws.

    Attributes:
        title: the trace's process name and the sync's figures.
        rows: every track but ``sync``.
        pauses_ms: ``(start, end)`` of each hard pause (the engine track's ``paused``).
        errors_ms: when the sync failed, if it did.
        end_ms: the end of the sync.
        buckets: how many distinct buckets the rows show.
    """

    title: str
    rows: tuple[Row, ...]
    pauses_ms: tuple[tuple[float, float], ...] = ()
    errors_ms: tuple[float, ...] = ()
    end_ms: float = 0.0
    buckets: int = 0


def read_trace(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The trace-event JSON object at ``path``.

    Raises:
        OSError: unreadable; ValueError: not JSON, or no ``traceEvents`` list.
    """
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not isinstance(data.get("traceEvents"), list):
        raise ValueError(f"{os.fspath(path)!r} is not a trace-event JSON object")
    return data


def _kind(track: str, event: Mapping[str, Any]) -> tuple[str, int | None]:
    args = event.get("args") or {}
    bucket = args.get("bucket") if isinstance(args, dict) else None
    if isinstance(bucket, int) and not isinstance(bucket, bool):
        return "bucket", bucket
    if event.get("cat") == "pause":  # a phase of the pause, not a call
        return "other", None
    if track.startswith("engine"):
        return "engine", None
    name = event.get("name")
    if name in ("step", "swap"):
        return str(name), None
    return "other", None


def timeline_rows(trace: Mapping[str, Any]) -> Timeline:
    """Read a trace (as ``SyncTrace`` writes it) into the rows of its timeline.

    Raises:
        ValueError: the object has no ``traceEvents`` list.
    """
    events = trace.get("traceEvents")
    if not isinstance(events, list):
        raise ValueError("not a trace-event JSON object: no traceEvents list")
    names: dict[int, str] = {}
    order: dict[int, int] = {}
    process = "weightpipe sync"
    for event in events:
        if event.get("ph") != "M":
            continue
        args = event.get("args") or {}
        if event.get("name") == "thread_name":
            names[event["tid"]] = str(args.get("name"))
        elif event.get("name") == "thread_sort_index":
            order[event["tid"]] = int(args.get("sort_index", event["tid"]))
        elif event.get("name") == "process_name":
            process = str(args.get("name"))
    bars: dict[int, list[Bar]] = {tid: [] for tid in names}
    pauses: list[tuple[float, float]] = []
    errors: list[float] = []
    end_ms = 0.0
    buckets: set[int] = set()
    sync_args: Mapping[str, Any] = {}
    for event in events:
        phase, tid = event.get("ph"), event.get("tid")
        if phase not in ("X", "i") or tid not in names:
            continue
        track = names[tid]
        start_ms = event["ts"] / 1e3
        if phase == "i":
            if event.get("name") == "error":
                errors.append(start_ms)
            continue
        dur_ms = event.get("dur", 0) / 1e3
        end_ms = max(end_ms, start_ms + dur_ms)
        if track == "sync":
            sync_args = event.get("args") or {}
            continue
        if event.get("name") == "paused":
            if track.startswith("engine"):
                pauses.append((start_ms, start_ms + dur_ms))
            continue  # shown as the shading, not as a bar
        kind, bucket = _kind(track, event)
        if bucket is not None:
            buckets.add(bucket)
        bars[tid].append(Bar(start_ms, dur_ms, kind, bucket))
    tids = sorted(names, key=lambda t: (order.get(t, t), t))
    rows = tuple(Row(names[t], tuple(bars[t])) for t in tids if names[t] != "sync")
    title = process
    if sync_args:
        title += (
            f": {sync_args.get('mode', '?')}, {sync_args.get('buckets', '?')} buckets, "
            f"{float(sync_args.get('bytes', 0)) / 1e6:.1f} MB, "
            f"hard pause {float(sync_args.get('hard_pause_ms', 0.0)):.1f} ms"
        )
        if sync_args.get("committed") is False:
            title += " (failed)"
    return Timeline(title, rows, tuple(pauses), tuple(errors), end_ms, len(buckets))


def write_timeline(
    trace: Mapping[str, Any] | str | os.PathLike[str], path: str | os.PathLike[str]
) -> Path:
    """Draw the timeline of ``trace`` (the JSON object, or a file holding it) as a PNG at
    ``path`` (written to a temporary file renamed over it); returns the path.

    Raises:
        OSError: the trace could not be read or the PNG written.
        ValueError: not a trace-event JSON object.
        ImportError: matplotlib is not installed (the ``local`` extra has it).
    """
    data = read_trace(trace) if isinstance(trace, str | os.PathLike) else trace
    timeline = timeline_rows(data)
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    bucket_map = matplotlib.colormaps["tab20"]
    rows = timeline.rows
    figure = Figure(figsize=(12.0, 1.6 + 0.42 * max(len(rows), 1)), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for y, row in enumerate(rows):
        groups: dict[str, list[tuple[float, float]]] = {}
        for bar in row.bars:
            colour = (
                _to_hex(bucket_map(bar.bucket % _BUCKET_COLOURS))
                if bar.bucket is not None
                else _FIXED[bar.kind]
            )
            # A slice under a pixel still shows: at least 0.2 % of the sync.
            width = max(bar.dur_ms, timeline.end_ms * 0.002)
            groups.setdefault(colour, []).append((bar.start_ms, width))
        for colour, spans in groups.items():
            # Thin white edges keep back-to-back decode steps apart.
            steps = colour == _FIXED["step"]
            axes.broken_barh(
                spans,
                (y - 0.38, 0.76),
                facecolors=colour,
                edgecolor="white" if steps else "none",
                linewidth=0.4 if steps else 0.0,
            )
    for start, end in timeline.pauses_ms:
        axes.axvspan(start, end, color="#1f77b4", alpha=0.12, linewidth=0)
    for at in timeline.errors_ms:
        axes.axvline(at, color="#d62728", linewidth=1.5, linestyle="--")
    axes.set_yticks(range(len(rows)), [row.name for row in rows])
    axes.set_ylim(len(rows) - 0.5, -0.5)  # the first track on top, as in Perfetto
    axes.set_xlim(0.0, max(timeline.end_ms, 1e-3) * 1.01)
    axes.set_xlabel("ms since the sync began")
    axes.set_title(timeline.title, fontsize=10)
    axes.grid(axis="x", alpha=0.3)
    handles = [
        Patch(color=_to_hex(bucket_map(i % _BUCKET_COLOURS)), label=f"bucket {i}")
        for i in range(min(timeline.buckets, _LEGEND_BUCKETS))
    ]
    if timeline.buckets > _LEGEND_BUCKETS:
        handles.append(Patch(color="white", label=f"... {timeline.buckets} buckets"))
    handles += [
        Patch(color=_FIXED["engine"], label="engine call"),
        Patch(color=_FIXED["step"], label="decode step"),
        Patch(color=_FIXED["swap"], label="weight switch"),
        Patch(color="#1f77b4", alpha=0.12, label="hard pause"),
    ]
    if any(bar.kind == "other" for row in rows for bar in row.bars):
        handles.append(Patch(color=_FIXED["other"], label="other (waiting in the pause)"))
    if timeline.errors_ms:
        handles.append(Patch(color="#d62728", label="error"))
    axes.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    figure.tight_layout()
    return write_atomically(path, lambda file: figure.savefig(file, format="png"))


def _to_hex(rgba: Sequence[float]) -> str:
    return "#" + "".join(f"{round(channel * 255):02x}" for channel in rgba[:3])
