"""The device parts of ``benchmarks/gpu_check.sh``: one subcommand each, one JSON each.

- ``fetch_h2d``: Fetch host-to-device from pinned staging on its copy stream (the whole
  stage, end to end) against a plain pinned ``copy_(non_blocking=True)`` of the same bytes.
- ``end_to_end``: Fetch -> Fp8Quantize on the device (GB/s of bf16 in, end to end) against
  the FP8 kernel alone on weights already there (``quantize_fp8_batch``), so the share of
  the kernel's speed the pipeline keeps is measured (issue 11, item 5).
- ``local_engine_cuda``: the local engine generating on the device while it syncs in each
  mode: hard pause, mixed steps (must be 0), tokens/s during a sync against just before.
- ``cuda_ipc_sglang``: a flattened FP8 bucket (Fetch -> Fp8Quantize on the device, then the
  SGLang wire encoding) sent to a second process that decodes it with SGLang's own code
  (``monkey_patch_torch_reductions``, ``MultiprocessingSerializer``,
  ``FlattenedTensorBucket``), as an SGLang server does; the bytes must match, and the
  payload must name the GPU by UUID.

``--dry-run`` runs every part at a tiny size on the CPU (where a part has a CPU form:
the IPC part then sends shared-memory handles), so CI checks the script's code paths;
the figures of a dry run mean nothing. Timings here are benchmarks, never test asserts.

Usage: ``python -m benchmarks.gpu_parts PART --json PATH [--dry-run]``
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import anyio
import torch

from weightpipe.pipeline import Pipeline
from weightpipe.stages.bucket import WeightBucket
from weightpipe.stages.engines.sglang import wire
from weightpipe.stages.fetch import Fetch
from weightpipe.stages.fp8 import QuantizeBackend, quantize_fp8_batch
from weightpipe.stages.quantize import Fp8Quantize

PARTS = ("fetch_h2d", "end_to_end", "local_engine_cuda", "cuda_ipc_sglang")


def _device(dry_run: bool) -> torch.device:
    if dry_run:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("gpu_parts: no CUDA device (use --dry-run on a CPU machine)")
    return torch.device("cuda", torch.cuda.current_device())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _weights(total_bytes: int, *, seed: int = 0) -> list[tuple[str, torch.Tensor]]:
    """bf16 Llama-like linear weights (host memory), ``total_bytes`` in all; random
    values (never zeros: they hide unwritten outputs and run faster)."""
    gen = torch.Generator().manual_seed(seed)
    side = 2048 if total_bytes >= 64 << 20 else 256
    count = max(1, total_bytes // (side * side * 2))
    return [
        (
            f"model.layers.{i}.mlp.up_proj.weight",
            (torch.randn(side, side, generator=gen) * 0.02).to(torch.bfloat16),
        )
        for i in range(count)
    ]


def _nbytes(pairs: list[tuple[str, torch.Tensor]]) -> int:
    return sum(t.numel() * t.element_size() for _, t in pairs)


def _median_s(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median wall time of ``fn`` (synchronized before and after each run), warmed once."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


def _run_stages(
    stages: list[Any], pairs: list[tuple[str, torch.Tensor]], device: torch.device
) -> list[WeightBucket]:
    """One pipeline run; the sink waits (on the device) for each bucket, keeps them."""
    buckets: list[WeightBucket] = []

    async def sink(bucket: WeightBucket) -> None:
        if device.type == "cuda":
            bucket.wait_ready(torch.cuda.current_stream(device))
        buckets.append(bucket)

    async def run() -> None:
        await Pipeline(stages, depth=2).run(pairs, sink=sink)

    anyio.run(run)
    _sync(device)
    return buckets


def fetch_h2d(dry_run: bool) -> dict[str, Any]:
    device = _device(dry_run)
    pairs = _weights(8 << 20 if dry_run else 1 << 30)
    nbytes = _nbytes(pairs)
    bucket_bytes = (1 << 20) if dry_run else (256 << 20)
    repeats = 2 if dry_run else 5
    pinned = device.type == "cuda"
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    plain_s = _median_s(lambda: dst.copy_(src, non_blocking=True), repeats, device)
    fetch = Fetch(bucket_bytes, device=device, flatten=True, keep_buffers=4)
    fetch_s = _median_s(lambda: _run_stages([fetch], pairs, device), repeats, device)
    return {
        "device": str(device),
        "bytes": nbytes,
        "bucket_bytes": bucket_bytes,
        "plain_pinned_copy_gbps": nbytes / plain_s / 1e9,
        "fetch_gbps": nbytes / fetch_s / 1e9,
        "fetch_fraction_of_plain_copy": plain_s / fetch_s,
    }


def end_to_end(dry_run: bool) -> dict[str, Any]:
    device = _device(dry_run)
    pairs = _weights(8 << 20 if dry_run else 1 << 30, seed=1)
    nbytes = _nbytes(pairs)
    repeats = 2 if dry_run else 5
    on_device = [t.to(device) for _, t in pairs]
    backend: QuantizeBackend = "auto" if dry_run else "triton"
    kernel_s = _median_s(lambda: quantize_fp8_batch(on_device, backend=backend), repeats, device)
    fetch = Fetch((1 << 20) if dry_run else (256 << 20), device=device, keep_buffers=4)
    quantize = Fp8Quantize()
    pipeline_s = _median_s(lambda: _run_stages([fetch, quantize], pairs, device), repeats, device)
    return {
        "device": str(device),
        "bytes_bf16_in": nbytes,
        "kernel_only_gbps": nbytes / kernel_s / 1e9,
        "end_to_end_gbps": nbytes / pipeline_s / 1e9,
        "end_to_end_fraction_of_kernel": kernel_s / pipeline_s,
    }


def local_engine_cuda(dry_run: bool) -> dict[str, Any]:
    from weightpipe.benchmarks.overlap import MODES, SIZES, summarise
    from weightpipe.stages.engines.local import (
        GenerationStats,
        LocalEngine,
        default_config,
        random_weights,
    )
    from weightpipe.stages.sync import sync_weights

    device = _device(dry_run)
    config = default_config(**({} if dry_run else SIZES["medium"]))
    idle_s = 0.05 if dry_run else 1.0
    engine = LocalEngine(
        config, seed=0, batch_size=4, max_new_tokens=8, device=device, track_versions=True
    )
    weights = list(random_weights(config, seed=1, dtype=engine.dtype).items())

    async def run() -> dict[str, Any]:
        modes: dict[str, Any] = {}
        async with engine:
            await engine.wait_for_outputs(1)
            for version, (label, mode, prefetch_bytes) in enumerate(MODES, start=1):
                idle = engine.open_window()
                await anyio.sleep(idle_s)  # a benchmark measures over time
                idle_stats = idle.close()
                report = await sync_weights(
                    weights,
                    engine,
                    version=version,
                    stages=[Fetch(8 << 20, device=device), Fp8Quantize()],
                    mode=mode,  # type: ignore[arg-type]
                    pause_mode="in_place",
                    prefetch_bytes=prefetch_bytes,
                )
                generation = report.generation
                assert isinstance(generation, GenerationStats)
                hard_pause_s = report.hard_pause_s if report.hard_pause_s > 0 else generation.swap_s
                run = {
                    "sync_s": report.seconds,
                    "hard_pause_ms": hard_pause_s * 1e3,
                    "tokens_per_s_idle": idle_stats.tokens_per_s,
                    "tokens_per_s_during_sync": generation.tokens_per_s,
                    "longest_gap_ms": generation.longest_gap_s * 1e3,
                    "idle_step_ms": idle_stats.median_step_s * 1e3,
                    "idle_longest_gap_ms": idle_stats.longest_gap_s * 1e3,
                    "added_gap_ms": max(0.0, generation.longest_gap_s - idle_stats.median_step_s)
                    * 1e3,
                    "weight_write_ms": generation.weight_write_s * 1e3,
                    "swap_ms": generation.swap_s * 1e3,
                    "mixed_steps": generation.mixed_steps,
                    "buckets": report.load.buckets,
                    "bytes": report.bytes,
                    "bottleneck": report.run.bottleneck().name,
                }
                modes[label] = summarise([run])
            final = await engine.version()
        return {"device": str(engine.device), "final_version": final, "modes": modes}

    result = anyio.run(run)
    result["mixed_steps_total"] = sum(m["mixed_steps"] for m in result["modes"].values())
    return result


# The second process: SGLang's own decoding, as its TP worker does it (patch, then decode).
_DECODER = r"""
import hashlib, json, sys
import torch
from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions
from sglang.srt.utils import MultiprocessingSerializer
from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket
monkey_patch_torch_reductions()
data = MultiprocessingSerializer.deserialize(sys.stdin.read().strip())
bucket = FlattenedTensorBucket(
    flattened_tensor=data["flattened_tensor"], metadata=data["metadata"]
)
flat = data["flattened_tensor"]
out = {"device": str(flat.device), "tensors": {}}
for name, tensor in bucket.reconstruct_tensors():
    raw = tensor.contiguous().view(torch.uint8).cpu().numpy().tobytes()
    out["tensors"][name] = [str(tensor.dtype), list(tensor.shape), hashlib.sha256(raw).hexdigest()]
