"""What to run on a first machine with two or more GPUs: the hazards one GPU cannot show.

Three checks, each in fresh processes, each a pass/fail with its reason, all in one JSON:

- ``nccl_two_devices``: a trainer rank on cuda:0 broadcasts a Fetch bucket over NCCL to a
  rank on cuda:1 (``DistributedSender`` / ``DistributedReceiver``); the bytes must match.
- ``nccl_abandoned_broadcast``: rank 0 enqueues a broadcast that rank 1 never joins (a
  refused bucket), aborts the communicator (``abort_update_group``, what
  ``SGLangDistributedEngine`` does), and then a kernel on cuda:0's default stream must
  finish: nothing stays queued behind the abandoned collective.
- ``ipc_other_visible_devices``: a trainer process that sees GPUs 0 and 1 puts a flattened
  FP8 bucket on its cuda:1 and encodes it with weightpipe's SGLang wire; a "server" process
  started with ``CUDA_VISIBLE_DEVICES=<that GPU>`` (so it sees it as cuda:0) decodes it with
  SGLang's own code. The payload names the GPU by UUID, so the server must open its cuda:0
  and read the same bytes; a payload naming the trainer's index would open a wrong or
  absent device.

With fewer than two GPUs it says so, writes the JSON with every check ``skipped`` and
exits 0. Needs sglang importable for the third check (``benchmarks/gpu_wheels.sh``).

Usage: ``python -m benchmarks.gpu_multi_check --json PATH``
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
import traceback
from typing import Any

import torch

CHECKS = ("nccl_two_devices", "nccl_abandoned_broadcast", "ipc_other_visible_devices")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().view(torch.uint8).cpu().numpy().tobytes()).hexdigest()


def _pairs(seed: int) -> list[tuple[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (f"model.layers.{i}.mlp.up_proj.weight", torch.randn(512, 384, generator=gen).bfloat16())
        for i in range(4)
    ] + [("model.norm.weight", torch.randn(384, generator=gen).bfloat16())]


def _rank_main(check: str, rank: int, port: int, out: Any) -> None:
    """One rank of an NCCL check, on cuda:<rank> (spawned)."""
    import torch.distributed as dist

    try:
        torch.cuda.set_device(rank)
        dist.init_process_group(
            "nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2
        )
        if check == "nccl_two_devices":
            out.put((rank, _two_devices(rank)))
        else:
            out.put((rank, _abandoned(rank)))
    except BaseException:
        out.put((rank, {"error": traceback.format_exc()[-3000:]}))


def _two_devices(rank: int) -> dict[str, Any]:
    import anyio

    from weightpipe.pipeline import Pipeline
    from weightpipe.stages.fetch import Fetch
    from weightpipe.stages.transport.distributed import DistributedReceiver, DistributedSender

    pairs = _pairs(0)
    if rank == 0:
        sender = DistributedSender(device="cuda", timeout_s=120)  # resolves to cuda:0 here

        async def run() -> None:
            await Pipeline([Fetch(1 << 20, device="cuda")]).run(pairs, sink=sender)

        anyio.run(run)
        return {"sent_buckets": sender.buckets_sent, "device": str(sender._link.device)}
    receiver = DistributedReceiver(device="cuda", timeout_s=120)  # cuda:1 here
    got = {name: _digest(t) for name, t in receiver.named_tensors()}
    expected = {name: _digest(t) for name, t in pairs}
    return {"bytes_match": got == expected, "device": str(receiver._link.device)}


def _abandoned(rank: int) -> dict[str, Any]:
    import torch.distributed as dist

    from weightpipe.stages.engines.sglang.distributed import abort_update_group

    group = dist.new_group([0, 1])
    dist.barrier()
    if rank == 1:
        time.sleep(30)  # never joins; outlives rank 0's check (the process then ends)
        return {"joined": False}
    side = torch.cuda.Stream()  # type: ignore[no-untyped-call]
    buffer = torch.ones(1 << 20, device="cuda")
    with torch.cuda.stream(side):
        dist.broadcast(buffer, src=0, group=group, async_op=True).wait()
    started = time.perf_counter()
    abort_update_group(group)
    x = torch.randn(1024, 1024, device="cuda")
    (x @ x).sum().item()  # a default-stream kernel, waited for on the host
    return {"default_stream_ran_after_abort_s": time.perf_counter() - started}


def _nccl_check(check: str) -> dict[str, Any]:
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(check, r, port, out)) for r in (0, 1)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    wanted = {0, 1} if check == "nccl_two_devices" else {0}
    deadline = time.monotonic() + 180
    while set(results) < wanted and time.monotonic() < deadline:
        try:
            rank, result = out.get(timeout=5)
            results[rank] = result
        except Exception:
            if not any(p.is_alive() for p in procs):
                break
    for p in procs:
        p.join(timeout=40)
        if p.is_alive():
            p.kill()
    if set(results) < wanted:
        return {"status": "failed", "why": f"ranks {sorted(wanted - set(results))} gave no result"}
    errors = [r["error"] for r in results.values() if "error" in r]
    if errors:
        return {"status": "failed", "why": errors[0], "ranks": results}
    ok = results.get(1, {}).get("bytes_match", True)
    return {"status": "passed" if ok else "failed", "ranks": results}


_TRAINER = r"""
import base64, hashlib, json, sys, torch
from weightpipe.stages.fp8 import quantize_fp8
from weightpipe.stages.engines.sglang import wire
torch.cuda.set_device(1)
g = torch.Generator().manual_seed(5)
w = torch.randn(512, 384, generator=g).bfloat16().cuda()
q = quantize_fp8(w)
name = "model.layers.0.mlp.up_proj"
tensors = [(name + ".weight", q.qweight), (name + ".weight_scale_inv", q.scale)]
payloads = wire.encode_flattened_bucket(tensors)
torch.cuda.synchronize()
def sha(t):
    return hashlib.sha256(t.contiguous().view(torch.uint8).cpu().numpy().tobytes()).hexdigest()
