"""weightpipe's configuration schema: one tree of dataclasses, typed with its owners' Literals.

Each field that is a set of choices uses the ``Literal`` type of the module that owns the
choice (FP8 formats from ``stages.fp8.spec``, sync and pause modes from
``stages.engines.base``, dtypes from ``stages.dtypes``), so the loader rejects a bad value
by the same list the stage checks, and the factory passes fields on without a cast. The
generic loader (``weightpipe.pipeline.config``) builds this schema from YAML and dotlist
overrides; ``load_weightpipe_config`` is that call for this schema. Ranges the types cannot
say are checked in ``__post_init__`` and fail with a ``ConfigError`` naming the key.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from weightpipe.pipeline.config import ConfigError, load_config
from weightpipe.stages.dtypes import KeepDtype
from weightpipe.stages.engines.base import PauseMode, SyncMode
from weightpipe.stages.engines.sglang.http import LoadFormat, SessionMode
from weightpipe.stages.fetch import EmptySource
from weightpipe.stages.fp8.spec import (
    Fp8Arithmetic,
    Fp8Method,
    NonFinitePolicy,
    QuantizeBackend,
    ScaleFormat,
    as_block,
    check_arithmetic,
)
from weightpipe.stages.load import OnPartialFailure

__all__ = [
    "ENGINE_KINDS",
    "SWEEP_PRESETS",
    "DemoConfig",
    "DeviceChoice",
    "EngineConfig",
    "EngineKind",
    "FetchConfig",
    "MetricsConfig",
    "ModelConfig",
    "QuantizeConfig",
    "SweepConfig",
    "SweepPreset",
    "SweepSink",
    "WeightpipeConfig",
    "load_weightpipe_config",
]

MiB = 1 << 20

EngineKind = Literal["local", "sglang_http"]
"""The engines a configuration alone can build: the embedded ``local`` engine and an SGLang
server over HTTP. The in-process and distributed SGLang adapters need objects a trainer
owns (an ``sglang.Engine``, a process group), so they are constructed in code."""
ENGINE_KINDS: tuple[EngineKind, ...] = get_args(EngineKind)

DeviceChoice = Literal["auto", "cpu", "cuda"]
"""``auto``: CUDA when present."""

SweepPreset = Literal["tiny", "llama-1b", "llama-8b"]
"""Model shapes of ``weightpipe bench`` (``weightpipe.stages.app.bench.PRESETS``)."""
SWEEP_PRESETS: tuple[SweepPreset, ...] = get_args(SweepPreset)

SweepSink = Literal["sink", "local"]
"""``sink``: discard after the load stage's copy; ``local``: the local engine."""


def _at_least(key: str, value: float, low: float) -> None:
    if value < low:
        raise ConfigError(key, f"must be >= {low}, got {value}")


@dataclass
class FetchConfig:
    """How weights are gathered into buckets (see ``weightpipe.stages.Fetch``)."""

    bucket_bytes: int = 64 * MiB
    """Upper bound of one bucket; a larger single tensor travels alone."""
    align_bytes: int = 256
    """Every tensor's start in a flattened bucket is aligned to this (a power of two)."""
    empty_source: EmptySource = "error"
    """``error``: an empty source fails the sync; ``empty``: it commits an empty sync."""
    allow: list[str] = field(default_factory=list)
    """If set, only names matching one of these patterns (``re:`` or glob) may be sent."""

    def __post_init__(self) -> None:
        _at_least("fetch.bucket_bytes", self.bucket_bytes, 1)
        _at_least("fetch.align_bytes", self.align_bytes, 1)
        if self.align_bytes & (self.align_bytes - 1):
            raise ConfigError(
                "fetch.align_bytes", f"must be a power of two, got {self.align_bytes}"
            )


