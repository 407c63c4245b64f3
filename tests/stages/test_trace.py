"""``sync_weights(..., trace=PATH)``: the trace of a real sync into the generating local
engine is valid trace-event JSON (``tests.trace_check``) with one track per stage worker,
the engine's and generation's, a slice per bucket per stage, the pause and the decode
steps; a failed sync still writes its trace, with the error; a trace that cannot be
written never hides the sync's outcome.

Synchronisation is by the engine's token counter, never by sleeps; no timing is asserted.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.fakes import FakeEngine, fake_buckets
from tests.fakes.local import BATCH, local_engine, new_weights
from tests.trace_check import CheckedTrace, check_trace
from weightpipe.pipeline import Stage, StageError
from weightpipe.pipeline.trace import SpanRecorder
from weightpipe.stages.bucket import WeightBucket
from weightpipe.stages.engines.local import LocalEngine
from weightpipe.stages.fetch import Fetch
from weightpipe.stages.quantize import Fp8Quantize
from weightpipe.stages.sync import sync_weights
from weightpipe.stages.trace import bucket_index

BUCKET_BYTES = 256 << 10


class StepBeforeLoad(Stage[WeightBucket, WeightBucket]):
    """Before Load: holds bucket 0 until the engine took one more decode step, so a step
    surely runs inside the sync (only bucket 0: later ones may meet a pausing engine)."""

    name = "step"

    def __init__(self, engine: LocalEngine) -> None:
        self.engine = engine

    async def process(self, item: WeightBucket) -> list[WeightBucket]:
        if item.index == 0 and not self.engine.paused:
            await self.engine.wait_for_tokens(self.engine.tokens_generated + BATCH)
        return [item]


class FailAt(Stage[WeightBucket, WeightBucket]):
    """Fails at bucket ``index`` (a stage's own error, mid-stream)."""

    name = "fail_at"

    def __init__(self, index: int) -> None:
        self.index = index

    async def process(self, item: WeightBucket) -> list[WeightBucket]:
        if item.index == self.index:
            raise RuntimeError(f"refusing bucket {item.index}")
        return [item]


def read_trace(path: Path) -> CheckedTrace:
    return check_trace(json.loads(path.read_text(encoding="utf-8")))


def buckets_on(checked: CheckedTrace, *tracks: str) -> list[int]:
    """The bucket of each slice on ``tracks``, sorted."""
    return sorted(e["args"]["bucket"] for t in tracks for e in checked.slices[t])


def within(inner: dict[str, Any], outer: dict[str, Any]) -> bool:
    return bool(
        outer["ts"] <= inner["ts"] and inner["ts"] + inner["dur"] <= outer["ts"] + outer["dur"]
    )


@pytest.mark.parametrize("mode", ["prefetch", "in_flight"])
async def test_the_trace_of_a_sync_into_the_local_engine(mode: str, tmp_path: Path) -> None:
    path = tmp_path / "sync.json"
    async with local_engine() as engine:
        await engine.wait_for_tokens(BATCH)
        report = await sync_weights(
            list(new_weights(engine, seed=3).items()),
            engine,
            version=1,
            stages=[Fetch(BUCKET_BYTES), Fp8Quantize(workers=2), StepBeforeLoad(engine)],
            mode=mode,  # type: ignore[arg-type]
            trace=path,
        )
    assert report.trace_path == path
    assert report.trace_error is None
    checked = read_trace(path)
    buckets = report.load.buckets
    assert buckets > 1
    assert checked.process == "weightpipe sync v1"
    assert checked.tracks == [
        "sync",
        "fetch",
        "quantize #1",
        "quantize #2",
        "step",
        "load",
        "engine local",
        "generation",
    ]
    # One slice per bucket on every stage, named by its bucket (one colour per bucket).
    for tracks in (("fetch",), ("quantize #1", "quantize #2"), ("step",), ("load",)):
        assert buckets_on(checked, *tracks) == list(range(buckets)), tracks
    assert all(e["name"] == f"bucket {e['args']['bucket']}" for e in checked.slices["load"])
    (sync,) = checked.slices["sync"]
    assert sync["args"]["committed"] is True
    assert checked.instants["sync"] == []  # no error
    for track in checked.tracks[1:]:
        assert all(within(e, sync) for e in checked.slices[track]), track

    engine_calls = checked.slices["engine local"]
    loads = [e for e in engine_calls if e["name"] == "load"]
    assert [e["args"]["bucket"] for e in loads] == list(range(buckets))
    assert [e["name"] for e in engine_calls if e["name"] in ("begin", "commit")] == [
        "begin",
        "commit",
    ]
    paused = [e for e in engine_calls if e["name"] == "paused"]
    generation = checked.slices["generation"]
    steps = [e for e in generation if e["name"] == "step"]
    assert steps  # StepBeforeLoad made sure of one inside the sync
    assert all(e["args"]["mixed"] is False for e in steps)
    assert all(e["args"]["tokens"] > 0 for e in steps)
    assert [e["name"] for e in generation].count("swap") == 1  # the switch at commit
    # A step's slice starts where the generation thread's previous slice ended: the
    # steps tile the track (a finished batch, reported just before its step, moves
    # nothing).
    ends = [0] + [e["ts"] + e["dur"] for e in generation[:-1]]
    assert all(
        e["ts"] == end for e, end in zip(generation, ends, strict=True) if e["name"] == "step"
    )
    if mode == "in_flight":
        assert paused == []
        assert "pause" not in [e["name"] for e in engine_calls]
    else:
        (pause,) = paused
        assert pause["args"]["left_paused"] is False
        phases = pause["args"]["phases"]
        assert set(phases) == {
            "first_payload_ms",
            "engine_calls_ms",
            "between_calls_ms",
            "resume_ms",
        }
        assert sum(phases.values()) == pytest.approx(pause["args"]["hard_pause_ms"])
        # Every load and the commit ran while generation was stopped, and no step did.
        assert all(within(e, pause) for e in engine_calls if e["name"] in ("load", "commit"))
        assert [e["name"] for e in generation].count("paused") == 1


async def test_a_failed_sync_writes_its_trace_with_the_error(tmp_path: Path) -> None:
    path = tmp_path / "failed.json"
    async with local_engine() as engine:
        await engine.wait_for_tokens(BATCH)
        with pytest.raises(StageError, match="refusing bucket 1") as caught:
            await sync_weights(
                list(new_weights(engine, seed=4).items()),
                engine,
                version=1,
                stages=[Fetch(BUCKET_BYTES), FailAt(1)],
                mode="pause",
                trace=path,
            )
        assert await engine.version() == 0
    if sys.version_info >= (3, 11):  # exception notes
        assert f"the sync's trace is in {path}" in caught.value.__notes__
    checked = read_trace(path)
    (sync,) = checked.slices["sync"]
    assert sync["args"]["committed"] is False
    (error,) = checked.instants["sync"]
    assert error["name"] == "error"
    assert error["args"]["stage"] == "fail_at"
    assert error["args"]["cause"] == "RuntimeError: refusing bucket 1"
    assert error["ts"] == sync["ts"] + sync["dur"]
    # Pause mode paused at Load's open; the failed sync resumed generation.
    (pause,) = [e for e in checked.slices["engine local"] if e["name"] == "paused"]
    assert pause["args"]["left_paused"] is False
    assert "resume" in [e["name"] for e in checked.slices["engine local"]]


async def test_an_unwritable_trace_never_hides_the_sync_s_outcome(tmp_path: Path) -> None:
    nowhere = tmp_path / "missing" / "trace.json"
    engine = FakeEngine()
    tensors = [(f"w{i}", torch_full(i)) for i in range(3)]
    report = await sync_weights(
        fake_buckets(tensors, per_bucket=1, version=1), engine, version=1, trace=nowhere
    )
    assert report.load.committed
    assert report.trace_path is None
    assert report.trace_error is not None
    assert "FileNotFoundError" in report.trace_error
    # A failed sync raises its own error, not the trace's, and a note says what happened.
    with pytest.raises(StageError, match="refusing bucket 0") as caught:
        await sync_weights(
            fake_buckets(tensors, per_bucket=1, version=2),
            engine,
            version=2,
            stages=[FailAt(0)],
            trace=nowhere,
        )
    if sys.version_info >= (3, 11):  # exception notes
        assert any("could not be written" in note for note in caught.value.__notes__)
    assert not nowhere.parent.exists()


async def test_a_trace_over_a_caller_s_observer_and_an_engine_without_listeners(
    tmp_path: Path,
) -> None:
    inner = SpanRecorder()
    engine = FakeEngine()
    tensors = [(f"w{i}", torch_full(i)) for i in range(3)]
    report = await sync_weights(
        fake_buckets(tensors, per_bucket=1, version=1),
        engine,
        version=1,
        observer=inner,
        trace=tmp_path / "t.json",
    )
    checked = read_trace(tmp_path / "t.json")
    # The caller's observer heard the run, its spans too.
    assert inner.stages == (("load", 1),)
    assert [s.stage for s in inner.spans] == ["load"] * 3
    assert checked.tracks == ["sync", "load", "engine fake"]  # no generation track
    assert buckets_on(checked, "load") == [0, 1, 2]
    assert report.trace_path == tmp_path / "t.json"


def torch_full(value: int) -> torch.Tensor:
    return torch.full((4,), float(value))


def test_bucket_index_reads_bucket_descriptions_and_load_calls() -> None:
    assert bucket_index("bucket 3 of v7 (2 tensors, first 'a')") == 3
    assert bucket_index("load of bucket 12 of v1 (1 tensors, first 'b', last)") == 12
    assert bucket_index("commit") is None
    assert bucket_index("'model.embed_tokens.weight'") is None
