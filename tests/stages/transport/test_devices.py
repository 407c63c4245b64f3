"""The transport's CUDA device: resolved once, and selected in whichever thread sends.

Runs on the fake CUDA layer (``tests.fakes.cuda``); the link's collectives are recorded
instead of run (the gloo round trips are in ``test_distributed.py``; NCCL needs GPUs).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist

from tests.fakes import FakeCuda, FakeCudaEvent, FakeCudaStream, install_fake_cuda
from weightpipe.stages._layout import flatten, unflatten
from weightpipe.stages.bucket import WeightBucket
from weightpipe.stages.transport.distributed import DistributedReceiver, DistributedSender, _Link


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> FakeCuda:
    return install_fake_cuda(monkeypatch, device_count=2)


class _RecordingLink(_Link):
    """A ``_Link`` whose collectives record the current device instead of running."""

    def __init__(self, link: _Link) -> None:
        super().__init__(link.group, link.src, link.timeout.total_seconds(), link.device)
        self.calls: list[tuple[str, int]] = []

    def broadcast(self, tensor: torch.Tensor, bucket: int, version: int | None, what: str) -> None:
        self.calls.append(("broadcast", torch.cuda.current_device()))

    def send_meta(self, meta: dict[str, Any], bucket: int, version: int | None) -> None:
        self.calls.append(("meta", torch.cuda.current_device()))


def _in_worker(fn: Callable[[], object]) -> None:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            assert torch.cuda.current_device() == 0  # every new host thread starts on 0
            fn()
        except BaseException as exc:  # re-raised on the test's thread
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive()
    if errors:
        raise errors[0]


def test_unindexed_cuda_is_resolved_at_construction(
    fake_cuda: FakeCuda, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.cuda.set_device(1)
    assert DistributedSender(device="cuda")._link.device == torch.device("cuda", 1)
    assert DistributedReceiver(device="cuda")._link.device == torch.device("cuda", 1)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    assert DistributedSender()._link.device == torch.device("cuda", 1)


def test_send_bucket_from_a_worker_thread_runs_under_the_links_device(
    fake_cuda: FakeCuda,
) -> None:
    torch.cuda.set_device(1)
    sender = DistributedSender(device="cuda")
    link = _RecordingLink(sender._link)
    sender._link = link
    buffer, layouts = flatten([("a", torch.arange(6.0)), ("b", torch.ones(3, 2))], 256)
    ready = FakeCudaEvent()
    ready.record(FakeCudaStream(1))  # the producer's copy, still pending
    bucket = WeightBucket(tuple(unflatten(buffer, layouts)), 0, True, 2, buffer=buffer, ready=ready)
    _in_worker(lambda: sender.send_bucket(bucket))
    assert link.calls == [("meta", 1), ("broadcast", 1)]
    (wait,) = fake_cuda.ops("wait_event")
    # cuda:1's current stream (what NCCL orders itself after) waits, on the device, for it.
    assert (wait.stream, wait.event, wait.thread_device) == (fake_cuda.default_streams[1], ready, 1)
    assert not ready.query() and ready.host_waits == 0