@dataclass
class QuantizeConfig:
    """FP8 quantization settings; the SGLang server's quantization_config follows them."""

    enabled: bool = True
    method: Fp8Method = "block"
    """``block`` (DeepSeek-style [128, 128] tiles), ``channel`` or ``tensor``."""
    block: list[int] = field(default_factory=lambda: [128, 128])
    """The block shape over [out, in] (``block`` method)."""
    scale_fmt: ScaleFormat = "float32"
    """``float32`` scales, or ``ue8m0`` (power-of-two, rounded up) for DeepGEMM."""
    arithmetic: Fp8Arithmetic = "sglang"
    """``sglang`` (``q = w / (max(amax, 1e-4) / 448)``) or ``verl`` (verl 0.9.1's
    quantizer, ``q = w * (448 / amax)``: block method, square blocks, float32 scales)."""
    nonfinite: NonFinitePolicy = "error"
    """A NaN/Inf weight: ``error`` fails the sync; ``keep`` sends it unquantized."""
    keep_dtype: KeepDtype = "bfloat16"
    """Dtype of the tensors that are not quantized."""
    ignored_layers: list[str] = field(default_factory=list)
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    workers: int = 1
    backend: QuantizeBackend = "auto"
    """``auto`` (Triton on CUDA when installed), ``torch`` or ``triton``."""

    def __post_init__(self) -> None:
        try:
            as_block(self.block, what="quantize.block")
        except ValueError as exc:
            raise ConfigError("quantize.block", str(exc)) from None
        try:
            check_arithmetic(
                self.arithmetic, self.method, self.block_shape, self.scale_fmt, what="quantize"
            )
        except ValueError as exc:
            raise ConfigError("quantize.arithmetic", str(exc)) from None
        _at_least("quantize.workers", self.workers, 1)

    @property
    def block_shape(self) -> tuple[int, int]:
        """``block`` as the ``(out, in)`` tuple the FP8 functions take."""
        return as_block(self.block, what="quantize.block")


@dataclass
class EngineConfig:
    """Which engine receives the weights and how a sync overlaps generation."""

    kind: EngineKind = "local"
    """``local`` (the embedded engine) or ``sglang_http`` (see ``EngineKind``)."""
    mode: SyncMode = "prefetch"
    """``pause``, ``prefetch`` or ``in_flight`` (``weightpipe.stages.engines.SyncMode``;
    the README's "Sync modes" table)."""
    pause_mode: PauseMode = "retract"
    """How generation pauses: ``abort``, ``retract`` or ``in_place``."""
    url: str = "http://127.0.0.1:30000"
    api_key: str | None = None
    timeout_s: float = 60.0
    """Deadline of every engine call (Load owns it)."""
    retries: int = 3
    """Retries of a retryable engine answer (5xx, reset, cache not flushed)."""
    session: SessionMode = "auto"
    """Weight-update sessions (SGLang >= 0.5.23): ``auto`` detects, ``on``/``off`` force."""
    load_format: LoadFormat = "flattened_bucket"
    """``flattened_bucket`` or ``named_tensors``."""
    tp_size: int = 1
    prefetch_bytes: int | None = 0
    """``prefetch`` mode: bytes fetched and quantized ahead before pausing (0: pause at
    the first bucket ready to load; null: the whole sync, memory permitting)."""
    on_partial_failure: OnPartialFailure = "keep_paused"
    """An engine that cannot roll back (SGLang) and accepted part of a failed sync:
    ``keep_paused`` until a full sync commits, or ``resume`` (logged as a warning)."""

    def __post_init__(self) -> None:
        if self.prefetch_bytes is not None:
            _at_least("engine.prefetch_bytes", self.prefetch_bytes, 0)
        _at_least("engine.timeout_s", self.timeout_s, 0.001)
        _at_least("engine.retries", self.retries, 0)
        _at_least("engine.tp_size", self.tp_size, 1)


