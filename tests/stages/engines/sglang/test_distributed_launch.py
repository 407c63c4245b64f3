"""SGLangDistributedEngine checks the server's args before the update group forms.

Refusals happen before any pause, begin or rendezvous, so no receiving rank is needed: the
control plane is the HTTP double (it reports ``tp_size`` and ``quantization`` in
``/server_info`` as SGLang's server does from its ServerArgs).
"""

from __future__ import annotations

import pytest
import torch

from tests.fakes.sglang_http import SGLangHTTPDouble
from tests.helpers import free_port
from weightpipe.stages.engines.base import EngineError, SyncSettings
from weightpipe.stages.engines.sglang.distributed import SGLangDistributedEngine
from weightpipe.stages.engines.sglang.http import SGLangHTTPEngine
from weightpipe.stages.fetch import Fetch
from weightpipe.stages.quantize import Fp8Quantize
from weightpipe.stages.sync import sync_weights

LINEAR = "model.layers.0.mlp.up_proj.weight"


def _weights() -> list[tuple[str, torch.Tensor]]:
    return [(LINEAR, torch.randn(256, 128, generator=torch.Generator().manual_seed(3)))]


def _engine(control: SGLangHTTPEngine, engine_ranks: int) -> SGLangDistributedEngine:
    return SGLangDistributedEngine(
        control,
        master_address="127.0.0.1",
        master_port=free_port(),
        engine_ranks=engine_ranks,
        backend="gloo",
        timeout_s=10.0,
    )


def _untouched(server: SGLangHTTPDouble) -> None:
    assert all(path.endswith("server_info") for path in server.paths()), server.paths()
    assert server.paused is None and not server.session_open and not server.weights
    assert server.weight_version == "default"


async def test_engine_ranks_other_than_the_servers_tp_size_are_refused_before_the_group() -> None:
    with SGLangHTTPDouble({}, tp_size=2) as server:
        async with SGLangHTTPEngine(server.url) as control:
            engine = _engine(control, engine_ranks=1)
            with pytest.raises(EngineError) as info:
                await sync_weights(_weights(), engine, version=1, stages=[Fetch(1 << 20)])
        message = str(info.value)
        assert "engine 'sglang_distributed'" in message
        assert "tp_size=2" in message and "engine_ranks=1" in message
        _untouched(server)


async def test_an_fp8_sync_into_a_server_quantized_without_fp8_is_refused() -> None:
    with SGLangHTTPDouble({}, quantization="awq") as server:
        async with SGLangHTTPEngine(server.url) as control:
            engine = _engine(control, engine_ranks=1)
            with pytest.raises(EngineError) as info:
                await sync_weights(
                    _weights(), engine, version=1, stages=[Fetch(1 << 20), Fp8Quantize()]
                )
        assert "quantization='awq'" in str(info.value)
        _untouched(server)


async def test_matching_args_pass_the_check() -> None:
    # No receiving rank here: the check must pass and leave nothing changed on the server.
    with SGLangHTTPDouble({}, tp_size=1, quantization="fp8") as server:
        async with SGLangHTTPEngine(server.url) as control:
            engine = _engine(control, engine_ranks=1)
            await engine.check_launch_settings(SyncSettings("block", (128, 128)))
        _untouched(server)
