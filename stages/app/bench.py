"""Sweep queue depth x bucket size (x quantize workers) through the real stages.

A synthetic model with real Llama shapes (``llama-1b``: Llama-3.2-1B, ``llama-8b``:
Llama-3.1-8B, ``tiny``: the local engine's default) is streamed one tensor at a time
through Fetch -> Fp8Quantize -> Load. Every tensor is a view into one shared random pool as
large as the biggest tensor, so the source costs no memory per tensor, and memory use is
the pipeline's own. The Load stage drives a ``CopySink`` engine, which copies every tensor
it is given into a scratch buffer, as an engine writing its parameters would.
``sweep.sink=local`` loads into the embedded local engine instead (tiny preset).

In the same run, the sequential baseline the peers use is measured: each bucket is
fetched, quantized and loaded before the next one starts, with the same stages (one core
each), and again with the quantizer on every core (``sequential_all_cores``, the strongest
loop a 2-core CPU allows: where every stage is CPU work, pipelining can only win by what
the other stages add, so this one is the honest upper bar). Each setting reports throughput
(GB/s of bf16 input), speed-up over the baseline, and peak RSS growth against the bound
``(depth + stages + 1) * bucket_bytes`` plus a fixed overhead (see ``memory_bound``).
Every setting and baseline runs ``sweep.repeats`` times (3 by default, interleaved) and
reports its median and min-max. The recommendation (``recommend``) is the setting with the
least memory among those whose runs cannot be told apart from the fastest one's, and the
output says why, with the figures; a shared machine's noise then moves the figures, not
the pick.

Usage: ``python -m benchmarks.sweep --json out/sweep.json --plot out/sweep.png`` or
``weightpipe bench`` (settings from the ``sweep`` config section).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import anyio
import torch

from weightpipe.pipeline import Pipeline
from weightpipe.pipeline.config import ConfigError
from weightpipe.stages.app.config import SweepPreset, WeightpipeConfig, load_weightpipe_config
from weightpipe.stages.app.report import PeakRss, print_table, write_json
from weightpipe.stages.bucket import WeightBucket
from weightpipe.stages.engines.base import PauseMode
from weightpipe.stages.fetch import Fetch
from weightpipe.stages.load import Load
from weightpipe.stages.quantize import Fp8Quantize

__all__ = [
    "FIXED_OVERHEAD_BYTES",
    "PRESETS",
    "CopySink",
    "Preset",
    "SyntheticModel",
    "main",
    "memory_bound",
    "model_shapes",
    "recommend",
    "run_pipelined",
    "run_sequential",
    "run_sweep",
    "sweep",
]

MiB = 1 << 20
STAGES = 3
FIXED_OVERHEAD_BYTES = 256 * MiB
"""Allowance for allocator slack, thread stacks and the quantizer's scratch space."""


def memory_bound(depth: int, bucket_bytes: int, largest_tensor_bytes: int) -> int:
    """``(depth + stages + 1) * bucket_bytes`` plus the fixed overhead.

    The fixed part is the allowance above plus two copies of the largest tensor: a tensor
    larger than a bucket travels alone, in a buffer of its own size (Fetch's copy and the
    quantizer's output), whatever ``bucket_bytes`` says.
    """
    fixed = FIXED_OVERHEAD_BYTES + 2 * largest_tensor_bytes
    return (depth + STAGES + 1) * bucket_bytes + fixed


@dataclass(frozen=True)
class Preset:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool


PRESETS: dict[SweepPreset, Preset] = {
    "tiny": Preset(256, 688, 4, 8, 8, 2048, False),
    "llama-1b": Preset(2048, 8192, 16, 32, 8, 128256, True),
    "llama-8b": Preset(4096, 14336, 32, 32, 8, 128256, False),
}


