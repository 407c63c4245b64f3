"""What SGLang's ``meta_info.weight_version`` is worth while weightpipe syncs: the truth.

A client keeps POSTing ``/generate`` to the SGLang HTTP double while ``sync_weights`` runs
Fetch -> Fp8Quantize -> Load into ``SGLangHTTPEngine`` in each mode. The double records,
per answer, the digest of every parameter the output was computed on; each version's
digests are known here (Fp8Quantize is deterministic), so every answer can be checked: its
label must name exactly the version of every weight it saw (no v1 label on any v2 bucket,
no v2 label on a mix), answers after the commit say v2, and labels never go backwards. The
double's ``hold_until`` makes the interesting orders certain, not likely: the pause waits
until an output was answered during the sync, and the first call inside the pause waits
until a request is queued on the pause. Two negative controls show the check catches a
bucket loaded outside a pause and a version announced before its weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import anyio
import httpx
import pytest
import torch

from tests.fakes.sglang_http import Generation, SGLangHTTPDouble, tensor_digest
from weightpipe.stages.bucket import WeightBucket
from weightpipe.stages.engines.sglang.http import SGLangHTTPEngine
from weightpipe.stages.fetch import Fetch
from weightpipe.stages.quantize import Fp8Quantize
from weightpipe.stages.sync import SyncReport, sync_weights

Digests = dict[str, str]


def _weights(version: int) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(version)
    return [
        ("model.embed_tokens.weight", torch.randn(64, 32, generator=g).to(torch.bfloat16)),
        *(
            (f"model.layers.{i}.mlp.down_proj.weight", torch.randn(160, 130, generator=g))
            for i in range(3)
        ),
        ("model.norm.weight", torch.randn(32, generator=g).to(torch.bfloat16)),
    ]


def _served(version: int, count: int | None = None) -> WeightBucket:
    """What the server holds of ``version`` (the first ``count`` source tensors): the
    names, dtypes and bytes Fp8Quantize sends."""
    source = WeightBucket(tuple(_weights(version)[:count]), index=0, is_last=False, version=version)
    return Fp8Quantize().quantize_bucket(source)


def _digests(version: int) -> Digests:
    return {name: tensor_digest(t) for name, t in _served(version).tensors}


def _spec() -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {n: (tuple(t.shape), t.dtype) for n, t in _served(1).tensors}


def _computed_on(seen: Mapping[str, str], expected: Mapping[int, Digests]) -> set[str]:
    """The versions an output's weights came from ("?" for a parameter matching none)."""
    names = next(iter(expected.values()))
    found: set[str] = set()
    for name in names:
        matches = [str(v) for v, digests in expected.items() if digests[name] == seen.get(name)]
        found.update(matches if len(matches) == 1 else ["?"])
    return found


def _mislabelled(generation: Generation, expected: Mapping[int, Digests]) -> str | None:
    computed_on = _computed_on(generation.weights_seen, expected)
    if computed_on == {generation.weight_version}:
        return None
    return (
        f"{generation.rid}: labelled {generation.weight_version}, computed on {sorted(computed_on)}"
    )


async def _sync(
    engine: SGLangHTTPEngine, version: int, mode: str, prefetch_bytes: int | None = 0
) -> SyncReport:
    return await sync_weights(
        _weights(version),
        engine,
        version=version,
        stages=[Fetch(40 << 10), Fp8Quantize()],
        mode=mode,  # type: ignore[arg-type]
        prefetch_bytes=prefetch_bytes,
    )


async def _generate(http: httpx.AsyncClient, rid: str) -> dict[str, Any]:
    body = {"text": f"prompt {rid}", "rid": rid, "sampling_params": {"max_new_tokens": 4}}
    response = await http.post("/generate", json=body)
    response.raise_for_status()
    answer: dict[str, Any] = response.json()
    return answer


