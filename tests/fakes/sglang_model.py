"""Test fakes of SGLang's model side of a weight update, shared by the HTTP double and the
fake in-process engine (not SGLang itself).

What a model does with the tensors an update decoded: refuse a name it has no parameter for,
or a shape or dtype other than the parameter's, with SGLang-like messages; rebuild a
``flattened_bucket`` payload with SGLang's own ``FlattenedTensorBucket``; and the exact
message SGLang 0.5.23 answers an update outside a weight-update session with.
"""

from __future__ import annotations

from typing import Any

import torch
from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket, FlattenedTensorMetadata

__all__ = ["SessionRefusal", "check_against_spec", "reconstruct_flattened"]

SessionRefusal = (
    "update_weights_from_tensor must run between begin_weight_update() and end_weight_update()"
)


def check_against_spec(
    spec: dict[str, tuple[tuple[int, ...], torch.dtype]],
    tensors: list[tuple[str, torch.Tensor]],
) -> str | None:
    """SGLang-like refusal message for the first tensor the model cannot take, or None."""
    for name, tensor in tensors:
        if name not in spec:
            return f"Failed to update parameter online: KeyError: {name!r} is not a parameter"
        shape, dtype = spec[name]
        if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
            return (
                f"Failed to update parameter online: {name} expects "
                f"{tuple(shape)} {dtype}, got {tuple(tensor.shape)} {tensor.dtype}"
            )
    return None


def reconstruct_flattened(data: Any) -> list[tuple[str, torch.Tensor]]:
    """What SGLang's weight updater does with a flattened_bucket payload, with its classes."""
    metadata = [
        FlattenedTensorMetadata(
            name=m.name,
            shape=m.shape,
            dtype=m.dtype,
            start_idx=m.start_idx,
            end_idx=m.end_idx,
            numel=m.numel,
        )
        for m in data["metadata"]
    ]
    bucket = FlattenedTensorBucket(flattened_tensor=data["flattened_tensor"], metadata=metadata)
    return [(str(n), t) for n, t in bucket.reconstruct_tensors()]
