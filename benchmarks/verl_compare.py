"""verl's own SGLang rollout weight path against weightpipe's updater, same weights, same run.

Both paths take the same in-memory bf16 weights of a Llama-shaped model (``--gb``, about
1 GB) and go up to the point where buckets are ready for the server:

- verl: ``SGLangFP8QuantizerHelper.quant_weights_by_name`` on its CPU fallback (Triton
  disabled with ``VERL_DISABLE_TRITON_FP8=1``; a one-process gloo group exists, since
  without one ``torch.distributed.get_rank()`` fails inside its try and every weight goes
  out in bf16), then ``get_named_tensor_buckets`` with the same bucket size;
- weightpipe: the stages ``WeightpipeUpdater`` runs before Load (``Fetch(flatten=False)``
  -> ``Fp8Quantize`` configured from the same ``quantization_config``, in the updater's
  default FP8 arithmetic, verl's), as a pipeline into a sink.

Each of ``--runs`` rounds runs both (alternating which goes first), each under its own
``PeakRss`` sampler, with the outputs dropped as they arrive. One more pass per path keeps
the outputs and compares them: names, FP8 codes (bytes) and scales (``output``). A last
untimed pass runs weightpipe with ``fp8_arithmetic="sglang"`` (``amax / 448`` and a
division, as SGLang's own quantizer, where verl computes ``1 / (448 / amax)`` and a
multiplication) and compares it the same way (``sglang_arithmetic``): what fraction of
codes and scales differ, and by how many float32 ulps at most.

Run (in .venv-verl): ``python -m benchmarks.verl_compare --json out/verl_compare.json``.
"""

from __future__ import annotations

import os

os.environ.setdefault("VERL_DISABLE_TRITON_FP8", "1")  # read when verl's kernel imports

import argparse
import statistics
import tempfile
import time
import warnings
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import torch
import torch.distributed as dist

from weightpipe.benchmarks.fetch import llama_shapes
from weightpipe.pipeline import Pipeline
from weightpipe.stages import SGLangHTTPEngine, WeightBucket
from weightpipe.stages.app.report import PeakRss, print_table, write_json
from weightpipe.stages.integrations.verl.updater import WeightpipeUpdater

__all__ = ["main"]

GB = 10**9


