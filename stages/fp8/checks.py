"""Checking FP8 results: dequantization, the error bound FP8 allows, and a full check.

``dequantize_fp8`` reads the method off the scale's shape (``spec.scale_shape``), so one
function serves block, channel and tensor scales; the local engine uses it to apply FP8
buckets. ``check_fp8`` holds a quantized tensor to its source within ``fp8_error_bound``
and raises ``Fp8CheckError`` naming the tensor and the worst element.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from weightpipe.pipeline import WeightpipeError
from weightpipe.stages.fp8.spec import FP8_DTYPE, FP8_METHODS, Fp8Tensor, as_block, scale_shape

__all__ = ["Fp8CheckError", "check_fp8", "dequantize_fp8", "fp8_error_bound"]


class Fp8CheckError(WeightpipeError):
    """A quantized tensor does not reproduce its source within FP8's error bound.

    Attributes:
        tensor: the tensor's name.
    """

    def __init__(self, tensor: str, message: str) -> None:
        self.tensor = tensor
        super().__init__(f"tensor {tensor!r}: {message}")


def _expand_scale(
    scale: torch.Tensor, shape: Sequence[int], block: tuple[int, int], name: str
) -> torch.Tensor:
    """The per-element scale for a weight of ``shape``, whatever the method."""
    *lead, out_dim, in_dim = shape
    for method in FP8_METHODS:
        if tuple(scale.shape) == scale_shape(shape, method, block):
            break
    else:
        raise ValueError(
            f"tensor {name!r}: scale shape {tuple(scale.shape)} fits no FP8 method for a "
            f"weight of shape {tuple(shape)} with block {list(block)}"
        )
    s = scale.to(torch.float32)
    if method == "block":
        s = s.repeat_interleave(block[0], dim=-2)[..., :out_dim, :]
        return s.repeat_interleave(block[1], dim=-1)[..., :in_dim]
    if method == "channel":
        return s.expand(*lead, out_dim, in_dim)
    return s[..., None, None].expand(*lead, out_dim, in_dim)


def dequantize_fp8(
    qweight: torch.Tensor,
    scale: torch.Tensor,
    *,
    block: tuple[int, int] = (128, 128),
    dtype: torch.dtype = torch.float32,
    name: str = "weight",
) -> torch.Tensor:
    """``qweight * scale`` (float32 maths) as ``dtype``; the method is read off the shapes.

    Raises:
        ValueError: the scale's shape fits neither block, channel nor tensor scaling, or
            ``block`` is not two positive ints.
        TypeError: ``qweight`` is not float8_e4m3fn.
    """
    if qweight.dtype != FP8_DTYPE:
        raise TypeError(f"tensor {name!r}: expected float8_e4m3fn, got {qweight.dtype}")
    block = as_block(block, what=f"tensor {name!r}: block")
    full = _expand_scale(scale, qweight.shape, block, name)
    return (qweight.to(torch.float32) * full).to(dtype)


def fp8_error_bound(weight: torch.Tensor, full_scale: torch.Tensor) -> torch.Tensor:
    """Largest ``|dequant - w|`` FP8 allows per element, in float64.

    Round-to-nearest e4m3 loses at most half a unit in the last place: ``|y| * 2**-4`` for
    normal values (3 mantissa bits) and ``2**-10`` below 2**-6 (subnormal spacing 2**-9),
    in units of the scale; the float32 division and the dequantizing product add relative
    ``2**-24`` each, covered by the ``2**-20`` slack.
    """
    w = weight.to(torch.float64).abs()
    s = full_scale.to(torch.float64)
    return w * (2.0**-4 + 2.0**-20) + s * (2.0**-10) * (1 + 2.0**-20)


def check_fp8(
    weight: torch.Tensor,
    quantized: Fp8Tensor,
    *,
    block: tuple[int, int] = (128, 128),
    name: str = "weight",
) -> float:
    """Check ``quantized`` against its source ``weight``; returns the worst error/bound.

    Also checks dtypes, shapes and that every scale is finite and positive. Runs in
    row chunks so a large matrix never needs float64 copies of the whole of it.

    Raises:
        Fp8CheckError: naming the tensor and the worst element, when any check fails.
        ValueError: ``block`` is not two positive ints.
    """
    block = as_block(block, what=f"tensor {name!r}: block")
    q, scale = quantized
    if q.dtype != FP8_DTYPE or scale.dtype != torch.float32:
        raise Fp8CheckError(name, f"dtypes {q.dtype}/{scale.dtype}, want e4m3fn/float32")
    if tuple(q.shape) != tuple(weight.shape):
        raise Fp8CheckError(name, f"shape {tuple(q.shape)} != source {tuple(weight.shape)}")
    if not bool((torch.isfinite(scale) & (scale > 0)).all()):
        raise Fp8CheckError(name, "a scale is zero, negative, NaN or Inf")
    try:
        full = _expand_scale(scale.cpu(), q.shape, block, name)
    except ValueError as exc:
        raise Fp8CheckError(name, str(exc)) from exc
    *_, out_dim, in_dim = q.shape
    w3 = weight.cpu().reshape(-1, out_dim, in_dim)
    q3 = q.cpu().reshape(-1, out_dim, in_dim)
    s3 = full.reshape(-1, out_dim, in_dim)
    worst = 0.0
    step = max(1, (1 << 22) // max(in_dim, 1))
    for e in range(w3.shape[0]):
        for r0 in range(0, out_dim, step):
            w = w3[e, r0 : r0 + step]
            s = s3[e, r0 : r0 + step]
            deq = q3[e, r0 : r0 + step].to(torch.float64) * s.to(torch.float64)
            err = (deq - w.to(torch.float64)).abs()
            ratio = err / fp8_error_bound(w, s)
            if ratio.numel() == 0:
                continue
            top = float(ratio.max())
            if not math.isfinite(top) or top > 1.0:
                flat = int(ratio.nan_to_num(math.inf).argmax())
                row, col = divmod(flat, in_dim)
                raise Fp8CheckError(
                    name,
                    f"element [{e}, {r0 + row}, {col}] = {float(w[row, col])} dequantizes to "
                    f"{float(deq[row, col])}, {top:.3g}x the FP8 error bound",
                )
            worst = max(worst, top)
    return worst
