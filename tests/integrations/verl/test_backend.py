"""The ``weightpipe`` checkpoint engine, driven by verl's own classes.

Runs in the verl environment (``.ci/test-verl``); skipped where verl is not installed.
The two-process test is a verl weight sync without Ray: process 0 is the trainer (its own
default process group, as FSDP has, then verl's actor-side calls: the registry through
``custom_backend_module``, ``prepare``, ``build_topology``, ``init_process_group``,
``send_weights``, ``finalize``), process 1 is a rollout worker: verl's real
``CheckpointEngineWorker``, built from a real ``RolloutConfig`` naming the backend and
the module, whose ``update_weights`` drives the backend's ``receive_weights`` into the
weightpipe updater and from there into the SGLang HTTP test double (decoding with
SGLang's own code). The metadata the driver would collect through Ray is handed over in
a file. Two steps run, so the group is torn down and rebuilt as verl does every step.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("verl")
pytest.importorskip("sglang")

from verl.checkpoint_engine import CheckpointEngineManager, CheckpointEngineRegistry
from verl.utils.import_utils import import_external_libs
from verl.workers.config import CheckpointEngineConfig

from tests.helpers import free_port, run_ranks
from weightpipe.stages.integrations.verl import WeightpipeCheckpointEngine

MODULE = "weightpipe.stages.integrations.verl"
ENGINE_KWARGS: dict[str, Any] = {"master_address": "127.0.0.1", "device": "cpu", "timeout_s": 60}
BUCKET_MB = 1
STEPS = ((7, 0), (8, 1))  # (global_steps, seed of that step's weights)


def test_verls_manager_resolves_the_backend_through_custom_backend_module() -> None:
    config = CheckpointEngineConfig(backend="weightpipe", custom_backend_module=MODULE)
    manager = CheckpointEngineManager(config, actor_wg=None, replicas=[])
    assert manager.backend_cls is WeightpipeCheckpointEngine
    import_external_libs(MODULE)
    engine = CheckpointEngineRegistry.new(
        "weightpipe", bucket_size=1 << 20, is_master=True, **ENGINE_KWARGS
    )
    assert isinstance(engine, WeightpipeCheckpointEngine)
    assert engine.wire_format == "named_tensors"


def test_prepare_and_build_topology_follow_verls_contract() -> None:
    master = WeightpipeCheckpointEngine(1 << 20, is_master=True, **ENGINE_KWARGS)
    other = WeightpipeCheckpointEngine(1 << 20, **ENGINE_KWARGS)
    meta = master.prepare()
    assert meta["master_address"] == "127.0.0.1" and isinstance(meta["master_port"], int)
    assert other.prepare() == {}
    actor, rollout = WeightpipeCheckpointEngine.build_topology(3, 2, [meta, {}, {}, {}, {}])
    assert actor["rank"] == [0, -1, -1]
    assert rollout["rank"] == [1, 2]
    assert actor["world_size"] == [3] * 3 and rollout["world_size"] == [3] * 2
    for kwargs, size in ((actor, 3), (rollout, 2)):
        assert all(len(v) == size for v in kwargs.values())  # verl asserts this
        assert kwargs["master_port"] == [meta["master_port"]] * size
    with pytest.raises(ValueError, match="is_master"):
        WeightpipeCheckpointEngine.build_topology(1, 1, [{}, {}])


async def test_a_worker_outside_the_group_walks_the_stream_and_reports_nothing() -> None:
    engine = WeightpipeCheckpointEngine(1 << 20, **ENGINE_KWARGS)
    engine.init_process_group(rank=-1, world_size=3, master_address="127.0.0.1", master_port=1)
    walked: list[str] = []

    def weights() -> Any:
        for name in ("a", "b"):
            walked.append(name)
            yield name, torch.zeros(2)

    assert await engine.send_weights(weights(), global_steps=1) == {}
    assert walked == ["a", "b"]


def _flushes(server: Any) -> int:
    """Cache flushes so far: ``/flush_cache`` calls and updates that carried the flush."""
    folded = sum(
        1
        for c in server.calls
        if c.path == "/update_weights_from_tensor" and c.body.get("flush_cache")
    )
    return int(server.paths().count("/flush_cache")) + folded


def _handover(port: int, step: int) -> Path:
    return Path(tempfile.gettempdir()) / f"weightpipe-verl-{port}-{step}.json"


def _trainer(rank: int, port: int, results: Any) -> None:
    try:
        import asyncio

        import torch.distributed as dist

        from tests.integrations.verl._model import llama_weights

        init = Path(tempfile.gettempdir()) / f"weightpipe-verl-{port}-trainer-pg"
        dist.init_process_group("gloo", init_method=f"file://{init}", rank=0, world_size=1)
        # What verl's actor worker does (engine_workers.py): import the module, then build.
        import_external_libs(MODULE)
        engine = CheckpointEngineRegistry.new(
            "weightpipe", is_master=True, bucket_size=BUCKET_MB << 20, **ENGINE_KWARGS
        )
        all_metrics = []
        for step, seed in STEPS:
            meta = engine.prepare()
            handover = _handover(port, step)
            handover.with_suffix(".tmp").write_text(json.dumps(meta))
            handover.with_suffix(".tmp").rename(handover)
            actor, _ = type(engine).build_topology(1, 1, [meta, {}])
            engine.init_process_group(**{k: v[0] for k, v in actor.items()})

            def weights(seed: int = seed) -> Any:
                yield from llama_weights(seed)

            all_metrics.append(asyncio.run(engine.send_weights(weights(), global_steps=step)))
            engine.finalize()
        results.put((rank, "ok", all_metrics))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))


def _rollout(rank: int, port: int, results: Any) -> None:
    try:
        import asyncio
        import types

        from verl.checkpoint_engine import CheckpointEngineWorker
        from verl.utils.sglang.sglang_fp8_utils import build_sglang_fp8_quant_config
        from verl.workers.config import RolloutConfig

        from tests.fakes.sglang_http import SGLangHTTPDouble
        from tests.integrations.verl._model import QUANTIZED_SUFFIXES, fp8_spec, llama_weights
        from weightpipe.stages import SGLangHTTPEngine, quantize_fp8
        from weightpipe.stages.integrations.verl import updater_for_rollout

        init = Path(tempfile.gettempdir()) / f"weightpipe-verl-{port}-rollout-pg"
        # verl's Worker reads these; its CheckpointEngineWorker then builds its own group.
        os.environ.update(
            WORLD_SIZE="1",
            RANK="0",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            DIST_INIT_METHOD=f"file://{init}",
        )
        config = RolloutConfig(
            name="sglang",
            quantization="fp8",
            checkpoint_engine=CheckpointEngineConfig(
                backend="weightpipe",
                custom_backend_module=MODULE,
                update_weights_bucket_megabytes=BUCKET_MB,
                engine_kwargs={"weightpipe": ENGINE_KWARGS},
            ),
        )
        hf_config = types.SimpleNamespace(
            model_type="llama", quantization_config=build_sglang_fp8_quant_config(None)
        )
        problems: list[str] = []
        with SGLangHTTPDouble(fp8_spec(llama_weights())) as server:

            async def main() -> None:
                engine = SGLangHTTPEngine(server.url, retries=0, timeout_s=60)
                updater = updater_for_rollout(config, hf_config, engine)
                worker = CheckpointEngineWorker(config, None, server_adapter=updater)
                backend = worker.checkpoint_engine
                assert isinstance(backend, WeightpipeCheckpointEngine)
                async with updater:
                    for step, seed in STEPS:
                        handover = _handover(port, step)
                        deadline = time.monotonic() + 60
                        while not handover.exists():  # the trainer's prepare(), via "Ray"
                            if time.monotonic() > deadline:
                                raise TimeoutError(f"no metadata from the trainer for {step}")
                            await asyncio.sleep(0.05)
                        meta = json.loads(handover.read_text())
                        handover.unlink()
                        _, rollout = type(backend).build_topology(1, 1, [meta, backend.prepare()])
                        kwargs = {k: v[0] for k, v in rollout.items()}
                        await asyncio.to_thread(backend.init_process_group, **kwargs)
                        flushes = _flushes(server)
                        await worker.update_weights(global_steps=step)
                        backend.finalize()
                        if server.weight_version != str(step):
                            problems.append(f"step {step}: version {server.weight_version}")
                        if _flushes(server) != flushes + 1:
                            problems.append(f"step {step}: not exactly one flush")
                        for name, tensor in llama_weights(seed):
                            got = server.weights[name]
                            if not name.endswith(QUANTIZED_SUFFIXES):
                                if not torch.equal(got, tensor):
                                    problems.append(f"step {step}: {name} differs")
                                continue
                            want = quantize_fp8(tensor, block=(128, 128), arithmetic="verl")
                            same = torch.equal(
                                got.view(torch.uint8), want.qweight.view(torch.uint8)
                            ) and torch.equal(server.weights[name + "_scale_inv"], want.scale)
                            if not same:
                                problems.append(f"step {step}: {name} FP8 differs")

            asyncio.run(main())
        results.put((rank, "ok" if not problems else "error", problems))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))


def _rank(rank: int, port: int, results: Any) -> None:
    (_trainer if rank == 0 else _rollout)(rank, port, results)


@pytest.mark.slow
def test_verls_checkpoint_engine_worker_drives_the_backend_and_updater_into_sglang() -> None:
    reports = run_ranks(_rank, 2, free_port(), timeout_s=180)
    assert reports[1] == ("ok", []), reports[1][1]
    status, metrics = reports[0]
    assert status == "ok", metrics
    for step_metrics in metrics:
        assert step_metrics["weightpipe/bytes"] >= sum(t.nbytes for _, t in _weights())
        assert step_metrics["weightpipe/buckets"] > 1
        assert step_metrics["weightpipe/gb_per_s"] > 0
        for stage in ("fetch", "send"):
            assert f"weightpipe/{stage}/busy_s" in step_metrics


def _weights() -> list[tuple[str, torch.Tensor]]:
    from tests.integrations.verl._model import llama_weights

    return llama_weights()
