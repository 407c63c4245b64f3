"""One pass over the bytes: what a sync writes per source byte, and what it costs.

A Llama-shaped bf16 model (``llama-1b`` shapes, ``--layers`` decoder layers: about 1 GB
with the default 4) goes through ``Fetch -> Fp8Quantize`` three ways, one entry each in
the JSON's ``cases`` list, named by ``source``:

- ``memory``: the tensors held in memory, into a sink that drops each bucket (an engine
  that takes tensors as they come, like the local one);
- ``safetensors``: the same model written to a safetensors file and streamed from the
  memory-mapped ``safetensors_source``;
- ``http``: the in-memory tensors up to the serialized payload of SGLang's HTTP engine
  (``encode_flattened_bucket``, CPU tensors as shared-memory handles), with the stage
  before the wire writing into the engine's ``WireSpec`` (16-byte starts, shared memory),
  as ``sync_weights`` sets it up for that engine.

Each case runs the current path (``after``: Fetch passes views, the quantizer writes the
final buffer) and the path before this change (``before``: Fetch packs every bucket, the
quantizer writes separate outputs, the wire flattens and moves them into shared memory),
``--repeats`` times interleaved, and the quantizer alone on the same weights in the same
run (the same stage, called bucket by bucket on views, no pipeline). Reported per case and
path: median GB/s of bf16 input with min-max, ``end_to_end_ratio`` (median end-to-end
against the quantizer alone), ``written_per_source_byte`` (bytes every stage and the wire
wrote, per source byte), ``minimum_written_per_source_byte`` (0.5 plus scales for each
FP8 weight, 1.0 for each tensor copied unquantized into a flat wire buffer, 0 for one sent
as it is), and peak RSS growth against ``(depth + 2)`` buckets. Targets: ratio >= 0.8,
written <= minimum + 0.05, growth <= the bound.

Run: ``python -m benchmarks.sync_path --json out/sync_path.json [--layers 4]``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import anyio
import torch

from weightpipe.pipeline import Pipeline
from weightpipe.stages._layout import plan_buckets, views_layout
from weightpipe.stages.app.bench import PRESETS, model_shapes
from weightpipe.stages.app.config import SweepPreset
from weightpipe.stages.app.report import PeakRss, machine, print_table, write_json
from weightpipe.stages.bucket import WeightBucket
from weightpipe.stages.engines.base import WireSpec
from weightpipe.stages.engines.sglang.wire import encode_flattened_bucket
from weightpipe.stages.fetch import Fetch
from weightpipe.stages.fp8 import scale_shape
from weightpipe.stages.quantize import Fp8Quantize
from weightpipe.stages.sources import safetensors_source

MiB = 1 << 20
GB = 1e9
HTTP_WIRE = WireSpec(align_bytes=16, shared_memory=True)
"""What SGLang's HTTP engine asks for with CPU tensors (flattened bucket, file_system)."""


def build_model(
    layers: int, seed: int = 0, preset: SweepPreset = "llama-1b"
) -> list[tuple[str, torch.Tensor]]:
    """Real tensors (not views of one pool) with the preset's shapes, in checkpoint order."""
    generator = torch.Generator().manual_seed(seed)
    return [
        (name, (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16))
        for name, shape in model_shapes(PRESETS[preset], layers)
    ]


def minimum_written(
    model: list[tuple[str, torch.Tensor]], quantize: Fp8Quantize, wire: bool
) -> int:
    """The unavoidable bytes: FP8 codes plus scales of each quantized weight; a kept tensor
    costs its bytes only when it must be copied into a flat wire buffer."""
    total = 0
    for name, tensor in model:
        if quantize.selection.quantizes(name, tensor):
            scale = math.prod(scale_shape(tensor.shape, quantize.method, quantize.block))
            total += tensor.numel() + 4 * scale  # float8 codes, float32 scales
        elif wire:
            total += tensor.numel() * tensor.element_size()
    return total


