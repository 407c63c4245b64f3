"""The demo's PNG timeline: which rows, bars, pauses and errors it reads from a trace,
and that it writes a PNG (its pixels are not asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from weightpipe.pipeline.trace import Trace
from weightpipe.stages.app.timeline import read_trace, timeline_rows, write_timeline

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def sync_like_trace(*, failed: bool = False) -> Trace:
    """A trace shaped as ``SyncTrace`` writes one: sync, two stages, engine, generation."""
    trace = Trace("weightpipe sync v3", origin_s=10.0)
    sync, fetch, load = trace.track("sync"), trace.track("fetch"), trace.track("load")
    engine, generation = trace.track("engine local"), trace.track("generation")
    trace.slice(
        sync,
        "sync v3",
        10.0,
        10.010,
        args={"mode": "prefetch", "buckets": 2, "bytes": 2_000_000, "hard_pause_ms": 4.0,
              "committed": not failed},
    )  # fmt: skip
    for index in range(2):
        start = 10.001 + index * 0.002
        trace.slice(fetch, f"bucket {index}", start, start + 0.001, args={"bucket": index})
        trace.slice(load, f"bucket {index}", start + 0.004, start + 0.005, args={"bucket": index})
        trace.slice(engine, "load", start + 0.004, start + 0.005, args={"bucket": index})
    trace.slice(engine, "pause", 10.003, 10.004, category="engine")
    trace.slice(engine, "paused", 10.004, 10.008, category="pause")
    trace.slice(generation, "step", 10.0, 10.002)
    trace.slice(generation, "paused", 10.004, 10.008, category="pause")
    trace.slice(generation, "swap", 10.0085, 10.009)
    if failed:
        trace.instant(sync, "error", 10.010, category="error")
    return trace


def test_rows_are_every_track_but_sync_with_buckets_pauses_and_errors() -> None:
    timeline = timeline_rows(sync_like_trace(failed=True).to_json())
    assert [row.name for row in timeline.rows] == ["fetch", "load", "engine local", "generation"]
    fetch, load, engine, generation = timeline.rows
    assert [(b.kind, b.bucket) for b in fetch.bars] == [("bucket", 0), ("bucket", 1)]
    assert [b.start_ms for b in fetch.bars] == [1.0, 3.0]
    assert [b.kind for b in engine.bars] == ["engine", "bucket", "bucket"]  # pause, 2 loads
    assert [b.kind for b in generation.bars] == ["step", "swap"]  # the pause is shading
    assert timeline.pauses_ms == ((4.0, 8.0),)  # the engine's pause only
    assert timeline.errors_ms == (10.0,)
    assert timeline.end_ms == 10.0
    assert timeline.buckets == 2
    assert timeline.title == (
        "weightpipe sync v3: prefetch, 2 buckets, 2.0 MB, hard pause 4.0 ms (failed)"
    )
    assert len(load.bars) == 2


def test_write_timeline_writes_a_png_from_a_trace_file(tmp_path: Path) -> None:
    source = sync_like_trace().write(tmp_path / "trace.json")
    target = tmp_path / "timeline.png"
    assert write_timeline(source, target) == target
    data = target.read_bytes()
    assert len(data) > len(PNG_MAGIC)
    assert data.startswith(PNG_MAGIC)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["timeline.png", "trace.json"]
    assert read_trace(source) == json.loads(source.read_text())


def test_a_file_that_is_no_trace_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "not-a-trace.json"
    path.write_text('{"events": []}')
    with pytest.raises(ValueError, match="not a trace-event JSON object"):
        write_timeline(path, tmp_path / "out.png")
    assert not (tmp_path / "out.png").exists()