async def _keep_generating(url: str, stop: anyio.Event, answers: list[dict[str, Any]]) -> None:
    """One client, one request at a time, until ``stop``: answers in the order received."""
    async with httpx.AsyncClient(base_url=url, timeout=10.0) as http:
        while not stop.is_set():
            answers.append(await _generate(http, f"during-{len(answers)}"))


@pytest.mark.parametrize(
    ("mode", "prefetch_bytes"),
    [("pause", 0), ("prefetch", 0), ("in_flight", 0), ("in_flight", None)],
)
async def test_every_output_names_the_version_that_computed_it(
    mode: str, prefetch_bytes: int | None
) -> None:
    expected = {1: _digests(1), 2: _digests(2)}
    answers: list[dict[str, Any]] = []
    with SGLangHTTPDouble(_spec()) as server:
        async with SGLangHTTPEngine(server.url) as engine:
            await _sync(engine, 1, mode, prefetch_bytes)  # nothing generates yet
            # The pause waits for an output answered during this sync, the session's
            # begin (the first call inside the pause) for a request queued on the pause.
            server.hold_until("/pause_generation", lambda d: len(d.generations) > 0)
            server.hold_until("/begin_weight_update", lambda d: d.generate_waiting > 0)
            stop = anyio.Event()
            with anyio.fail_after(20):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(_keep_generating, server.url, stop, answers)
                    report = await _sync(engine, 2, mode, prefetch_bytes)
                    stop.set()
            async with httpx.AsyncClient(base_url=server.url, timeout=10.0) as http:
                after = [await _generate(http, f"after-{i}") for i in range(3)]
    assert report.load.committed and report.load.buckets > 1
    assert server.hold_timeouts == []
    assert server.unpaused_updates == []
    by_rid = {g.rid: g for g in server.generations}
    problems = [_mislabelled(by_rid[a["meta_info"]["id"]], expected) for a in answers + after]
    assert [p for p in problems if p is not None] == []
    labels = [a["meta_info"]["weight_version"] for a in answers + after]
    assert labels == sorted(labels, key=int)  # never backwards, as received
    recorded = [g.weight_version for g in server.generations]  # as the double answered
    assert recorded == sorted(recorded, key=int)
    assert "1" in labels  # v1 kept serving while this sync fetched (or paused)
    waited = [by_rid[a["meta_info"]["id"]] for a in answers if by_rid[a["meta_info"]["id"]].waited]
    assert waited and all(g.weight_version == "2" for g in waited)  # queued on the pause
    assert [a["meta_info"]["weight_version"] for a in after] == ["2"] * 3


@pytest.mark.parametrize("fault", ["bucket_outside_a_pause", "version_before_weights"])
async def test_the_check_flags_an_output_computed_on_a_mix(fault: str) -> None:
    expected = {1: _digests(1), 2: _digests(2)}
    with SGLangHTTPDouble(_spec()) as server:
        async with (
            SGLangHTTPEngine(server.url) as engine,
            httpx.AsyncClient(base_url=server.url, timeout=10.0) as http,
        ):
            await _sync(engine, 1, "prefetch")
            if fault == "bucket_outside_a_pause":
                # SGLang applies an update to the live model when it is not paused.
                await engine.begin(2)
                await engine.load(_served(2, count=2))
            else:
                response = await http.post("/update_weight_version", json={"new_version": "2"})
                response.raise_for_status()
            answer = await _generate(http, "mixed")
            if fault == "bucket_outside_a_pause":
                await engine.abort(2)
    generation = next(g for g in server.generations if g.rid == "mixed")
    if fault == "bucket_outside_a_pause":
        assert server.unpaused_updates == ["/update_weights_from_tensor"]
        assert answer["meta_info"]["weight_version"] == "1"
        assert _computed_on(generation.weights_seen, expected) == {"1", "2"}
    else:
        assert answer["meta_info"]["weight_version"] == "2"
        assert _computed_on(generation.weights_seen, expected) == {"1"}
    assert _mislabelled(generation, expected) is not None
