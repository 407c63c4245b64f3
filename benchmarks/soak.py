"""Soak: many syncs back to back into the generating local engine, a fault every 10th.

The local engine (a small Llama-architecture model) generates the whole time while full
syncs of new weights run through Fetch -> Load, one after the other; every
``--fault-every``-th sync gets one fault of the fault matrix, in rotation (``FAULTS``: an
engine call raising or hanging past Load's deadline at the pause, the begin, the first /
a middle / the last bucket, the commit, the resume or the version query; an outside
cancellation mid-sync; a stage before Load raising mid-stream). Each sync sends one of
``WEIGHT_SETS`` seeded weight sets, so after every sync, failed or not, the engine's
parameters are compared bit for bit with those of the version it reports:
``half_applied`` counts the syncs after which they differ (must be 0), ``left_paused``
those after which generation stayed paused (the local engine rolls back, so must be 0).

JSON: ``syncs``, ``syncs_committed``, ``syncs_failed`` (the engine does not serve the
sync's version), ``errors_raised`` (a sync whose resume failed after its commit raises yet
commits), ``faults_injected`` per kind, ``half_applied``, ``left_paused``,
``rss_drift_bytes`` (RSS at the last sync minus RSS at sync 100, or a third of the way
into a shorter run; target <= 64 MiB), ``threads_start``/``threads_end`` (every thread but
anyio's idle worker pool, which grows and shrinks by itself: ``anyio_workers_start/_end``
report it) and ``fds_start``/``fds_end`` (at the same two points; equal),
``sync_s_p50``/``_p99`` and ``hard_pause_s_p50``/``_p99`` over the clean syncs, ``wall_s``,
``targets_met``.

Usage: ``python -m benchmarks.soak --syncs 1000 --json out/soak.json``
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any, Literal

import anyio
import anyio.lowlevel
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from weightpipe.benchmarks._faults import EngineCallName, FaultyEngine, StageFault
from weightpipe.pipeline import Stage, StageError
from weightpipe.stages.app.report import machine, print_table, rss_bytes, write_json
from weightpipe.stages.bucket import WeightBucket
from weightpipe.stages.engines.local import LocalEngine, default_config, random_weights
from weightpipe.stages.fetch import Fetch
from weightpipe.stages.load import engine_is_dirty
from weightpipe.stages.sync import sync_weights

Fault = tuple[EngineCallName | Literal["stage"], StageFault]

FAULTS: tuple[Fault, ...] = (
    ("load middle", "raise"),
    ("commit", "raise"),
    ("load last", "hang"),
    ("begin", "raise"),
    ("pause", "raise"),
    ("load middle", "cancel"),
    ("stage", "raise"),
    ("load first", "raise"),
    ("resume", "raise"),
    ("version query", "raise"),
    ("commit", "hang"),
    ("load last", "raise"),
)
"""The faults injected in rotation: (where, what). ``stage`` is a stage before Load."""

WEIGHT_SETS = 4
"""Seeded weight sets the syncs take turns sending (version v sends set v % 4)."""

RSS_FROM_SYNC = 100
"""RSS, threads and fds are first taken after this sync (allocators settle before)."""

TINY = {
    "hidden_size": 192,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "intermediate_size": 320,
    "vocab_size": 512,
    "max_position_embeddings": 256,
}


class InjectedFault(RuntimeError):
    """The error an injected ``raise`` fault raises."""


class RaiseAtBucket(Stage[WeightBucket, WeightBucket]):
    """A stage between Fetch and Load that fails at one bucket when armed."""

    name = "soak_fault"

    def __init__(self) -> None:
        self.at: int | None = None

    async def process(self, item: WeightBucket) -> AsyncIterator[WeightBucket]:
        if self.at is not None and item.index == self.at:
            self.at = None
            raise InjectedFault(f"soak: injected failure at {item.describe()}")
        yield item


ANYIO_WORKER = "AnyIO worker thread"


def thread_counts() -> tuple[int, int]:
    """Threads other than anyio's worker pool, and that pool's threads (a worker stuck in
    a call shows up as that pool's growth, an idle one exits after anyio's idle time)."""
    names = [t.name for t in threading.enumerate()]
    workers = names.count(ANYIO_WORKER)
    return len(names) - workers, workers


def fd_count() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:  # not Linux
        return -1


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def differs(engine: LocalEngine, expected: dict[str, torch.Tensor]) -> str | None:
    """The first parameter the engine serves that is not ``expected``'s, if any."""
    for name, tensor in expected.items():
        if not torch.equal(engine.parameter(name), tensor):
            return name
    return None


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    config = default_config(**TINY)
    engine = LocalEngine(config, seed=0, batch_size=4, max_new_tokens=8)
    sets = [random_weights(config, seed=1 + k, dtype=engine.dtype) for k in range(WEIGHT_SETS)]
    expected: dict[int, dict[str, torch.Tensor]] = {0: {}}  # v0: the engine's own weights
    injector = FaultyEngine(engine)
    raiser = RaiseAtBucket()
    model_bytes = sum(t.nbytes for t in sets[0].values())
    buckets = max(1, -(-model_bytes // args.bucket_bytes))
    faults: Counter[str] = Counter()
    committed = failed = raised = half_applied = left_paused = 0
    sync_s: list[float] = []
    hard_pause_s: list[float] = []
    first_problem: str | None = None
    marks: dict[str, int] = {}
    # a short run (CI) takes its first marks a third of the way in
    mark_at = min(RSS_FROM_SYNC, max(1, args.syncs // 3))
    started = time.perf_counter()
    console = Console(stderr=True)
    progress = Progress(
        TextColumn("soak"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[state]}"),
        TimeElapsedColumn(),
        console=console,
        disable=args.quiet,
    )
    async with engine:
        expected[0] = {name: engine.parameter(name) for name in sets[0]}
        await engine.wait_for_outputs(4)
        with progress:
            task = progress.add_task("soak", total=args.syncs, state="")
            for attempt in range(1, args.syncs + 1):
                version = attempt
                weights = sets[version % WEIGHT_SETS]
                fault = (
                    FAULTS[(attempt // args.fault_every - 1) % len(FAULTS)]
                    if (attempt % args.fault_every == 0)
                    else None
                )
                if fault is not None:
                    where, what = fault
                    faults[f"{where}: {what}"] += 1
                    if where == "stage":
                        raiser.at = buckets // 2
                    else:
                        injector.arm(where, what, buckets=buckets)
                before = await engine.version()
                began = time.perf_counter()
                error: BaseException | None = None
                report = None
                with anyio.CancelScope() as scope:
                    injector.cancel_scope = scope
                    try:
                        report = await sync_weights(
                            list(weights.items()),
                            injector,
                            version=version,
                            stages=[Fetch(args.bucket_bytes), raiser],
                            mode="prefetch",
                            pause_mode="retract",
                            timeout_s=args.timeout_s,
                        )
                    except StageError as exc:
                        error = exc
                injector.disarm()
                raiser.at = None
                if error is not None or scope.cancelled_caught:
                    raised += error is not None
                now = await engine.version()
                if now == version:
                    committed += 1
                    expected[version] = weights
                    if fault is None and report is not None:
                        sync_s.append(time.perf_counter() - began)
                        hard_pause_s.append(report.hard_pause_s)
                else:
                    failed += 1
                assert now is not None
                problem = None
                if now not in (before, version):
                    problem = f"sync {attempt}: serves v{now}, neither v{before} nor v{version}"
                else:
                    name = differs(engine, expected[now])
                    if name is not None:
                        problem = f"sync {attempt}: {name!r} is not v{now}'s"
                if problem is not None:
                    half_applied += 1
                    first_problem = first_problem or problem
                if engine.paused or engine_is_dirty(injector) or engine_is_dirty(engine):
                    left_paused += 1
                    first_problem = first_problem or f"sync {attempt}: left paused or dirty"
                    await engine.resume()
                if attempt == mark_at:
                    threads, workers = thread_counts()
                    marks = {"rss": rss_bytes(), "threads": threads, "anyio_workers": workers}
                    marks["fds"] = fd_count()
                    marks["at_sync"] = attempt
                progress.update(task, advance=1, state=f"committed {committed} failed {failed}")
            # Inside the progress bar, as the first marks were: its refresh thread is
            # counted in both or in neither.
            rss_end, fds_end = rss_bytes(), fd_count()
            threads_end, workers_end = thread_counts()
        tokens = engine.tokens_generated
    wall_s = time.perf_counter() - started
    result: dict[str, Any] = {
        "benchmark": "soak",
        "syncs": args.syncs,
        "syncs_committed": committed,
        "syncs_failed": failed,
        "errors_raised": raised,
        "fault_every": args.fault_every,
        "faults_injected": dict(faults),
        "half_applied": half_applied,
        "left_paused": left_paused,
        "first_problem": first_problem,
        "rss_from_sync": marks["at_sync"],
        "rss_drift_bytes": rss_end - marks["rss"],
        "threads_start": marks["threads"],
        "threads_end": threads_end,
        "anyio_workers_start": marks["anyio_workers"],
        "anyio_workers_end": workers_end,
        "fds_start": marks["fds"],
        "fds_end": fds_end,
        "sync_s_p50": statistics.median(sync_s) if sync_s else float("nan"),
        "sync_s_p99": percentile(sync_s, 0.99),
        "hard_pause_s_p50": statistics.median(hard_pause_s) if hard_pause_s else float("nan"),
        "hard_pause_s_p99": percentile(hard_pause_s, 0.99),
        "tokens_generated": tokens,
        "model": {
            **TINY,
            "bytes_bf16": model_bytes,
            "buckets_per_sync": buckets,
            "bucket_bytes": args.bucket_bytes,
        },
        "load_timeout_s": args.timeout_s,
        "wall_s": wall_s,
        "machine": machine(),
    }
    result["targets_met"] = {
        "half_applied == 0": half_applied == 0,
        "left_paused == 0": left_paused == 0,
        "rss_drift_bytes <= 64 MiB": result["rss_drift_bytes"] <= 64 << 20,
        "threads_start == threads_end": result["threads_start"] == threads_end,
        "fds_start == fds_end": result["fds_start"] == fds_end,
        "syncs_committed + syncs_failed == syncs": committed + failed == args.syncs,
    }
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--syncs", type=int, default=1000)
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--fault-every", type=int, default=10, help="a fault every N-th sync")
    parser.add_argument("--bucket-bytes", type=int, default=256 << 10)
    parser.add_argument(
        "--timeout-s", type=float, default=1.0, help="Load's deadline per engine call"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.syncs < 1 or args.fault_every < 1:
        parser.error("--syncs and --fault-every must be >= 1")
    result = anyio.run(main_async, args)
    print_table(
        [
            [
                result["syncs"],
                result["syncs_committed"],
                result["syncs_failed"],
                result["half_applied"],
                result["rss_drift_bytes"] / 2**20,
                f"{result['threads_start']}/{result['threads_end']}",
                f"{result['fds_start']}/{result['fds_end']}",
                result["sync_s_p50"],
                result["sync_s_p99"],
                result["hard_pause_s_p99"],
            ]
        ],
        [
            "syncs",
            "committed",
            "failed",
            "half_applied",
            "rss_drift_MiB",
            "threads",
            "fds",
            "sync_s_p50",
            "sync_s_p99",
            "pause_s_p99",
        ],
    )
    print(f"targets: {result['targets_met']}", file=sys.stdout)
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
