"""weightpipe's configuration: one typed schema, YAML files and dotlist overrides.

This is the only module that imports omegaconf. The schema is a tree of dataclasses; the
OmegaConf tree is created complete from it and locked in struct mode before anything is
merged, so no key can ever be written before it exists (the seed's
``Key 'hf_config' is not in struct`` came from the opposite order). Files and
``key=value`` overrides merge on top; an unknown key, a wrong type or a value outside its
choices fails with a ``ConfigError`` that names the key and lists what is valid there.
Stage constructors never see OmegaConf: callers turn the validated tree into plain
dataclasses with ``load_config`` and pass typed arguments on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    GrammarParseError,
    OmegaConfBaseException,
    ValidationError,
)

__all__ = [
    "ConfigError",
    "DemoConfig",
    "EngineConfig",
    "FetchConfig",
    "MetricsConfig",
    "ModelConfig",
    "QuantizeConfig",
    "SweepConfig",
    "WeightpipeConfig",
    "load_config",
    "to_yaml",
]

MiB = 1 << 20


class ConfigError(ValueError):
    """A configuration key is unknown, mistyped or out of range.

    Attributes:
        key: the dotted key at fault (``"quantize.block"``).
        valid: the keys (or values) that would have been accepted there.
    """

    def __init__(self, key: str, problem: str, valid: Sequence[str] = ()) -> None:
        hint = f"; valid: {', '.join(valid)}" if valid else ""
        super().__init__(f"config key {key!r}: {problem}{hint}")
        self.key = key
        self.valid = tuple(valid)


def _choice(key: str, value: object, choices: Sequence[object]) -> None:
    if value not in choices:
        raise ConfigError(key, f"{value!r} is not one of the choices", [str(c) for c in choices])


def _at_least(key: str, value: float, low: float) -> None:
    if value < low:
        raise ConfigError(key, f"must be >= {low}, got {value}")


@dataclass
class FetchConfig:
    """How weights are gathered into buckets (see ``weightpipe.stages.Fetch``)."""

    bucket_bytes: int = 64 * MiB
    """Upper bound of one bucket; a larger single tensor travels alone."""
    align_bytes: int = 256
    """Every tensor's start in a flattened bucket is aligned to this."""
    include_buffers: bool = False
    """Also send a module's buffers (rotary tables, running stats)."""
    empty_source: str = "error"
    """``error``: an empty source fails the sync; ``empty``: it commits an empty sync."""
    allow: list[str] = field(default_factory=list)
    """If set, only names matching one of these patterns (``re:`` or glob) may be sent."""
    timeout_s: float = 300.0
    """Timeout of every torch.distributed collective of the transport."""

    def __post_init__(self) -> None:
        _at_least("fetch.bucket_bytes", self.bucket_bytes, 1)
        _at_least("fetch.align_bytes", self.align_bytes, 1)
        _choice("fetch.empty_source", self.empty_source, ("error", "empty"))
        _at_least("fetch.timeout_s", self.timeout_s, 0.001)


@dataclass
class QuantizeConfig:
    """FP8 quantization settings; the SGLang server's quantization_config follows them."""

    enabled: bool = True
    method: str = "block"
    """``block`` (DeepSeek-style [128, 128] tiles), ``channel`` or ``tensor``."""
    block: list[int] = field(default_factory=lambda: [128, 128])
    scale_fmt: str = "float32"
    """``float32`` scales, or ``ue8m0`` (power-of-two, rounded up) for DeepGEMM."""
    nonfinite: str = "error"
    """A NaN/Inf weight: ``error`` fails the sync; ``keep`` sends it unquantized."""
    keep_dtype: str = "bfloat16"
    """Dtype of the tensors that are not quantized."""
    ignored_layers: list[str] = field(default_factory=list)
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    workers: int = 1
    backend: str = "auto"
    """``auto`` (Triton on CUDA when installed), ``torch`` or ``triton``."""

    def __post_init__(self) -> None:
        _choice("quantize.method", self.method, ("block", "channel", "tensor"))
        if len(self.block) != 2 or any(b < 1 for b in self.block):
            raise ConfigError("quantize.block", f"must be two positive integers, got {self.block}")
        _choice("quantize.scale_fmt", self.scale_fmt, ("float32", "ue8m0"))
        _choice("quantize.nonfinite", self.nonfinite, ("error", "keep"))
        _choice("quantize.keep_dtype", self.keep_dtype, ("bfloat16", "float16", "float32"))
        _at_least("quantize.workers", self.workers, 1)
        _choice("quantize.backend", self.backend, ("auto", "torch", "triton"))


