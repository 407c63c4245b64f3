"""A checker of Chrome trace-event JSON, as Perfetto and chrome://tracing read it.

``check_trace`` checks what those viewers need of the JSON object format (the "Trace
Event Format" document): every event's required fields for its phase (complete slices
``X``: ``name``, ``ph``, ``ts``, ``dur`` >= 0, ``pid``, ``tid``; instants ``i``: a scope
``s``; metadata ``M``: ``args.name`` for a name, ``args.sort_index`` for an order),
whole-microsecond timestamps, events sorted by timestamp after the metadata, every
timed event on a named track, and slices on one track properly nested (one inside the
other, or apart; never a partial overlap, which the viewers draw wrongly). It returns
the events by track name, for a test's own assertions.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["CheckedTrace", "check_trace"]

_META_ARG = {
    "process_name": "name",
    "thread_name": "name",
    "process_sort_index": "sort_index",
    "thread_sort_index": "sort_index",
}


@dataclass
class CheckedTrace:
    """A trace that passed ``check_trace``.

    Attributes:
        process: the process's name (its ``process_name`` metadata).
        tracks: track names in their sort order (``thread_sort_index``).
        slices / instants: each track's ``X`` / ``i`` events, by track name, in order.
    """

    process: str | None = None
    tracks: list[str] = field(default_factory=list)
    slices: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    instants: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


def _fail(index: int, event: Mapping[str, Any], why: str) -> AssertionError:
    return AssertionError(f"trace event {index} ({event!r}): {why}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_trace(data: object) -> CheckedTrace:
    """Check ``data`` (the parsed JSON) and return its events by track.

    Raises:
        AssertionError: the first violation, naming the event's index and the event.
    """
    assert isinstance(data, dict), f"a trace is a JSON object, got {type(data).__name__}"
    events = data.get("traceEvents")
    assert isinstance(events, list), "the trace has no traceEvents list"
    names: dict[tuple[int, int], str] = {}
    order: dict[tuple[int, int], int] = {}
    process: str | None = None
    timed: list[tuple[int, dict[str, Any]]] = []
    seen_timed = False
    last_ts = None
    for index, event in enumerate(events):
        if not isinstance(event, dict):
            raise AssertionError(f"trace event {index} is not an object: {event!r}")
        for required in ("name", "ph", "pid", "tid", "ts"):
            if required not in event:
                raise _fail(index, event, f"no {required!r}")
        if not isinstance(event["name"], str) or not event["name"]:
            raise _fail(index, event, "name must be a non-empty string")
        for number in ("pid", "tid", "ts"):
            if not _is_int(event[number]):
                raise _fail(index, event, f"{number} must be an int")
        if "args" in event and not isinstance(event["args"], dict):
            raise _fail(index, event, "args must be an object")
        phase = event["ph"]
        if phase == "M":
            if seen_timed:
                raise _fail(index, event, "metadata after timed events")
            arg = _META_ARG.get(event["name"])
            if arg is None:
                raise _fail(index, event, "unknown metadata event")
            value = event.get("args", {}).get(arg)
            if arg == "name" and not (isinstance(value, str) and value):
                raise _fail(index, event, "metadata needs a non-empty args.name")
            if arg == "sort_index" and not _is_int(value):
                raise _fail(index, event, "metadata needs an int args.sort_index")
            key: tuple[int, int] = (event["pid"], event["tid"])
            if event["name"] == "thread_name":
                names[key] = value
            elif event["name"] == "thread_sort_index":
                order[key] = value
            elif event["name"] == "process_name":
                process = value
            continue
        seen_timed = True
        if phase == "X":
            if not _is_int(event.get("dur")) or event["dur"] < 0:
                raise _fail(index, event, "a complete slice needs an int dur >= 0")
        elif phase == "i":
            if event.get("s") not in ("g", "p", "t"):
                raise _fail(index, event, "an instant needs a scope s of g, p or t")
        else:
            raise _fail(index, event, f"unexpected phase {phase!r}")
        if event["ts"] < 0:
            raise _fail(index, event, "ts before the trace's origin")
        if last_ts is not None and event["ts"] < last_ts:
            raise _fail(index, event, f"not sorted: ts {event['ts']} after {last_ts}")
        last_ts = event["ts"]
        if (event["pid"], event["tid"]) not in names:
            raise _fail(index, event, "on a track with no thread_name")
        timed.append((index, event))
    checked = CheckedTrace(process=process)
    keys = sorted(names, key=lambda k: (order.get(k, k[1]), k))
    checked.tracks = [names[k] for k in keys]
    assert len(set(checked.tracks)) == len(checked.tracks), f"track names repeat: {keys}"
    checked.slices = {name: [] for name in checked.tracks}
    checked.instants = {name: [] for name in checked.tracks}
    open_slices: dict[tuple[int, int], list[tuple[int, int]]] = {k: [] for k in names}
    for index, event in timed:
        key = (event["pid"], event["tid"])
        if event["ph"] == "i":
            checked.instants[names[key]].append(event)
            continue
        start, end = event["ts"], event["ts"] + event["dur"]
        stack = open_slices[key]
        # A slice ending where this one starts is apart from it, not around it.
        while stack and stack[-1][1] <= start:
            stack.pop()
        if stack and end > stack[-1][1]:
            raise _fail(
                index,
                event,
                f"overlaps the slice {stack[-1]} on track {names[key]!r} without nesting",
            )
        stack.append((start, end))
        checked.slices[names[key]].append(event)
    return checked
