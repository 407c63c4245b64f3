"""Framework overhead and pipelining efficiency of ``weightpipe.pipeline``.

Two measurements, each against a baseline taken in the same run:

* ``per_hop_us``: no-op stages moving >= 100k small items; the wall time per item per
  channel hop is what the framework itself costs (median of several repeats). The plain
  ``for`` loop doing the same no-op calls is reported beside it.
* ``efficiency``: three stages with unequal per-item costs from real work, each in its
  stage's worker thread (torch ops release the GIL): a copy out of a source tensor, an FP8
  quantization, a copy into a destination. ``efficiency`` is the slowest stage's busy time
  divided by the pipelined wall time (1.0 means the pipeline runs exactly as fast as its
  bottleneck allows); ``sequential_s`` runs the same three calls one after another per
  item in the same process, with the same torch thread count, right after.

Usage: ``python -m benchmarks.overhead --json out/overhead.json``
"""

from __future__ import annotations

import argparse
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.to_thread
import torch

from weightpipe.pipeline import Pipeline, RunReport, Stage

from ._report import median, print_table, write_json

FP8_MAX = 448.0


class Noop(Stage[Any, Any]):
    def __init__(self, name: str) -> None:
        self.name = name  # type: ignore[misc]

    async def process(self, item: Any) -> AsyncIterator[Any]:
        yield item


class Threaded(Stage[int, int]):
    """Runs ``work(item)`` in its own worker thread; one thread per stage."""

    def __init__(self, name: str, work: Any) -> None:
        self.name = name  # type: ignore[misc]
        self.work = work
        self.limiter = anyio.CapacityLimiter(1)

    async def process(self, item: int) -> AsyncIterator[int]:
        yield await anyio.to_thread.run_sync(self.work, item, limiter=self.limiter)


class Workload:
    """Real per-item work of unequal cost on preallocated, pre-touched ring buffers.

    Item ``i`` uses slot ``i % SLOTS``. A pipeline of three single-worker stages at depth
    ``d`` has at most ``3 * (d + 1) + 1`` items alive, so ``SLOTS`` (16) is safe for the
    depths this benchmark uses (checked in ``measure_efficiency``). Buffers are written
    once before timing so neither run pays first-touch page faults.
    """

    SLOTS = 16

    def __init__(self, numel: int) -> None:
        generator = torch.Generator().manual_seed(0)
        self.source = [torch.randn(numel, generator=generator) for _ in range(4)]
        self.staged = [
            torch.zeros(numel, dtype=torch.bfloat16).fill_(1.0) for _ in range(self.SLOTS)
        ]
        self.quantized = [
            torch.zeros(numel, dtype=torch.float8_e4m3fn).fill_(1.0) for _ in range(self.SLOTS)
        ]
        self.destination = torch.zeros(numel, dtype=torch.float8_e4m3fn).fill_(1.0)
        self.checksum = 0

    def fetch(self, i: int) -> int:
        # Gather: the trainer's fp32 master weights checked and cast to bf16 for the wire.
        staged = self.staged[i % self.SLOTS]
        staged.copy_(self.source[i % len(self.source)])
        if not bool(staged.abs().amax().isfinite()):
            raise ValueError(f"item {i} is not finite")
        return i

    def quantize(self, i: int) -> int:
        x = self.staged[i % self.SLOTS]
        scale = x.abs().amax().clamp_min(1e-12) / FP8_MAX
        self.quantized[i % self.SLOTS].copy_(torch.div(x, scale).clamp_(-FP8_MAX, FP8_MAX))
        return i

    def load(self, i: int) -> int:
        # Install: copy the FP8 payload into the engine's parameter, then read it back
        # (a checksum of the installed bytes, as a loader that verifies would).
        self.destination.copy_(self.quantized[i % self.SLOTS])
        self.checksum = int(self.destination.view(torch.uint8).sum(dtype=torch.int64))
        return i


