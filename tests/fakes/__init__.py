"""Test fakes and doubles, all in one place (one module a thing faked).

- ``engines``: a fake of the ``Engine`` protocol, of a checkpoint engine, a broken model.
- ``stages``: a fake gate stage and fake buckets.
- ``cuda``: a fake CUDA layer (per-thread device, streams, pending events, pinning).
- ``sglang_http``: a test double of SGLang's HTTP weight-update surface.
- ``sglang_engine``: fakes of the in-process ``sglang.Engine`` and the ``sglang`` module.
- ``sglang_receiver``: a fake of SGLang's receiving rank of a distributed update.
- ``sglang_model``: SGLang's model-side checks, shared by the SGLang fakes.
- ``sglang_faults``: the HTTP double and the in-process fake with injected faults.
- ``faults``: one fault at one chosen point of a pipeline run or an engine call.
- ``local``: helpers around the real ``LocalEngine`` and a recording generation listener.

The light fakes are re-exported here; the SGLang ones import ``sglang`` and ``aiohttp``, so
they are imported from their modules (``from tests.fakes.sglang_http import ...``).
"""

from __future__ import annotations

from .cuda import CudaCall, FakeCuda, FakeCudaEvent, FakeCudaStream, install_fake_cuda
from .engines import FakeCheckpointEngine, FakeEngine, fake_broken_model, small_llama_config
from .stages import FakeGate, fake_buckets

__all__ = [
    "CudaCall",
    "FakeCheckpointEngine",
    "FakeCuda",
    "FakeCudaEvent",
    "FakeCudaStream",
    "FakeEngine",
    "FakeGate",
    "fake_broken_model",
    "fake_buckets",
    "install_fake_cuda",
    "small_llama_config",
]