@dataclass
class EngineConfig:
    """Which engine receives the weights and how a sync overlaps generation."""

    kind: str = "local"
    """``local`` (embedded engine), ``sglang_http``, ``sglang_engine``, ``sglang_distributed``."""
    mode: str = "prefetch"
    """``pause``, ``prefetch`` or ``in_flight`` (see ARCHITECTURE.md)."""
    pause_mode: str = "retract"
    """How generation pauses: ``abort``, ``retract`` or ``in_place``."""
    url: str = "http://127.0.0.1:30000"
    api_key: str | None = None
    timeout_s: float = 60.0
    """Timeout of every engine call."""
    retries: int = 3
    """Retries of a retryable engine answer (5xx, reset, cache not flushed)."""
    session: str = "auto"
    """Weight-update sessions (SGLang >= 0.5.23): ``auto`` detects, ``on``/``off`` force."""
    load_format: str = "flattened_bucket"
    """``flattened_bucket`` or ``named_tensors``."""
    tp_size: int = 1
    prefetch_bytes: int | None = 0
    """``prefetch`` mode: bytes fetched and quantized ahead before pausing (0: pause at
    the first bucket ready to load; null: the whole sync, memory permitting)."""

    def __post_init__(self) -> None:
        if self.prefetch_bytes is not None:
            _at_least("engine.prefetch_bytes", self.prefetch_bytes, 0)
        _choice(
            "engine.kind",
            self.kind,
            ("local", "sglang_http", "sglang_engine", "sglang_distributed"),
        )
        _choice("engine.mode", self.mode, ("pause", "prefetch", "in_flight"))
        _choice("engine.pause_mode", self.pause_mode, ("abort", "retract", "in_place"))
        _at_least("engine.timeout_s", self.timeout_s, 0.001)
        _at_least("engine.retries", self.retries, 0)
        _choice("engine.session", self.session, ("auto", "on", "off"))
        _choice("engine.load_format", self.load_format, ("flattened_bucket", "named_tensors"))
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
    dtype: str = "bfloat16"
    seed: int = 0
    batch_size: int = 8
    """Sequences the local engine generates at once."""
    max_new_tokens: int = 32
    """Tokens per request before it finishes and a new one starts."""
    device: str = "auto"
    """``auto`` (CUDA when present), ``cpu`` or ``cuda``."""

    def __post_init__(self) -> None:
        for key in ("hidden_size", "intermediate_size", "num_layers", "num_heads"):
            _at_least(f"model.{key}", getattr(self, key), 1)
        _at_least("model.num_kv_heads", self.num_kv_heads, 1)
        _at_least("model.vocab_size", self.vocab_size, 2)
        _at_least("model.batch_size", self.batch_size, 1)
        _at_least("model.max_new_tokens", self.max_new_tokens, 1)
        _choice("model.dtype", self.dtype, ("bfloat16", "float16", "float32"))
        _choice("model.device", self.device, ("auto", "cpu", "cuda"))
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

    preset: str = "llama-1b"
    depths: list[int] = field(default_factory=lambda: [1, 2, 4])
    bucket_mib: list[int] = field(default_factory=lambda: [16, 64])
    workers: list[int] = field(default_factory=lambda: [1, 2])
    sink: str = "sink"
    """``sink`` (discard after the load stage's copy) or ``local`` (the local engine)."""
    layers: int = 0
    """Decoder layers to stream (0: the preset's own count)."""

    def __post_init__(self) -> None:
        _choice("sweep.preset", self.preset, ("tiny", "llama-1b", "llama-8b"))
        _choice("sweep.sink", self.sink, ("sink", "local"))
        for key in ("depths", "bucket_mib", "workers"):
            values = getattr(self, key)
            if not values or any(v < 1 for v in values):
                raise ConfigError(
                    f"sweep.{key}", f"must be a non-empty list of ints >= 1: {values}"
                )


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