async def measure_hops(items: int, stages: int, repeats: int) -> dict[str, float]:
    walls: list[float] = []
    for _ in range(repeats):
        pipe = Pipeline([Noop(f"noop{i}") for i in range(stages)], depth=8)
        started = time.perf_counter()
        await pipe.run(range(items))
        walls.append(time.perf_counter() - started)
    noop = Noop("plain")
    started = time.perf_counter()
    for i in range(items):
        for _ in range(stages):
            async for _out in noop.process(i):
                pass
    plain_s = time.perf_counter() - started
    per_hop = [wall / (items * stages) * 1e6 for wall in walls]
    return {
        "per_hop_us": median(per_hop),
        "per_hop_us_runs": per_hop,  # type: ignore[dict-item]
        "plain_loop_per_call_us": plain_s / (items * stages) * 1e6,
        "hop_items": items,
        "hop_stages": stages,
    }


async def measure_efficiency(items: int, numel: int, depth: int, repeats: int) -> dict[str, Any]:
    if 3 * (depth + 1) + 1 > Workload.SLOTS:
        raise ValueError(f"depth {depth} needs more than {Workload.SLOTS} ring slots")
    work = Workload(numel)
    for i in range(Workload.SLOTS):  # warm caches and allocator
        work.load(work.quantize(work.fetch(i)))
    limiter = anyio.CapacityLimiter(1)

    def one(i: int) -> int:
        return work.load(work.quantize(work.fetch(i)))

    async def sequential() -> float:
        started = time.perf_counter()
        for i in range(items):
            await anyio.to_thread.run_sync(one, i, limiter=limiter)
        return time.perf_counter() - started

    async def pipelined() -> tuple[float, RunReport]:
        stages = [
            Threaded("fetch", work.fetch),
            Threaded("quantize", work.quantize),
            Threaded("load", work.load),
        ]
        started = time.perf_counter()
        report = await Pipeline(stages, depth=depth).run(range(items))
        return time.perf_counter() - started, report

    # Alternate the two so drift in machine load hits both alike; keep the median runs.
    runs: list[tuple[float, RunReport]] = []
    sequential_runs: list[float] = []
    for _ in range(repeats):
        sequential_runs.append(await sequential())
        runs.append(await pipelined())
    runs.sort(key=lambda run: run[0])
    pipelined_s, report = runs[len(runs) // 2]
    sequential_s = median(sequential_runs)
    slowest = report.bottleneck()
    return {
        "efficiency": slowest.busy_s / pipelined_s,
        "pipelined_s": pipelined_s,
        "sequential_s": sequential_s,
        "speedup": sequential_s / pipelined_s,
        "bottleneck": slowest.name,
        "busy_s": {s.name: s.busy_s for s in report.stages},
        "efficiency_items": items,
        "efficiency_numel": numel,
        "depth": depth,
        "pipelined_runs_s": sorted(run[0] for run in runs),
        "sequential_runs_s": sorted(sequential_runs),
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(1)  # one core per stage; the sequential run uses the same setting
    hops = await measure_hops(args.items, args.stages, args.repeats)
    efficiency = await measure_efficiency(args.work_items, args.numel, args.depth, args.repeats)
    return {**hops, **efficiency}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--items", type=int, default=100_000, help="no-op items (>= 100k)")
    parser.add_argument("--stages", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work-items", type=int, default=300)
    parser.add_argument("--numel", type=int, default=1 << 20, help="elements per work item")
    parser.add_argument("--depth", type=int, default=2)
    args = parser.parse_args(argv)
    result = anyio.run(main_async, args)
    targets = {
        "per_hop_us <= 20": result["per_hop_us"] <= 20,
        "efficiency >= 0.90": result["efficiency"] >= 0.90,
        "sequential_s / pipelined_s >= 1.5": result["speedup"] >= 1.5,
    }
    result["targets_met"] = targets
    print_table(
        [
            ["per_hop_us", result["per_hop_us"], "<= 20"],
            ["plain_loop_per_call_us", result["plain_loop_per_call_us"], "(baseline)"],
            ["efficiency", result["efficiency"], ">= 0.90"],
            ["pipelined_s", result["pipelined_s"], ""],
            ["sequential_s", result["sequential_s"], "(baseline)"],
            ["speedup", result["speedup"], ">= 1.5"],
        ],
        ["figure", "value", "target"],
    )
    write_json(args.json, {"benchmark": "overhead", **result})
    return result


if __name__ == "__main__":
    main()