print(json.dumps(out))
"""


def _digest(tensor: torch.Tensor) -> str:
    raw = tensor.contiguous().view(torch.uint8).cpu().numpy().tobytes()
    return hashlib.sha256(raw).hexdigest()


def cuda_ipc_sglang(dry_run: bool) -> dict[str, Any]:
    device = _device(dry_run)
    pairs = _weights(1 << 20 if dry_run else 64 << 20, seed=2)
    pairs.append(("model.norm.weight", torch.randn(2048).to(torch.bfloat16)))
    buckets = _run_stages([Fetch(1 << 30, device=device), Fp8Quantize()], pairs, device)
    (bucket,) = buckets
    payloads = wire.encode_flattened_bucket(list(bucket.tensors), buffer=bucket.buffer)
    _sync(device)  # the flattening copies are done before another process maps the buffer
    (text,) = wire.b64encode_payloads(payloads)
    names_uuid = (
        device.type == "cuda" and wire.device_uuid(device.index or 0).encode() in (payloads[0])
    )
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", _DECODER],
        input=text,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    decode_s = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"the decoding process failed: {done.stderr[-2000:]}")
    decoded = json.loads(done.stdout.strip().splitlines()[-1])
    expected = {name: [str(t.dtype), list(t.shape), _digest(t)] for name, t in bucket.tensors}
    mismatched = sorted(n for n in expected if decoded["tensors"].get(n) != expected[n])
    if mismatched:
        raise RuntimeError(f"decoded bytes differ for {mismatched[:5]}")
    del payloads  # the sender's buffer outlived the decode
    return {
        "device": str(device),
        "decoder_device": decoded["device"],
        "tensors": len(expected),
        "bucket_bytes": int(bucket.nbytes),
        "fp8_tensors": sum(1 for _, t in bucket.tensors if t.dtype == torch.float8_e4m3fn),
        "payload_names_gpu_by_uuid": names_uuid,
        "second_process_s": decode_s,
        "bytes_match": True,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", choices=PARTS)
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU")
    args = parser.parse_args(argv)
    run: dict[str, Callable[[bool], dict[str, Any]]] = {
        "fetch_h2d": fetch_h2d,
        "end_to_end": end_to_end,
        "local_engine_cuda": local_engine_cuda,
        "cuda_ipc_sglang": cuda_ipc_sglang,
    }
    result = {"part": args.part, "dry_run": args.dry_run, **run[args.part](args.dry_run)}
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