digest = {n: sha(t) for n, t in tensors}
text = wire.b64encode_payloads(payloads)[0]
print(json.dumps({"payload": text, "uuid": wire.device_uuid(1), "digest": digest}), flush=True)
sys.stdin.readline()  # keep the buffer alive until the server has read it
"""

_SERVER = r"""
import hashlib, json, sys, torch
from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions
from sglang.srt.utils import MultiprocessingSerializer
from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket
monkey_patch_torch_reductions()
data = MultiprocessingSerializer.deserialize(sys.stdin.readline().strip())
b = FlattenedTensorBucket(flattened_tensor=data["flattened_tensor"], metadata=data["metadata"])
def sha(t):
    return hashlib.sha256(t.contiguous().view(torch.uint8).cpu().numpy().tobytes()).hexdigest()
out = {n: sha(t) for n, t in b.reconstruct_tensors()}
device = str(data["flattened_tensor"].device)
print(json.dumps({"device": device, "visible": torch.cuda.device_count(), "digest": out}))
"""


def _ipc_check() -> dict[str, Any]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": f"{ids[0]},{ids[1]}", "PYTHONUNBUFFERED": "1"}
    trainer = subprocess.Popen(
        [sys.executable, "-c", _TRAINER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert trainer.stdout is not None and trainer.stdin is not None
        sent = json.loads(trainer.stdout.readline())
        server_env = {**env, "CUDA_VISIBLE_DEVICES": ids[1]}  # the trainer's cuda:1 is its cuda:0
        server = subprocess.run(
            [sys.executable, "-c", _SERVER],
            input=sent["payload"] + "\n",
            capture_output=True,
            text=True,
            timeout=180,
            env=server_env,
            check=False,
        )
        trainer.stdin.write("\n")
        trainer.stdin.flush()
    finally:
        trainer.wait(timeout=60)
    if server.returncode != 0:
        return {"status": "failed", "why": server.stderr[-3000:]}
    got = json.loads(server.stdout.strip().splitlines()[-1])
    ok = got["digest"] == sent["digest"] and got["device"] == "cuda:0"
    return {
        "status": "passed" if ok else "failed",
        "uuid": sent["uuid"],
        "server_opened": got["device"],
        "server_visible_devices": got["visible"],
        "bytes_match": got["digest"] == sent["digest"],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--only", choices=CHECKS, action="append", help="run only these")
    args = parser.parse_args(argv)
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    checks: dict[str, Any] = {}
    for check in args.only or CHECKS:
        if count < 2:
            checks[check] = {"status": "skipped", "why": f"needs 2 GPUs, {count} visible"}
            continue
        started = time.perf_counter()
        try:
            checks[check] = (
                _ipc_check() if check == "ipc_other_visible_devices" else _nccl_check(check)
            )
        except Exception:
            checks[check] = {"status": "failed", "why": traceback.format_exc()[-3000:]}
        checks[check]["seconds"] = time.perf_counter() - started
    result = {
        "gpus": count,
        "devices": [torch.cuda.get_device_name(i) for i in range(count)],
        "checks": checks,
        "failed": sorted(n for n, c in checks.items() if c["status"] == "failed"),
    }
    if count < 2:
        print(f"gpu_multi_check: {count} GPU(s) visible; every check needs 2: skipped")
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    raise SystemExit(1 if main()["failed"] else 0)
