"""The demo end to end: exit 0 with every sync verified; non-zero on a failure."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import free_port
from weightpipe.pipeline.config import load_config
from weightpipe.stages.app.demo import fp8_weight_names, run_demo


def test_demo_runs_and_verifies_every_sync(capsys: pytest.CaptureFixture[str]) -> None:
    config = load_config(
        overrides=[
            "demo.steps=4",
            "demo.sync_every=2",
            "demo.progress=false",
            "metrics.port=0",
            "model.num_layers=2",
            "engine.mode=in_flight",
        ]
    )
    assert run_demo(config) == 0
    out = capsys.readouterr().out
    assert "metrics: http://127.0.0.1:" in out
    assert out.count("ok: ") == 2  # one verified row per sync
    assert "in_flight" in out


def test_demo_exits_non_zero_when_the_engine_is_unreachable(
    capsys: pytest.CaptureFixture[str],
) -> None:
    port = free_port()  # a port nothing listens on
    config = load_config(
        overrides=[
            "demo.steps=2",
            "demo.progress=false",
            "metrics.enabled=false",
            "model.num_layers=1",
            "engine.kind=sglang_http",
            f"engine.url=http://127.0.0.1:{port}",
            "engine.timeout_s=2",
            "engine.retries=0",
            "engine.mode=pause",
        ]
    )
    assert run_demo(config) == 1
    out = capsys.readouterr().out
    assert "demo failed" in out


def test_fp8_names_come_from_scale_tensors() -> None:
    names = ["a.weight", "a.weight_scale_inv", "b.weight", "c.weight", "c.weight_scale"]
    assert fp8_weight_names(names) == {"a.weight", "c.weight"}


def test_demo_against_sglangs_http_surface() -> None:
    # `weightpipe demo --engine sglang --url URL`, pointed at the test double of SGLang's
    # weight endpoints (which decodes every payload with SGLang's own code).
    from transformers import LlamaForCausalLM

    from tests.fakes.sglang_http import SGLangHTTPDouble
    from weightpipe.stages.app.factory import build_llama_config
    from weightpipe.stages.bucket import WeightBucket
    from weightpipe.stages.quantize import Fp8Quantize

    overrides = [
        "demo.steps=2",
        "demo.sync_every=2",
        "demo.progress=false",
        "metrics.enabled=false",
        "model.num_layers=1",
    ]
    base = load_config(overrides=overrides)
    model = LlamaForCausalLM(build_llama_config(base.model))
    sample = WeightBucket(
        tuple((n, p.detach().bfloat16()) for n, p in model.named_parameters()),
        index=0,
        is_last=True,
        version=1,
    )
    sent = Fp8Quantize().quantize_bucket(sample)
    spec = {name: (tuple(t.shape), t.dtype) for name, t in sent.tensors}
    with SGLangHTTPDouble(spec) as server:
        config = load_config(overrides=[*overrides, "engine.kind=sglang_http"])
        config.engine.url = server.url
        assert run_demo(config) == 0
        assert server.weight_version == "1"
        assert set(server.weights) == set(spec)
        fp8 = [n for n, (_, dtype) in spec.items() if dtype == torch.float8_e4m3fn]
        assert fp8
        assert all(server.weights[n].dtype == torch.float8_e4m3fn for n in fp8)
