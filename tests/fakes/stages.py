"""Test fakes of stages and their items: a gate stage that holds a sync at a chosen bucket,
and buckets made without a Fetch stage.

``FakeGate`` holds a sync at a chosen bucket, so tests synchronise on events, not sleeps;
``fake_buckets`` splits named tensors into ``WeightBucket``s the way Fetch would hand them on.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import anyio
import torch

from weightpipe.pipeline import Stage
from weightpipe.stages.bucket import WeightBucket

__all__ = ["FakeGate", "fake_buckets"]


def fake_buckets(
    tensors: Mapping[str, torch.Tensor] | Sequence[tuple[str, torch.Tensor]],
    *,
    per_bucket: int,
    version: int,
) -> list[WeightBucket]:
    """Fake buckets (no Fetch stage behind them): split named tensors into buckets of
    ``per_bucket`` tensors (the last one marked)."""
    items = list(tensors.items()) if isinstance(tensors, Mapping) else list(tensors)
    count = max(1, math.ceil(len(items) / per_bucket))
    return [
        WeightBucket(
            tensors=tuple(items[i * per_bucket : (i + 1) * per_bucket]),
            index=i,
            is_last=i == count - 1,
            version=version,
        )
        for i in range(count)
    ]


class FakeGate(Stage[WeightBucket, WeightBucket]):
    """A fake stage (stands in between Fetch and Load): passes buckets on, but holds bucket
    ``hold_at`` until ``release`` is set.

    ``reached`` is set when the held bucket arrives, so a test can look at the engine
    while the sync is known to be waiting upstream of Load. ``cancelled`` is set when the
    run is cancelled while the bucket is held: anyio delivers a cancellation to every task
    of the run in one pass, so by then every other stage has been cancelled too.
    """

    name = "fake_gate"

    def __init__(self, hold_at: int = 0) -> None:
        self.hold_at = hold_at
        self.reached = anyio.Event()
        self.release = anyio.Event()
        self.cancelled = anyio.Event()

    async def process(self, item: WeightBucket) -> list[WeightBucket]:
        if item.index == self.hold_at:
            self.reached.set()
            try:
                await self.release.wait()
            except anyio.get_cancelled_exc_class():
                self.cancelled.set()
                raise
        return [item]
