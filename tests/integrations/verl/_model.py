"""A small Llama-shaped set of bf16 weights and the SGLang spec an FP8 server of it has.

Shared by the verl integration tests (in-process and two-process). Shapes are chosen so
that some matrices are not multiples of the 128 x 128 FP8 block.
"""

from __future__ import annotations

import torch

from weightpipe.stages.fp8 import FP8_DTYPE

__all__ = ["QUANTIZED_SUFFIXES", "fp8_spec", "llama_weights"]

HIDDEN, INTER, VOCAB, LAYERS = 256, 320, 384, 2

QUANTIZED_SUFFIXES = (
    "q_proj.weight",
    "k_proj.weight",
    "v_proj.weight",
    "o_proj.weight",
    "gate_proj.weight",
    "up_proj.weight",
    "down_proj.weight",
)


def llama_weights(seed: int = 0) -> list[tuple[str, torch.Tensor]]:
    """Deterministic bf16 weights of a 2-layer Llama (embedding, norms and head included)."""
    generator = torch.Generator().manual_seed(seed)
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for layer in range(LAYERS):
        prefix = f"model.layers.{layer}"
        shapes += [
            (f"{prefix}.input_layernorm.weight", (HIDDEN,)),
            (f"{prefix}.self_attn.q_proj.weight", (HIDDEN, HIDDEN)),
            (f"{prefix}.self_attn.k_proj.weight", (HIDDEN // 2, HIDDEN)),
            (f"{prefix}.self_attn.v_proj.weight", (HIDDEN // 2, HIDDEN)),
            (f"{prefix}.self_attn.o_proj.weight", (HIDDEN, HIDDEN)),
            (f"{prefix}.post_attention_layernorm.weight", (HIDDEN,)),
            (f"{prefix}.mlp.gate_proj.weight", (INTER, HIDDEN)),
            (f"{prefix}.mlp.up_proj.weight", (INTER, HIDDEN)),
            (f"{prefix}.mlp.down_proj.weight", (HIDDEN, INTER)),
        ]
    shapes += [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]
    return [
        (name, (torch.randn(shape, generator=generator) * 0.05).to(torch.bfloat16))
        for name, shape in shapes
    ]


def fp8_spec(
    weights: list[tuple[str, torch.Tensor]], block: int = 128
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """name -> (shape, dtype) of an SGLang block-FP8 model with these weights."""
    spec: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for name, tensor in weights:
        shape = tuple(tensor.shape)
        if name.endswith(QUANTIZED_SUFFIXES):
            spec[name] = (shape, FP8_DTYPE)
            rows, cols = -(-shape[0] // block), -(-shape[1] // block)
            spec[name + "_scale_inv"] = ((rows, cols), torch.float32)
        else:
            spec[name] = (shape, tensor.dtype)
    return spec