def _valid_keys(tree: DictConfig, key: str) -> list[str]:
    """The keys that exist at the parent of dotted ``key``."""
    parent = key.rsplit(".", 1)[0] if "." in key else ""
    node: Any = OmegaConf.select(tree, parent) if parent else tree
    if isinstance(node, DictConfig):
        return [f"{parent}.{k!s}" if parent else str(k) for k in node]
    return []


def _schema() -> DictConfig:
    tree = OmegaConf.structured(WeightpipeConfig)
    assert isinstance(tree, DictConfig)
    OmegaConf.set_struct(tree, True)
    return tree


def _merge(tree: DictConfig, other: Any, origin: str) -> DictConfig:
    try:
        merged = OmegaConf.merge(tree, other)
    except (ConfigAttributeError, ConfigKeyError) as exc:
        key = str(exc.full_key or exc.key or "")
        raise ConfigError(key, f"unknown key (from {origin})", _valid_keys(tree, key)) from None
    except ValidationError as exc:
        key = str(exc.full_key or exc.key or "")
        node = OmegaConf.select(tree, key) if key else None
        expected = type(node).__name__ if node is not None else "the schema's type"
        raise ConfigError(
            key, f"wrong type (from {origin}): {_first_line(exc.msg)}; expected {expected}"
        ) from None
    assert isinstance(merged, DictConfig)
    return merged


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> WeightpipeConfig:
    """Build the configuration: defaults, then a YAML file, then ``key=value`` overrides.

    Overrides use OmegaConf's dotlist grammar: ``depth=4 quantize.block=[128,128]``.

    Raises:
        ConfigError: an unknown key, a wrong type, a malformed override or a value out of
            range; the message names the key and lists the valid keys or choices.
        FileNotFoundError: ``path`` does not exist.
    """
    tree = _schema()
    if path is not None:
        text = Path(path).read_text()
        try:
            loaded = OmegaConf.create(text) if text.strip() else OmegaConf.create({})
        except (OmegaConfBaseException, yaml.YAMLError) as exc:
            raise ConfigError(str(path), f"not valid YAML: {_first_line(str(exc))}") from None
        if not isinstance(loaded, DictConfig):
            raise ConfigError(str(path), "the file must hold a mapping at the top level")
        tree = _merge(tree, loaded, str(path))
    for override in overrides:
        if "=" not in override:
            raise ConfigError(override, "an override must look like key=value")
        key = override.split("=", 1)[0].strip()
        if OmegaConf.select(tree, key, default=_MISSING) is _MISSING:
            raise ConfigError(
                key, f"unknown key (from override {override!r})", _valid_keys(tree, key)
            )
        try:
            dotlist = OmegaConf.from_dotlist([override])
        except (GrammarParseError, OmegaConfBaseException, yaml.YAMLError) as exc:
            detail = _first_line(str(exc))
            raise ConfigError(key, f"cannot parse override {override!r}: {detail}") from None
        tree = _merge(tree, dotlist, f"override {override!r}")
    try:
        config = OmegaConf.to_object(tree)
    except ValidationError as exc:
        key = str(exc.full_key or exc.key or "")
        raise ConfigError(key, f"wrong type: {_first_line(exc.msg)}") from None
    assert isinstance(config, WeightpipeConfig)
    return config


_MISSING = object()


def to_yaml(config: WeightpipeConfig) -> str:
    """The configuration as YAML (what ``weightpipe config show`` prints)."""
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def as_dict(config: Any) -> dict[str, Any]:
    """A section (or the whole tree) as plain Python containers."""
    return dataclasses.asdict(config)


def _first_line(text: str | None) -> str:
    return (text or "").strip().splitlines()[0] if text and text.strip() else "invalid value"