@dataclass
class ModelConfig:
    """The local engine's (and the demo trainer's) Llama-architecture model."""

    hidden_size: int = 256
    intermediate_size: int = 688
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int = 4
    vocab_size: int = 2048
    dtype: KeepDtype = "bfloat16"
    """The dtype the local engine serves unquantized weights in."""
    seed: int = 0
    batch_size: int = 8
    """Sequences the local engine generates at once."""
    max_new_tokens: int = 32
    """Tokens per request before it finishes and a new one starts."""
    device: DeviceChoice = "auto"
    """``auto`` (CUDA when present), ``cpu`` or ``cuda``."""

    def __post_init__(self) -> None:
        for key in ("hidden_size", "intermediate_size", "num_layers", "num_heads"):
            _at_least(f"model.{key}", getattr(self, key), 1)
        _at_least("model.num_kv_heads", self.num_kv_heads, 1)
        _at_least("model.vocab_size", self.vocab_size, 2)
        _at_least("model.batch_size", self.batch_size, 1)
        _at_least("model.max_new_tokens", self.max_new_tokens, 1)
        if self.hidden_size % self.num_heads:
            raise ConfigError("model.hidden_size", "must be a multiple of model.num_heads")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError("model.num_kv_heads", "must divide model.num_heads")


@dataclass
class MetricsConfig:
    """Prometheus exposition."""

    enabled: bool = True
    addr: str = "127.0.0.1"
    """Bind address; loopback unless you mean to expose it."""
    port: int = 9464
    """0 picks a free port."""

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError("metrics.port", f"must be in 0..65535, got {self.port}")


@dataclass
class DemoConfig:
    """The demo's trainer loop."""

    steps: int = 10
    """Optimizer steps in all."""
    sync_every: int = 2
    """Sync the weights to the engine every this many steps."""
    lr: float = 1e-3
    batch_size: int = 4
    seq_len: int = 64
    progress: bool = True

    def __post_init__(self) -> None:
        _at_least("demo.steps", self.steps, 1)
        _at_least("demo.sync_every", self.sync_every, 1)
        _at_least("demo.batch_size", self.batch_size, 1)
        _at_least("demo.seq_len", self.seq_len, 2)


@dataclass
class SweepConfig:
    """``weightpipe bench``: the depth x bucket size sweep."""

    preset: SweepPreset = "llama-1b"
    depths: list[int] = field(default_factory=lambda: [1, 2, 4])
    bucket_mib: list[int] = field(default_factory=lambda: [16, 64])
    workers: list[int] = field(default_factory=lambda: [1, 2])
    sink: SweepSink = "sink"
    """``sink`` (discard after the load stage's copy) or ``local`` (the local engine)."""
    layers: int = 0
    """Decoder layers to stream (0: the preset's own count)."""
    repeats: int = 3
    """Runs of every setting and baseline (interleaved); figures are medians with spread."""

    def __post_init__(self) -> None:
        _at_least("sweep.repeats", self.repeats, 1)
        for key in ("depths", "bucket_mib", "workers"):
            values = getattr(self, key)
            if not values or any(v < 1 for v in values):
                raise ConfigError(
                    f"sweep.{key}", f"must be a non-empty list of ints >= 1: {values}"
                )
        _at_least("sweep.layers", self.layers, 0)


@dataclass
class WeightpipeConfig:
    """The whole configuration tree."""

    depth: int = 2
    """Capacity of every channel between stages (memory bound vs slack)."""
    fetch: FetchConfig = field(default_factory=FetchConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)

    def __post_init__(self) -> None:
        _at_least("depth", self.depth, 1)


def load_weightpipe_config(
    path: str | Path | None = None, overrides: Sequence[str] = ()
) -> WeightpipeConfig:
    """``load_config(WeightpipeConfig, path, overrides)``: defaults, a file, then overrides.

    Raises:
        ConfigError: see ``weightpipe.pipeline.config.load_config``.
    """
    return load_config(WeightpipeConfig, path, overrides)
