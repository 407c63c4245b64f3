"""The rollout side of verl: weightpipe in place of the SGLang ServerAdapter's weight update.

verl's SGLang ``ServerAdapter.update_weights(weights, global_steps, wire_format)`` runs
``quant_weights_by_name`` (FP8 on the event loop, a bf16 weight sent in place of any that
fails), ``get_named_tensor_buckets`` and one ``update_weights_from_tensor`` per bucket,
then one cache flush. ``WeightpipeUpdater.update_weights`` has the same arguments and the
same effect on the server, as one weightpipe sync: ``Fetch`` (verl's bucket size, owned
tensors passed on without a copy) -> ``KeepFused`` (only when the model has fusion groups)
-> ``Fp8Quantize`` (configured from the rollout's ``quantization_config``, in verl's own FP8
arithmetic by default, so the server gets the same codes and scales verl's CPU quantizer
would have sent; ``fp8_arithmetic="sglang"`` picks SGLang's) -> ``Load`` into
an ``Engine`` (``SGLangHTTPEngine`` in production: a weight-update session, buckets with
``flush_cache=false``, one flush and ``global_steps`` as the weight version at commit).
A quantization failure fails the sync, naming the tensor; nothing is sent in bf16 in its
place. Sources that lend their buffers (verl's NCCL engine) are wrapped in
``borrowed_tensors`` and copied once before they advance. Nothing here imports verl.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Iterable, Mapping, Sequence
from typing import Any

import torch

from weightpipe.pipeline import aclose_iterator, as_async_iter
from weightpipe.stages.engines.base import Engine
from weightpipe.stages.fetch import Fetch
from weightpipe.stages.fp8 import Fp8Arithmetic, ScaleFormat
from weightpipe.stages.integrations.verl._fusion import KeepFused
from weightpipe.stages.quantize import Fp8Quantize
from weightpipe.stages.sources import borrowed_tensors, named_tensors
from weightpipe.stages.sync import SyncReport, sync_weights

__all__ = [
    "OWNED_BACKENDS",
    "WeightpipeUpdater",
    "default_fp8_arithmetic",
    "drain",
    "lends_buffers",
    "quantize_stage",
    "updater_for_rollout",
]

OWNED_BACKENDS = frozenset({"naive", "weightpipe"})
"""verl checkpoint-engine backends whose ``receive_weights`` yields tensors it will not
overwrite: the colocated one (the trainer's own tensors) and weightpipe's (a fresh buffer
per bucket). Every other backend is treated as lending its buffers (NCCL, NIXL, HCCL,
Mooncake and Kimi reuse receive buffers), which costs one copy and is always safe."""


def lends_buffers(backend: str | None) -> bool:
    """Whether tensors from verl checkpoint-engine ``backend`` must be copied before use."""
    return backend not in OWNED_BACKENDS


def _layer_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = value.split(",")
    return [str(v).strip() for v in value if str(v).strip()]


def default_fp8_arithmetic(block: tuple[int, int], scale_fmt: ScaleFormat) -> Fp8Arithmetic:
    """``verl`` (verl 0.9.1's own quantizer, bit for bit) wherever it applies, else ``sglang``.

    verl's quantizer has square blocks and float32 scales only: a non-square block or
    ``scale_fmt="ue8m0"`` keeps SGLang's arithmetic (with its power-of-two rounding).
    """
    return "verl" if block[0] == block[1] and scale_fmt == "float32" else "sglang"


def quantize_stage(
    quantization_config: Mapping[str, Any],
    *,
    workers: int = 1,
    arithmetic: Fp8Arithmetic | None = None,
) -> Fp8Quantize:
    """The ``Fp8Quantize`` that produces what an SGLang server with this config loads.

    Reads the block FP8 config verl builds for SGLang (``build_sglang_fp8_quant_config``):
    ``quant_method="fp8"``, ``fmt="e4m3"``, ``weight_block_size`` (required, as verl's
    own quantizer requires it), optional ``scale_fmt="ue8m0"``, and ``ignored_layers`` /
    ``modules_to_not_convert`` (lists or comma-separated strings), matched by SGLang's own
    ignored-layer rule. Tensors left unquantized keep their dtype, as verl sends them.
    ``arithmetic``: the FP8 arithmetic (``weightpipe.stages.fp8.reference``); None:
    ``default_fp8_arithmetic`` (verl's, so the codes and scales equal what verl's own
    CPU quantizer sends), ``"sglang"`` for SGLang's.

    Raises:
        ValueError: another quantization method or format, no ``weight_block_size``, or
            an ``arithmetic`` that is unknown or that the config's block or scale format
            rules out (``check_arithmetic``).
    """
    method = quantization_config.get("quant_method")
    if method != "fp8":
        raise ValueError(f"verl updater: quant_method {method!r} is not supported (only 'fp8')")
    fmt = quantization_config.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise ValueError(f"verl updater: FP8 format {fmt!r} is not supported (only 'e4m3')")
    block = quantization_config.get("weight_block_size")
    if block is None or len(block) != 2:
        raise ValueError(
            "verl updater: quantization_config has no weight_block_size [out, in] "
            f"(got {block!r}); verl's SGLang FP8 path quantizes in blocks only"
        )
    ignored = _layer_list(quantization_config.get("ignored_layers"))
    ignored += [
        m
        for m in _layer_list(quantization_config.get("modules_to_not_convert"))
        if m not in ignored
    ]
    pair = (int(block[0]), int(block[1]))
    scale_fmt: ScaleFormat = (
        "ue8m0" if quantization_config.get("scale_fmt") == "ue8m0" else "float32"
    )
    return Fp8Quantize(
        block=pair,
        method="block",
        scale_fmt=scale_fmt,
        arithmetic=default_fp8_arithmetic(pair, scale_fmt) if arithmetic is None else arithmetic,
        nonfinite="error",
        keep_dtype=None,
        ignored_layers=ignored,
        workers=workers,
    )


async def drain(weights: Iterable[Any] | AsyncIterable[Any]) -> int:
    """Consume ``weights`` without using them (ranks that do not post to the server).

    Producing the weights is collective (DTensor gathers, the checkpoint engine's
    broadcasts), so every rank walks the stream; sync iterables in a worker thread.
    Returns the number of items.
    """
    items = as_async_iter(weights)
    count = 0
    try:
        async for _ in items:
            count += 1
    finally:
        await aclose_iterator(items)
    return count


class WeightpipeUpdater:
    """A drop-in for the SGLang ``ServerAdapter.update_weights`` contract, on weightpipe.

    Args:
        engine: where the weights go (``SGLangHTTPEngine`` for verl's SGLang servers).
        bucket_bytes: verl's ``update_weights_bucket_megabytes << 20``. It bounds the
            input bytes of a bucket, so FP8 output buckets are smaller, never larger
            (a lone larger tensor travels alone, as in verl; a fusion group's carried-over
            members may add their bytes, see ``KeepFused``).
        quantization_config: the rollout's SGLang ``quantization_config`` when it serves
            FP8 (verl: ``rollout.quantization == "fp8"``), else None (weights sent as
            they come).
        fusion_groups: name-suffix groups that must share a bucket (verl's
            ``DEEPSEEK_V4_FUSION_GROUPS`` for ``model_type == "deepseek_v4"``).
        lends_buffers: the weight streams this updater gets reuse their buffers (see
            ``lends_buffers()``): each tensor is then copied once before the stream
            advances. False: tensors are owned and never copied.
        device: where bucket tensors live (the rollout GPU, or ``"cpu"``).
        depth: channel depth between stages (buckets in flight).
        timeout_s: limit on each engine call.
        quantize_workers: buckets quantized concurrently.
        fp8_arithmetic: ``"verl"`` or ``"sglang"`` (``weightpipe.stages.fp8.reference``);
            None (default): verl's wherever its quantizer applies
            (``default_fp8_arithmetic``), so the server gets bit for bit the codes and
            scales verl's own CPU quantizer would have sent.

    Raises:
        ValueError: a bad ``bucket_bytes``, an unsupported ``quantization_config`` or
            ``fp8_arithmetic``.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        bucket_bytes: int,
        quantization_config: Mapping[str, Any] | None = None,
        fusion_groups: Sequence[Sequence[str]] = (),
        lends_buffers: bool = True,
        device: str | torch.device = "cpu",
        depth: int = 2,
        timeout_s: float = 300.0,
        quantize_workers: int = 1,
        fp8_arithmetic: Fp8Arithmetic | None = None,
    ) -> None:
        self.engine = engine
        self.lends_buffers = lends_buffers
        self.depth = depth
        self.timeout_s = timeout_s
        self.fetch = Fetch(bucket_bytes, flatten=False, device=device)
        self.keep_fused = KeepFused(fusion_groups) if fusion_groups else None
        self.quantize = (
            quantize_stage(quantization_config, workers=quantize_workers, arithmetic=fp8_arithmetic)
            if quantization_config is not None
            else None
        )
        self.last_version: int | None = None
        self.last_report: SyncReport | None = None

    async def aclose(self) -> None:
        """Close the engine's resources (its HTTP client) if it has any."""
        close = getattr(self.engine, "aclose", None)
        if callable(close):
            await close()

    async def __aenter__(self) -> WeightpipeUpdater:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def stages(self) -> list[Any]:
        """The stages before Load: Fetch, then KeepFused and Fp8Quantize when configured."""
        stages: list[Any] = [self.fetch]
        if self.keep_fused is not None:
            stages.append(self.keep_fused)
        if self.quantize is not None:
            stages.append(self.quantize)
        return stages

    def source(
        self, weights: Iterable[Any] | AsyncIterable[Any]
    ) -> Iterable[Any] | AsyncIterable[Any]:
        """``weights`` as the first stage takes it: copied once when the stream lends."""
        # named_tensors detaches (a trainer's parameters may require grad) and gathers
        # DTensors; it copies nothing.
        return borrowed_tensors(weights) if self.lends_buffers else named_tensors(weights)

    async def update_weights(
        self,
        weights: Iterable[Any] | AsyncIterable[Any],
        global_steps: int | None = None,
        wire_format: str = "named_tensors",
        **kwargs: Any,
    ) -> SyncReport:
        """Install ``weights`` as version ``global_steps`` (verl's adapter contract).

        ``global_steps`` None: one more than the last version this updater installed
        (1 at first). The engine reports the new version only after every bucket was
        accepted and the cache flushed once.

        Raises:
            StageError: the sync failed (a tensor that cannot be quantized, the server
                refused or timed out, the stream failed); names the stage, bucket and
                tensor. The server keeps reporting its old version.
            ValueError: a ``wire_format`` other than ``"named_tensors"``.
            NotImplementedError: a LoRA adapter update (``peft_config`` with
                ``base_sync_done``), which goes through SGLang's adapter API instead.
        """
        if wire_format != "named_tensors":
            raise ValueError(
                f"verl updater: wire_format {wire_format!r} is not supported "
                "(weightpipe takes full tensors, 'named_tensors')"
            )
        if kwargs.get("peft_config") and kwargs.get("base_sync_done"):
            raise NotImplementedError("verl updater: LoRA adapter updates are not supported")
        last = self.last_version or 0
        version = int(global_steps) if global_steps is not None else last + 1
        report = await sync_weights(
            self.source(weights),
            self.engine,
            version=version,
            stages=self.stages(),
            depth=self.depth,
            # verl's manager has already aborted the requests and released the KV cache.
            mode="in_flight",
            timeout_s=self.timeout_s,
        )
        self.last_version = version
        self.last_report = report
        return report


def _get(config: Any, key: str, default: Any = None) -> Any:
    getter = getattr(config, "get", None)
    if callable(getter):
        return getter(key, default)
    return getattr(config, key, default)


def updater_for_rollout(
    rollout_config: Any, hf_config: Any, engine: Engine, *, device: str | torch.device = "cpu"
) -> WeightpipeUpdater:
    """The updater verl's SGLang adapter would be, read from verl's own configuration.

    ``rollout_config`` is verl's ``RolloutConfig`` (``actor_rollout_ref.rollout``):
    ``quantization == "fp8"`` selects FP8 with ``hf_config.quantization_config`` (what
    verl's adapter puts there and launches SGLang with), the bucket size is
    ``checkpoint_engine.update_weights_bucket_megabytes``, the backend decides whether
    the weight stream lends its buffers, and ``hf_config.model_type == "deepseek_v4"``
    brings verl's fusion groups. ``engine_kwargs["weightpipe"]`` may set ``depth``,
    ``timeout_s``, ``quantize_workers`` and ``fp8_arithmetic`` (``"sglang"`` for SGLang's
    FP8 arithmetic instead of verl's) for the rollout side as well.

    Raises:
        ValueError: FP8 is asked for but ``hf_config`` has no usable quantization_config.
    """
    checkpoint_engine = _get(rollout_config, "checkpoint_engine")
    backend = _get(checkpoint_engine, "backend", "naive")
    bucket_bytes = int(_get(checkpoint_engine, "update_weights_bucket_megabytes", 2048)) << 20
    per_backend = _get(checkpoint_engine, "engine_kwargs", None) or {}
    kwargs = dict(per_backend.get("weightpipe", None) or {})
    quantization = None
    if _get(rollout_config, "quantization") == "fp8":
        quantization = _get(hf_config, "quantization_config")
        if not isinstance(quantization, Mapping):
            raise ValueError(
                "verl updater: rollout.quantization is 'fp8' but the model config has no "
                f"quantization_config dict (got {type(quantization).__name__})"
            )
    fusion_groups: Sequence[Sequence[str]] = ()
    if _get(hf_config, "model_type") == "deepseek_v4":
        from verl.workers.rollout.sglang_rollout.utils import DEEPSEEK_V4_FUSION_GROUPS

        fusion_groups = DEEPSEEK_V4_FUSION_GROUPS
    return WeightpipeUpdater(
        engine,
        bucket_bytes=bucket_bytes,
        quantization_config=quantization,
        fusion_groups=fusion_groups,
        lends_buffers=lends_buffers(backend),
        device=device,
        depth=int(kwargs.get("depth", 2)),
        timeout_s=float(kwargs.get("timeout_s", 300.0)),
        quantize_workers=int(kwargs.get("quantize_workers", 1)),
        fp8_arithmetic=kwargs.get("fp8_arithmetic"),
    )
