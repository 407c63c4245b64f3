"""FP8 (float8_e4m3fn) weight quantization as an SGLang FP8 checkpoint stores it.

The numerical core of the ``Fp8Quantize`` stage, public on its own: block-wise (default
``[128, 128]`` over ``[out, in]``), per-channel and per-tensor quantization, optional
power-of-two (UE8M0) scales, dequantization, an error-bound check, the selection rules
and the SGLang ``quantization_config``. This module is the public face only; each part
lives in one module a person can own:

- ``spec``: the format, the choices (``Literal`` types and their tuples), scale names and
  shapes, block coercion, the result type and the argument rules;
- ``reference``: the definition in plain torch ops, which every path equals bit for bit,
  in SGLang's arithmetic or verl's (``Fp8Arithmetic``);
- ``cpu``: row bands on a thread pool, torch band kernels, output arenas;
  ``_numba``: the fused numba CPU kernel; ``_triton``: the batched CUDA kernel;
- ``dispatch``: which of them runs, by device and backend;
- ``checks``: dequantization, the FP8 error bound, ``check_fp8``;
- ``selection``: which parameters are quantized (``Fp8Selection``);
- ``sglang``: the ``quantization_config`` SGLang is launched with.
"""

from weightpipe.stages.fp8.checks import Fp8CheckError, check_fp8, dequantize_fp8, fp8_error_bound
from weightpipe.stages.fp8.cpu import (
    default_cpu_threads,
    fp8_output_bytes,
    quantize_fp8_many,
    warm_up_cpu_kernel,
)
from weightpipe.stages.fp8.dispatch import (
    check_backend,
    quantize_block_fp8,
    quantize_channel_fp8,
    quantize_fp8,
    quantize_fp8_batch,
    quantize_tensor_fp8,
    triton_usable,
)
from weightpipe.stages.fp8.reference import (
    fp8_scale_from_amax,
    quantize_fp8_reference,
    reference_with_amax,
    verl_multiplier_from_amax,
)
from weightpipe.stages.fp8.selection import Fp8Selection, select_for_fp8
from weightpipe.stages.fp8.sglang import sglang_quantization_config
from weightpipe.stages.fp8.spec import (
    FP8_ARITHMETICS,
    FP8_DTYPE,
    FP8_EPSILON,
    FP8_MAX,
    FP8_METHODS,
    HIGH_PRECISION_DTYPES,
    NONFINITE_POLICIES,
    QUANTIZE_BACKENDS,
    SCALE_FORMATS,
    SCALE_SUFFIXES,
    Fp8Arithmetic,
    Fp8Method,
    Fp8Tensor,
    NonFinitePolicy,
    NonFiniteWeightError,
    QuantizeBackend,
    ScaleFormat,
    as_block,
    check_arithmetic,
    check_quantizable,
    scale_name,
    scale_owner,
    scale_shape,
)

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
    "Fp8CheckError",
    "Fp8Method",
    "Fp8Selection",
    "Fp8Tensor",
    "NonFinitePolicy",
    "NonFiniteWeightError",
    "QuantizeBackend",
    "ScaleFormat",
    "as_block",
    "check_arithmetic",
    "check_backend",
    "check_fp8",
    "check_quantizable",
    "default_cpu_threads",
    "dequantize_fp8",
    "fp8_error_bound",
    "fp8_output_bytes",
    "fp8_scale_from_amax",
    "quantize_block_fp8",
    "quantize_channel_fp8",
    "quantize_fp8",
    "quantize_fp8_batch",
    "quantize_fp8_many",
    "quantize_fp8_reference",
    "quantize_tensor_fp8",
    "reference_with_amax",
    "scale_name",
    "scale_owner",
    "scale_shape",
    "select_for_fp8",
    "sglang_quantization_config",
    "triton_usable",
    "verl_multiplier_from_amax",
    "warm_up_cpu_kernel",
]