class WireSink:
    """What the HTTP engine does with each bucket up to the payload, counting its writes.

    A bucket whose tensors are views of one shared-memory buffer is sent as it is (no
    write); otherwise the wire flattens it (a write) and pickling moves the flat buffer
    into shared memory (another).
    """

    def __init__(self) -> None:
        self.written = 0
        self.payload_bytes = 0

    async def __call__(self, bucket: WeightBucket) -> None:
        tensors = bucket.tensors
        if not tensors:
            return
        buffer = bucket.buffer
        layout = views_layout(buffer, tensors) if buffer is not None else None
        nbytes = sum(t.numel() * t.element_size() for _, t in tensors)
        if layout is None:
            self.written += nbytes  # flattened into a fresh buffer
        if layout is None or buffer is None or not buffer.is_shared():  # type: ignore[no-untyped-call]
            self.written += nbytes  # moved into shared memory by the pickler
        payloads = encode_flattened_bucket(tensors, buffer=buffer)
        self.payload_bytes += sum(len(p) for p in payloads)


async def _drop(bucket: WeightBucket) -> None:
    return None


def _stages(after: bool, bucket_bytes: int, wire: bool) -> tuple[Fetch, Fp8Quantize]:
    fetch = Fetch(bucket_bytes, flatten="auto" if after else True)
    quantize = Fp8Quantize()
    if after and wire:
        quantize.use_wire(HTTP_WIRE)
    return fetch, quantize


def run_case(
    source: Callable[[], Iterable[tuple[str, Any]]],
    source_bytes: int,
    stages: tuple[Fetch, Fp8Quantize],
    *,
    wire: bool,
    depth: int,
) -> dict[str, Any]:
    """One sync through ``stages`` (kept across runs, as a trainer keeps them across
    syncs: their buffer pools are warm after the first)."""
    fetch, quantize = stages
    fetch_before, quantize_before = fetch.written_bytes, quantize.written_bytes
    sink = WireSink() if wire else None
    with PeakRss() as rss:
        started = time.perf_counter()
        anyio.run(
            lambda: Pipeline([fetch, quantize], depth=depth).run(
                source(), sink=sink if sink is not None else _drop
            )
        )
        seconds = time.perf_counter() - started
    by_stage = {
        "fetch": fetch.written_bytes - fetch_before,
        "quantize": quantize.written_bytes - quantize_before,
        "wire": sink.written if sink else 0,
    }
    return {
        "gbs": source_bytes / seconds / GB,
        "seconds": seconds,
        "written_bytes": sum(by_stage.values()),
        "written_by_stage": by_stage,
        "peak_rss_growth_bytes": rss.growth,
    }


