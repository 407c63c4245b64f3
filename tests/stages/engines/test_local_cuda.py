"""The local engine's CUDA paths, on the fake CUDA layer (``tests.fakes.cuda``).

The current CUDA device is per thread: the engine's staging runs on an anyio worker
thread and its generation on a thread of its own, both of which start on cuda:0. These
tests build an engine for cuda:1 from an unindexed ``"cuda"`` and check which device,
stream and event every allocation, copy and wait of a sync uses, with a bucket whose
ready event is still pending. The model itself stays on the CPU (device memory cannot
be faked for a real model); the staging seams of ``WeightUpdates`` are routed through
the layer's stand-ins, as the layer does for Fetch's.
"""

from __future__ import annotations

import threading

import pytest
import torch

from tests.fakes import FakeCuda, FakeCudaEvent, install_fake_cuda
from tests.fakes.local import local_engine, new_weights
from weightpipe.stages.bucket import WeightBucket
from weightpipe.stages.engines.local import LocalEngine
from weightpipe.stages.engines.local import engine as engine_module
from weightpipe.stages.engines.local.model import build_model
from weightpipe.stages.engines.local.updates import WeightUpdates
from weightpipe.stages.fp8 import dequantize_fp8, quantize_fp8

ENGINE_DEVICE = 1
MLP = "model.layers.0.mlp.gate_proj.weight"


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> FakeCuda:
    fake = install_fake_cuda(monkeypatch, device_count=2)

    def build_on_cpu(
        config: object, *, seed: int, device: torch.device, dtype: torch.dtype
    ) -> object:
        assert device.type == "cuda" and device.index is not None  # resolved before the build
        return build_model(config, seed=seed, device=torch.device("cpu"), dtype=dtype)

    def empty_like(self: WeightUpdates, param: torch.Tensor) -> torch.Tensor:
        return fake.empty(param.nbytes, ENGINE_DEVICE).view(param.dtype).view(param.shape)

    monkeypatch.setattr(engine_module, "build_model", build_on_cpu)
    monkeypatch.setattr(WeightUpdates, "_empty_like", empty_like)
    monkeypatch.setattr(WeightUpdates, "_copy", lambda self, dst, src: fake.copy(dst, src))
    return fake


def engine_on_device_1() -> LocalEngine:
    """Built with an unindexed ``"cuda"`` on a thread whose current device is 1."""
    with torch.cuda.device(ENGINE_DEVICE):
        return local_engine(device="cuda")


def test_an_unindexed_cuda_is_resolved_once_at_construction(fake_cuda: FakeCuda) -> None:
    engine = engine_on_device_1()
    assert engine.device == torch.device("cuda", ENGINE_DEVICE)
    assert torch.cuda.current_device() == 0  # the constructing thread's choice was its own
    assert local_engine(device="cuda").device == torch.device("cuda", 0)


@pytest.mark.parametrize("bucket_device", [ENGINE_DEVICE, 0], ids=["same-device", "other-device"])
async def test_staging_runs_on_the_engines_device_from_a_worker_thread(
    fake_cuda: FakeCuda, bucket_device: int
) -> None:
    engine = engine_on_device_1()
    new = new_weights(engine, seed=3)
    q, scale = quantize_fp8(new[MLP].float())
    others = [(name, t) for name, t in new.items() if name != MLP]
    pairs = [(MLP, q), (MLP + "_scale_inv", scale), *others]  # every parameter, one FP8
    # The bucket as Fetch would hand it over: device tensors, and an event still pending.
    tensors = tuple((name, fake_cuda.to(t, bucket_device)) for name, t in pairs)
    ready = FakeCudaEvent()
    ready.record(fake_cuda.default_stream(bucket_device))
    bucket = WeightBucket(tensors, 0, True, 1, ready=ready)
    fake_cuda.calls.clear()

    await engine.begin(1)
    await engine.load(bucket)

    staging = [c for c in fake_cuda.calls if c.thread != threading.current_thread().name]
    assert staging == fake_cuda.calls  # all of it on a worker thread, which starts on cuda:0
    assert {c.thread_device for c in staging} == {ENGINE_DEVICE}
    (wait,) = fake_cuda.ops("wait_event")
    # The bucket's own device's stream waits (torch copies out of it on that stream).
    assert wait.event is ready and wait.stream is fake_cuda.default_stream(bucket_device)
    assert not ready.query() and ready.host_waits == 0  # waited on by a stream, not the host
    allocs, copies = fake_cuda.ops("alloc"), fake_cuda.ops("copy")
    assert len(allocs) >= len(pairs) - 1 and len(copies) >= len(pairs) - 1
    assert {c.device for c in allocs + copies} == {ENGINE_DEVICE}
    assert {c.stream for c in copies} == {fake_cuda.default_stream(ENGINE_DEVICE)}
    # The FP8 weight and its scale were moved to the engine's device before dequantising.
    assert sum(c.nbytes == q.nbytes for c in copies) >= 1
    (host_wait,) = fake_cuda.ops("host_wait")  # once per bucket, before it can be recycled
    assert host_wait.stream is fake_cuda.default_stream(ENGINE_DEVICE)
    assert fake_cuda.ops("wait_event", "copy", "host_wait")[-1] is host_wait

    await engine.commit(1)
    assert await engine.version() == 1
    assert all(torch.equal(engine.parameter(name), t) for name, t in others)
    assert torch.equal(engine.parameter(MLP), dequantize_fp8(q, scale, dtype=torch.bfloat16))


async def test_the_generation_thread_runs_under_the_engines_device(fake_cuda: FakeCuda) -> None:
    engine = engine_on_device_1()
    seen: set[int] = set()
    engine.model.register_forward_pre_hook(
        lambda module, args: seen.add(torch.cuda.current_device())
    )
    async with engine:
        await engine.wait_for_tokens(1)
    assert seen == {ENGINE_DEVICE}
