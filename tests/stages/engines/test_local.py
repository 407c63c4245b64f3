"""The embedded local engine: generation, pause modes, validation, bf16/FP8 loading, undo,
and the listener protocol its generation windows are built on.

Tests synchronise on the engine's own counters (``wait_for_tokens``/``wait_for_outputs``)
and never assert on timings.
"""

from __future__ import annotations

import threading

import pytest
import torch

from tests.fakes import fake_broken_model, fake_buckets, small_llama_config
from tests.fakes.local import (
    BATCH,
    NEW_TOKENS,
    RecordingListener,
    complete,
    local_engine,
    new_weights,
)
from weightpipe.stages.bucket import WeightBucket
from weightpipe.stages.engines.base import Engine, EngineError, MeasuresGeneration
from weightpipe.stages.engines.local import GenerationStats, updates
from weightpipe.stages.engines.local.updates import dequantize_into
from weightpipe.stages.fp8 import dequantize_fp8, quantize_fp8

MLP = "model.layers.0.mlp.gate_proj.weight"  # 320x192: partial FP8 blocks both ways
Q = "model.layers.0.self_attn.q_proj.weight"


def bucket(
    tensors: list[tuple[str, torch.Tensor]], version: int = 1, index: int = 0
) -> WeightBucket:
    return WeightBucket(tuple(tensors), index, True, version)


def test_is_seeded_and_knows_its_parameters() -> None:
    first, second, other = local_engine(seed=3), local_engine(seed=3), local_engine(seed=4)
    # Checked by mypy: the protocols Load and sync_weights drive it through.
    engine: Engine = first
    measures: MeasuresGeneration = first
    assert engine.name == "local"
    assert isinstance(measures.open_window().close(), GenerationStats)  # what sync reads
    assert first.default_timeout_s == 60
    assert torch.equal(first.parameter(MLP), second.parameter(MLP))
    assert not torch.equal(first.parameter(MLP), other.parameter(MLP))
    specs = first.parameter_specs()
    assert specs[MLP] == ((320, 192), torch.bfloat16)
    assert "lm_head.weight" in specs
    new = new_weights(first, seed=9)
    assert set(new) == set(specs)
    assert all(new[name].shape == specs[name][0] for name in specs)


async def test_generates_and_tags_outputs_with_the_version() -> None:
    async with local_engine(initial_version=7) as engine:
        window = engine.open_window()
        await engine.wait_for_outputs(2 * BATCH)
        stats = window.close()
        outputs = engine.outputs()
    assert len(outputs) >= 2 * BATCH
    assert [o.request_id for o in outputs] == list(range(len(outputs)))
    for output in outputs:
        assert len(output.tokens) == NEW_TOKENS
        assert output.weight_version == 7
        assert output.finish_reason == "length"
        assert not output.weights_changed
    assert stats.tokens >= 2 * BATCH * NEW_TOKENS
    assert stats.steps >= 2 * NEW_TOKENS
    assert stats.finished >= 2 * BATCH
    assert stats.tokens_per_s > 0
    assert stats.longest_gap_s > 0
    assert stats.paused_s == 0
    assert not engine.running


async def test_same_weights_generate_the_same_tokens() -> None:
    async with local_engine(seed=1) as one:
        await one.wait_for_outputs(BATCH)
        first = one.outputs()[:BATCH]
    async with local_engine(seed=1) as two:
        await two.wait_for_outputs(BATCH)
        second = two.outputs()[:BATCH]
    assert [o.tokens for o in first] == [o.tokens for o in second]


async def test_pause_stops_every_step_until_resume() -> None:
    async with local_engine() as engine:
        await engine.wait_for_tokens(BATCH)
        await engine.pause("in_place")
        assert engine.paused
        frozen = engine.tokens_generated
        # A commit submitted while paused still runs, and no decode step sneaks in.
        await engine.begin(1)
        await engine.load(
            bucket(complete(engine, [(Q, torch.zeros(192, 192, dtype=torch.bfloat16))]))
        )
        await engine.commit(1)
        assert engine.tokens_generated == frozen
        with pytest.raises(EngineError, match="already paused"):
            await engine.pause("abort")
        await engine.resume()
        await engine.wait_for_tokens(frozen + BATCH)
        assert not engine.paused
        assert engine.paused_total_s > 0


