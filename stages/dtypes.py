"""The one table of weight dtypes: names on the wire, in safetensors headers and in config.

Sources read safetensors' dtype codes, the torch.distributed transport and the SGLang wire
format send dtypes by their torch name (``"bfloat16"``, which SGLang resolves with
``getattr(torch, name)``), and the config names the dtype of unquantized tensors. All of
them go through this module, so a dtype weightpipe can carry is listed exactly once.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch

from weightpipe.pipeline import WeightpipeError

__all__ = [
    "KEEP_DTYPES",
    "SAFETENSORS_DTYPES",
    "WIRE_DTYPES",
    "KeepDtype",
    "dtype_from_name",
    "dtype_name",
]

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "U16": torch.uint16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "I64": torch.int64,
    "U64": torch.uint64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
"""safetensors' header codes and the torch dtypes they stand for."""

WIRE_DTYPES: dict[str, torch.dtype] = {
    str(dtype).removeprefix("torch."): dtype for dtype in SAFETENSORS_DTYPES.values()
}
"""Every dtype a bucket may carry, by its torch name (what the wire formats send)."""

KeepDtype = Literal["bfloat16", "float16", "float32"]
"""The dtypes an unquantized weight may be sent in."""
KEEP_DTYPES: tuple[KeepDtype, ...] = get_args(KeepDtype)


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``: the name SGLang resolves with getattr(torch, .)."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    """The dtype called ``name`` (``"bfloat16"`` or ``"torch.bfloat16"``).

    Raises:
        WeightpipeError: a name outside ``WIRE_DTYPES`` (the message lists them).
    """
    dtype = WIRE_DTYPES.get(name.removeprefix("torch."))
    if dtype is None:
        raise WeightpipeError(f"unknown dtype {name!r}; known: {sorted(WIRE_DTYPES)}")
    return dtype