def model_shapes(preset: Preset, layers: int = 0) -> list[tuple[str, tuple[int, ...]]]:
    """Checkpoint (HF) names and shapes of a Llama model, in checkpoint order."""
    h, i, v = preset.hidden, preset.intermediate, preset.vocab
    kv = preset.kv_heads * (h // preset.heads)
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, h))]
    for layer in range(layers or preset.layers):
        p = f"model.layers.{layer}."
        shapes += [
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
            (p + "input_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
        ]
    shapes.append(("model.norm.weight", (h,)))
    if not preset.tied:
        shapes.append(("lm_head.weight", (v, h)))
    return shapes


class SyntheticModel:
    """Lazily yields ``(name, tensor)`` views of one shared random bf16 pool."""

    def __init__(self, shapes: list[tuple[str, tuple[int, ...]]], seed: int = 0) -> None:
        self.shapes = shapes
        largest = max(math.prod(shape) for _, shape in shapes)
        generator = torch.Generator().manual_seed(seed)
        # Random normal values scaled like trained weights; written once, reused by views.
        chunk = torch.randn(1 << 22, generator=generator).mul_(0.02).to(torch.bfloat16)
        self.pool = torch.empty(largest, dtype=torch.bfloat16)
        for start in range(0, largest, chunk.numel()):
            end = min(largest, start + chunk.numel())
            self.pool[start:end].copy_(chunk[: end - start])
        self.largest_bytes = largest * 2
        self.total_bytes = sum(math.prod(shape) * 2 for _, shape in shapes)

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, shape in self.shapes:
            yield name, self.pool[: math.prod(shape)].view(shape)


class CopySink:
    """An ``Engine`` that copies every tensor it is given into a scratch buffer.

    It stands in for an engine's parameter writes (a real memory copy per byte) without
    holding a model; it is a benchmark sink, not a test double of any engine.
    """

    name = "sink"

    def __init__(self) -> None:
        self.scratch = torch.empty(0, dtype=torch.uint8)
        self.committed: int | None = None
        self.bytes = 0
        self.limiter = anyio.CapacityLimiter(1)

    def _copy(self, bucket: WeightBucket) -> None:
        for _, tensor in bucket.tensors:
            flat = tensor.reshape(-1).view(torch.uint8)
            if self.scratch.numel() < flat.numel():
                self.scratch = torch.empty(flat.numel(), dtype=torch.uint8)
            self.scratch[: flat.numel()].copy_(flat)
            self.bytes += flat.numel()

    async def begin(self, version: int) -> None:
        self.bytes = 0

    async def load(self, bucket: WeightBucket) -> None:
        await anyio.to_thread.run_sync(self._copy, bucket, limiter=self.limiter)

    async def commit(self, version: int) -> None:
        self.committed = version

    async def abort(self, version: int) -> None:
        pass

    async def version(self) -> int | None:
        return self.committed

    async def pause(self, mode: PauseMode) -> None:
        pass

    async def resume(self) -> None:
        pass


def _stages(bucket_bytes: int, workers: int, cpu_threads: int = 1) -> tuple[Fetch, Fp8Quantize]:
    # One core per stage by default: the pipeline's parallelism comes from running the
    # stages side by side (and ``workers`` buckets at once), not from one stage taking
    # every core.
    return Fetch(bucket_bytes), Fp8Quantize(workers=workers, cpu_threads=cpu_threads)


async def run_pipelined(
    model: SyntheticModel, engine: Any, depth: int, bucket_bytes: int, workers: int, version: int
) -> dict[str, Any]:
    fetch, quantize = _stages(bucket_bytes, workers)
    fetch.version = version
    load = Load(engine, mode="pause", version=version)
    with PeakRss() as rss:
        started = time.perf_counter()
        report = await Pipeline([fetch, quantize, load], depth=depth).run(iter(model))
        seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "gbs": model.total_bytes / seconds / 1e9,
        "peak_rss_growth_bytes": rss.growth,
        "bottleneck": report.bottleneck().name,
        "busy_s": {s.name: round(s.busy_s, 4) for s in report.stages},
        "blocked_s": {s.name: round(s.blocked_s, 4) for s in report.stages},
        "peaks": {c.name: c.peak for c in report.channels},
    }


async def _outputs(result: Any) -> list[Any]:
    """A stage's outputs, whichever form its ``process`` takes (async generator or coroutine)."""
    if hasattr(result, "__anext__"):
        return [item async for item in result]
    return list(await result or ())


async def run_sequential(
    model: SyntheticModel, engine: Any, bucket_bytes: int, version: int, cpu_threads: int = 1
) -> dict[str, Any]:
    """Each bucket fetched, quantized and loaded before the next tensor is read."""
    fetch, quantize = _stages(bucket_bytes, 1, cpu_threads)
    fetch.version = version
    load = Load(engine, mode="pause", version=version)

    async def through(bucket: WeightBucket) -> None:
        for quantized in await _outputs(quantize.process(bucket)):
            await _outputs(load.process(quantized))

    with PeakRss() as rss:
        started = time.perf_counter()
        for stage in (fetch, quantize, load):
            await stage.open()
        try:
            for item in model:
                for bucket in await _outputs(fetch.process(item)):
                    await through(bucket)
            for bucket in await _outputs(fetch.flush()):
                await through(bucket)
        finally:
            for stage in (load, quantize, fetch):
                await stage.close()
        seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "gbs": model.total_bytes / seconds / 1e9,
        "peak_rss_growth_bytes": rss.growth,
    }


