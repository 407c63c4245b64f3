"""Which parameters become FP8: the name rules of ``Fp8Selection``, shared with SGLang.

A trainer-side selection must agree with what the SGLang model builds as FP8 linear
layers, or the engine refuses the bucket (or silently serves a high-precision copy): so
the rules follow SGLang's own, structural ones first (linear ``.weight`` matrices and
expert stacks; never embeddings, ``lm_head``, norms or routers), then its
``ignored_layers`` matching (dotted paths, fused ``qkv_proj`` / ``gate_up_proj`` names
covering their shards, ``re:`` entries), then the user's include/exclude patterns.
``Fp8Selection.engine_ignored_layers`` turns a selection into the plain list SGLang's
config understands (see ``weightpipe.stages.fp8.sglang``).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch

from weightpipe.stages.fp8.spec import HIGH_PRECISION_DTYPES

__all__ = ["Fp8Selection", "select_for_fp8"]

# Last module-path components that are never FP8 linear layers in SGLang: embeddings and
# the LM head (vocab-parallel embeddings there), and MoE routers, which SGLang builds
# unquantized (``mlp.gate``, Qwen's ``shared_expert_gate``, Mixtral-style ``router``).
_NEVER_MODULES = frozenset(
    {
        "embed_tokens",
        "embed",
        "embeddings",
        "word_embeddings",
        "wte",
        "wpe",
        "lm_head",
        "gate",
        "shared_expert_gate",
        "router",
    }
)
_NORM = re.compile(r"(^|_)(norm|layernorm|ln(_\w+)?)$|norm$")

# The checkpoint shards of SGLang's fused layers: an ignored fused name skips its shards.
_FUSED = {
    "q_proj": "qkv_proj",
    "k_proj": "qkv_proj",
    "v_proj": "qkv_proj",
    "gate_proj": "gate_up_proj",
    "up_proj": "gate_up_proj",
}


def _module_of(name: str) -> str:
    """``model.layers.0.mlp.down_proj.weight`` -> ``model.layers.0.mlp.down_proj``."""
    return name[: -len(".weight")] if name.endswith(".weight") else name


def _path_match(ignored: str, module: str) -> bool:
    """SGLang's ignored-layer rule: equal, a dotted prefix, or a dotted sub-path."""
    ignored = ignored.rstrip(".")
    if module == ignored or module.startswith(ignored + "."):
        return True
    return f".{ignored}." in f".{module}."


@lru_cache(maxsize=256)
def _compile(pattern: str) -> re.Pattern[str]:
    """``re:REGEX`` as given; anything else is an fnmatch glob over the full name."""
    if pattern.startswith("re:"):
        return re.compile(pattern[3:])
    return re.compile(fnmatch.translate(pattern))


