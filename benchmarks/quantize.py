"""Benchmark: FP8 block quantization throughput against a plain copy and SGLang's quantizer.

``python -m benchmarks.quantize --json PATH [--device cpu|cuda] [--repeats N]`` measures
GB/s of high-precision (bf16) input for one 4096x4096 matrix and for the full set of one
Llama-3-8B decoder layer (q/k/v/o, gate/up/down, two norms), through the batched
quantizer the Fp8Quantize stage uses, and in the same run a plain bf16 ``copy_`` of the
same tensors into preallocated ones (``copy_gbs``) and, where the real ``sglang`` package is
installed, SGLang's own pure-torch ``per_block_cast_to_fp8`` (``sglang_gbs``). Every figure
is the median of ``--repeats`` timed runs after a warm-up, the three methods interleaved
per repeat so that load from other processes hits them alike; CPU-seconds figures and the
load average are recorded too, since this machine is shared. Writes JSON and prints a
table. ``WEIGHTPIPE_FP8_CPU_KERNEL=torch`` measures the torch band path instead of numba;
``--arithmetic verl`` measures verl's FP8 arithmetic instead of SGLang's.

SGLang's function is taken from the installed package's source file (its module cannot
be imported without SGLang's GPU stack): the two function definitions are compiled from
that file as they are, nothing is copied into this repository.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from weightpipe.stages.fp8 import FP8_ARITHMETICS, Fp8Arithmetic

__all__ = ["llama3_8b_layer", "load_sglang_block_quantizer", "main", "run"]

# Llama-3-8B: hidden 4096, 32 heads, 8 KV heads of 128, MLP 14336.
_HIDDEN, _KV, _MLP = 4096, 1024, 14336


def llama3_8b_layer(dtype: torch.dtype = torch.bfloat16) -> list[tuple[str, torch.Tensor]]:
    """The parameters of one Llama-3-8B decoder layer, random, in checkpoint names."""
    gen = torch.Generator().manual_seed(0)
    shapes = {
        "self_attn.q_proj.weight": (_HIDDEN, _HIDDEN),
        "self_attn.k_proj.weight": (_KV, _HIDDEN),
        "self_attn.v_proj.weight": (_KV, _HIDDEN),
        "self_attn.o_proj.weight": (_HIDDEN, _HIDDEN),
        "mlp.gate_proj.weight": (_MLP, _HIDDEN),
        "mlp.up_proj.weight": (_MLP, _HIDDEN),
        "mlp.down_proj.weight": (_HIDDEN, _MLP),
        "input_layernorm.weight": (_HIDDEN,),
        "post_attention_layernorm.weight": (_HIDDEN,),
    }
    return [
        (f"model.layers.0.{name}", (torch.randn(shape, generator=gen) * 0.02).to(dtype))
        for name, shape in shapes.items()
    ]


def load_sglang_block_quantizer() -> (
    Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None
):
    """SGLang's ``per_block_cast_to_fp8`` from the installed package, or None.

    Its module imports SGLang's whole GPU stack (torchvision, tvm_ffi, ...), so the
    function and the helpers it calls are compiled from the installed source files.
    """
    spec = importlib.util.find_spec("sglang")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(next(iter(spec.submodule_search_locations)))
    wanted = {
        root / "srt/layers/quantization/fp8_utils.py": ("per_block_cast_to_fp8", "ceil_to_ue8m0"),
        root / "srt/utils/common.py": ("ceil_align", "ceil_div"),
    }
    namespace: dict[str, Any] = {"torch": torch, "Tuple": tuple}
    for path, names in wanted.items():
        if not path.exists():
            return None
        tree = ast.parse(path.read_text(), filename=str(path))
        found = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in names]
        if len(found) != len(names):
            return None
        module = ast.Module(body=list(found), type_ignores=[])
        exec(compile(module, str(path), "exec"), namespace)
    fn = namespace["per_block_cast_to_fp8"]
    return fn  # type: ignore[no-any-return]


_KERNEL_LOOPS = 10


def _triton_ready() -> bool:
    from weightpipe.stages.fp8 import triton_usable

    return triton_usable("block", (128, 128))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], Any], device: torch.device) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the whole process) for one call."""
    _sync(device)
    start, cpu = time.perf_counter(), time.process_time()
    fn()
    _sync(device)
    return time.perf_counter() - start, time.process_time() - cpu


