"""Host buffers (``stages/_memory.py``) on the fake CUDA layer: how much a pinned buffer
really pins, through which device, and that it is unpinned when its last view goes."""

from __future__ import annotations

import gc

import pytest
import torch

from tests.fakes import FakeCuda, install_fake_cuda
from weightpipe.stages._memory import (
    HUGEPAGE_MIN_BYTES,
    PIN_ROUND_BYTES,
    BufferPool,
    allocate_host,
    pinned_size,
)


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> FakeCuda:
    return install_fake_cuda(monkeypatch, device_count=2)


def test_a_large_pinned_buffer_is_rounded_to_huge_pages_not_a_power_of_two(
    fake_cuda: FakeCuda,
) -> None:
    # 4.2 GB would have pinned 8 GiB under torch's allocator; at this size 9 MiB + 1
    # byte would have pinned 16 MiB.
    nbytes = 9 * (1 << 20) + 1
    assert pinned_size(4_200_000_000) == 4_200_000_000 - 4_200_000_000 % PIN_ROUND_BYTES + (
        PIN_ROUND_BYTES
    )
    with torch.cuda.device(1):
        buffer = allocate_host(nbytes, pin=True)
    (pin,) = fake_cuda.ops("pin")
    assert pin.reserved == 10 << 20 == buffer.numel()
    assert pin.thread_device == 1  # pinned through the device that will copy from it
    view = buffer[5:7]
    del buffer
    gc.collect()
    assert fake_cuda.ops("unpin") == []  # a view still holds the memory
    del view
    gc.collect()
    assert len(fake_cuda.ops("unpin")) == 1


def test_small_pinned_buffers_come_from_torchs_allocator(fake_cuda: FakeCuda) -> None:
    allocate_host(HUGEPAGE_MIN_BYTES - 1, pin=True)
    (pin,) = fake_cuda.ops("pin")
    assert pin.reserved == pinned_size(HUGEPAGE_MIN_BYTES - 1) == HUGEPAGE_MIN_BYTES


def test_the_pool_keeps_at_most_keep_pinned_buffers_and_unpins_the_rest(
    fake_cuda: FakeCuda,
) -> None:
    pool = BufferPool(5 << 20, keep=2, pin=True)
    # Downstream holds views (as Fetch's buckets do): all three buffers are in use.
    held = [pool.take(5 << 20)[:1] for _ in range(3)]
    assert len(fake_cuda.ops("pin")) == 3
    assert pool.retained_bytes == 2 * (6 << 20)  # the oldest was forgotten
    del held
    gc.collect()
    assert len(fake_cuda.ops("unpin")) == 1  # only the forgotten one is freed
    pool.clear()
    gc.collect()
    assert len(fake_cuda.ops("unpin")) == 3
