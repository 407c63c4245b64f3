"""The torch.distributed transport across 3 real processes (gloo on 127.0.0.1).

One spawn runs every scenario in sequence, since starting torch in three processes is
most of the cost: a bit-exact round trip of every dtype through ``DistributedSender.send``,
the same through ``Pipeline([Fetch])`` with the sender as sink, the same once more into a
rollout-side ``Pipeline([Fetch])`` fed by ``distributed_source``, an abort that receivers
see as an error naming the bucket, and a receive that times out naming the bucket.
"""

from __future__ import annotations

import traceback
from datetime import timedelta
from typing import Any

import pytest
import torch

from tests.helpers import DTYPES, as_bytes, free_port, run_ranks

pytestmark = pytest.mark.slow

WORLD = 3


def make_tensors() -> list[tuple[str, torch.Tensor]]:
    """Random bit patterns of every dtype (NaN payloads included), odd shapes and sizes."""
    generator = torch.Generator().manual_seed(1234)
    pairs: list[tuple[str, torch.Tensor]] = []
    for i, dtype in enumerate(DTYPES):
        for j, shape in enumerate([(7, 13), (3,), (), (0, 5), (40, 33)]):
            numel = 1
            for s in shape:
                numel *= s
            raw = torch.randint(0, 256, (numel * dtype.itemsize,), dtype=torch.uint8,
                                generator=generator)  # fmt: skip
            if dtype == torch.bool:
                raw = raw % 2  # only 0 and 1 are valid bools
            pairs.append((f"layer{i}.{dtype}.w{j}", raw.view(dtype).view(shape)))
    pairs.append(("big.lone", torch.arange(3000, dtype=torch.float32)))  # > bucket_bytes
    return pairs


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(as_bytes(a), as_bytes(b))


def _check_pairs(got: list[tuple[str, torch.Tensor]], want: list[tuple[str, torch.Tensor]]) -> None:
    assert [n for n, _ in got] == [n for n, _ in want]
    for (name, a), (_, b) in zip(got, want, strict=True):
        assert _same(a, b), f"{name} differs"


def _sender(results: Any, done: Any) -> None:
    import anyio

    from weightpipe.pipeline import Pipeline
    from weightpipe.stages.fetch import Fetch
    from weightpipe.stages.transport.distributed import DistributedSender

    pairs = make_tensors()
    sender = DistributedSender(timeout_s=20)
    buckets = sender.send(pairs, version=5, bucket_bytes=4096)

    async def via_pipeline() -> None:
        await Pipeline([Fetch(4096, version=6)]).run(pairs, sink=sender)

    anyio.run(via_pipeline)
    sender.send(pairs, version=8, bucket_bytes=1 << 20)  # rollouts re-bucket it themselves
    sender.abort("trainer crashed", version=7)
    results.put((0, "ok", buckets))
    done.wait(60)  # stay up (and silent) while receivers time out


def _receiver(rank: int, results: Any) -> None:
    import anyio

    from weightpipe.pipeline import Pipeline
    from weightpipe.stages.bucket import WeightBucket
    from weightpipe.stages.fetch import Fetch
    from weightpipe.stages.transport.distributed import (
        DistributedReceiver,
        TransportError,
        distributed_source,
    )

    want = make_tensors()
    receiver = DistributedReceiver(timeout_s=20)
    _check_pairs(list(receiver.named_tensors()), want)
    buckets = list(receiver.buckets())
    assert [b.index for b in buckets] == list(range(len(buckets)))
    assert [b.is_last for b in buckets] == [False] * (len(buckets) - 1) + [True]
    assert {b.version for b in buckets} == {6}
    assert all(b.nbytes <= 4096 or len(b) == 1 for b in buckets)
    _check_pairs([p for b in buckets for p in b.tensors], want)

    async def rollout_pipeline() -> list[WeightBucket]:
        received: list[WeightBucket] = []

        async def sink(bucket: WeightBucket) -> None:
            received.append(bucket)

        source = distributed_source(timeout_s=20)
        await Pipeline([Fetch(2048, version=8)]).run(source, sink=sink)
        return received

    rebucketed = anyio.run(rollout_pipeline)
    assert len(rebucketed) > 1
    _check_pairs([p for b in rebucketed for p in b.tensors], want)
    messages = []
    for timeout_s in (20.0, 1.0):  # the abort, then nothing at all
        try:
            list(DistributedReceiver(timeout_s=timeout_s).buckets())
        except TransportError as exc:
            messages.append(str(exc))
    results.put((rank, "ok", messages))


def _worker(rank: int, port: int, results: Any, done: Any) -> None:
    import torch.distributed as dist

    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=WORLD,
            timeout=timedelta(seconds=30),
        )
        if rank == 0:
            _sender(results, done)
        else:
            _receiver(rank, results)
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))


def test_three_process_round_trip_abort_and_timeout() -> None:
    reports = run_ranks(_worker, WORLD, free_port(), with_done=True)
    failed = {rank: detail for rank, (status, detail) in reports.items() if status != "ok"}
    assert not failed, "\n".join(f"rank {r} failed:\n{d}" for r, d in sorted(failed.items()))
    assert reports[0][1] > 3  # several buckets, including the lone oversize one
    for rank in (1, 2):
        aborted, timed_out = reports[rank][1]
        assert aborted.startswith("bucket 0 of v7: the sender aborted: trainer crashed")
        assert timed_out.startswith("bucket 0: broadcast of the metadata length")
