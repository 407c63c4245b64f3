"""Spans and the trace-event JSON: every output of every stage worker has one span, a
worker's spans never overlap and fall within the run, several workers get their indices;
``SpanRecorder`` forwards every event; ``Trace`` rounds, orders and labels its events and
writes its file atomically.

Synchronisation is by events, never by sleeping.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.trace_check import check_trace
from weightpipe.pipeline import ChannelStatistics, Pipeline, RunReport, Stage, StageError
from weightpipe.pipeline.trace import Span, SpanRecorder, Trace, add_stage_tracks


class Passthrough(Stage[Any, Any]):
    """One output per input, streamed (an async generator)."""

    def __init__(self, name: str) -> None:
        self.name = name

    async def process(self, item: Any) -> AsyncIterator[Any]:
        yield item


class Pairs(Stage[Any, Any]):
    """Gathers two inputs into one output; the flush emits a lone last one. Records when
    each call began, so a span can be checked to hold the whole gathering."""

    name = "pairs"

    def __init__(self) -> None:
        self.held: list[Any] = []
        self.entered: list[float] = []

    async def process(self, item: Any) -> AsyncIterator[Any]:
        self.entered.append(time.perf_counter())
        self.held.append(item)
        if len(self.held) == 2:
            pair, self.held = tuple(self.held), []
            yield pair

    async def flush(self) -> AsyncIterator[Any]:
        if self.held:
            yield tuple(self.held)


class Together(Stage[Any, Any]):
    """``workers`` concurrent calls; the first ``workers`` calls all wait until every one
    of them has started, so each must run on its own worker."""

    name = "together"

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.started = 0
        self.all_in = anyio.Event()

    async def process(self, item: Any) -> list[Any]:
        self.started += 1
        if self.started >= self.workers:
            self.all_in.set()
        with anyio.fail_after(10):
            await self.all_in.wait()
        return [item, item]  # two outputs of one call: two spans


class Fails(Stage[Any, Any]):
    name = "fails"

    async def process(self, item: Any) -> AsyncIterator[Any]:
        if item == 3:
            raise ValueError("item 3 is bad")
        yield item


def overlapping(spans: list[Span]) -> list[tuple[Span, Span]]:
    """Pairs of one worker's spans that overlap (touching ends are not an overlap)."""
    found = []
    by_worker: dict[tuple[str, int], list[Span]] = {}
    for span in spans:
        by_worker.setdefault((span.stage, span.worker), []).append(span)
    for worker_spans in by_worker.values():
        ordered = sorted(worker_spans, key=lambda s: s.start_s)
        found += [(a, b) for a, b in itertools.pairwise(ordered) if b.start_s < a.end_s]
    return found


async def test_every_output_of_every_worker_has_one_span_within_the_run() -> None:
    recorder = SpanRecorder()
    pairs = Pairs()
    stages = [Passthrough("first"), pairs, Together(3), Passthrough("last")]
    before = time.perf_counter()
    report = await Pipeline(stages, 2, observer=recorder).run(range(7))
    after = time.perf_counter()

    assert recorder.stages == (("first", 1), ("pairs", 1), ("together", 3), ("last", 1))
    for stage in report.stages:
        spans = [s for s in recorder.spans if s.stage == stage.name]
        assert len(spans) == stage.items_out, stage.name
    assert len([s for s in recorder.spans if s.stage == "last"]) == 8  # 4 pairs, doubled
    assert all(before <= s.start_s <= s.end_s <= after for s in recorder.spans)
    assert overlapping(recorder.spans) == []
    workers = {s.worker for s in recorder.spans if s.stage == "together"}
    assert workers == {0, 1, 2}
    assert {s.worker for s in recorder.spans if s.stage != "together"} == {0}
    # Items are described as errors describe them; a span of "last" per output.
    assert [s.item for s in recorder.spans if s.stage == "first"] == [repr(i) for i in range(7)]


