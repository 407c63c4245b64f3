"""The local engine's model: a small Llama-architecture network built from a config.

Everything here is built, never downloaded: ``default_config`` is a ``transformers.
LlamaConfig`` of about 4M parameters, ``build_model`` initialises it from a seed in
inference mode, ``random_weights`` makes a seeded set of new weights of the same shapes
(what a trainer would send), and ``named_parameters`` gives every parameter under each
of its checkpoint names (tied weights answer to both). The scheduler
runs the model, the update transaction writes into its parameters; neither builds one.
Where the model lives is decided here too: ``resolve_device`` turns an unindexed
``"cuda"`` into the constructing thread's current device once, and ``device_guard`` makes
that device current for a section run on another thread (the current CUDA device is per
thread, and every thread other than the one that chose it starts on cuda:0).
"""

from __future__ import annotations

import contextlib
import inspect
from contextlib import AbstractContextManager
from typing import Any

import torch

__all__ = [
    "build_model",
    "build_prompts",
    "cache_argument",
    "default_config",
    "device_guard",
    "named_parameters",
    "random_weights",
    "resolve_device",
]


def default_config(**overrides: Any) -> Any:
    """The local engine's default ``LlamaConfig`` (about 4M parameters, bf16).

    Small on purpose: one decode step of a batch of 8 takes a few to a few tens of ms on
    two CPU cores. Keyword arguments override any field (``hidden_size=512``, ...).
    """
    from transformers import LlamaConfig

    fields: dict[str, Any] = {
        "hidden_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "intermediate_size": 688,
        "vocab_size": 2048,
        "max_position_embeddings": 512,
        "tie_word_embeddings": False,
    }
    fields.update(overrides)
    return LlamaConfig(**fields)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """An explicit device: CUDA when available unless ``device`` says otherwise, and a CUDA
    device always with its index (an unindexed one is the calling thread's current
    device, read now, so every later thread uses that device and not its own cuda:0)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    resolved = torch.device(device)
    if resolved.type == "cuda" and resolved.index is None:
        resolved = torch.device("cuda", torch.cuda.current_device())
    return resolved


def device_guard(device: torch.device) -> AbstractContextManager[Any]:
    """``torch.cuda.device(device)`` for an indexed CUDA device, else nothing to do."""
    if device.type == "cuda" and device.index is not None:
        return torch.cuda.device(device.index)
    return contextlib.nullcontext()


def _seeded_model(config: Any, seed: int) -> Any:
    """A ``LlamaForCausalLM`` initialised from ``seed`` without touching the global RNG."""
    from transformers import LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def build_model(config: Any, *, seed: int, device: torch.device, dtype: torch.dtype) -> Any:
    """The seeded model on ``device`` in ``dtype``, in eval mode, gradients off."""
    model: Any = _seeded_model(config, seed).to(device=device, dtype=dtype).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def build_prompts(config: Any, *, batch_size: int, prompt_len: int, seed: int) -> torch.Tensor:
    """``[batch_size, prompt_len]`` random token ids from their own generator (on CPU)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, int(config.vocab_size), (batch_size, prompt_len), generator=generator)


def cache_argument(model: Any) -> str:
    """The keyword the model's ``forward`` takes its KV cache under (transformers renamed it)."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def named_parameters(model: Any) -> dict[str, torch.Tensor]:
    """Every parameter under each of its checkpoint names (a tied weight appears twice)."""
    return dict(model.named_parameters(remove_duplicate=False))


def random_weights(config: Any, *, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """New weights of ``config``'s shapes in ``dtype``, as a trainer would produce them.

    Seeded and independent of any engine's own weights; on CPU, one name per tensor (a
    tied weight under its first name only, as ``state_dict`` sources send it).
    """
    model = _seeded_model(config, seed).to(dtype)
    return {name: p.detach() for name, p in model.named_parameters()}
