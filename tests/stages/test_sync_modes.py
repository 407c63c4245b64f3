"""Whole syncs into the generating local engine, in each sync mode, and their faults.

A sync either installs every new weight under the new version or raises one
``StageError`` with the old weights and version in place and generation running again.
Synchronisation is by events (a gate stage) and the engine's counters, never by sleeps.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest
import torch

from tests.fakes import FakeEngine, FakeGate, fake_buckets
from tests.fakes.local import (
    BATCH,
    NEW_TOKENS,
    RecordingListener,
    StepAfterLoad,
    assert_weights,
    local_engine,
    new_weights,
    snapshot,
)
from weightpipe.pipeline import Pipeline, StageError
from weightpipe.stages.bucket import WeightBucket
from weightpipe.stages.engines.base import EngineError
from weightpipe.stages.engines.local import GenerationStats, LocalEngine
from weightpipe.stages.fetch import Fetch
from weightpipe.stages.fp8 import dequantize_fp8, quantize_fp8
from weightpipe.stages.load import Load
from weightpipe.stages.quantize import Fp8Quantize
from weightpipe.stages.sync import sync_weights

LONG = 10_000
BUCKET_BYTES = 256 << 10
MODES = ["pause", "prefetch", "in_flight"]


async def assert_still_generating(engine: LocalEngine) -> None:
    assert not engine.paused
    await engine.wait_for_tokens(engine.tokens_generated + BATCH)


@pytest.mark.parametrize("mode", MODES)
async def test_sync_installs_every_weight_in_each_mode(mode: str) -> None:
    async with local_engine() as engine:
        new = new_weights(engine, seed=11)
        await engine.wait_for_tokens(BATCH)
        report = await sync_weights(
            list(new.items()),
            engine,
            version=1,
            stages=[Fetch(BUCKET_BYTES)],
            mode=mode,  # type: ignore[arg-type]
        )
        assert await engine.version() == 1
        assert_weights(engine, new)
        await assert_still_generating(engine)
        done = len(engine.outputs())
        await engine.wait_for_outputs(done + 2 * BATCH)
        assert all(o.weight_version == 1 for o in engine.outputs()[-BATCH:])
    assert report.version == 1
    assert report.mode == mode
    assert report.engine == "local"
    assert report.load.committed
    assert report.load.buckets == report.run.stage("fetch").items_out > 1
    assert report.bytes == report.load.bytes > 0
    assert report.generation is not None
    assert report.tokens_per_s_during_sync is not None
    assert report.longest_gap_s is not None
    # The window sync_weights opened (MeasuresGeneration) heard the one switch: the commit.
    assert isinstance(report.generation, GenerationStats)
    assert report.generation.weight_writes == 1
    assert report.generation.swap_s > 0.0
    if mode == "in_flight":
        assert report.hard_pause_s == 0.0
        assert report.generation.paused_s == 0.0
    else:
        assert report.hard_pause_s > 0.0
    assert "v1 on 'local'" in report.format()


@pytest.mark.parametrize("mode", MODES)
async def test_fetch_fp8quantize_load_end_to_end(mode: str) -> None:
    async with local_engine() as engine:
        new = new_weights(engine, seed=12)
        report = await sync_weights(
            list(new.items()),
            engine,
            version=3,
            stages=[Fetch(BUCKET_BYTES), Fp8Quantize()],
            mode=mode,  # type: ignore[arg-type]
        )
        assert await engine.version() == 3
        fp8_names = {
            n.removesuffix("_scale_inv") for n in report.load.names if n.endswith("_scale_inv")
        }
        # Every linear layer went as FP8; embeddings, lm_head and norms as bf16.
        assert len(fp8_names) == 2 * 7
        assert "model.layers.1.mlp.down_proj.weight" in fp8_names
        assert "lm_head.weight" not in fp8_names
        for name, weight in new.items():
            served = engine.parameter(name)
            if name in fp8_names:
                q, scale = quantize_fp8(weight)
                assert torch.equal(served, dequantize_fp8(q, scale, dtype=served.dtype)), name
            else:
                assert torch.equal(served, weight), name
        assert report.run.stage("quantize").items_out == report.load.buckets
        await assert_still_generating(engine)


@pytest.mark.parametrize(
    ("mode", "paused_upstream"),
    [
        ("pause", True),
        ("prefetch", False),
        ("in_flight", False),
    ],
)
async def test_generation_runs_while_upstream_works_unless_pause_mode(
    mode: str, paused_upstream: bool
) -> None:
    async with local_engine() as engine:
        new = new_weights(engine, seed=13)
        gate = FakeGate(hold_at=0)
        async with anyio.create_task_group() as group:
            group.start_soon(
                lambda: sync_weights(
                    list(new.items()),
                    engine,
                    version=1,
                    stages=[Fetch(BUCKET_BYTES), gate],
                    mode=mode,  # type: ignore[arg-type]
                )
            )
            await gate.reached.wait()
            assert engine.paused is paused_upstream
            if not paused_upstream:  # fetch is running and tokens keep coming
                await engine.wait_for_tokens(engine.tokens_generated + BATCH)
            gate.release.set()
        assert await engine.version() == 1
        await assert_still_generating(engine)


async def test_prefetch_look_ahead_keeps_generating_until_the_last_bucket() -> None:
    async with local_engine() as engine:
        new = new_weights(engine, seed=19)
        gate = FakeGate(hold_at=3)  # buckets 0-2 may already be waiting in Load
        async with anyio.create_task_group() as group:
            group.start_soon(
                lambda: sync_weights(
                    list(new.items()),
                    engine,
                    version=1,
                    stages=[Fetch(BUCKET_BYTES), gate],
                    mode="prefetch",
                    prefetch_bytes=None,
                )
            )
            await gate.reached.wait()
            assert not engine.paused
            await engine.wait_for_tokens(engine.tokens_generated + BATCH)
            gate.release.set()
        assert await engine.version() == 1
        assert_weights(engine, new)
        await assert_still_generating(engine)


async def test_in_flight_buckets_are_not_served_before_the_commit() -> None:
    async with local_engine(max_new_tokens=LONG) as engine:
        await engine.wait_for_tokens(BATCH)
        new = new_weights(engine, seed=14)
        first = next(iter(new))
        old = engine.parameter(first)
        after_load = FakeGate(hold_at=0)  # holds bucket 0 after the engine applied it
        load = Load(engine, mode="in_flight")
        pipeline = Pipeline([Fetch(BUCKET_BYTES, version=1), load, after_load], depth=1)
        async with anyio.create_task_group() as group:
            group.start_soon(pipeline.run, list(new.items()))
            await after_load.reached.wait()
            assert not engine.paused
            assert await engine.version() == 0
            assert torch.equal(engine.parameter(first), old)  # staged only
            # The running batch still runs on the old weights alone; let it finish now.
            engine.max_new_tokens = NEW_TOKENS
            await engine.wait_for_outputs(BATCH)
            mixed = engine.outputs()[:BATCH]
            after_load.release.set()
        assert await engine.version() == 1
        done = len(engine.outputs())
        await engine.wait_for_outputs(done + 2 * BATCH)
        clean = engine.outputs()[-BATCH:]
    assert load.report.hard_pause_s == 0.0
    assert all(o.weight_version == 0 and not o.weights_changed for o in mixed)
    assert all(set(o.token_versions) == {0} for o in mixed)
    assert all(o.started_version == 1 and o.weight_version == 1 for o in clean)
    assert all(set(o.token_versions) == {1} for o in clean)
    assert not any(o.weights_changed for o in clean)


def bad_tensor(kind: str, new: dict[str, torch.Tensor]) -> tuple[str, torch.Tensor]:
    name = "model.layers.1.mlp.up_proj.weight"
    if kind == "unknown-name":
        return "model.layers.1.mlp.up_proj.weigth", new[name]
    if kind == "shape":
        return name, new[name].t().contiguous()
    return name, new[name].float()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["unknown-name", "shape", "dtype"])
async def test_bad_tensor_in_the_last_bucket_leaves_the_old_weights(mode: str, kind: str) -> None:
    async with local_engine() as engine:
        old = snapshot(engine)
        new = new_weights(engine, seed=15)
        pairs = [(n, t) for n, t in new.items() if n != "model.layers.1.mlp.up_proj.weight"]
        pairs.append(bad_tensor(kind, new))
        source = fake_buckets(pairs, per_bucket=5, version=1)
        with pytest.raises(StageError) as info:
            await sync_weights(source, engine, version=1, mode=mode)  # type: ignore[arg-type]
        cause = info.value.__cause__
        assert isinstance(cause, EngineError)
        assert cause.tensor is not None
        assert cause.tensor.startswith("model.layers.1.mlp.up_proj.")
        assert info.value.stage == "load"
        assert f"bucket {len(source) - 1} of v1" in str(info.value)
        assert await engine.version() == 0
        assert_weights(engine, old)  # the buckets before it were rolled back
        await assert_still_generating(engine)


@pytest.mark.parametrize("mode", MODES)
async def test_source_failing_mid_sync_leaves_the_old_weights(mode: str) -> None:
    async with local_engine() as engine:
        old = snapshot(engine)
        new = new_weights(engine, seed=16)

        async def trainer() -> AsyncIterator[tuple[str, torch.Tensor]]:
            for count, pair in enumerate(new.items()):
                if count == 20:
                    raise ConnectionError("trainer rank 3 went away")
                yield pair

        with pytest.raises(StageError, match="trainer rank 3 went away") as info:
            await sync_weights(
                trainer(),
                engine,
                version=1,
                stages=[Fetch(64 << 10)],
                mode=mode,  # type: ignore[arg-type]
            )
        assert info.value.stage == "source"
        assert await engine.version() == 0
        assert_weights(engine, old)
        await assert_still_generating(engine)


async def test_cancelled_sync_leaves_the_old_weights() -> None:
    async with local_engine() as engine:
        old = snapshot(engine)
        new = new_weights(engine, seed=17)
        after_load = FakeGate(hold_at=1)  # bucket 1 reaches it only once the engine has it
        load = Load(engine, mode="prefetch")
        pipeline = Pipeline([Fetch(BUCKET_BYTES, version=1), load, after_load], depth=1)
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as group:
                group.start_soon(pipeline.run, list(new.items()))
                await after_load.reached.wait()
                assert engine.paused
                # Loaded but only staged: what generation reads is untouched.
                assert torch.equal(
                    engine.parameter("model.embed_tokens.weight"), old["model.embed_tokens.weight"]
                )
                scope.cancel()
        assert load.report.aborted
        assert await engine.version() == 0
        assert_weights(engine, old)
        await assert_still_generating(engine)


async def test_second_sync_after_a_failed_one_succeeds() -> None:
    async with local_engine() as engine:
        new = new_weights(engine, seed=18)
        broken = [*list(new.items())[:-1], ("lm_head.weight", torch.zeros(3))]
        with pytest.raises(StageError):
            await sync_weights(broken, engine, version=1, stages=[Fetch(BUCKET_BYTES)])
        report = await sync_weights(
            list(new.items()), engine, version=1, stages=[Fetch(BUCKET_BYTES)]
        )
        assert report.load.committed
        assert await engine.version() == 1
        assert_weights(engine, new)


async def test_sync_against_a_timing_out_engine() -> None:
    engine = FakeEngine(fail_at={"load": "hang"})
    source = fake_buckets({"w": torch.zeros(2)}, per_bucket=1, version=4)
    with pytest.raises(StageError, match=r"did not answer within 0\.05 s") as info:
        await sync_weights(source, engine, version=4, timeout_s=0.05)
    assert info.value.stage == "load"
    assert await engine.version() == 0
    # A load never answered may have been applied, and this engine cannot roll back: it is
    # dirty and stays paused until a full sync commits.
    assert getattr(info.value, "engine_dirty", False)
    assert "may have applied one it never answered" in str(info.value.__cause__)
    assert engine.paused
    assert ("abort", 4) in engine.calls
    engine.fail_at.clear()
    await sync_weights(
        fake_buckets({"w": torch.ones(2)}, per_bucket=1, version=5), engine, version=5
    )
    assert await engine.version() == 5
    assert not engine.paused


async def test_sync_report_without_generation_figures_for_other_engines() -> None:
    engine = FakeEngine()
    source = fake_buckets({"a": torch.zeros(2), "b": torch.ones(2)}, per_bucket=1, version=2)
    report = await sync_weights(source, engine, version=2, mode="pause", pause_mode="abort")
    assert report.generation is None
    assert report.tokens_per_s_during_sync is None
    assert report.bytes == 16
    assert engine.pause_modes == ["abort"]
    assert "tokens/s" not in report.format()


async def test_buckets_of_another_version_are_refused() -> None:
    engine = FakeEngine()
    source: list[WeightBucket] = fake_buckets({"a": torch.zeros(2)}, per_bucket=1, version=2)
    with pytest.raises(StageError, match="does not belong to the sync of v3"):
        await sync_weights(source, engine, version=3)
    assert engine.calls == []  # refused before prefetch mode paused anything


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", MODES)
async def test_cuda_fetch_fp8quantize_load(mode: str) -> None:  # pragma: no cover
    async with local_engine(device="cuda") as engine:
        new = new_weights(engine, seed=21)
        report = await sync_weights(
            list(new.items()),
            engine,
            version=1,
            stages=[Fetch(BUCKET_BYTES, device="cuda"), Fp8Quantize()],
            mode=mode,  # type: ignore[arg-type]
        )
        assert report.load.committed
        name = "model.layers.0.mlp.up_proj.weight"
        q, scale = quantize_fp8(new[name].cuda())
        served = engine.parameter(name)
        assert served.is_cuda
        assert torch.equal(served, dequantize_fp8(q, scale, dtype=served.dtype))
        assert torch.equal(engine.parameter("lm_head.weight").cpu(), new["lm_head.weight"])
        await assert_still_generating(engine)


def test_overlap_benchmark_writes_every_mode(tmp_path: Path) -> None:
    from weightpipe.benchmarks import overlap

    path = tmp_path / "overlap.json"
    overlap.main(
        [
            "--json",
            str(path),
            "--size",
            "small",
            "--repeats",
            "1",
            "--idle-s",
            "0.05",
            "--batch",
            "2",
            "--new-tokens",
            "4",
            "--bucket-mb",
            "1",
        ]
    )
    data = json.loads(path.read_text())
    assert set(data["modes"]) == {"pause", "prefetch", "prefetch_lookahead", "in_flight"}
    for figures in data["modes"].values():
        for key in ("sync_s", "hard_pause_ms", "tokens_per_s_idle", "tokens_per_s_during_sync"):
            assert figures[key] >= 0
    for figures in data["modes"].values():
        assert figures["mixed_steps"] == 0
        assert figures["swap_ms"] > 0
    assert data["fp8"] is True
    assert data["final_version"] == 4


@pytest.mark.parametrize("mode", MODES)
async def test_no_step_reads_two_versions_over_50_syncs(mode: str) -> None:
    """Every decode step reads one version, with steps forced between the buckets of each
    ``in_flight`` sync: per-bucket switching would make those steps read two."""
    listener = RecordingListener()
    async with local_engine(track_versions=True) as engine:
        engine.add_listener(listener)
        weights = [list(new_weights(engine, seed=seed).items()) for seed in (31, 32)]
        for version in range(1, 51):
            load = Load(engine, mode=mode)  # type: ignore[arg-type]
            stages = [Fetch(BUCKET_BYTES, version=version), load, StepAfterLoad(engine)]
            await Pipeline(stages, depth=1).run(weights[version % 2])
            assert load.report.committed and load.report.buckets > 1
        await engine.wait_for_tokens(engine.tokens_generated + BATCH)
        outputs = engine.outputs()
    assert all(len(read) == 1 for read in listener.step_versions)
    read = [next(iter(r)) for r in listener.step_versions]
    assert read == sorted(read)  # type: ignore[type-var]
    assert read[-1] == 50
    if mode == "in_flight":  # every version served steps, also while the next one loaded
        assert set(read) == set(range(51))
    for output in outputs:
        assert list(output.token_versions) == sorted(output.token_versions)  # type: ignore[type-var]


# -- SGLang: no update reaches a generating server, in any mode ----------------------------


def _sglang_weights(seed: int) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        ("model.embed_tokens.weight", torch.randn(64, 32, generator=g).to(torch.bfloat16)),
        *(
            (f"model.layers.{i}.mlp.down_proj.weight", torch.randn(160, 130, generator=g))
            for i in range(3)
        ),
        ("model.norm.weight", torch.randn(32, generator=g).to(torch.bfloat16)),
    ]


def _sglang_spec() -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """What the double's model holds: the names, shapes and dtypes Fp8Quantize sends."""
    sample = WeightBucket(tuple(_sglang_weights(0)), index=0, is_last=True, version=1)
    return {n: (tuple(t.shape), t.dtype) for n, t in Fp8Quantize().quantize_bucket(sample).tensors}


@pytest.mark.parametrize(
    ("mode", "prefetch_bytes"), [*((m, 0) for m in MODES), ("in_flight", None)]
)
async def test_no_update_reaches_a_generating_sglang_server(
    mode: str, prefetch_bytes: int | None
) -> None:
    from tests.fakes.sglang_http import SGLangHTTPDouble
    from weightpipe.stages.engines.sglang.http import SGLangHTTPEngine

    with SGLangHTTPDouble(_sglang_spec()) as server:
        async with SGLangHTTPEngine(server.url) as engine:
            for version in range(1, 4):
                report = await sync_weights(
                    _sglang_weights(version),
                    engine,
                    version=version,
                    stages=[Fetch(40 << 10), Fp8Quantize()],
                    mode=mode,  # type: ignore[arg-type]
                    prefetch_bytes=prefetch_bytes,
                )
                assert report.load.committed and report.load.buckets > 1
                assert await engine.version() == version
        assert server.paths().count("/update_weights_from_tensor") > 3
        assert server.unpaused_updates == []  # every update arrived inside a pause
        pauses = [c.body["mode"] for c in server.calls if c.path == "/pause_generation"]
        assert pauses == ["in_place" if mode == "in_flight" else "retract"] * 3
        assert server.paused is None
