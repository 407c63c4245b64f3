"""KeepFused: the members of a fused destination parameter travel in one bucket.

SGLang's loader for some fused parameters (DeepSeek-V4's ``wqkv_a`` and ``wkv_gate``: verl
names their checkpoint members in ``DEEPSEEK_V4_FUSION_GROUPS``) concatenates all of a
group's members inside one ``load_weights`` call and asserts its cache is empty when the
call returns, so a bucket boundary between two members makes it fail. Fetch places tensors
one at a time and cannot see groups; this stage, placed right after it, holds a group's
members back until the group is whole and emits them with the bucket in which its last
member arrived. A bucket may so exceed ``bucket_bytes`` by the bytes of the members it
carries over (a group is two weights here). Buckets are renumbered, since one whose
tensors were all held back is not emitted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from weightpipe.pipeline import Stage
from weightpipe.stages.bucket import WeightBucket

__all__ = ["KeepFused", "fusion_key"]

FusionKey = tuple[str, int, int]  # (name prefix, group index, members in the group)


def fusion_key(name: str, groups: Sequence[Sequence[str]]) -> FusionKey | None:
    """Which group ``name`` belongs to: ``(prefix, group index, group size)``, or None.

    A group is a tuple of name suffixes (``".self_attn.wq_a.weight"``); members of one
    instance of a group share the prefix before their suffix.

    Raises:
        ValueError: ``name`` ends with suffixes of two groups (names the tensor).
    """
    matches = [
        (index, suffix, len(group))
        for index, group in enumerate(groups)
        for suffix in group
        if name.endswith(suffix)
    ]
    if len(matches) > 1:
        raise ValueError(f"tensor {name!r}: matches more than one fusion group: {matches}")
    if not matches:
        return None
    index, suffix, size = matches[0]
    return name[: -len(suffix)], index, size


class KeepFused(Stage[WeightBucket, WeightBucket]):
    """Hold fused-group members back until their group is whole, then emit them together.

    Args:
        groups: the groups, each a tuple of name suffixes (verl's fusion-group format).

    Raises (from ``process``, wrapped by the pipeline in a ``StageError``):
        ValueError: the last bucket arrived with a group still incomplete (names its
            members and the missing count), or a name matches two groups.
    """

    name = "keep_fused"

    def __init__(self, groups: Sequence[Sequence[str]]) -> None:
        self.groups = tuple(tuple(group) for group in groups)
        self._staged: dict[tuple[str, int], list[tuple[str, torch.Tensor]]] = {}
        self._emitted = 0

    async def open(self) -> None:
        self._staged = {}
        self._emitted = 0

    async def process(self, item: WeightBucket) -> list[WeightBucket]:
        out: list[tuple[str, torch.Tensor]] = []
        for name, tensor in item.tensors:
            key = fusion_key(name, self.groups)
            if key is None:
                out.append((name, tensor))
                continue
            prefix, index, size = key
            slot = self._staged.setdefault((prefix, index), [])
            slot.append((name, tensor))
            if len(slot) == size:
                out.extend(self._staged.pop((prefix, index)))
        if item.is_last and self._staged:
            missing = {
                f"{prefix}{self.groups[index][0]}": [n for n, _ in members]
                for (prefix, index), members in self._staged.items()
            }
            raise ValueError(f"fused parameter groups never completed in this sync: {missing}")
        if not out and not item.is_last:
            return []
        bucket = replace(item.with_tensors(tuple(out), ready=item.ready), index=self._emitted)
        self._emitted += 1
        return [bucket]