def _progress(total: int, enabled: bool) -> Any:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        disable=not enabled,
    )
    return progress


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median and spread of repeated runs of one setting (GB/s, seconds, peak RSS)."""
    gbs = sorted(r["gbs"] for r in runs)
    rss = sorted(r["peak_rss_growth_bytes"] for r in runs)
    median = statistics.median(gbs)
    out = dict(runs[len(runs) // 2])  # the other fields (busy, bottleneck) of one run
    out.update(
        gbs=median,
        gbs_min=gbs[0],
        gbs_max=gbs[-1],
        gbs_runs=[r["gbs"] for r in runs],
        spread=(gbs[-1] - gbs[0]) / median if median else 0.0,
        seconds=statistics.median(r["seconds"] for r in runs),
        peak_rss_growth_bytes=int(statistics.median(rss)),
        peak_rss_growth_max_bytes=rss[-1],
        repeats=len(runs),
    )
    return out


def recommend(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The setting to use, and why, from the summarised settings of one sweep.

    The fastest setting by median is the reference. Every setting whose fastest run
    reaches the reference's slowest run is within the noise of the best (their ranges
    overlap, so the runs cannot tell them apart). Among those, the one with the least
    memory wins: the smallest memory bound (depth and bucket size, a fixed property of
    the setting, so the pick does not move with noise), then fewer workers, then the
    lower measured peak. Settings over their memory bound are considered only when
    every setting is.

    Returns:
        a dict with the chosen row's settings and figures, ``best_median`` (the
        reference), ``tied`` (the settings within noise, as ``depth/MiB/workers``
        strings) and ``why`` (one sentence with the figures).
    """
    if not results:
        raise ValueError("recommend: no results")
    candidates = [r for r in results if r["within_bound"]] or results
    best = max(candidates, key=lambda r: r["gbs"])
    floor = best["gbs_min"]
    tied = [r for r in candidates if r["gbs_max"] >= floor]
    pick = min(
        tied,
        key=lambda r: (r["memory_bound_bytes"], r["workers"], r["peak_rss_growth_bytes"]),
    )

    def label(r: dict[str, Any]) -> str:
        return f"depth {r['depth']}/{r['bucket_mib']} MiB/{r['workers']} workers"

    if len(tied) == 1:
        why = (
            f"{label(pick)} is the fastest ({pick['gbs']:.3f} GB/s median, "
            f"{pick['gbs_min']:.3f}-{pick['gbs_max']:.3f}) and no other setting's runs reach "
            f"its slowest run"
        )
    else:
        why = (
            f"{len(tied)} settings are tied with the fastest ({label(best)}, "
            f"{best['gbs']:.3f} GB/s median, slowest run {floor:.3f}): their fastest runs "
            f"reach its slowest, so the runs cannot tell them apart; {label(pick)} "
            f"({pick['gbs']:.3f} GB/s) needs the least memory among them "
            f"(bound {pick['memory_bound_bytes'] / MiB:.0f} MiB)"
        )
    return {
        "depth": pick["depth"],
        "bucket_mib": pick["bucket_mib"],
        "workers": pick["workers"],
        "gbs": pick["gbs"],
        "gbs_min": pick["gbs_min"],
        "gbs_max": pick["gbs_max"],
        "peak_rss_growth_bytes": pick["peak_rss_growth_bytes"],
        "memory_bound_bytes": pick["memory_bound_bytes"],
        "best_median": best["gbs"],
        "tied": [label(r) for r in tied],
        "why": why,
    }


