"""The FP8 format weightpipe emits, and every rule about it that more than one module needs.

One owner per contract: the element format and its limits, the methods, scale formats and
arithmetics (as ``Literal`` types with their tuples of choices, and ``check_arithmetic``,
the combinations an arithmetic allows), the names SGLang loads a weight's scale
under (and the inverse), the shape of a scale, the coercion of a block shape, the result
type ``Fp8Tensor``, the arguments a quantizer accepts (``check_quantizable``) and the error
a NaN/Inf weight raises. The quantizer, the engines, the config schema and the demo import
these; none restates them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, NamedTuple, get_args

import torch

from weightpipe.pipeline import WeightpipeError

__all__ = [
    "FP8_ARITHMETICS",
    "FP8_DTYPE",
    "FP8_EPSILON",
    "FP8_MAX",
    "FP8_METHODS",
    "HIGH_PRECISION_DTYPES",
    "NONFINITE_POLICIES",
    "QUANTIZE_BACKENDS",
    "SCALE_FORMATS",
    "SCALE_SUFFIXES",
    "Fp8Arithmetic",
    "Fp8Method",
    "Fp8Tensor",
    "NonFinitePolicy",
    "NonFiniteWeightError",
    "QuantizeBackend",
    "ScaleFormat",
    "as_block",
    "check_arithmetic",
    "check_quantizable",
    "scale_name",
    "scale_owner",
    "scale_shape",
]

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
"""The largest finite float8_e4m3fn value."""
FP8_EPSILON = 1e-4
"""amax is clamped to at least this before dividing (SGLang's and DeepGEMM's references)."""

Fp8Method = Literal["block", "channel", "tensor"]
"""``block``: one scale per [128, 128] tile over [out, in] (DeepSeek-style, SGLang's
``weight_block_size``); ``channel``: one per output row; ``tensor``: one per matrix."""
FP8_METHODS: tuple[Fp8Method, ...] = get_args(Fp8Method)

ScaleFormat = Literal["float32", "ue8m0"]
"""``float32`` scales, or ``ue8m0``: rounded up to a power of two (DeepGEMM runners)."""
SCALE_FORMATS: tuple[ScaleFormat, ...] = get_args(ScaleFormat)

Fp8Arithmetic = Literal["sglang", "verl"]
"""How a block's scale and codes follow from its amax (``weightpipe.stages.fp8.reference``
defines both exactly). ``sglang``: ``scale = max(amax, 1e-4) / 448``, ``q = w / scale``
(SGLang's and DeepGEMM's references; every method and scale format). ``verl``: verl
0.9.1's PyTorch block quantizer, ``m = 448 / amax`` (1 for an all-zero block),
``q = w * m``, ``scale = 1 / m``: block method, square blocks and float32 scales only
(``check_arithmetic``). On real weights they differ by one ulp in about 40% of the scales
and in under 0.01% of the codes (``benchmarks/verl_compare.py``)."""
FP8_ARITHMETICS: tuple[Fp8Arithmetic, ...] = get_args(Fp8Arithmetic)

NonFinitePolicy = Literal["error", "keep"]
"""A NaN/Inf weight: ``error`` fails the sync; ``keep`` sends it unquantized."""
NONFINITE_POLICIES: tuple[NonFinitePolicy, ...] = get_args(NonFinitePolicy)

QuantizeBackend = Literal["auto", "torch", "triton"]
"""``auto``: Triton on CUDA when installed, else torch ops (or the numba CPU kernel)."""
QUANTIZE_BACKENDS: tuple[QuantizeBackend, ...] = get_args(QuantizeBackend)

HIGH_PRECISION_DTYPES: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16, torch.float32)
"""The dtypes a weight may have to be quantized."""

SCALE_SUFFIXES: dict[str, tuple[Fp8Method, ...]] = {
    "_scale_inv": ("block",),
    "_scale": ("channel", "tensor"),
}
"""SGLang's parameter-name suffix of a weight's scale, and the methods that use it."""


def scale_name(name: str, method: Fp8Method = "block") -> str:
    """The name SGLang loads the scale of weight ``name`` under.

    ``X.weight`` -> ``X.weight_scale_inv`` for block scales and ``X.weight_scale`` for
    channel/tensor scales (SGLang's parameter names); a stacked-expert name without the
    ``.weight`` suffix gets ``_scale_inv`` / ``_scale`` appended the same way.
    """
    return name + ("_scale_inv" if method == "block" else "_scale")


def scale_owner(name: str) -> str | None:
    """``X.weight`` for a scale name ``X.weight_scale_inv`` / ``X.weight_scale``, else None."""
    for suffix in SCALE_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


def as_block(value: object, *, what: str = "block") -> tuple[int, int]:
    """A block shape as two positive ints, or a ``ValueError`` naming ``what``.

    Accepts any two-element sequence of integers (a list from a config file, a tuple);
    refuses floats (``128.9`` is never silently truncated), bools, other lengths and
    values below 1.
    """
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"{what} must be two positive ints [out, in], got {value!r}")
    items = list(value)
    if len(items) != 2 or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in items
    ):
        raise ValueError(f"{what} must be two positive ints [out, in], got {value!r}")
    return int(items[0]), int(items[1])


def scale_shape(
    shape: Sequence[int], method: Fp8Method = "block", block: tuple[int, int] = (128, 128)
) -> tuple[int, ...]:
    """The shape of the float32 scale for a weight of ``shape`` ``[..., out, in]``."""
    *lead, out_dim, in_dim = shape
    if method == "block":
        return (*lead, math.ceil(out_dim / block[0]), math.ceil(in_dim / block[1]))
    if method == "channel":
        return (*lead, out_dim, 1)
    return tuple(lead)


class Fp8Tensor(NamedTuple):
    """A quantized weight: ``qweight`` (float8_e4m3fn, the input's shape) and ``scale``.

    ``scale`` is float32, the dequantization multiplier SGLang loads as
    ``weight_scale_inv`` (block) or ``weight_scale`` (channel, tensor). Shapes for an input
    ``[..., out, in]``: block ``[..., ceil(out/bo), ceil(in/bi)]``; channel ``[..., out, 1]``;
    tensor ``[...]`` (a 0-dim tensor for a 2-D input); see ``scale_shape``.
    """

    qweight: torch.Tensor
    scale: torch.Tensor


class NonFiniteWeightError(WeightpipeError, ValueError):
    """A weight holds NaN or Inf, so it has no FP8 representation.

    Under ``arithmetic="verl"`` a block whose ``448 / amax`` overflows float32 (amax
    above 0 and below about 1.3e-36, where verl itself sends an infinite multiplier, a
    zero scale and NaN codes) has none either, and is reported the same way.
    A ``ValueError`` too, as it was before ``WeightpipeError`` existed.

    Attributes:
        tensor: the offending tensor's name.
    """

    def __init__(self, tensor: str, detail: str = "") -> None:
        self.tensor = tensor
        more = f" ({detail})" if detail else ""
        super().__init__(f"tensor {tensor!r} contains NaN or Inf and cannot be quantized{more}")


def check_arithmetic(
    arithmetic: object,
    method: object,
    block: tuple[int, int],
    scale_fmt: object,
    *,
    what: str = "FP8",
) -> None:
    """Refuse an unknown arithmetic, or a combination that verl's quantizer does not do.

    ``arithmetic="verl"`` reproduces verl 0.9.1's block quantizer, which quantizes in
    square blocks with float32 scales only; ``what`` starts the message.

    Raises:
        ValueError: an unknown ``arithmetic``; ``verl`` with a method other than
            ``block``, a non-square ``block`` or ``scale_fmt="ue8m0"``.
    """
    if arithmetic not in FP8_ARITHMETICS:
        raise ValueError(
            f"{what}: unknown FP8 arithmetic {arithmetic!r}, not one of {FP8_ARITHMETICS}"
        )
    if arithmetic != "verl":
        return
    if method != "block":
        raise ValueError(
            f"{what}: arithmetic='verl' quantizes in blocks only (verl has no "
            f"{method!r} FP8), use arithmetic='sglang'"
        )
    if block[0] != block[1]:
        raise ValueError(
            f"{what}: arithmetic='verl' needs a square block (verl's quantizer refuses "
            f"{list(block)}), use arithmetic='sglang'"
        )
    if scale_fmt != "float32":
        raise ValueError(
            f"{what}: arithmetic='verl' has float32 scales only (verl's quantizer has no "
            f"{scale_fmt!r} rounding), use arithmetic='sglang'"
        )


def check_quantizable(
    weight: torch.Tensor,
    method: object,
    block: object,
    scale_fmt: object,
    name: str,
    arithmetic: object = "sglang",
) -> tuple[int, int]:
    """Refuse what no quantizer accepts; returns ``block`` as two ints (``as_block``).

    Raises:
        ValueError: an unknown method, scale format or arithmetic, a combination the
            arithmetic refuses (``check_arithmetic``), a bad block, or fewer than 2 dims,
            naming the tensor.
        TypeError: the weight is not one of ``HIGH_PRECISION_DTYPES``.
    """
    if method not in FP8_METHODS:
        raise ValueError(
            f"tensor {name!r}: unknown FP8 method {method!r}, not one of {FP8_METHODS}"
        )
    if scale_fmt not in SCALE_FORMATS:
        raise ValueError(
            f"tensor {name!r}: unknown scale_fmt {scale_fmt!r}, not one of {SCALE_FORMATS}"
        )
    pair = as_block(block, what=f"tensor {name!r}: block")
    check_arithmetic(arithmetic, method, pair, scale_fmt, what=f"tensor {name!r}")
    if weight.dtype not in HIGH_PRECISION_DTYPES:
        raise TypeError(
            f"tensor {name!r}: dtype {weight.dtype} is not bfloat16, float16 or float32"
        )
    if weight.dim() < 2:
        raise ValueError(
            f"tensor {name!r}: FP8 quantization needs [..., out, in], got shape "
            f"{tuple(weight.shape)}"
        )
    return pair
