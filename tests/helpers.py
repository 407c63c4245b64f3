"""Helpers shared by the tests (not fakes: those live in ``tests.fakes``).

A table of the dtypes a weight sync must carry bit-exactly, random bit patterns of any of
them, two byte views for bit-exact comparisons, a free TCP port on 127.0.0.1, spawned
ranks that each report once, and one begin/load/commit (abort on failure) sync against any
``Engine``.
"""

from __future__ import annotations

import queue
import socket
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from weightpipe.stages.bucket import WeightBucket
from weightpipe.stages.engines.base import Engine

__all__ = ["DTYPES", "as_bytes", "bits", "free_port", "random_tensor", "run_ranks", "sync"]

DTYPES = [
    torch.bfloat16,
    torch.float16,
    torch.float32,
    torch.float64,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.bool,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
]
"""Every dtype a sync must carry bit-exactly (the FP8 ones included)."""


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as one flat uint8 tensor (works for 0-d tensors too)."""
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as uint8, keeping its shape but the last dimension (so two tensors
    of different shapes do not compare equal)."""
    return tensor.contiguous().view(torch.uint8)


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Random bit patterns of ``dtype`` (NaN payloads included; bools only 0 and 1)."""
    numel = 1
    for size in shape:
        numel *= size
    generator = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (numel * dtype.itemsize,), dtype=torch.uint8, generator=generator)
    if dtype == torch.bool:
        raw = raw % 2
    return raw.view(dtype).view(shape)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free when asked.

    Racy by nature (another process may take it before the caller binds it); the callers
    bind at once, and a lost race fails loudly, never silently.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_ranks(
    target: Callable[..., None],
    world: int,
    port: int,
    *,
    with_done: bool = False,
    timeout_s: float = 90.0,
) -> dict[int, tuple[str, Any]]:
    """Spawn ``world`` processes running ``target(rank, port, results[, done])`` and collect
    one ``(rank, status, detail)`` report from each; then set ``done`` (passed when
    ``with_done``, so ranks can stay up until every report is in), join them and kill any
    that do not exit. Returns ``{rank: (status, detail)}``; the caller asserts on it.

    Fails the test, naming the silent ranks, when no report came within ``timeout_s``.
    """
    context = mp.get_context("spawn")
    results = context.Queue()
    done = context.Event()
    extra = (done,) if with_done else ()
    processes = [
        context.Process(target=target, args=(rank, port, results, *extra), daemon=True)
        for rank in range(world)
    ]
    for process in processes:
        process.start()
    reports: dict[int, tuple[str, Any]] = {}
    try:
        while len(reports) < world:
            try:
                rank, status, detail = results.get(timeout=timeout_s)
            except queue.Empty:
                pytest.fail(f"no report from ranks {sorted(set(range(world)) - set(reports))}")
            reports[rank] = (status, detail)
    finally:
        done.set()
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
    return reports


async def sync(engine: Engine, version: int, buckets: Sequence[WeightBucket]) -> None:
    """One sync: ``begin``, ``load`` every bucket, ``commit``; ``abort`` and re-raise on
    any failure (cancellation included)."""
    await engine.begin(version)
    try:
        for bucket in buckets:
            await engine.load(bucket)
        await engine.commit(version)
    except BaseException:
        await engine.abort(version)
        raise
