"""The ``quantization_config`` SGLang must be launched with to load what the quantizer emits.

One function, ``sglang_quantization_config``, builds it from the same settings the
quantizer runs with (method, block, scale format, selection), so the trainer and the
engine can never disagree: block FP8 is SGLang's ``fp8`` config with
``weight_block_size``; tensor FP8 the same without it; channel FP8 a compressed-tensors
``float-quantized`` config. ``Fp8Quantize.quantization_config`` calls it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from weightpipe.stages.fp8.selection import Fp8Selection
from weightpipe.stages.fp8.spec import Fp8Method, ScaleFormat, as_block

__all__ = ["sglang_quantization_config"]


def sglang_quantization_config(
    selection: Fp8Selection,
    *,
    method: Fp8Method = "block",
    block: tuple[int, int] = (128, 128),
    scale_fmt: ScaleFormat = "float32",
    parameters: Iterable[tuple[str, Sequence[int]]] | None = None,
) -> dict[str, Any]:
    """The ``quantization_config`` to launch SGLang with (``quantization="fp8"``).

    ``parameters`` (``(name, shape)`` of the model, e.g. from ``named_parameters``) lets
    the unquantized linear modules and any ``re:`` / include / exclude rules be spelled out
    as plain ``ignored_layers`` names, which is all SGLang's fp8 config matches. Block:
    ``{"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
    "weight_block_size": [bo, bi], "ignored_layers": [...]}`` (plus ``"scale_fmt":
    "ue8m0"`` when set); tensor: the same without ``weight_block_size``; channel: a
    compressed-tensors ``float-quantized`` config with channel-wise weights and dynamic
    per-token activations.

    Raises:
        ValueError: the rules use ``re:`` patterns or include/exclude but ``parameters``
            was not given (SGLang could not apply them), or they would split a fused
            layer's shards; ``block`` is not two positive ints.
    """
    block = as_block(block)
    if parameters is None:
        if (
            selection.include
            or selection.exclude
            or any(e.startswith("re:") for e in selection.ignored_layers)
        ):
            raise ValueError(
                "quantization_config: re: patterns and include/exclude must be expanded "
                "against the model; pass parameters=(name, shape) pairs"
            )
        ignored = list(selection.ignored_layers)
    else:
        ignored = selection.engine_ignored_layers(parameters)
    if method == "channel":
        return {
            "quant_method": "compressed-tensors",
            "format": "float-quantized",
            "quantization_status": "compressed",
            "config_groups": {
                "group_0": {
                    "targets": ["Linear"],
                    "weights": {
                        "num_bits": 8,
                        "type": "float",
                        "strategy": "channel",
                        "symmetric": True,
                        "dynamic": False,
                    },
                    "input_activations": {
                        "num_bits": 8,
                        "type": "float",
                        "strategy": "token",
                        "symmetric": True,
                        "dynamic": True,
                    },
                }
            },
            "ignore": ignored,
        }
    config: dict[str, Any] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
    }
    if method == "block":
        config["weight_block_size"] = list(block)
    config["ignored_layers"] = ignored
    if scale_fmt == "ue8m0":
        config["scale_fmt"] = "ue8m0"
    return config