@dataclass(frozen=True)
class Fp8Selection:
    """The rules deciding which parameters are quantized to FP8.

    A parameter is quantized when all of these hold:

    - its name ends with ``.weight`` and it is 2-D, or it is a 3-D stack of expert
      matrices (``experts`` in its module path; ``.weight`` or a transformers-style
      ``experts.gate_up_proj`` name), quantized per expert matrix;
    - its module is not an embedding, ``lm_head``, a norm or a router gate
      (``mlp.gate``, ``shared_expert_gate``, ``router``);
    - its module is not matched by ``ignored_layers`` (SGLang's dotted-path rule, with
      and without a leading ``model.``, fused ``qkv_proj``/``gate_up_proj`` entries
      covering their shards; ``re:REGEX`` entries use ``re.match`` on the module name, as
      SGLang's compressed-tensors configs do);
    - it matches one of ``include`` if any are given and none of ``exclude``
      (fnmatch globs, or ``re:REGEX`` with ``re.match``, over the full parameter name).

    The dtype is checked separately (only bf16/fp16/fp32 tensors are quantized).
    """

    ignored_layers: tuple[str, ...] = ()
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for pattern in (*self.ignored_layers, *self.include, *self.exclude):
            if not isinstance(pattern, str) or not pattern:
                raise ValueError(f"FP8 selection pattern {pattern!r} must be a non-empty str")
            try:
                _compile(pattern)
            except re.error as exc:
                raise ValueError(f"FP8 selection pattern {pattern!r}: {exc}") from exc

    def __call__(self, name: str, shape: Sequence[int]) -> bool:
        """True when ``name`` of ``shape`` is quantized."""
        return self.why_not(name, shape) is None

    def quantizes(self, name: str, tensor: torch.Tensor) -> bool:
        """The whole decision for one tensor: these rules and a high-precision dtype."""
        return tensor.dtype in HIGH_PRECISION_DTYPES and self(name, tensor.shape)

    def why_not(self, name: str, shape: Sequence[int]) -> str | None:
        """None when quantized, else a short reason (used in logs and tests)."""
        module = _module_of(name)
        last = module.rsplit(".", 1)[-1]
        stacked = len(shape) == 3 and ".experts" in f".{module}"
        if not (name.endswith(".weight") or (stacked and last.endswith("_proj"))):
            return "not a weight"
        if len(shape) != 2 and not stacked:
            return f"{len(shape)}-D"
        if last in _NEVER_MODULES:
            return f"{last} stays high precision"
        if _NORM.search(last):
            return "norm"
        if self.ignored(module):
            return "ignored_layers"
        if self.include and not any(_compile(p).match(name) for p in self.include):
            return "not included"
        if any(_compile(p).match(name) for p in self.exclude):
            return "excluded"
        return None

    def ignored(self, module: str) -> bool:
        """Whether ``ignored_layers`` covers ``module`` (a module path, no ``.weight``)."""
        if not self.ignored_layers:
            return False
        base = module.removeprefix("model.")
        candidates = {base, f"model.{base}"}
        head, _, last = module.rpartition(".")
        if last in _FUSED:
            fused = f"{head}.{_FUSED[last]}" if head else _FUSED[last]
            fused_base = fused.removeprefix("model.")
            candidates |= {fused_base, f"model.{fused_base}"}
        for entry in self.ignored_layers:
            if entry.startswith("re:"):
                if any(_compile(entry).match(c) for c in candidates):
                    return True
                continue
            entry_base = entry.removeprefix("model.")
            for ignored in (entry_base, f"model.{entry_base}"):
                if any(_path_match(ignored, c) for c in candidates):
                    return True
        return False

    def engine_ignored_layers(self, parameters: Iterable[tuple[str, Sequence[int]]]) -> list[str]:
        """The ``ignored_layers`` list SGLang needs to agree with this selection.

        Literal entries are kept; every module with a >= 2-D ``.weight`` this selection
        leaves unquantized is listed by name (so ``re:`` patterns and include/exclude,
        which SGLang's fp8 config does not understand, become plain module names).

        Raises:
            ValueError: some but not all shards of a fused SGLang layer (q/k/v,
                gate/up) would be quantized: SGLang refuses to load that.
        """
        out = [entry for entry in self.ignored_layers if not entry.startswith("re:")]
        decided: dict[str, dict[str, bool]] = {}
        for name, shape in parameters:
            if not name.endswith(".weight") or len(shape) < 2:
                continue
            module = _module_of(name)
            quantized = self(name, shape)
            head, _, last = module.rpartition(".")
            if last in _FUSED:
                decided.setdefault(f"{head}.{_FUSED[last]}", {})[last] = quantized
            if not quantized and not any(_path_match(e, module) for e in out):
                out.append(module)
        for fused, shards in decided.items():
            if len(set(shards.values())) > 1:
                which = ", ".join(
                    f"{k}={'fp8' if v else 'kept'}" for k, v in sorted(shards.items())
                )
                raise ValueError(
                    f"FP8 selection splits SGLang's fused layer {fused!r} ({which}); "
                    "quantize all of its shards or none"
                )
        return out


def select_for_fp8(
    name: str,
    shape: Sequence[int],
    *,
    ignored_layers: Sequence[str] = (),
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
) -> bool:
    """Whether parameter ``name`` of ``shape`` is quantized; the rules of ``Fp8Selection``.

    Raises:
        ValueError: a pattern is empty or an invalid ``re:`` regex.
    """
    return Fp8Selection(tuple(ignored_layers), tuple(include), tuple(exclude))(name, shape)