async def test_a_gathering_stage_s_span_holds_every_call_toward_its_output() -> None:
    recorder = SpanRecorder()
    pairs = Pairs()
    await Pipeline([pairs], 1, observer=recorder).run(range(5))
    spans = [s for s in recorder.spans if s.stage == "pairs"]
    assert [s.item for s in spans] == ["(0, 1)", "(2, 3)", "(4,)"]
    # Output k gathered inputs 2k and 2k+1: its span began before the first of them.
    assert spans[0].start_s <= pairs.entered[0]
    assert spans[1].start_s <= pairs.entered[2]
    assert spans[1].start_s >= spans[0].end_s
    # The flush's output: its span is the flush call (the lone input's call carried over).
    assert spans[2].start_s <= pairs.entered[4]


class _ReleaseAfterItem:
    """An inner observer that lets the source go on only once ``stage`` finished an item."""

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self.item_done = anyio.Event()

    def on_run_start(self, statistics: Callable[[], RunReport]) -> None: ...
    def on_item(self, stage: str, seconds: float, bytes_in: int, bytes_out: int, n: int) -> None:
        if stage == self.stage:
            self.item_done.set()

    def on_flush(self, stage: str, seconds: float, bytes_out: int, items_out: int) -> None: ...
    def on_channel(self, stats: ChannelStatistics) -> None: ...
    def on_error(self, stage: str, kind: str) -> None: ...
    def on_run_end(self, report: RunReport) -> None: ...


async def test_a_one_to_one_stage_s_span_does_not_hold_its_wait_for_input() -> None:
    inner = _ReleaseAfterItem("only")
    produced: list[float] = []

    async def source() -> AsyncGenerator[int, None]:
        for i in range(3):
            if i:
                with anyio.fail_after(10):
                    await inner.item_done.wait()
                inner.item_done = anyio.Event()
            produced.append(time.perf_counter())
            yield i

    recorder = SpanRecorder(inner)
    await Pipeline([Passthrough("only")], 1, observer=recorder).run(source())
    spans = recorder.spans
    assert len(spans) == 3
    # Item k was made only after the stage finished item k - 1: its span starts after.
    for span, made in zip(spans, produced, strict=True):
        assert span.start_s >= made


