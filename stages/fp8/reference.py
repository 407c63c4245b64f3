"""The FP8 definition in plain torch ops: the scale rules and the reference quantizer.

Every implementation in ``weightpipe.stages.fp8`` (the CPU band path, the numba kernel,
the Triton kernel, the CUDA torch ops) computes exactly this, bit for bit, for either
arithmetic (``Fp8Arithmetic``). ``amax`` is the largest ``|w|`` of the block (row,
tensor), in float32 (exact: the input is widened losslessly, and a maximum never rounds).

``arithmetic="sglang"`` (the default; SGLang's and DeepGEMM's ``per_block_cast_to_fp8``):

1. ``scale = max(amax, 1e-4) / 448`` as an IEEE float32 division (the epsilon gives an
   all-zero block a finite, non-zero scale, so it quantizes to zeros, never NaN);
2. with ``scale_fmt="ue8m0"`` the scale is rounded *up* to a power of two by its float32
   bits (exponent + 1 when the mantissa is non-zero), so it never under-scales;
3. ``q = float8_e4m3fn(clamp(w_fp32 / scale, -448, 448))``: an IEEE float32 division
   (never a multiplication by ``1 / scale``, which rounds differently) and a
   round-to-nearest-even cast.

``arithmetic="verl"`` (verl 0.9.1's PyTorch block quantizer, ``_scaled_fp8_blockwise_pytorch``
in ``verl/utils/kernel/fp8_kernel.py``, which verl's SGLang rollout runs where Triton is
absent or ``VERL_DISABLE_TRITON_FP8=1``; block method, square blocks, float32 scales):

1. the multiplier ``m = 448 / amax`` as an IEEE float32 division, with no epsilon;
   ``m = 1`` where ``amax`` is 0 (an all-zero block: codes 0, scale 1) or +Inf;
2. ``scale = 1 / m`` as an IEEE float32 division (so ``scale`` can differ from
   ``amax / 448`` by an ulp);
3. ``q = float8_e4m3fn(clamp(w_fp32 * m, -448, 448))``: an IEEE float32 multiplication
   and the same round-to-nearest-even cast.

A block with ``0 < amax < 448 / FLT_MAX`` (about 1.3e-36) has ``m = +Inf`` there: verl
sends scale 0 and NaN codes for its zeros; weightpipe reports it as non-finite (its amax
is returned as +Inf below), like a NaN/Inf weight. verl's Triton kernel (its CUDA path)
computes yet another rule (``max(amax, 1e-10) / 448`` with Triton's approximate division,
``q = w * (1 / scale)``) that no arithmetic here reproduces.

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
    Fp8Arithmetic,
    Fp8Method,
    Fp8Tensor,
    NonFiniteWeightError,
    ScaleFormat,
    check_quantizable,
)

__all__ = [
    "fp8_scale_from_amax",
    "quantize_fp8_reference",
    "reference_with_amax",
    "verl_multiplier_from_amax",
]


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


def verl_multiplier_from_amax(amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's ``(m, scale)``: ``m = 448 / amax`` (1 where amax is 0 or +Inf), ``scale = 1 / m``.

    ``amax`` is float32 (any shape, any device); both results are new float32 tensors of
    its shape. Both divisions are by tensors on ``amax``'s device (IEEE on CUDA too).
    ``m`` is +Inf where ``0 < amax < 448 / FLT_MAX`` (the caller flags those blocks).
    """
    a = amax.to(torch.float32)
    one = torch.ones((), dtype=torch.float32, device=a.device)
    m = torch.div(torch.full((), FP8_MAX, dtype=torch.float32, device=a.device), a)
    m = torch.where((a == 0) | (a == torch.inf), one, m)
    return m, torch.div(one, m)


def quantize_fp8_reference(
    weight: torch.Tensor,
    *,
    method: Fp8Method = "block",
    block: tuple[int, int] = (128, 128),
    scale_fmt: ScaleFormat = "float32",
    name: str = "weight",
    arithmetic: Fp8Arithmetic = "sglang",
) -> Fp8Tensor:
    """The definition in plain whole-tensor torch ops (slow, memory-hungry, obvious).

    Every fast path must match this bit for bit; tests hold them to it.

    Raises:
        NonFiniteWeightError: the weight holds NaN or Inf, or (``arithmetic="verl"``) a
            block too small to scale (named ``name``).
        ValueError, TypeError: bad arguments (``check_quantizable``).
    """
    block = check_quantizable(weight, method, block, scale_fmt, name, arithmetic)
    result, amax = reference_with_amax(weight, method, block, scale_fmt, arithmetic)
    if not bool(torch.isfinite(amax).all()):
        raise NonFiniteWeightError(name)
    return result


def reference_with_amax(
    weight: torch.Tensor,
    method: Fp8Method,
    block: tuple[int, int],
    scale_fmt: ScaleFormat,
    arithmetic: Fp8Arithmetic = "sglang",
) -> tuple[Fp8Tensor, torch.Tensor]:
    """The definition without validation or host syncs, plus the amax it scaled by.

    A NaN/Inf in the weight makes its amax non-finite (torch's max propagates NaN), so a
    device caller can flag it without synchronising; the result is then meaningless.
    With ``arithmetic="verl"`` the amax of a block whose multiplier overflows is returned
    as +Inf, flagging it the same way.
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
        if arithmetic == "verl":
            m, scale = verl_multiplier_from_amax(amax)
            amax = torch.where(torch.isfinite(m), amax, torch.inf)
            q = (tiles * m[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
        else:
            scale = fp8_scale_from_amax(amax, scale_fmt)
            q = (tiles / scale[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
        q = q.flatten(-2).flatten(-3, -2)[..., :out_dim, :in_dim].contiguous()
        return Fp8Tensor(q, scale), amax
    if arithmetic == "verl":
        raise ValueError(f"arithmetic='verl' quantizes in blocks only, not {method!r}")
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
