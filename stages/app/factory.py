"""Typed configuration sections -> stage and engine objects.

``weightpipe.pipeline.config`` turns files and overrides into plain dataclasses; this
module is the one place that knows which constructor argument each field feeds, so the
demo, the sweep and a user's trainer build identical stages from one configuration.
"""

from __future__ import annotations

from typing import Any

import torch

from weightpipe.pipeline.config import EngineConfig, FetchConfig, ModelConfig, QuantizeConfig
from weightpipe.stages.engines.base import Engine
from weightpipe.stages.fetch import Fetch
from weightpipe.stages.quantize import Fp8Quantize

__all__ = ["build_engine", "build_fetch", "build_llama_config", "build_quantize", "torch_dtype"]

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def torch_dtype(name: str) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16``.

    Raises:
        ValueError: an unknown dtype name (lists the known ones).
    """
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; known: {sorted(_DTYPES)}") from None


def build_fetch(config: FetchConfig, *, device: str | torch.device = "cpu") -> Fetch:
    return Fetch(
        config.bucket_bytes,
        align_bytes=config.align_bytes,
        device=device,
        empty_source="empty" if config.empty_source == "empty" else "error",
        allow=list(config.allow) or None,
    )


def build_quantize(config: QuantizeConfig) -> Fp8Quantize:
    block = (int(config.block[0]), int(config.block[1]))
    return Fp8Quantize(
        block=block,
        method=config.method,  # type: ignore[arg-type]
        scale_fmt=config.scale_fmt,  # type: ignore[arg-type]
        nonfinite=config.nonfinite,  # type: ignore[arg-type]
        keep_dtype=torch_dtype(config.keep_dtype),
        ignored_layers=list(config.ignored_layers),
        include=list(config.include),
        exclude=list(config.exclude),
        workers=config.workers,
        backend=config.backend,  # type: ignore[arg-type]
    )


def build_llama_config(model: ModelConfig) -> Any:
    """The ``transformers.LlamaConfig`` shared by the demo trainer and the local engine."""
    from weightpipe.stages.engines.local import default_config

    return default_config(
        hidden_size=model.hidden_size,
        intermediate_size=model.intermediate_size,
        num_hidden_layers=model.num_layers,
        num_attention_heads=model.num_heads,
        num_key_value_heads=model.num_kv_heads,
        vocab_size=model.vocab_size,
    )


def build_engine(engine: EngineConfig, model: ModelConfig, *, block: tuple[int, int]) -> Engine:
    """The engine ``engine.kind`` names.

    Raises:
        ValueError: a kind that needs more than a configuration to build
            (``sglang_engine`` wraps an in-process ``sglang.Engine`` the caller owns;
            ``sglang_distributed`` needs the trainer's process group).
    """
    if engine.kind == "local":
        from weightpipe.stages.engines.local import LocalEngine

        device = None if model.device == "auto" else model.device
        return LocalEngine(
            build_llama_config(model),
            seed=model.seed,
            batch_size=model.batch_size,
            max_new_tokens=model.max_new_tokens,
            dtype=torch_dtype(model.dtype),
            device=device,
            block_size=block,
        )
    if engine.kind == "sglang_http":
        from weightpipe.stages.engines.sglang.http import SGLangHTTPEngine

        return SGLangHTTPEngine(
            engine.url,
            api_key=engine.api_key,
            timeout_s=engine.timeout_s,
            retries=engine.retries,
            session=engine.session,  # type: ignore[arg-type]
            load_format=engine.load_format,  # type: ignore[arg-type]
            tp_size=engine.tp_size,
        )
    raise ValueError(
        f"engine.kind={engine.kind!r} can't be built from configuration alone: construct "
        "it in your trainer (see README, 'Pointing it at SGLang') and pass it to sync_weights"
    )
