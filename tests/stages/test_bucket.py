"""WeightBucket.wait_ready on the fake CUDA layer: which stream waits, from which thread."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
import torch

from tests.fakes import FakeCuda, FakeCudaEvent, FakeCudaStream, install_fake_cuda
from weightpipe.stages.bucket import WeightBucket


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> FakeCuda:
    return install_fake_cuda(monkeypatch, device_count=2)


def _bucket_ready_on(stream: FakeCudaStream) -> WeightBucket:
    event = FakeCudaEvent()
    event.record(stream)  # pending until complete(): the producer's copy is still running
    return WeightBucket((("w", torch.zeros(4)),), 0, True, 1, ready=event)


def _in_worker(fn: Callable[[], object]) -> None:
    """Run ``fn`` in a new thread (current device 0, as every new host thread)."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            assert torch.cuda.current_device() == 0
            fn()
        except BaseException as exc:  # re-raised on the test's thread
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive()
    if errors:
        raise errors[0]


def test_a_worker_thread_waits_on_the_buckets_device_not_its_own(fake_cuda: FakeCuda) -> None:
    producer = FakeCudaStream(1)
    bucket = _bucket_ready_on(producer)
    _in_worker(bucket.wait_ready)
    (wait,) = fake_cuda.ops("wait_event")
    assert wait.thread_device == 0  # the worker's own device was never switched
    assert wait.stream is fake_cuda.default_streams[1]  # cuda:1's stream waits, not cuda:0's
    ready = bucket.ready
    assert isinstance(ready, FakeCudaEvent)
    assert wait.event is ready
    assert not ready.query() and ready.host_waits == 0  # still pending; no host wait


def test_an_explicit_stream_is_the_one_that_waits(fake_cuda: FakeCuda) -> None:
    bucket = _bucket_ready_on(FakeCudaStream(1))
    consumer = FakeCudaStream(1)
    _in_worker(lambda: bucket.wait_ready(consumer))
    assert [(c.stream, c.event) for c in fake_cuda.ops("wait_event")] == [(consumer, bucket.ready)]
    assert consumer.waited == [bucket.ready]


def test_a_bucket_without_an_event_waits_for_nothing(fake_cuda: FakeCuda) -> None:
    WeightBucket((("w", torch.zeros(4)),), 0, True, 1).wait_ready()
    assert fake_cuda.calls == []
