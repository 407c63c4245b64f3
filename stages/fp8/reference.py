"""The FP8 definition in plain torch ops: the scale rule and the reference quantizer.

Every implementation in ``weightpipe.stages.fp8`` (the CPU band path, the numba kernel,
the Triton kernel, the CUDA torch ops) computes exactly this, bit for bit:

1. ``amax`` = the largest ``|w|`` of the block (row, tensor), in float32 (exact: the input
   is widened losslessly, and a maximum never rounds);
2. ``scale = max(amax, 1e-4) / 448`` as an IEEE float32 division (the epsilon is the
   DeepGEMM / SGLang ``per_block_cast_to_fp8`` one, so an all-zero block gets a finite,
   non-zero scale and quantizes to zeros, never NaN);
3. with ``scale_fmt="ue8m0"`` the scale is rounded *up* to a power of two by its float32
   bits (exponent + 1 when the mantissa is non-zero), so it never under-scales;
4. ``q = float8_e4m3fn(clamp(w_fp32 / scale, -448, 448))``: an IEEE float32 division
   (never a multiplication by ``1 / scale``, which rounds differently) and a
   round-to-nearest-even cast.

The float32 ``scale`` is what SGLang calls ``weight_scale_inv`` (the dequantization
multiplier: ``w ~= q * scale``). Inputs are never modified. This module is slow and
memory-hungry on purpose: it is the obvious reading the fast paths are tested against.
"""

from __future__ import annotations

import math

import torch

from weightpipe.stages.fp8.spec import (
    FP8_DTYPE,
    FP8_EPSILON,
    FP8_MAX,
    Fp8Method,
    Fp8Tensor,
    NonFiniteWeightError,
    ScaleFormat,
    check_quantizable,
)

__all__ = ["fp8_scale_from_amax", "quantize_fp8_reference", "reference_with_amax"]


def fp8_scale_from_amax(amax: torch.Tensor, scale_fmt: ScaleFormat = "float32") -> torch.Tensor:
    """``max(amax, eps) / 448`` in float32, rounded up to a power of two for ``ue8m0``.

    ``amax`` is float32 (any shape, any device); returns a new float32 tensor of its shape.
    The division is by a tensor on ``amax``'s device because CUDA torch turns a division
    by a host scalar into a multiplication by its reciprocal, which rounds differently.
    """
    guarded = amax.to(torch.float32).clamp(min=FP8_EPSILON)
    scale = torch.div(guarded, torch.full((), FP8_MAX, dtype=torch.float32, device=amax.device))
    if scale_fmt == "ue8m0":
        bits = scale.view(torch.int32)
        exponent = (bits >> 23) & 0xFF
        exponent = exponent + ((bits & 0x7FFFFF) != 0).to(torch.int32)
        scale = (exponent.clamp(1, 254) << 23).view(torch.float32)
    return scale


def quantize_fp8_reference(
    weight: torch.Tensor,
    *,
    method: Fp8Method = "block",
    block: tuple[int, int] = (128, 128),
    scale_fmt: ScaleFormat = "float32",
    name: str = "weight",
) -> Fp8Tensor:
    """The definition in plain whole-tensor torch ops (slow, memory-hungry, obvious).

    Every fast path must match this bit for bit; tests hold them to it.

    Raises:
        NonFiniteWeightError: the weight holds NaN or Inf (named ``name``).
        ValueError, TypeError: bad arguments (``check_quantizable``).
    """
    block = check_quantizable(weight, method, block, scale_fmt, name)
    result, amax = reference_with_amax(weight, method, block, scale_fmt)
    if not bool(torch.isfinite(amax).all()):
        raise NonFiniteWeightError(name)
    return result


def reference_with_amax(
    weight: torch.Tensor, method: Fp8Method, block: tuple[int, int], scale_fmt: ScaleFormat
) -> tuple[Fp8Tensor, torch.Tensor]:
    """The definition without validation or host syncs, plus the amax it scaled by.

    A NaN/Inf in the weight makes its amax non-finite (torch's max propagates NaN), so a
    device caller can flag it without synchronising; the result is then meaningless.
    """
    w = weight.to(torch.float32)
    *lead, out_dim, in_dim = w.shape
    if method == "block":
        bo, bi = block
        n_out, n_in = math.ceil(out_dim / bo), math.ceil(in_dim / bi)
        padded = w.new_zeros((*lead, n_out * bo, n_in * bi))
        padded[..., :out_dim, :in_dim] = w
        tiles = padded.view(*lead, n_out, bo, n_in, bi)
        amax = tiles.abs().amax(dim=(-3, -1))
        scale = fp8_scale_from_amax(amax, scale_fmt)
        q = (tiles / scale[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
        q = q.flatten(-2).flatten(-3, -2)[..., :out_dim, :in_dim].contiguous()
        return Fp8Tensor(q, scale), amax
    if method == "channel":
        amax = w.abs().amax(dim=-1, keepdim=True)
        scale = fp8_scale_from_amax(amax, scale_fmt)
        expanded = scale
    else:
        amax = w.abs().amax(dim=(-2, -1)) if w.numel() else w.new_zeros(lead)
        scale = fp8_scale_from_amax(amax, scale_fmt)
        expanded = scale[..., None, None]
    q = (w / expanded).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return Fp8Tensor(q, scale), amax