async def sweep(config: WeightpipeConfig, *, progress: bool = True) -> dict[str, Any]:
    """Run every setting and baseline ``sweep.repeats`` times, interleaved, and summarise.

    Repeats go round-robin (every setting once, then again), so a slow spell of a shared
    machine lands on all settings instead of on one.
    """
    cfg = config.sweep
    preset = PRESETS[cfg.preset]
    model = SyntheticModel(model_shapes(preset, cfg.layers), seed=config.model.seed)
    engine: Any
    if cfg.sink == "local":
        from weightpipe.stages.engines.local import LocalEngine, default_config

        if cfg.preset != "tiny":
            raise ValueError("sweep.sink=local runs the tiny preset only (a CPU engine)")
        engine = LocalEngine(default_config(num_hidden_layers=cfg.layers or preset.layers))
    else:
        engine = CopySink()
    settings = [
        (depth, mib, workers)
        for mib in cfg.bucket_mib
        for depth in cfg.depths
        for workers in cfg.workers
    ]
    runs: dict[tuple[int, int, int], list[dict[str, Any]]] = {s: [] for s in settings}
    baseline_runs: dict[int, list[dict[str, Any]]] = {mib: [] for mib in cfg.bucket_mib}
    all_core_runs: dict[int, list[dict[str, Any]]] = {mib: [] for mib in cfg.bucket_mib}
    cores = os.cpu_count() or 1
    version = 0
    total = cfg.repeats * (len(settings) + 2 * len(cfg.bucket_mib)) + 1
    with _progress(total, progress) as bar:
        task = bar.add_task("sweep", total=total)
        # One untimed pass first: page faults of the pool, allocator growth and thread
        # start-up would otherwise land on whichever run happens to be first.
        bar.update(task, description="warm-up")
        version += 1
        await run_pipelined(model, engine, 1, cfg.bucket_mib[0] * MiB, 1, version)
        bar.advance(task)
        for repeat in range(cfg.repeats):
            tag = f"run {repeat + 1}/{cfg.repeats}"
            for mib in cfg.bucket_mib:
                version += 1
                bar.update(task, description=f"{tag}: sequential {mib} MiB")
                baseline_runs[mib].append(await run_sequential(model, engine, mib * MiB, version))
                bar.advance(task)
                # The strongest sequential loop on this machine: the quantizer on every core.
                version += 1
                bar.update(task, description=f"{tag}: sequential {mib} MiB, {cores} cores")
                all_core_runs[mib].append(
                    await run_sequential(model, engine, mib * MiB, version, cpu_threads=cores)
                )
                bar.advance(task)
            for depth, mib, workers in settings:
                version += 1
                bar.update(task, description=f"{tag}: depth {depth}, {mib} MiB, {workers} w")
                runs[(depth, mib, workers)].append(
                    await run_pipelined(model, engine, depth, mib * MiB, workers, version)
                )
                bar.advance(task)
    baselines = {mib: _summary(r) for mib, r in baseline_runs.items()}
    all_cores = {mib: _summary(r) for mib, r in all_core_runs.items()}
    results: list[dict[str, Any]] = []
    for (depth, mib, workers), setting_runs in runs.items():
        result = _summary(setting_runs)
        bound = memory_bound(depth, mib * MiB, model.largest_bytes)
        result.update(
            depth=depth,
            bucket_mib=mib,
            workers=workers,
            speedup=baselines[mib]["seconds"] / result["seconds"],
            memory_bound_bytes=bound,
            within_bound=result["peak_rss_growth_max_bytes"] <= bound,
        )
        results.append(result)
    chosen = recommend(results)
    best_sequential = max(b["gbs"] for b in [*baselines.values(), *all_cores.values()])
    chosen["speedup_vs_sequential_same_bucket"] = (
        chosen["gbs"] / baselines[chosen["bucket_mib"]]["gbs"]
    )
    chosen["speedup_vs_best_sequential_any_setting"] = chosen["gbs"] / best_sequential
    return {
        "benchmark": "sweep",
        "preset": cfg.preset,
        "sink": cfg.sink,
        "repeats": cfg.repeats,
        "total_bytes": model.total_bytes,
        "largest_tensor_bytes": model.largest_bytes,
        "tensors": len(model.shapes),
        "sequential": {str(k): v for k, v in baselines.items()},
        "sequential_all_cores": {str(k): v for k, v in all_cores.items()},
        "results": results,
        "recommended": chosen,
    }