def _case(
    label: str,
    named: Sequence[tuple[str, torch.Tensor]],
    device: torch.device,
    repeats: int,
    threads: int,
    sglang: Callable[[torch.Tensor], Any] | None,
    arithmetic: Fp8Arithmetic = "sglang",
) -> dict[str, Any]:
    from weightpipe.stages.bucket import WeightBucket
    from weightpipe.stages.quantize import Fp8Quantize

    named = [(n, t.to(device)) for n, t in named]
    nbytes = sum(t.nbytes for _, t in named)
    stage = Fp8Quantize(cpu_threads=threads, arithmetic=arithmetic)
    bucket = WeightBucket(tuple(named), 0, True, 1)
    copies = [torch.empty_like(t) for _, t in named]
    matrices = [t for _, t in named if t.dim() == 2]

    def quantize() -> None:
        out = stage.quantize_bucket(bucket)
        if out.ready is not None:
            out.ready.synchronize()

    def copy() -> None:
        for dst, (_, src) in zip(copies, named, strict=True):
            dst.copy_(src)

    def run_sglang() -> None:
        assert sglang is not None
        for t in matrices:
            sglang(t)

    def kernel() -> None:
        # The batched launch alone, no host wait per bucket: what the GPU sustains.
        from weightpipe.stages.fp8 import quantize_fp8_batch

        for _ in range(_KERNEL_LOOPS):
            quantize_fp8_batch(matrices, backend="triton", arithmetic=arithmetic)

    methods: dict[str, Callable[[], None]] = {"quantize": quantize, "copy": copy}
    if sglang is not None:
        methods["sglang"] = run_sglang
    if device.type == "cuda" and _triton_ready():
        methods["kernel"] = kernel
    for fn in methods.values():  # warm-up: first-touch pages, thread pools, kernels
        fn()
    times: dict[str, list[float]] = {k: [] for k in methods}
    cpu_times: dict[str, list[float]] = {k: [] for k in methods}
    for _ in range(repeats):
        for key, fn in methods.items():
            wall, cpu = _time(fn, device)
            times[key].append(wall)
            cpu_times[key].append(cpu)
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu_times.items()}
    row: dict[str, Any] = {
        "case": label,
        "tensors": len(named),
        "bytes": nbytes,
        "quantize_s": med["quantize"],
        "quantize_gbs": nbytes / med["quantize"] / 1e9,
        "copy_gbs": nbytes / med["copy"] / 1e9,
        "sglang_gbs": None,
        "sglang_gbs_per_cpu_s": None,
        "ratio_to_copy": med["copy"] / med["quantize"],
        "speedup_vs_sglang": None,
        "quantize_best_gbs": nbytes / min(times["quantize"]) / 1e9,
        "copy_best_gbs": nbytes / min(times["copy"]) / 1e9,
        # Bytes per CPU-second: less sensitive to other processes than wall time.
        "quantize_gbs_per_cpu_s": nbytes / max(med_cpu["quantize"], 1e-9) / 1e9,
        "copy_gbs_per_cpu_s": nbytes / max(med_cpu["copy"], 1e-9) / 1e9,
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    if "kernel" in med:
        kernel_bytes = sum(t.nbytes for t in matrices) * _KERNEL_LOOPS
        row["kernel_gbs"] = kernel_bytes / med["kernel"] / 1e9
    if "sglang" in med:
        sg_bytes = sum(t.nbytes for t in matrices)
        row["sglang_gbs"] = sg_bytes / med["sglang"] / 1e9
        row["speedup_vs_sglang"] = row["quantize_gbs"] / row["sglang_gbs"]
        row["sglang_gbs_per_cpu_s"] = sg_bytes / max(med_cpu["sglang"], 1e-9) / 1e9
    return row


def run(
    device: str = "cpu",
    repeats: int = 7,
    threads: int | None = None,
    sglang: bool = True,
    arithmetic: Fp8Arithmetic = "sglang",
) -> dict[str, Any]:
    """Measure both cases; returns the JSON-ready result."""
    dev = torch.device(device)
    from weightpipe.stages.fp8 import default_cpu_threads, warm_up_cpu_kernel

    cpu_threads = threads if threads is not None else default_cpu_threads()
    sglang_fn = load_sglang_block_quantizer() if sglang else None

    cpu_kernel = "numba" if warm_up_cpu_kernel() else "torch"  # compiled outside timings
    gen = torch.Generator().manual_seed(1)
    square = [
        (
            "model.layers.0.self_attn.o_proj.weight",
            (torch.randn(4096, 4096, generator=gen) * 0.02).bfloat16(),
        )
    ]
    cases = [
        _case("4096x4096 bf16", square, dev, repeats, cpu_threads, sglang_fn, arithmetic),
        _case(
            "llama3-8b layer bf16",
            llama3_8b_layer(),
            dev,
            repeats,
            cpu_threads,
            sglang_fn,
            arithmetic,
        ),
    ]
    return {
        "benchmark": "quantize",
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else _cpu_name(),
        "cpu_count": os.cpu_count(),
        "cpu_threads": cpu_threads,
        "cpu_kernel": cpu_kernel,
        "arithmetic": arithmetic,
        "torch": torch.__version__,
        "repeats": repeats,
        "sglang_available": sglang_fn is not None,
        "targets": {
            "ratio_to_copy_min": 0.25,
            "speedup_vs_sglang_min": 5.0,
            "cuda_gbs_min": 2000.0,
        },
        "cases": cases,
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"


def _table(result: dict[str, Any]) -> str:
    head = (
        f"{'case':24s} {'quant GB/s':>10s} {'copy GB/s':>10s} {'ratio':>6s} "
        f"{'sglang GB/s':>11s} {'x sglang':>8s}"
    )
    lines = [
        f"device: {result['device']} ({result['device_name']}), CPU kernel "
        f"{result['cpu_kernel']}, {result['cpu_threads']} band threads",
        head,
    ]
    for row in result["cases"]:
        sg = "-" if row["sglang_gbs"] is None else f"{row['sglang_gbs']:.3f}"
        sx = "-" if row["speedup_vs_sglang"] is None else f"{row['speedup_vs_sglang']:.1f}"
        lines.append(
            f"{row['case']:24s} {row['quantize_gbs']:10.3f} {row['copy_gbs']:10.3f} "
            f"{row['ratio_to_copy']:6.3f} {sg:>11s} {sx:>8s}"
        )
        if "kernel_gbs" in row:
            lines.append(f"{'':24s} kernel only (batched launch): {row['kernel_gbs']:.1f} GB/s")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quantize", description=__doc__)
    parser.add_argument("--json", type=Path, help="write the result here")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="CPU band threads")
    parser.add_argument("--no-sglang", action="store_true", help="skip SGLang's baseline")
    parser.add_argument(
        "--arithmetic", choices=FP8_ARITHMETICS, default="sglang", help="the FP8 arithmetic"
    )
    args = parser.parse_args(argv)
    result = run(
        args.device,
        args.repeats,
        args.threads,
        sglang=not args.no_sglang,
        arithmetic=args.arithmetic,
    )
    print(_table(result))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
