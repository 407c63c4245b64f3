"""Typed configuration sections -> stage and engine objects.

The one place that knows which constructor argument each config field feeds, so the demo,
the sweep and a user's trainer build identical stages from one configuration; the stages
themselves take typed arguments and never see the config tree. Dtype names resolve
through ``weightpipe.stages.dtypes`` and block shapes through ``stages.fp8.spec.as_block``.
"""

from __future__ import annotations

from typing import Any

import torch

from weightpipe.stages.app.config import (
    ENGINE_KINDS,
    EngineConfig,
    FetchConfig,
    ModelConfig,
    QuantizeConfig,
)
from weightpipe.stages.dtypes import dtype_from_name
from weightpipe.stages.engines.base import Engine
from weightpipe.stages.fetch import Fetch
from weightpipe.stages.load import Load
from weightpipe.stages.quantize import Fp8Quantize

__all__ = ["build_engine", "build_fetch", "build_llama_config", "build_load", "build_quantize"]


def build_fetch(config: FetchConfig, *, device: str | torch.device = "cpu") -> Fetch:
    """The Fetch stage ``config`` describes, its buckets on ``device``."""
    return Fetch(
        config.bucket_bytes,
        align_bytes=config.align_bytes,
        device=device,
        empty_source=config.empty_source,
        allow=list(config.allow) or None,
    )


def build_quantize(config: QuantizeConfig) -> Fp8Quantize:
    """The Fp8Quantize stage ``config`` describes (``config.enabled`` is the caller's)."""
    return Fp8Quantize(
        block=config.block_shape,
        method=config.method,
        scale_fmt=config.scale_fmt,
        arithmetic=config.arithmetic,
        nonfinite=config.nonfinite,
        keep_dtype=dtype_from_name(config.keep_dtype),
        ignored_layers=list(config.ignored_layers),
        include=list(config.include),
        exclude=list(config.exclude),
        workers=config.workers,
        backend=config.backend,
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
    """The engine ``engine.kind`` names (every ``EngineKind`` is buildable).

    ``block`` is the FP8 block shape the local engine dequantizes with.
    """
    if engine.kind == "local":
        from weightpipe.stages.engines.local import LocalEngine

        return LocalEngine(
            build_llama_config(model),
            seed=model.seed,
            batch_size=model.batch_size,
            max_new_tokens=model.max_new_tokens,
            dtype=dtype_from_name(model.dtype),
            device=None if model.device == "auto" else model.device,
            block_size=block,
        )
    if engine.kind == "sglang_http":
        from weightpipe.stages.engines.sglang.http import SGLangHTTPEngine

        return SGLangHTTPEngine(
            engine.url,
            api_key=engine.api_key,
            timeout_s=engine.timeout_s,
            retries=engine.retries,
            session=engine.session,
            load_format=engine.load_format,
            tp_size=engine.tp_size,
        )
    raise ValueError(f"engine.kind: no factory for {engine.kind!r}; known: {ENGINE_KINDS}")


def build_load(engine_config: EngineConfig, engine: Engine, *, version: int | None = None) -> Load:
    """The Load stage for ``engine`` with the sync settings of ``engine_config``."""
    return Load(
        engine,
        mode=engine_config.mode,
        pause_mode=engine_config.pause_mode,
        timeout_s=engine_config.timeout_s,
        version=version,
        prefetch_bytes=engine_config.prefetch_bytes,
        on_partial_failure=engine_config.on_partial_failure,
    )