class _Inner:
    """A ``SpanObserver`` that writes down every call it gets."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.spans: list[tuple[str, int, float, float, str, int]] = []

    def on_run_start(self, statistics: Callable[[], RunReport]) -> None:
        self.calls.append("run_start")

    def on_item(self, stage: str, seconds: float, bytes_in: int, bytes_out: int, n: int) -> None:
        self.calls.append(f"item {stage}")

    def on_flush(self, stage: str, seconds: float, bytes_out: int, items_out: int) -> None:
        self.calls.append(f"flush {stage}")

    def on_channel(self, stats: ChannelStatistics) -> None:
        self.calls.append("channel")

    def on_error(self, stage: str, kind: str) -> None:
        self.calls.append(f"error {stage} {kind}")

    def on_run_end(self, report: RunReport) -> None:
        self.calls.append("run_end")

    def on_span(
        self, stage: str, worker: int, start_s: float, end_s: float, item: str, bytes_out: int
    ) -> None:
        self.spans.append((stage, worker, start_s, end_s, item, bytes_out))


async def test_the_recorder_forwards_every_event_to_its_inner_observer() -> None:
    inner = _Inner()
    recorder = SpanRecorder(inner)
    pipeline = Pipeline([Passthrough("a"), Fails(), Pairs()], 1, observer=recorder)
    with pytest.raises(StageError, match="item 3 is bad"):
        await pipeline.run(range(8))
    alone = _Inner()
    with pytest.raises(StageError):
        await Pipeline([Passthrough("a"), Fails(), Pairs()], 1, observer=alone).run(range(8))
    assert inner.calls[0] == "run_start"
    assert inner.calls[-2:] == ["error fails ValueError", "run_end"]
    assert "item a" in inner.calls
    assert "channel" in inner.calls
    assert recorder.errors == [("fails", "ValueError")]
    # The inner observer heard each span the recorder kept, in the same order.
    assert inner.spans == [
        (s.stage, s.worker, s.start_s, s.end_s, s.item, s.bytes_out) for s in recorder.spans
    ]
    # Recording changes nothing the pipeline does: the same outputs as without it.
    assert [s[4] for s in inner.spans] == [s[4] for s in alone.spans]
    assert "3" not in [s.item for s in recorder.spans if s.stage == "fails"]


def test_trace_rounds_each_end_to_whole_microseconds() -> None:
    trace = Trace("p", origin_s=100.0)
    track = trace.track("t")
    trace.slice(track, "outer", 100.0000004, 100.0000106)  # 0.4 us .. 10.6 us
    trace.slice(track, "inner", 100.0000104, 100.0000106)  # shorter than 1 us: dur 0
    events = [e for e in trace.events() if e["ph"] == "X"]
    assert [(e["name"], e["ts"], e["dur"]) for e in events] == [("outer", 0, 11), ("inner", 10, 1)]
    assert trace.us(100.5) == 500_000
    with pytest.raises(ValueError, match=r"ends .* before it starts"):
        trace.slice(track, "backwards", 101.0, 100.5)
    with pytest.raises(ValueError, match="no track 2"):
        trace.instant(2, "nowhere", 100.0)


def test_trace_events_are_ordered_with_enclosing_slices_first() -> None:
    trace = Trace("p", origin_s=0.0)
    a, b = trace.track("a"), trace.track("b")
    trace.slice(b, "late", 0.003, 0.004)
    trace.slice(a, "short", 0.001, 0.0015)
    trace.slice(a, "long", 0.001, 0.002)
    trace.instant(a, "mark", 0.0012, args={"why": "test"})
    timed = [e for e in trace.events() if e["ph"] != "M"]
    assert [e["name"] for e in timed] == ["long", "short", "mark", "late"]
    mark = timed[2]
    assert mark["s"] == "t"
    assert mark["args"] == {"why": "test"}
    check_trace(trace.to_json())


def test_trace_metadata_names_the_process_and_orders_the_tracks() -> None:
    trace = Trace("weightpipe run", origin_s=0.0, pid=7)
    first, second = trace.track("first"), trace.track("second")
    assert (first, second) == (1, 2)
    assert trace.tracks == ("first", "second")
    meta = [e for e in trace.events() if e["ph"] == "M"]
    assert meta[0] == {
        "name": "process_name",
        "ph": "M",
        "ts": 0,
        "pid": 7,
        "tid": 0,
        "args": {"name": "weightpipe run"},
    }
    names = {e["tid"]: e["args"] for e in meta if e["name"] == "thread_name"}
    assert names == {1: {"name": "first"}, 2: {"name": "second"}}
    order = {e["tid"]: e["args"] for e in meta if e["name"] == "thread_sort_index"}
    assert order == {1: {"sort_index": 1}, 2: {"sort_index": 2}}
    data = trace.to_json()
    assert data["displayTimeUnit"] == "ms"
    assert json.loads(json.dumps(data)) == data


async def test_stage_tracks_one_per_worker_in_pipeline_order() -> None:
    recorder = SpanRecorder()
    await Pipeline([Passthrough("first"), Together(2)], 1, observer=recorder).run(range(4))
    trace = Trace("p", origin_s=min(s.start_s for s in recorder.spans))
    tracks = add_stage_tracks(trace, recorder, span_name=lambda s: f"item {s.item}")
    assert trace.tracks == ("first", "together #1", "together #2")
    assert tracks == {("first", 0): 1, ("together", 0): 2, ("together", 1): 3}
    data = trace.to_json()
    check_trace(data)
    events = data["traceEvents"]
    assert isinstance(events, list)
    slices = [e for e in events if e["ph"] == "X"]
    assert len(slices) == len(recorder.spans) == 4 + 8
    assert {e["name"] for e in slices} == {f"item {i}" for i in range(4)}
    assert all(e["args"]["stage"] in ("first", "together") for e in slices)


def test_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trace = Trace("p", origin_s=0.0)
    trace.slice(trace.track("t"), "s", 0.0, 0.001)
    target = tmp_path / "trace.json"
    assert trace.write(target) == target
    written = target.read_bytes()
    assert json.loads(written) == trace.to_json()
    assert (target.stat().st_mode & 0o777) == 0o644

    trace.slice(1, "more", 0.002, 0.003)

    def broken_replace(src: Any, dst: Any) -> None:
        raise OSError("disk went away")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk went away"):
        trace.write(target)
    assert target.read_bytes() == written  # the old trace, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trace.json"]  # no temporary left
    with pytest.raises(FileNotFoundError):
        trace.write(tmp_path / "missing" / "trace.json")
