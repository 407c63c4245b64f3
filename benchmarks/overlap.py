"""Overlap of weight syncs with generation: each sync mode on the generating local engine.

The local engine generates continuously while full syncs of a same-shaped model's new
weights run through Fetch -> Fp8Quantize -> Load in each sync mode (``pause``,
``prefetch``, ``in_flight``, and ``prefetch_lookahead``: prefetch with Load holding the
whole sync back before it pauses), the modes taking turns so drift on a shared machine
hits them alike. Per mode (median over the repeats): ``sync_s`` (wall time of the sync),
``hard_pause_ms`` (generation held by the sync: Load's pause, or in ``in_flight``, which
never pauses, the commit's switch of every parameter; median and ``_max``), ``swap_ms``
(that switch, in every mode), ``mixed_steps`` (decode steps that read parameters of two
versions, counted by the engine's ``track_versions``; must be 0), ``tokens_per_s_idle``
(measured on the same engine just before each sync, the baseline) and
``tokens_per_s_during_sync``, plus the longest gap between two tokens during the sync
(beside the longest gap of the idle window, which shows what the machine itself adds)
and ``weight_write_ms``, the time the generation thread spent switching the sync's
weights between two steps. ``--no-fp8`` drops the quantize stage (bf16 syncs).

Usage: ``python -m benchmarks.overlap --json out/overlap.json [--png out/overlap.png]``
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import anyio
import torch

from weightpipe.stages.app.report import print_table, write_json
from weightpipe.stages.engines.local import (
    GenerationStats,
    LocalEngine,
    default_config,
    random_weights,
)
from weightpipe.stages.fetch import Fetch
from weightpipe.stages.quantize import Fp8Quantize
from weightpipe.stages.sync import SyncReport, sync_weights

# (label, sync mode, Load's prefetch_bytes): ``prefetch`` pauses at the first bucket;
# ``prefetch_lookahead`` fetches and quantizes the whole sync before pausing.
MODES: tuple[tuple[str, str, int | None], ...] = (
    ("pause", "pause", 0),
    ("prefetch", "prefetch", 0),
    ("prefetch_lookahead", "prefetch", None),
    ("in_flight", "in_flight", 0),
)

SIZES: dict[str, dict[str, int]] = {
    # about 4M parameters: the engine's default, a decode step of a few ms here
    "small": {},
    # about 34M parameters (68 MB bf16): a sync long enough to see the overlap
    "medium": {
        "hidden_size": 512,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "intermediate_size": 1376,
        "vocab_size": 8192,
    },
}


def quantize_stage(enabled: bool) -> tuple[Fp8Quantize | None, str]:
    """The Fp8Quantize stage unless bf16-only syncs were asked for, and what was used."""
    if not enabled:
        return None, "none (--no-fp8: bf16 syncs)"
    return Fp8Quantize(), "Fp8Quantize (block [128, 128])"


async def one_sync(
    engine: LocalEngine,
    weights: list[tuple[str, torch.Tensor]],
    *,
    mode: str,
    prefetch_bytes: int | None,
    version: int,
    bucket_bytes: int,
    depth: int,
    fp8: bool,
    idle_s: float,
) -> dict[str, Any]:
    idle = engine.open_window()
    await anyio.sleep(idle_s)  # a benchmark measures over time; tests never do this
    idle_stats = idle.close()
    quantize, _ = quantize_stage(fp8)
    stages: list[Any] = [Fetch(bucket_bytes)]
    if quantize is not None:
        stages.append(quantize)
    report: SyncReport = await sync_weights(
        weights,
        engine,
        version=version,
        stages=stages,
        depth=depth,
        mode=mode,  # type: ignore[arg-type]
        pause_mode="in_place",
        prefetch_bytes=prefetch_bytes,
    )
    generation = report.generation
    assert isinstance(generation, GenerationStats)  # the local engine's window
    return {
        "version": version,
        "sync_s": report.seconds,
        # A sync that never paused (in_flight) held generation only for the switch.
        "hard_pause_ms": (report.hard_pause_s if report.hard_pause_s > 0 else generation.swap_s)
        * 1e3,
        "tokens_per_s_idle": idle_stats.tokens_per_s,
        "tokens_per_s_during_sync": generation.tokens_per_s,
        "longest_gap_ms": generation.longest_gap_s * 1e3,
        "idle_step_ms": idle_stats.median_step_s * 1e3,
        "idle_longest_gap_ms": idle_stats.longest_gap_s * 1e3,
        "added_gap_ms": max(0.0, generation.longest_gap_s - idle_stats.median_step_s) * 1e3,
        "weight_write_ms": generation.weight_write_s * 1e3,
        "swap_ms": generation.swap_s * 1e3,
        "mixed_steps": generation.mixed_steps,
        "buckets": report.load.buckets,
        "bytes": report.bytes,
        "bottleneck": report.run.bottleneck().name,
    }


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    keys = [
        "sync_s",
        "hard_pause_ms",
        "tokens_per_s_idle",
        "tokens_per_s_during_sync",
        "longest_gap_ms",
        "idle_step_ms",
        "idle_longest_gap_ms",
        "added_gap_ms",
        "weight_write_ms",
        "swap_ms",
    ]
    summary: dict[str, Any] = {key: statistics.median(r[key] for r in runs) for key in keys}
    summary["hard_pause_ms_max"] = max(r["hard_pause_ms"] for r in runs)
    summary["swap_ms_max"] = max(r["swap_ms"] for r in runs)
    summary["mixed_steps"] = sum(r["mixed_steps"] for r in runs)
    summary["longest_gap_ms_max"] = max(r["longest_gap_ms"] for r in runs)
    summary["tokens_per_s_ratio"] = (
        summary["tokens_per_s_during_sync"] / summary["tokens_per_s_idle"]
        if summary["tokens_per_s_idle"] > 0
        else 0.0
    )
    summary["buckets"] = runs[0]["buckets"]
    summary["bytes"] = runs[0]["bytes"]
    summary["bottleneck"] = runs[0]["bottleneck"]
    summary["runs"] = runs
    return summary


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    config = default_config(**SIZES[args.size])
    engine = LocalEngine(
        config,
        seed=0,
        batch_size=args.batch,
        max_new_tokens=args.new_tokens,
        track_versions=True,  # mixed_steps: what each step really read
    )
    weights = list(random_weights(config, seed=1, dtype=engine.dtype).items())
    params = sum(t.numel() for _, t in weights)
    _, quantize_used = quantize_stage(not args.no_fp8)
    runs: dict[str, list[dict[str, Any]]] = {label: [] for label, _, _ in MODES}
    started = time.perf_counter()
    async with engine:
        await engine.wait_for_outputs(args.batch)  # warm: one full batch before measuring
        version = 0
        for _ in range(args.repeats):
            for label, mode, prefetch_bytes in MODES:
                version += 1
                runs[label].append(
                    await one_sync(
                        engine,
                        weights,
                        mode=mode,
                        prefetch_bytes=prefetch_bytes,
                        version=version,
                        bucket_bytes=args.bucket_mb << 20,
                        depth=args.depth,
                        fp8=not args.no_fp8,
                        idle_s=args.idle_s,
                    )
                )
        final_version = await engine.version()
    modes = {label: summarise(label_runs) for label, label_runs in runs.items()}
    for label, mode, prefetch_bytes in MODES:
        modes[label]["sync_mode"] = mode
        modes[label]["prefetch_bytes"] = prefetch_bytes
    return {
        "benchmark": "overlap",
        "model": {
            "size": args.size,
            "parameters": params,
            "bytes_bf16": params * 2,
            "hidden_size": config.hidden_size,
            "num_hidden_layers": config.num_hidden_layers,
            "vocab_size": config.vocab_size,
            "batch_size": args.batch,
            "max_new_tokens": args.new_tokens,
            "device": str(engine.device),
        },
        "quantize": quantize_used,
        "fp8": quantize_used.startswith("Fp8Quantize"),
        "bucket_bytes": args.bucket_mb << 20,
        "depth": args.depth,
        "pause_mode": "in_place",
        "repeats": args.repeats,
        "idle_window_s": args.idle_s,
        "final_version": final_version,
        "wall_s": time.perf_counter() - started,
        "modes": modes,
    }


def plot(path: str, result: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(result["modes"])
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.bar(modes, [result["modes"][m]["hard_pause_ms"] for m in modes], color="tab:red")
    left.set_ylabel("hard pause per sync (ms, median)")
    left.set_title("generation paused by a sync")
    width = 0.38
    xs = range(len(modes))
    right.bar(
        [x - width / 2 for x in xs],
        [result["modes"][m]["tokens_per_s_idle"] for m in modes],
        width,
        label="idle",
    )
    right.bar(
        [x + width / 2 for x in xs],
        [result["modes"][m]["tokens_per_s_during_sync"] for m in modes],
        width,
        label="during sync",
    )
    right.set_xticks(list(xs), modes)
    for axis in (left, right):
        axis.tick_params(axis="x", labelrotation=15)
    right.set_ylabel("tokens/s")
    right.set_title("generation throughput")
    right.legend()
    figure.suptitle(
        f"local engine, {result['model']['parameters'] / 1e6:.0f}M params, "
        f"quantize: {'FP8' if result['fp8'] else 'none (bf16)'}"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--png", help="also plot them here")
    parser.add_argument("--size", choices=sorted(SIZES), default="medium")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bucket-mb", type=int, default=8)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--idle-s", type=float, default=1.0, help="idle window before a sync")
    parser.add_argument("--no-fp8", action="store_true", help="bf16 syncs only")
    args = parser.parse_args(argv)
    result = anyio.run(main_async, args)
    modes = result["modes"]
    result["targets_met"] = {
        "in_flight hard_pause_ms <= 5": modes["in_flight"]["hard_pause_ms_max"] <= 5,
        "mixed_steps 0 in every mode": all(m["mixed_steps"] == 0 for m in modes.values()),
        "prefetch hard_pause_ms < pause": modes["prefetch"]["hard_pause_ms"]
        < modes["pause"]["hard_pause_ms"],
        "prefetch_lookahead hard_pause_ms < pause": modes["prefetch_lookahead"]["hard_pause_ms"]
        < modes["pause"]["hard_pause_ms"],
    }
    print_table(
        [
            [
                mode,
                m["sync_s"],
                m["hard_pause_ms"],
                m["tokens_per_s_idle"],
                m["tokens_per_s_during_sync"],
                m["longest_gap_ms"],
                m["idle_longest_gap_ms"],
                m["hard_pause_ms_max"],
                m["swap_ms"],
                m["mixed_steps"],
            ]
            for mode, m in modes.items()
        ],
        [
            "mode",
            "sync_s",
            "hard_pause_ms",
            "tok/s idle",
            "tok/s sync",
            "gap_ms",
            "idle_gap_ms",
            "pause_max_ms",
            "swap_ms",
            "mixed",
        ],
    )
    print(f"quantize: {result['quantize']}; targets: {result['targets_met']}")
    write_json(args.json, result)
    if args.png:
        plot(args.png, result)
    return result


if __name__ == "__main__":
    main()