def quantizer_alone(
    model: list[tuple[str, torch.Tensor]], quantize: Fp8Quantize, *, bucket_bytes: int
) -> float:
    """GB/s of the stage itself on the same weights, bucket by bucket, on views."""
    plan = plan_buckets([t.nbytes for _, t in model], bucket_bytes, align=256)
    buckets = [
        WeightBucket(tuple(model[i] for i in indices), b, b == len(plan) - 1, 1)
        for b, indices in enumerate(plan)
    ]
    total = sum(t.nbytes for _, t in model)
    started = time.perf_counter()
    for bucket in buckets:
        out = quantize.quantize_bucket(bucket)
        del out
    return total / (time.perf_counter() - started) / GB


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (4: ~1 GB)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="llama-1b")
    parser.add_argument("--bucket-mib", type=int, default=64)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    bucket_bytes = args.bucket_mib * MiB
    model = build_model(args.layers, preset=args.preset)
    source_bytes = sum(t.nbytes for _, t in model)
    probe = Fp8Quantize()
    bound = (args.depth + 2) * bucket_bytes
    cases: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        from safetensors.torch import save_file

        path = Path(tmp) / "model.safetensors"
        save_file(dict(model), str(path))
        sources: dict[str, tuple[Callable[[], Iterable[tuple[str, Any]]], bool]] = {
            "memory": (lambda: iter(model), False),
            "safetensors": (lambda: safetensors_source(path), False),
            "http": (lambda: iter(model), True),
        }
        runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
        alone: dict[str, list[float]] = {}
        paths = {
            (name, label): _stages(label == "after", bucket_bytes, wire)
            for name, (_, wire) in sources.items()
            for label in ("after", "before")
        }
        alone_stages = {
            name: _stages(True, bucket_bytes, wire)[1] for name, (_, wire) in sources.items()
        }
        # Warm-up: the CPU kernel's compile, the buffer pools' first faults, the page cache.
        for (name, _), stages in paths.items():
            source, wire = sources[name]
            run_case(source, source_bytes, stages, wire=wire, depth=args.depth)
        for name in sources:
            quantizer_alone(model, alone_stages[name], bucket_bytes=bucket_bytes)
        for _ in range(args.repeats):
            for name, (source, wire) in sources.items():
                alone.setdefault(name, []).append(
                    quantizer_alone(model, alone_stages[name], bucket_bytes=bucket_bytes)
                )
                for label in ("after", "before"):
                    runs.setdefault((name, label), []).append(
                        run_case(
                            source, source_bytes, paths[(name, label)], wire=wire, depth=args.depth
                        )
                    )
        for name, (_, wire) in sources.items():
            minimum = minimum_written(model, probe, wire) / source_bytes
            alone_gbs = _spread(alone[name])
            case: dict[str, Any] = {
                "source": name,
                "source_bytes": source_bytes,
                "quantizer_alone_gbs": alone_gbs,
                "minimum_written_per_source_byte": minimum,
                "memory_bound_bytes": bound,
            }
            for label in ("after", "before"):
                rows = runs[(name, label)]
                gbs = _spread([r["gbs"] for r in rows])
                written = statistics.median(r["written_bytes"] for r in rows) / source_bytes
                growth = max(r["peak_rss_growth_bytes"] for r in rows)
                case[label] = {
                    "end_to_end_gbs": gbs,
                    "end_to_end_ratio": gbs["median"] / alone_gbs["median"],
                    "written_per_source_byte": written,
                    "written_by_stage": rows[len(rows) // 2]["written_by_stage"],
                    "peak_rss_growth_bytes": growth,
                }
            after_row = case["after"]
            case["targets"] = {
                "end_to_end_ratio_ge_0.8": after_row["end_to_end_ratio"] >= 0.8,
                "written_le_minimum_plus_0.05": after_row["written_per_source_byte"]
                <= minimum + 0.05,
                "peak_rss_growth_le_bound": after_row["peak_rss_growth_bytes"] <= bound,
            }
            cases.append(case)
    result = {
        "benchmark": "sync_path",
        "machine": machine(),
        "preset": args.preset,
        "layers": args.layers,
        "bucket_bytes": bucket_bytes,
        "depth": args.depth,
        "repeats": args.repeats,
        "cases": cases,
    }
    rows_out = [
        [
            c["source"],
            label,
            c[label]["end_to_end_gbs"]["median"],
            f"{c[label]['end_to_end_gbs']['min']:.2f}-{c[label]['end_to_end_gbs']['max']:.2f}",
            c["quantizer_alone_gbs"]["median"],
            c[label]["end_to_end_ratio"],
            c[label]["written_per_source_byte"],
            c["minimum_written_per_source_byte"],
            c[label]["peak_rss_growth_bytes"] / MiB,
        ]
        for c in cases
        for label in ("after", "before")
    ]
    print_table(
        rows_out,
        [
            "source",
            "path",
            "GB/s",
            "min-max",
            "quantizer GB/s",
            "ratio",
            "written/B",
            "min/B",
            "peak MiB",
        ],
    )
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