LONG = 10_000  # requests that cannot finish while a test looks at them


async def test_pause_abort_finishes_running_requests_as_aborted() -> None:
    async with local_engine(max_new_tokens=LONG) as engine:
        await engine.wait_for_tokens(2 * BATCH)  # at least two steps into the first batch
        await engine.pause("abort")
        aborted = engine.outputs()
        engine.max_new_tokens = NEW_TOKENS
        await engine.resume()
        await engine.wait_for_outputs(2 * BATCH)
        after = engine.outputs()[BATCH : 2 * BATCH]
    assert [o.request_id for o in aborted] == list(range(BATCH))
    assert all(o.finish_reason == "abort" for o in aborted)
    assert all(2 <= len(o.tokens) < LONG for o in aborted)
    assert [o.request_id for o in after] == list(range(BATCH, 2 * BATCH))
    assert all(o.finish_reason == "length" for o in after)


async def test_pause_retract_restarts_requests_from_their_prompts() -> None:
    async with local_engine(max_new_tokens=LONG) as engine:
        await engine.wait_for_tokens(BATCH)
        await engine.pause("retract")
        assert engine.outputs() == []
        engine.max_new_tokens = NEW_TOKENS
        await engine.resume()
        await engine.wait_for_outputs(BATCH)
        first = engine.outputs()[:BATCH]
    assert all(o.retractions == 1 for o in first)
    assert all(len(o.tokens) == NEW_TOKENS for o in first)
    assert [o.request_id for o in first] == list(range(BATCH))


async def test_pause_in_place_keeps_requests_running() -> None:
    async with local_engine(max_new_tokens=LONG) as engine:
        await engine.wait_for_tokens(2 * BATCH)
        await engine.pause("in_place")
        assert engine.outputs() == []
        engine.max_new_tokens = NEW_TOKENS
        await engine.resume()
        await engine.wait_for_outputs(BATCH)
        first = engine.outputs()[:BATCH]
    # Kept its KV cache and tokens: finished at once with the tokens it already had.
    assert all(o.retractions == 0 and o.finish_reason == "length" for o in first)
    assert all(len(o.tokens) >= 2 for o in first)
    assert [o.request_id for o in first] == list(range(BATCH))


async def test_unknown_pause_mode() -> None:
    engine = local_engine()
    with pytest.raises(EngineError, match="unknown pause mode"):
        await engine.pause("sleep")  # type: ignore[arg-type]


async def test_bf16_bucket_commit_and_abort_restore() -> None:
    engine = local_engine()  # not started: changes apply on a worker thread
    new = new_weights(engine, seed=5)
    old_q, old_mlp = engine.parameter(Q), engine.parameter(MLP)

    await engine.begin(1)
    await engine.load(bucket([(Q, new[Q])]))
    assert torch.equal(engine.parameter(Q), old_q)  # staged, not served before the commit
    await engine.abort(1)
    assert torch.equal(engine.parameter(Q), old_q)
    assert await engine.version() == 0

    await engine.begin(2)
    for b in fake_buckets(complete(engine, [(Q, new[Q])]), per_bucket=4, version=2):
        await engine.load(b)
    await engine.commit(2)
    assert await engine.version() == 2
    assert torch.equal(engine.parameter(Q), new[Q])
    assert torch.equal(engine.parameter(MLP), old_mlp)  # sent as it was


async def test_an_incomplete_sync_is_refused_at_commit_listing_what_it_left_out() -> None:
    engine = local_engine()
    new = new_weights(engine, seed=5)
    before = {name: engine.parameter(name) for name in new}
    await engine.begin(1)
    await engine.load(bucket([(Q, new[Q])]))
    with pytest.raises(
        EngineError, match=r"cannot commit v1: the sync left out (\d+) of the"
    ) as info:
        await engine.commit(1)
    left_out = len(new) - 1
    assert f"left out {left_out} of the {len(new)} parameters" in str(info.value)
    assert f"and {left_out - 5} more" in str(info.value)  # five are named
    assert repr(next(n for n in new if n != Q)) in str(info.value)
    assert info.value.tensor is None  # several: the message lists them
    # Nothing switched, the version stays; the sync is still open for the caller's abort.
    assert await engine.version() == 0
    assert all(torch.equal(engine.parameter(n), t) for n, t in before.items())
    await engine.abort(1)

    # One parameter short: named, also as the error's tensor.
    await engine.begin(2)
    norm = "model.norm.weight"
    await engine.load(bucket([(n, t) for n, t in new.items() if n != norm], version=2))
    with pytest.raises(EngineError, match=r"left out 1 of the .* \('model.norm.weight'\)") as one:
        await engine.commit(2)
    assert one.value.tensor == norm
    assert await engine.version() == 0
    await engine.load(bucket([(norm, new[norm])], version=2, index=1))
    await engine.commit(2)
    assert await engine.version() == 2
    assert all(torch.equal(engine.parameter(n), t) for n, t in new.items())