def make_weights(total_bytes: int) -> list[tuple[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [
        (name, (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16))
        for name, shape in llama_shapes(total_bytes)
    ]


async def _verl_buckets(
    weights: list[tuple[str, torch.Tensor]], config: dict[str, Any], bucket_bytes: int
) -> AsyncIterator[list[tuple[str, torch.Tensor]]]:
    from verl.utils.sglang.sglang_fp8_utils import SGLangFP8QuantizerHelper
    from verl.workers.rollout.sglang_rollout.utils import get_named_tensor_buckets

    helper = SGLangFP8QuantizerHelper(config)
    quantized = helper.quant_weights_by_name(iter(weights), dtype=torch.bfloat16)
    async for bucket in get_named_tensor_buckets(quantized, bucket_bytes):
        yield bucket


async def run_verl(
    weights: list[tuple[str, torch.Tensor]],
    config: dict[str, Any],
    bucket_bytes: int,
    keep: dict[str, torch.Tensor] | None = None,
) -> int:
    buckets = 0
    async for bucket in _verl_buckets(weights, config, bucket_bytes):
        buckets += 1
        if keep is not None:
            keep.update(bucket)
    return buckets


async def run_weightpipe(
    weights: list[tuple[str, torch.Tensor]],
    updater: WeightpipeUpdater,
    keep: dict[str, torch.Tensor] | None = None,
) -> int:
    buckets = 0

    async def sink(bucket: WeightBucket) -> None:
        nonlocal buckets
        buckets += 1
        if keep is not None:
            keep.update(bucket.tensors)

    await Pipeline(updater.stages(), updater.depth).run(updater.source(iter(weights)), sink=sink)
    return buckets


def _ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    return int((a.view(torch.int32).long() - b.view(torch.int32).long()).abs().max().item())


def compare(verl: dict[str, torch.Tensor], ours: dict[str, torch.Tensor]) -> dict[str, Any]:
    names_identical = list(verl) == list(ours)
    codes = codes_differ = scales = scales_differ = 0
    max_ulps = 0
    for name, theirs in verl.items():
        mine = ours.get(name)
        if mine is None:
            continue
        if theirs.dtype == torch.float8_e4m3fn:
            same = theirs.view(torch.uint8) == mine.view(torch.uint8)
            codes += same.numel()
            codes_differ += int((~same).sum())
        elif name.endswith("_scale_inv"):
            mine = mine.reshape(theirs.shape)
            scales += theirs.numel()
            scales_differ += int((theirs != mine).sum())
            max_ulps = max(max_ulps, _ulps(theirs.contiguous(), mine.contiguous()))
    quantized = sum(1 for t in verl.values() if t.dtype == torch.float8_e4m3fn)
    return {
        "names_identical": names_identical,
        "tensors": len(verl),
        "quantized_tensors": quantized,
        "codes_identical": codes_differ == 0 and codes > 0,
        "codes_differing_fraction": codes_differ / codes if codes else None,
        "scales_identical": scales_differ == 0 and scales > 0,
        "scales_differing_fraction": scales_differ / scales if scales else None,
        "scales_max_ulps": max_ulps,
        "identical": names_identical and codes_differ == 0 and scales_differ == 0,
    }


async def _measure(runs: int, gb: float, bucket_mb: int) -> dict[str, Any]:
    from verl.utils.sglang.sglang_fp8_utils import build_sglang_fp8_quant_config

    config: dict[str, Any] = build_sglang_fp8_quant_config(None)
    bucket_bytes = bucket_mb << 20
    weights = make_weights(int(gb * GB))
    total = sum(t.nbytes for _, t in weights)
    engine = SGLangHTTPEngine("http://127.0.0.1:9")  # never called: no Load stage here
    updater = WeightpipeUpdater(
        engine, bucket_bytes=bucket_bytes, quantization_config=config, lends_buffers=False
    )
    # Warm both (weightpipe compiles its CPU kernel once per process).
    await run_weightpipe(weights[:4], updater)
    await run_verl(weights[:4], config, bucket_bytes)
    figures: dict[str, dict[str, list[float]]] = {
        "verl": {"gbs": [], "rss": [], "buckets": []},
        "weightpipe": {"gbs": [], "rss": [], "buckets": []},
    }
    for index in range(runs):
        order = ("verl", "weightpipe") if index % 2 == 0 else ("weightpipe", "verl")
        for which in order:
            with PeakRss() as rss:
                started = time.perf_counter()
                if which == "verl":
                    buckets = await run_verl(weights, config, bucket_bytes)
                else:
                    buckets = await run_weightpipe(weights, updater)
                seconds = time.perf_counter() - started
            figures[which]["gbs"].append(total / seconds / GB)
            figures[which]["rss"].append(rss.growth / 1e6)
            figures[which]["buckets"].append(buckets)
    kept_verl: dict[str, torch.Tensor] = {}
    kept_ours: dict[str, torch.Tensor] = {}
    await run_verl(weights, config, bucket_bytes, keep=kept_verl)
    await run_weightpipe(weights, updater, keep=kept_ours)
    output = compare(kept_verl, kept_ours)
    del kept_ours
    sglang_updater = WeightpipeUpdater(
        engine,
        bucket_bytes=bucket_bytes,
        quantization_config=config,
        lends_buffers=False,
        fp8_arithmetic="sglang",
    )
    kept_sglang: dict[str, torch.Tensor] = {}
    await run_weightpipe(weights, sglang_updater, keep=kept_sglang)
    sglang_output = compare(kept_verl, kept_sglang)
    assert updater.quantize is not None

    def summary(values: list[float]) -> dict[str, float]:
        return {
            "median": statistics.median(values),
            "min": min(values),
            "max": max(values),
            "spread": (max(values) - min(values)) / statistics.median(values)
            if statistics.median(values)
            else 0.0,
        }

    verl_gbs = statistics.median(figures["verl"]["gbs"])
    ours_gbs = statistics.median(figures["weightpipe"]["gbs"])
    verl_rss = statistics.median(figures["verl"]["rss"])
    ours_rss = statistics.median(figures["weightpipe"]["rss"])
    return {
        "benchmark": "verl_compare",
        "bytes": total,
        "tensors": len(weights),
        "bucket_bytes": bucket_bytes,
        "runs": runs,
        "verl_gbs": summary(figures["verl"]["gbs"]),
        "weightpipe_gbs": summary(figures["weightpipe"]["gbs"]),
        "ratio": ours_gbs / verl_gbs,
        "verl_peak_rss_growth_mb": summary(figures["verl"]["rss"]),
        "weightpipe_peak_rss_growth_mb": summary(figures["weightpipe"]["rss"]),
        "buckets": {k: v["buckets"][0] for k, v in figures.items()},
        "per_run": figures,
        "weightpipe_arithmetic": updater.quantize.arithmetic,
        "output": output,
        "sglang_arithmetic": sglang_output,
        "targets": {
            "ratio_at_least_5": ours_gbs / verl_gbs >= 5,
            "rss_growth_at_most_verls": ours_rss <= verl_rss,
            "identical_output": output["identical"],
        },
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--gb", type=float, default=1.0)
    parser.add_argument("--bucket-mb", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # verl's imports of Ray
        import verl.utils.sglang.sglang_fp8_utils
        import verl.workers.rollout.sglang_rollout.utils  # noqa: F401
    created = False
    if not dist.is_initialized():
        init = Path(tempfile.mkdtemp()) / "pg"
        dist.init_process_group("gloo", init_method=f"file://{init}", rank=0, world_size=1)
        created = True
    try:
        result = anyio.run(_measure, args.runs, args.gb, args.bucket_mb)
    finally:
        if created:
            dist.destroy_process_group()
    print_table(
        [
            ["verl", result["verl_gbs"]["median"], result["verl_peak_rss_growth_mb"]["median"]],
            [
                "weightpipe",
                result["weightpipe_gbs"]["median"],
                result["weightpipe_peak_rss_growth_mb"]["median"],
            ],
        ],
        ["path", "GB/s", "peak RSS growth MB"],
    )
    print(f"ratio {result['ratio']:.2f}x; output: {result['output']}")
    print(f"with SGLang's arithmetic: {result['sglang_arithmetic']}")
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
