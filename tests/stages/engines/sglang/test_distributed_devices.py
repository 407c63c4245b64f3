"""SGLangDistributedEngine on the fake CUDA layer: its device, its stream, a refused bucket.

``tests.fakes.cuda`` follows torch's per-thread current device, per-device streams and
events that complete only when told; the update group is a recording stand-in for an
NCCL ``ProcessGroup`` (``broadcast`` enqueues and returns, ``abort`` ends what is queued),
so what a refused bucket leaves behind is visible on one CPU. The gloo round trips with
SGLang's own receiving code are in ``test_distributed.py``.
"""

from __future__ import annotations

import threading
from typing import Any

import anyio
import pytest
import torch

from tests.fakes import FakeCuda, FakeCudaEvent, FakeCudaStream, install_fake_cuda
from weightpipe.stages.bucket import WeightBucket
from weightpipe.stages.engines.base import EngineError
from weightpipe.stages.engines.sglang.distributed import SGLangDistributedEngine


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> FakeCuda:
    return install_fake_cuda(monkeypatch, device_count=2)


class _Work:
    """NCCL's ``Work.wait()``: orders the current stream after the collective, no host wait."""

    def wait(self) -> None:
        return None


class _Group:
    """Follows ``ProcessGroupNCCL``: ``broadcast`` is enqueued and returns at once."""

    def __init__(self) -> None:
        self.broadcasts: list[tuple[int, Any]] = []  # (thread's device, current stream)
        self.issued = threading.Event()
        self.aborted = False

    def broadcast(self, tensors: list[torch.Tensor], opts: Any) -> _Work:
        device = torch.cuda.current_device()
        self.broadcasts.append((device, torch.cuda.current_stream(device)))
        self.issued.set()
        return _Work()

    def abort(self) -> None:
        self.aborted = True


class _RefusingClient:
    """The control plane's client: the engine refuses the bucket once the broadcast is
    queued (SGLang answers success=False; its ranks never join the broadcast)."""

    def __init__(self, group: _Group) -> None:
        self.group = group

    async def update_weights_from_distributed(self, *args: Any) -> None:
        await anyio.to_thread.run_sync(self.group.issued.wait)
        message = "model.x.weight is not a parameter"
        raise EngineError("sglang_http", message, tensor="model.x.weight")


class _Control:
    name = "sglang_http"

    def __init__(self, group: _Group) -> None:
        self.client = _RefusingClient(group)


def _engine(group: _Group | None = None, **kwargs: Any) -> SGLangDistributedEngine:
    return SGLangDistributedEngine(
        _Control(group or _Group()),  # type: ignore[arg-type]
        master_address="127.0.0.1",
        master_port=1,
        backend="nccl",
        **kwargs,
    )


def test_an_unindexed_device_is_resolved_once_at_construction(fake_cuda: FakeCuda) -> None:
    torch.cuda.set_device(1)  # under torchrun: this rank's device
    assert _engine().device == torch.device("cuda", 1)
    assert _engine(device="cuda").device == torch.device("cuda", 1)
    torch.cuda.set_device(0)
    assert _engine(device="cuda:1").device == torch.device("cuda", 1)


async def test_a_refused_bucket_leaves_no_broadcast_queued_and_no_thread_waiting(
    fake_cuda: FakeCuda, monkeypatch: pytest.MonkeyPatch
) -> None:
    group = _Group()
    torch.cuda.set_device(1)
    engine = _engine(group, timeout_s=600)
    engine._group = group
    finished = threading.Event()
    outcome: list[BaseException | None] = []
    send = engine._send

    def tracked_send(*args: Any) -> None:
        try:
            send(*args)
            outcome.append(None)
        except BaseException as exc:  # the worker's own end, inspected below
            outcome.append(exc)
            raise
        finally:
            finished.set()

    monkeypatch.setattr(engine, "_send", tracked_send)
    ready = FakeCudaEvent()
    ready.record(FakeCudaStream(1))  # the producer's copy, still pending
    bucket = WeightBucket((("model.x.weight", torch.ones(4, 4)),), 0, True, 3, ready=ready)
    with pytest.raises(EngineError, match="is not a parameter") as raised:
        await engine.load(bucket)
    assert raised.value.tensor == "model.x.weight"
    # The worker thread stopped waiting for the broadcast that will never complete,
    # and the communicator was aborted so the queued collective ends on the device.
    assert finished.wait(timeout=60)
    assert isinstance(outcome[0], EngineError) and "given up" in str(outcome[0])
    assert group.aborted and engine._group_broken
    # The broadcast ran from the worker under cuda:1, on the engine's side stream: the
    # device's default stream (the trainer's kernels) never waits behind it.
    side = engine._stream
    assert isinstance(side, FakeCudaStream) and side.device == torch.device("cuda", 1)
    assert group.broadcasts == [(1, side)]
    assert all(stream.waited == [] for stream in fake_cuda.default_streams)
    (wait,) = fake_cuda.ops("wait_event")
    assert (wait.stream, wait.event, wait.thread_device) == (side, ready, 1)
    assert fake_cuda.ops("host_wait") == [] and ready.host_waits == 0
    for call in fake_cuda.ops("alloc", "copy"):
        assert (call.device, call.thread_device, call.stream) == (1, 1, side), call


class _CountingEvent:
    """An event that completes after ``queries`` polls (``query()`` never blocks)."""

    def __init__(self, queries: int) -> None:
        self.left = queries

    def query(self) -> bool:
        self.left -= 1
        return self.left < 0


def test_the_broadcast_wait_polls_and_ends_on_completion_abandon_or_timeout() -> None:
    engine = SGLangDistributedEngine(
        _Control(_Group()),  # type: ignore[arg-type]
        master_address="127.0.0.1",
        master_port=1,
        backend="gloo",
        timeout_s=600,
    )
    event = _CountingEvent(3)
    engine._wait_for(event, threading.Event())
    assert event.left == -1  # returned on the first query that said done
    given_up = threading.Event()
    given_up.set()
    with pytest.raises(EngineError, match="given up"):
        engine._wait_for(_CountingEvent(10**9), given_up)
    engine.timeout_s = 1e-9
    with pytest.raises(EngineError, match="did not finish within"):
        engine._wait_for(_CountingEvent(10**9), threading.Event())


async def test_a_bucket_without_an_event_is_ordered_after_the_callers_stream(
    fake_cuda: FakeCuda,
) -> None:
    group = _Group()
    torch.cuda.set_device(1)
    trainer = FakeCudaStream(1, label="trainer")
    torch.cuda.set_stream(trainer)  # type: ignore[arg-type]
    engine = _engine(group, timeout_s=600)
    engine._group = group
    with pytest.raises(EngineError):  # the double refuses; the ordering is what counts
        await engine.load(WeightBucket((("model.x.weight", torch.ones(4)),), 0, True, 3))
    side = engine._stream
    assert isinstance(side, FakeCudaStream) and side.waited == [trainer]
    assert trainer.waited == [] and group.broadcasts == [(1, side)]