async def test_full_sync_while_generating_moves_the_version_at_commit() -> None:
    async with local_engine() as engine:
        new = new_weights(engine, seed=6)
        await engine.wait_for_tokens(BATCH)
        await engine.begin(1)
        for b in fake_buckets(new, per_bucket=8, version=1):
            await engine.load(b)
        before = engine.outputs()
        assert all(o.weight_version == 0 for o in before)
        assert await engine.version() == 0
        await engine.commit(1)
        done = len(engine.outputs())
        await engine.wait_for_outputs(done + 2 * BATCH)
        after = engine.outputs()[-BATCH:]
    assert all(o.weight_version == 1 for o in after)
    assert all(torch.equal(engine.parameter(n), t) for n, t in new.items())


@pytest.mark.parametrize(
    ("method", "suffix", "scale_shape"),
    [("block", "_scale_inv", (3, 2)), ("channel", "_scale", (320, 1)), ("tensor", "_scale", ())],
)
async def test_fp8_bucket_is_dequantised_like_the_fp8_module_does(
    method: str, suffix: str, scale_shape: tuple[int, ...]
) -> None:
    engine = local_engine()
    weight = torch.randn(320, 192, dtype=torch.bfloat16)
    q, scale = quantize_fp8(weight, method=method)  # type: ignore[arg-type]
    assert tuple(scale.shape) == scale_shape  # block: partial edge blocks both ways
    await engine.begin(1)
    await engine.load(bucket(complete(engine, [(MLP, q), (MLP + suffix, scale)])))
    await engine.commit(1)
    loaded = engine.parameter(MLP)
    # Bit for bit what the demo's verification and the quantizer's own checks compute.
    assert torch.equal(loaded, dequantize_fp8(q, scale, dtype=torch.bfloat16))
    # FP8 e4m3 keeps 3 mantissa bits: within 1/16 relative of the scale group's maximum.
    error = (loaded.float() - weight.float()).abs().max().item()
    assert error <= weight.float().abs().max().item() / 16


EMBED = "model.embed_tokens.weight"  # 512x192 bf16: several staging chunks below
NORM = "model.layers.0.input_layernorm.weight"


def poisoned(
    name: str, shape: tuple[int, ...], at: tuple[int, ...], value: float
) -> list[tuple[str, torch.Tensor]]:
    tensor = torch.randn(shape).to(torch.bfloat16)
    tensor[at] = value
    return [(name, tensor)]


def fp8_poisoned(*, code_nan: bool) -> list[tuple[str, torch.Tensor]]:
    q, scale = quantize_fp8(torch.randn(320, 192))
    if code_nan:
        q.view(torch.uint8)[300, 7] = 0x7F  # e4m3fn's NaN, in the last band of rows
    else:
        scale[2, 1] = float("inf")  # the last band's second block: codes x Inf
    return [(MLP, q), (MLP + "_scale_inv", scale)]