def plot(result: dict[str, Any], path: str) -> None:
    """Throughput (median, min-max bars) and peak memory against depth, one line per
    bucket size and worker count, with every sequential baseline as a horizontal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_speed, ax_mem) = plt.subplots(1, 2, figsize=(11, 4.2))
    lines: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for row in result["results"]:
        lines.setdefault((row["bucket_mib"], row["workers"]), []).append(row)
    colors: dict[int, str] = {}
    for (mib, workers), rows in sorted(lines.items()):
        rows.sort(key=lambda r: r["depth"])
        depths = [r["depth"] for r in rows]
        label = f"{mib} MiB" + (f", {workers} workers" if workers > 1 else "")
        medians = [r["gbs"] for r in rows]
        errors = [
            [r["gbs"] - r.get("gbs_min", r["gbs"]) for r in rows],
            [r.get("gbs_max", r["gbs"]) - r["gbs"] for r in rows],
        ]
        bars = ax_speed.errorbar(depths, medians, yerr=errors, marker="o", capsize=3, label=label)
        color = bars.lines[0].get_color()
        colors.setdefault(mib, color)
        ax_mem.plot(
            depths,
            [r["peak_rss_growth_bytes"] / MiB for r in rows],
            marker="o",
            label=label,
            color=color,
        )
    for key, style, what in (
        ("sequential", ":", "sequential"),
        ("sequential_all_cores", "--", "sequential, all cores"),
    ):
        for mib, base in result.get(key, {}).items():
            ax_speed.axhline(
                base["gbs"],
                linestyle=style,
                linewidth=1.2,
                color=colors.get(int(mib)),
                label=f"{what} {mib} MiB",
            )
    rec = result["recommended"]
    ax_speed.plot(
        [rec["depth"]],
        [rec["gbs"]],
        marker="*",
        markersize=14,
        color="black",
        linestyle="",
        label="recommended",
    )
    all_depths = sorted({r["depth"] for r in result["results"]})
    for ax in (ax_speed, ax_mem):
        ax.set_xticks(all_depths)
    repeats = result.get("repeats", 1)
    ax_speed.set(
        xlabel="queue depth",
        ylabel="GB/s of bf16 input",
        title=f"throughput (median of {repeats}, bars: min-max)",
    )
    ax_mem.set(xlabel="queue depth", ylabel="peak RSS growth (MiB)", title="peak memory")
    for ax in (ax_speed, ax_mem):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"weightpipe sweep: {result['preset']}, {result['total_bytes'] / 1e9:.2f} GB")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(result: dict[str, Any]) -> None:
    rows = [
        [
            r["depth"],
            r["bucket_mib"],
            r["workers"],
            r["gbs"],
            f"{r['gbs_min']:.3f}-{r['gbs_max']:.3f}",
            r["speedup"],
            r["peak_rss_growth_bytes"] / MiB,
            r["memory_bound_bytes"] / MiB,
            r["bottleneck"],
        ]
        for r in result["results"]
    ]
    print_table(
        rows,
        [
            "depth",
            "bucket MiB",
            "workers",
            "GB/s (median)",
            "min-max",
            "x sequential",
            "peak MiB",
            "bound MiB",
            "bottleneck",
        ],
    )
    for mib, base in result["sequential"].items():
        strong = result["sequential_all_cores"][mib]
        print(
            f"sequential {mib} MiB: {base['gbs']:.3f} GB/s (same stages, "
            f"{base['gbs_min']:.3f}-{base['gbs_max']:.3f}), {strong['gbs']:.3f} GB/s "
            f"(quantizer on every core, {strong['gbs_min']:.3f}-{strong['gbs_max']:.3f})"
        )
    rec = result["recommended"]
    print(
        f"recommended: depth={rec['depth']} fetch.bucket_bytes={rec['bucket_mib'] * MiB} "
        f"quantize.workers={rec['workers']}: {rec['gbs']:.3f} GB/s, "
        f"{rec['speedup_vs_sequential_same_bucket']:.2f}x the sequential baseline, "
        f"{rec['speedup_vs_best_sequential_any_setting']:.2f}x the best sequential setting"
    )
    print(f"why: {rec['why']}")


def run_sweep(
    config: WeightpipeConfig, *, json_path: str | None, plot_path: str | None, progress: bool = True
) -> int:
    """What ``weightpipe bench`` runs; returns an exit status."""
    torch.set_num_threads(1)  # each stage's worker thread gets one core
    result = anyio.run(lambda: sweep(config, progress=progress))
    report(result)
    write_json(json_path, result)
    if plot_path:
        plot(result, plot_path)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--plot", help="write the PNG plot here")
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "overrides", nargs="*", help="e.g. sweep.preset=llama-8b sweep.depths=[1,2]"
    )
    args = parser.parse_args(argv)
    try:
        config = load_weightpipe_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"sweep: {exc}", file=sys.stderr)
        return 2
    return run_sweep(
        config, json_path=args.json, plot_path=args.plot, progress=not args.no_progress
    )


if __name__ == "__main__":
    raise SystemExit(main())
