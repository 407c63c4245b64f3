"""Which implementation quantizes a tensor: chosen by its device and the backend setting.

CPU tensors take the band path of ``weightpipe.stages.fp8.cpu``; CUDA tensors the Triton
kernel of ``weightpipe.stages.fp8._triton`` when Triton is installed and the block is a
pair of powers of two, else the reference torch ops, enqueued on the current stream. All
of them compute the one definition in ``weightpipe.stages.fp8.reference`` bit for bit, for
either ``arithmetic``, so the choice is about speed only. ``quantize_fp8_batch`` is the
device entry the ``Fp8Quantize`` stage uses: it never waits on the device and reports
NaN/Inf as flags.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from weightpipe.stages.fp8.cpu import quantize_fp8_many
from weightpipe.stages.fp8.reference import reference_with_amax
from weightpipe.stages.fp8.spec import (
    Fp8Arithmetic,
    Fp8Method,
    Fp8Tensor,
    NonFiniteWeightError,
    QuantizeBackend,
    ScaleFormat,
    as_block,
    check_arithmetic,
    check_quantizable,
)

__all__ = [
    "check_backend",
    "quantize_block_fp8",
    "quantize_channel_fp8",
    "quantize_fp8",
    "quantize_fp8_batch",
    "quantize_tensor_fp8",
    "triton_usable",
]


def triton_usable(method: Fp8Method, block: tuple[int, int]) -> bool:
    """Whether the Triton kernel is installed and can do ``method`` with ``block``."""
    from weightpipe.stages.fp8 import _triton

    return method == "block" and _triton.available() and _triton.supports_block(block)


def check_backend(
    backend: QuantizeBackend, method: Fp8Method, block: tuple[int, int], *, what: str = "FP8"
) -> None:
    """Refuse a ``backend`` that cannot run ``method`` with ``block`` here.

    ``what`` starts the message (the caller's name, e.g. ``Fp8Quantize``).

    Raises:
        RuntimeError: ``backend="triton"`` but Triton is not installed.
        ValueError: ``backend="triton"`` with a method or block the kernel does not do.
    """
    if backend != "triton":
        return
    from weightpipe.stages.fp8 import _triton

    if not _triton.available():
        raise RuntimeError(f"{what}: backend='triton' but Triton is not installed")
    if not triton_usable(method, block):
        raise ValueError(
            f"{what}: the Triton backend does block FP8 with power-of-two blocks only "
            f"(method={method!r}, block={list(block)})"
        )


def quantize_fp8_batch(
    weights: Sequence[torch.Tensor],
    *,
    method: Fp8Method = "block",
    block: tuple[int, int] = (128, 128),
    scale_fmt: ScaleFormat = "float32",
    backend: QuantizeBackend = "auto",
    arithmetic: Fp8Arithmetic = "sglang",
) -> tuple[list[Fp8Tensor], torch.Tensor]:
    """Quantize ``weights`` (bf16/fp16/fp32, ``[..., out, in]``) on the current stream.

    ``backend``: ``triton`` always uses the kernel (CUDA tensors, or CPU ones under
    ``TRITON_INTERPRET=1``); ``auto`` uses it for CUDA tensors where ``triton_usable``;
    otherwise the reference torch ops run. Returns the results in order and an int32 flag
    per weight, on the weights' device, set to 1 where the weight holds NaN/Inf (its result
    is then meaningless; with ``arithmetic="verl"`` also where a block is too small to
    scale). Nothing waits on the device.

    Raises:
        RuntimeError, ValueError: as ``check_backend``, for ``backend="triton"``; a
            ``block`` that is not two positive ints; as ``check_arithmetic``.
    """
    block = as_block(block)
    check_arithmetic(arithmetic, method, block, scale_fmt, what="quantize_fp8_batch")
    if not weights:
        return [], torch.zeros(0, dtype=torch.int32)
    check_backend(backend, method, block)
    on_cuda = weights[0].is_cuda
    if backend == "triton" or (backend == "auto" and on_cuda and triton_usable(method, block)):
        from weightpipe.stages.fp8 import _triton

        return _triton.quantize_block_batch(weights, block, scale_fmt, arithmetic)
    results: list[Fp8Tensor] = []
    bad: list[torch.Tensor] = []
    for weight in weights:
        # Finiteness stays a device flag: no host sync per tensor.
        result, amax = reference_with_amax(weight, method, block, scale_fmt, arithmetic)
        results.append(result)
        bad.append((~torch.isfinite(amax).all()).to(torch.int32))
    return results, torch.stack(bad)


def quantize_fp8(
    weight: torch.Tensor,
    *,
    method: Fp8Method = "block",
    block: tuple[int, int] = (128, 128),
    scale_fmt: ScaleFormat = "float32",
    name: str = "weight",
    threads: int = 1,
    arithmetic: Fp8Arithmetic = "sglang",
) -> Fp8Tensor:
    """Quantize one ``[..., out, in]`` weight (leading dims: a stack, e.g. MoE experts).

    CPU tensors take the band path (``threads`` workers); CUDA tensors use the Triton
    kernel when Triton is installed, else the reference ops, on the current stream (and
    wait for its NaN/Inf flag).

    ``arithmetic``: ``sglang`` or ``verl`` (see ``weightpipe.stages.fp8.reference``).

    Raises:
        NonFiniteWeightError: the weight holds NaN or Inf, or (``arithmetic="verl"``) a
            block too small to scale (named ``name``).
        ValueError, TypeError: bad method/block/scale_fmt/arithmetic, dtype or rank.
    """
    block = check_quantizable(weight, method, block, scale_fmt, name, arithmetic)
    if weight.device.type == "cpu":
        (result,) = quantize_fp8_many(
            [(name, weight)],
            method=method,
            block=block,
            scale_fmt=scale_fmt,
            threads=threads,
            arithmetic=arithmetic,
        )
        if result is None:
            raise NonFiniteWeightError(name)
        return result
    results, bad = quantize_fp8_batch(
        [weight], method=method, block=block, scale_fmt=scale_fmt, arithmetic=arithmetic
    )
    if bool(bad[0].item()):
        raise NonFiniteWeightError(name)
    return results[0]


def quantize_block_fp8(
    weight: torch.Tensor,
    block: tuple[int, int] = (128, 128),
    *,
    scale_fmt: ScaleFormat = "float32",
    name: str = "weight",
    threads: int = 1,
    arithmetic: Fp8Arithmetic = "sglang",
) -> Fp8Tensor:
    """Block-wise FP8: scale ``[..., ceil(out/bo), ceil(in/bi)]``; see ``quantize_fp8``."""
    return quantize_fp8(
        weight,
        method="block",
        block=block,
        scale_fmt=scale_fmt,
        name=name,
        threads=threads,
        arithmetic=arithmetic,
    )


def quantize_channel_fp8(
    weight: torch.Tensor,
    *,
    scale_fmt: ScaleFormat = "float32",
    name: str = "weight",
    threads: int = 1,
) -> Fp8Tensor:
    """Per-output-channel FP8: scale ``[..., out, 1]``; see ``quantize_fp8``."""
    return quantize_fp8(weight, method="channel", scale_fmt=scale_fmt, name=name, threads=threads)


def quantize_tensor_fp8(
    weight: torch.Tensor,
    *,
    scale_fmt: ScaleFormat = "float32",
    name: str = "weight",
    threads: int = 1,
) -> Fp8Tensor:
    """Per-tensor (per matrix of a stack) FP8: scale ``[...]``; see ``quantize_fp8``."""
    return quantize_fp8(weight, method="tensor", scale_fmt=scale_fmt, name=name, threads=threads)