@pytest.mark.parametrize(
    ("tensors", "culprit", "message"),
    [
        pytest.param(
            poisoned(NORM, (192,), (5,), float("nan")),
            NORM,
            r"holds 1 NaN and 0 Inf values \(the first at \[5\]\)",
            id="nan-norm",
        ),
        pytest.param(
            poisoned(EMBED, (512, 192), (500, 3), float("-inf")),  # in the last of several chunks
            EMBED,
            r"holds 0 NaN and 1 Inf values \(the first at \[500, 3\]\)",
            id="inf-late-chunk",
        ),
        pytest.param(
            fp8_poisoned(code_nan=True),
            MLP,
            r"holds 1 NaN and 0 Inf values \(the first at \[300, 7\]\)",
            id="fp8-nan-code",
        ),
        pytest.param(fp8_poisoned(code_nan=False), MLP, r"NaN and \d+ Inf", id="fp8-inf-scale"),
    ],
)
async def test_a_non_finite_value_is_refused_while_staging(
    tensors: list[tuple[str, torch.Tensor]],
    culprit: str,
    message: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(updates, "CHUNK_BYTES", 16 << 10)  # the embedding in 13 chunks
    engine = local_engine()
    good = (Q, torch.zeros(192, 192, dtype=torch.bfloat16))
    await engine.begin(1)
    with pytest.raises(EngineError, match=message) as info:
        await engine.load(bucket([good, *tensors]))
    assert info.value.tensor == culprit
    assert "a non-finite weight fails the sync" in str(info.value)
    # Nothing of the bucket was staged: each of its tensors can still be sent, once.
    await engine.load(bucket(complete(engine, [good]), index=1))
    await engine.commit(1)
    assert await engine.version() == 1


async def test_large_finite_values_whose_sum_overflows_are_accepted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The check sums each band: a sum that overflows is not proof of an Inf, so the
    # values themselves are looked at before a tensor is refused.
    monkeypatch.setattr(updates, "CHUNK_BYTES", 16 << 10)
    engine = local_engine()
    huge = torch.full((512, 192), 3.0e38, dtype=torch.bfloat16)
    assert not torch.isfinite(huge.sum())
    await engine.begin(1)
    await engine.load(bucket(complete(engine, [(EMBED, huge)])))
    await engine.commit(1)
    assert torch.equal(engine.parameter(EMBED), huge)


async def test_fp8_with_a_scale_of_another_block_size_is_refused() -> None:
    engine = local_engine(block_size=(64, 64))
    q, scale = quantize_fp8(torch.randn(320, 192))  # [128, 128] blocks: scale (3, 2)
    await engine.begin(1)
    with pytest.raises(EngineError, match=r"needs \[5, 3\] \(block \[64, 64\]\)") as info:
        await engine.load(bucket([(MLP, q), (MLP + "_scale_inv", scale)]))
    assert info.value.tensor == MLP


def fp8(shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    q, scale = quantize_fp8(torch.randn(shape))
    return q, scale


def bad_buckets() -> list[object]:
    q, scale = fp8((320, 192))
    good = (Q, torch.zeros(192, 192, dtype=torch.bfloat16))
    return [
        pytest.param(
            [good, ("model.layers.0.self_attn.q_proj.weights", torch.zeros(192, 192))],
            "model.layers.0.self_attn.q_proj.weights",
            "unknown parameter; did you mean",
            id="unknown-name",
        ),
        pytest.param(
            [good, (MLP, torch.zeros(192, 320, dtype=torch.bfloat16))],
            MLP,
            r"shape \(192, 320\) does not match the parameter's \(320, 192\)",
            id="shape",
        ),
        pytest.param(
            [good, (MLP, torch.zeros(320, 192, dtype=torch.float32))],
            MLP,
            "dtype torch.float32, expected torch.bfloat16",
            id="dtype",
        ),
        pytest.param(
            [good, (MLP, q)],
            MLP,
            "without 'model.layers.0.mlp.gate_proj.weight_scale_inv' or "
            "'model.layers.0.mlp.gate_proj.weight_scale'",
            id="fp8-without-scale",
        ),
        pytest.param(
            [good, (MLP, q), (MLP + "_scale_inv", scale.double())],
            MLP + "_scale_inv",
            "scale dtype torch.float64",
            id="scale-dtype",
        ),
        pytest.param(
            [good, (MLP, q), (MLP + "_scale_inv", torch.ones(2, 2))],
            MLP,
            r"weight_scale_inv' has shape \(2, 2\); a \(320, 192\) weight needs \[3, 2\]",
            id="scale-shape",
        ),
        pytest.param(
            [good, (MLP + "_scale_inv", scale)],
            MLP + "_scale_inv",
            "scale without its float8_e4m3fn weight",
            id="orphan-scale",
        ),
        pytest.param(
            [good, ("model.nope_scale_inv", scale)],
            "model.nope_scale_inv",
            "scale of an unknown parameter",
            id="orphan-unknown-scale",
        ),
        pytest.param(
            [good, (MLP, q), (MLP + "_scale_inv", scale), (MLP + "_scale", torch.ones(()))],
            MLP,
            "with two scales",
            id="two-scales",
        ),
        pytest.param(
            [good, (MLP, q), (MLP + "_scale", torch.ones(3, 2))],
            MLP,
            r"weight_scale' has shape \(3, 2\); a \(320, 192\) weight needs \[\] or \[320, 1\]",
            id="block-scale-under-the-channel-name",
        ),
        pytest.param([good, good], Q, "appears twice in one bucket", id="duplicate"),
    ]


@pytest.mark.parametrize(("tensors", "culprit", "message"), bad_buckets())
async def test_bad_bucket_is_refused_before_anything_is_applied(
    tensors: list[tuple[str, torch.Tensor]], culprit: str, message: str
) -> None:
    engine = local_engine()
    old_q = engine.parameter(Q)
    await engine.begin(1)
    with pytest.raises(EngineError, match=message) as info:
        await engine.load(bucket(tensors))
    assert info.value.tensor == culprit
    assert info.value.engine == "local"
    assert torch.equal(engine.parameter(Q), old_q)  # the valid tensor before it: untouched
    await engine.abort(1)
    assert await engine.version() == 0


async def test_protocol_misuse_is_refused() -> None:
    engine = local_engine()
    good = bucket([(Q, torch.zeros(192, 192, dtype=torch.bfloat16))], version=1)
    with pytest.raises(EngineError, match="outside a sync"):
        await engine.load(good)
    with pytest.raises(EngineError, match="cannot commit v1: no sync is open"):
        await engine.commit(1)
    await engine.abort(1)  # nothing open: a no-op
    await engine.begin(1)
    with pytest.raises(EngineError, match="the sync of v1 is open"):
        await engine.begin(2)
    with pytest.raises(EngineError, match="does not belong to the open sync v1"):
        await engine.load(bucket(list(good.tensors), version=2))
    await engine.load(good)
    with pytest.raises(EngineError, match="loaded twice in one sync") as info:
        await engine.load(good)
    assert info.value.tensor == Q
    with pytest.raises(EngineError, match="cannot commit v2: the open sync is v1"):
        await engine.commit(2)
    await engine.load(bucket(complete(engine, list(good.tensors))[1:], version=1, index=1))
    await engine.commit(1)
    assert await engine.version() == 1


async def test_start_twice_and_stop_twice() -> None:
    engine = local_engine()
    await engine.start()
    with pytest.raises(RuntimeError, match="already running"):
        await engine.start()
    await engine.stop()
    await engine.stop()
    assert not engine.running


async def test_waiting_on_a_paused_engine_times_out_with_a_clear_error() -> None:
    engine = local_engine()
    await engine.pause("abort")  # not started: pauses at once
    with pytest.raises(EngineError, match=r"waited 0.01 s for 1 tokens; have 0 \(paused\)"):
        await engine.wait_for_tokens(1, timeout_s=0.01)


async def test_tied_weights_answer_to_both_names() -> None:
    engine = local_engine(config=small_llama_config(tie_word_embeddings=True), batch_size=1)
    specs = engine.parameter_specs()
    assert specs["lm_head.weight"] == specs["model.embed_tokens.weight"]
    new = torch.randn(specs["lm_head.weight"][0]).to(torch.bfloat16)
    await engine.begin(1)
    sync = complete(engine, [("lm_head.weight", new)])
    assert "model.embed_tokens.weight" not in dict(sync)  # one parameter, sent once
    await engine.load(bucket(sync))
    await engine.commit(1)  # complete: the tied weight came under one of its names
    assert torch.equal(engine.parameter("model.embed_tokens.weight"), new)
    # Under both names in one sync it would be written twice, the last silently winning.
    await engine.begin(2)
    with pytest.raises(EngineError, match=r"appears twice in one bucket.*tied") as info:
        await engine.load(
            bucket([("lm_head.weight", new), ("model.embed_tokens.weight", new)], version=2)
        )
    assert info.value.tensor == "model.embed_tokens.weight"
    await engine.load(bucket([("lm_head.weight", new)], version=2))
    with pytest.raises(EngineError, match="loaded twice in one sync"):
        await engine.load(bucket([("model.embed_tokens.weight", new)], version=2, index=1))
    await engine.abort(2)


async def test_loaded_storage_is_a_copy_of_the_bucket() -> None:
    engine = local_engine()
    source = torch.randn(192, 192).to(torch.bfloat16)
    await engine.begin(1)
    await engine.load(bucket(complete(engine, [(Q, source)])))
    await engine.commit(1)
    source.zero_()  # a producer reusing its buffer must not reach into the engine
    assert not torch.equal(engine.parameter(Q), source)


@pytest.mark.parametrize("shape", [(1, 1), (128, 128), (129, 257), (300, 5), (5, 300)])
def test_banded_dequantisation_is_bit_identical_to_one_call(shape: tuple[int, int]) -> None:
    weight = torch.randn(shape) * 3
    q, scale = quantize_fp8(weight)
    out = torch.empty(shape, dtype=torch.bfloat16)
    dequantize_into(out, q, scale, (128, 128), "w")
    assert torch.equal(out, dequantize_fp8(q, scale, dtype=torch.bfloat16))


async def test_a_failed_generation_thread_fails_every_later_call() -> None:
    engine = local_engine()
    engine.model = fake_broken_model
    async with engine:
        with pytest.raises(EngineError, match="generation failed: RuntimeError: fake model"):
            await engine.wait_for_tokens(1)
        with pytest.raises(EngineError, match="generation failed"):
            await engine.begin(1)
        with pytest.raises(EngineError, match="generation failed"):
            await engine.pause("abort")
    assert await engine.version() == 0


async def test_a_listener_hears_steps_writes_and_pauses_until_removed() -> None:
    listener = RecordingListener()
    engine = local_engine()
    engine.add_listener(listener)  # before start: it hears the very first step
    async with engine:
        await engine.wait_for_outputs(BATCH)
        await engine.pause("in_place")
        await engine.begin(1)
        await engine.load(
            bucket(complete(engine, [(Q, torch.zeros(192, 192, dtype=torch.bfloat16))]))
        )
        await engine.commit(1)
        await engine.resume()
        await engine.wait_for_tokens(engine.tokens_generated + BATCH)
        engine.remove_listener(listener)
        heard = len(listener.events)
        await engine.wait_for_tokens(engine.tokens_generated + 2 * BATCH)
    names = listener.names()
    assert len(listener.events) == heard  # nothing after remove_listener
    # The first batch: a prefill and decode steps of BATCH tokens each; its last step
    # finishes the batch (reported before the step itself).
    assert names[: NEW_TOKENS + 1] == ["step"] * (NEW_TOKENS - 1) + ["finish", "step"]
    assert listener.events[NEW_TOKENS - 1] == ("finish", BATCH)
    assert all(value == BATCH for name, value in listener.events if name == "step")
    # Paused between two steps; the bucket was staged off the thread, the commit switched
    # it in on the thread while paused.
    paused, resumed = names.index("pause"), names.index("resume")
    assert names[paused : resumed + 1] == ["pause", "write", "resume"]
    assert "step" in names[resumed:]
    assert listener.threads == {"weightpipe-local-engine", "MainThread"}  # resume: caller


async def test_a_window_opened_during_a_pause_counts_it_whole() -> None:
    async with local_engine() as engine:
        await engine.wait_for_tokens(BATCH)
        await engine.pause("in_place")
        inside = engine.open_window()
        spanning = inside.snapshot()
        await engine.resume()
        await engine.wait_for_tokens(engine.tokens_generated + BATCH)
        after = inside.close()
    assert spanning.tokens == 0
    assert spanning.paused_s == spanning.elapsed_s  # paused from its opening to now
    assert after.tokens >= BATCH
    assert 0 < after.paused_s < after.elapsed_s


async def test_a_closed_window_stops_listening() -> None:
    async with local_engine() as engine:
        window = engine.open_window()
        await engine.wait_for_tokens(BATCH)
        closed = window.close()
        await engine.wait_for_tokens(engine.tokens_generated + 2 * BATCH)
        later = window.snapshot()
        again = window.close()
    assert closed.tokens >= BATCH
    assert later.tokens == closed.tokens
    assert later.steps == closed.steps
    assert again == closed


async def test_window_counts_each_weight_write_of_a_sync() -> None:
    async with local_engine() as engine:
        new = new_weights(engine, seed=7)
        window = engine.open_window()
        await engine.begin(1)
        buckets = fake_buckets(new, per_bucket=8, version=1)
        for b in buckets:
            await engine.load(b)
        await engine.commit(1)
        stats: GenerationStats = window.close()
    assert len(buckets) > 1
    assert stats.weight_writes == 1  # the buckets were staged; only the commit switched
    assert stats.swap_s == stats.weight_write_s > 0


async def test_a_failing_listener_fails_the_engine() -> None:
    class Broken(RecordingListener):
        def on_step(self, now: float, tokens: int, versions: frozenset[int | None]) -> None:
            raise RuntimeError("fake listener failure")

    async with local_engine() as engine:
        engine.add_listener(Broken())
        with pytest.raises(EngineError, match="generation failed: RuntimeError: fake listener"):
            await engine.wait_for_tokens(1)


def test_a_block_size_that_is_not_two_positive_ints_is_refused() -> None:
    with pytest.raises(ValueError, match=r"block_size must be two positive ints"):
        local_engine(block_size=(128.5, 128))
    assert local_engine(block_size=[64, 64]).block_size == (64, 64)  # a config file's list


async def test_buckets_are_staged_off_the_generation_thread_and_the_event_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Dequantising and copying (what a bucket costs) must not run where it would stall
    # decode steps or the event loop; only the commit's switch runs between two steps.
    staged_on: set[str] = set()
    real_copy = updates.WeightUpdates._copy

    def copy(self: updates.WeightUpdates, dst: torch.Tensor, src: torch.Tensor) -> None:
        staged_on.add(threading.current_thread().name)
        real_copy(self, dst, src)

    monkeypatch.setattr(updates.WeightUpdates, "_copy", copy)
    listener = RecordingListener()
    async with local_engine() as engine:
        engine.add_listener(listener)
        q, scale = quantize_fp8(torch.randn(320, 192))
        await engine.wait_for_tokens(BATCH)
        await engine.begin(1)
        sync = complete(engine, [(MLP, q), (MLP + "_scale_inv", scale)])
        for b in fake_buckets(sync, per_bucket=4, version=1):
            await engine.load(b)
        await engine.commit(1)
    assert staged_on
    assert not staged_on & {"weightpipe-local-engine", threading.current_thread().name}
    assert listener.names().count("write") == 1  # the commit, on the generation thread


async def test_loaded_buckets_switch_together_at_commit_and_tokens_carry_versions() -> None:
    listener = RecordingListener()
    async with local_engine(max_new_tokens=LONG, track_versions=True) as engine:
        engine.add_listener(listener)
        window = engine.open_window()
        new = new_weights(engine, seed=8)
        await engine.wait_for_tokens(BATCH)
        await engine.begin(1)
        for b in fake_buckets(new, per_bucket=4, version=1):
            await engine.load(b)
            # Steps run between buckets, and still on the old weights only.
            await engine.wait_for_tokens(engine.tokens_generated + BATCH)
        assert torch.equal(engine.parameter(Q), local_engine().parameter(Q))
        await engine.commit(1)
        await engine.wait_for_tokens(engine.tokens_generated + 2 * BATCH)
        engine.max_new_tokens = 1  # the running batch finishes at its next step
        await engine.wait_for_outputs(BATCH)
        stats = window.close()
        spanning = engine.outputs()[0]
    assert all(len(read) == 1 for read in listener.step_versions)
    assert frozenset({0}) in listener.step_versions
    assert listener.step_versions[-1] == frozenset({1})
    assert stats.mixed_steps == 0
    assert spanning.weights_changed and spanning.started_version == 0
    assert len(spanning.token_versions) == len(spanning.tokens)
    (switch,) = spanning.switches  # one sync: one switch, from v0 to v1
    assert set(spanning.token_versions[:switch]) == {0}
    assert set(spanning.token_versions[switch:]) == {1}


async def test_a_storage_switched_behind_the_engine_shows_as_a_mixed_step() -> None:
    # The check reads what each step really read: a parameter whose storage was replaced
    # outside the transaction (an untagged storage) makes every step read two versions.
    engine = local_engine(track_versions=True)
    dict(engine.model.named_parameters())[Q].data = torch.zeros(192, 192, dtype=torch.bfloat16)
    async with engine:
        window = engine.open_window()
        await engine.wait_for_tokens(2 * BATCH)
        stats = window.close()
    assert stats.mixed_steps == stats.steps > 0
    untracked = local_engine()
    assert untracked.open_window().close().mixed_steps is None
