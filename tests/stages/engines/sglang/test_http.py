"""SGLangHTTPEngine against SGLangHTTPDouble, whose decoding is SGLang's own code.

Every sync runs through the Load stage (``drive.load_sync`` / ``drive.failed_sync``), so
the engine sees Load's order of calls and Load's deadline. Covers one full sync on both
SGLang behaviours (0.5.23 sessions, 0.5.12 none) and both payload formats, bit-identical
bf16 + FP8 + fp32 scales in one bucket, TP > 1, the request sequence (flush_cache false
per bucket, one flush and the version at commit), session detection and its overrides,
bearer auth, pause modes, retries only on retryable answers and only within Load's
deadline, a failed ``/end_weight_update`` closed by the abort that follows, and every
fault ending in one clear EngineError with the version unchanged.
"""

from __future__ import annotations

import logging
import math
import re
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import torch

from tests.fakes.sglang_http import SGLangHTTPDouble
from tests.fakes.sglang_model import SessionRefusal
from tests.helpers import bits
from tests.stages.engines.sglang.drive import WaitRecordingEvent, failed_sync, load_sync
from weightpipe.pipeline import Pipeline
from weightpipe.stages._layout import flatten, unflatten
from weightpipe.stages.bucket import WeightBucket
from weightpipe.stages.engines.base import Engine, EngineError
from weightpipe.stages.engines.sglang.http import SGLangHTTPEngine, parse_version, uses_sessions
from weightpipe.stages.fetch import Fetch
from weightpipe.stages.load import Load
from weightpipe.stages.quantize import Fp8Quantize
from weightpipe.stages.sync import SyncReport, sync_weights


def _model() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(200, 130, generator=g)
    return [
        # odd-length bf16 first: an unaligned packer would break the fp32 view after it
        ("model.norm.weight", torch.randn(13, generator=g).to(torch.bfloat16)),
        ("model.layers.0.mlp.down_proj.weight", w.clamp(-448, 448).to(torch.float8_e4m3fn)),
        ("model.layers.0.mlp.down_proj.weight_scale_inv", torch.rand(2, 2, generator=g)),
        ("model.embed_tokens.weight", torch.randn(7, 9, generator=g).to(torch.bfloat16)),
        ("lm_head.weight", torch.randn(9, 7, generator=g).to(torch.bfloat16)),
    ]


def _spec() -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {n: (tuple(t.shape), t.dtype) for n, t in _model()}


def _buckets(
    version: int, tensors: list[tuple[str, torch.Tensor]] | None = None
) -> list[WeightBucket]:
    tensors = _model() if tensors is None else tensors
    halves = [tensors[:3], tensors[3:]]
    return [
        WeightBucket(tuple(h), index=i, is_last=i == len(halves) - 1, version=version)
        for i, h in enumerate(halves)
    ]


@pytest.fixture
def double() -> Iterator[SGLangHTTPDouble]:
    with SGLangHTTPDouble(_spec()) as server:
        yield server


@pytest.fixture
def double_0512() -> Iterator[SGLangHTTPDouble]:
    with SGLangHTTPDouble(_spec(), behave_like="0.5.12") as server:
        yield server


def _assert_applied(server: SGLangHTTPDouble, tensors: list[tuple[str, torch.Tensor]]) -> None:
    assert set(server.weights) == {n for n, _ in tensors}
    for name, sent in tensors:
        got = server.weights[name]
        assert got.dtype == sent.dtype, name
        assert got.shape == sent.shape, name
        assert torch.equal(bits(got), bits(sent)), name


def test_engine_satisfies_protocol() -> None:
    assert isinstance(SGLangHTTPEngine("http://127.0.0.1:1"), Engine)


@pytest.mark.parametrize("behave_like", ["0.5.23", "0.5.12"])
@pytest.mark.parametrize("load_format", ["flattened_bucket", "named_tensors"])
async def test_sync_is_bit_identical_on_both_sglang_versions(
    behave_like: str, load_format: str
) -> None:
    with SGLangHTTPDouble(_spec(), behave_like=behave_like) as server:  # type: ignore[arg-type]
        async with SGLangHTTPEngine(server.url, load_format=load_format) as engine:  # type: ignore[arg-type]
            assert await engine.version() is None  # "default" is not a number
            report = await load_sync(engine, _buckets(7))
            assert report.committed
            assert await engine.version() == 7
        _assert_applied(server, _model())
        assert server.weight_version == "7"
        assert not server.session_open


async def test_request_sequence_on_0523(double: SGLangHTTPDouble) -> None:
    async with SGLangHTTPEngine(double.url) as engine:
        await load_sync(engine, _buckets(3), mode="prefetch", pause_mode="retract")
    assert double.paths() == [
        "/model_info",  # Load checks the version before touching the engine
        "/server_info",  # asked once, before the pause (prepare)
        "/pause_generation",
        "/begin_weight_update",
        "/update_weights_from_tensor",
        "/update_weights_from_tensor",  # carries the flush
        "/end_weight_update",
        "/update_weight_version",  # never folded in a session: only after the close
        "/continue_generation",
    ]
    updates = [c.body for c in double.calls if c.path == "/update_weights_from_tensor"]
    assert [body["flush_cache"] for body in updates] == [False, True]
    assert all(body["load_format"] == "flattened_bucket" for body in updates)
    assert all("weight_version" not in body for body in updates)  # set once, at commit
    version_call = next(c for c in double.calls if c.path == "/update_weight_version")
    assert version_call.body == {"new_version": "3", "abort_all_requests": False}


async def test_request_sequence_on_0512_folds_flush_and_version(
    double_0512: SGLangHTTPDouble,
) -> None:
    async with SGLangHTTPEngine(double_0512.url) as engine:
        await load_sync(engine, _buckets(3), mode="prefetch", pause_mode="retract")
        assert await engine.version() == 3
    paths = double_0512.paths()
    inside = paths[paths.index("/pause_generation") + 1 : paths.index("/continue_generation")]
    # Without a session the last update is the last step: it carries flush and version.
    assert inside == ["/update_weights_from_tensor", "/update_weights_from_tensor"]
    updates = [c.body for c in double_0512.calls if c.path == "/update_weights_from_tensor"]
    assert [body["flush_cache"] for body in updates] == [False, True]
    assert [body.get("weight_version") for body in updates] == [None, "3"]
    assert double_0512.weight_version == "3"
    _assert_applied(double_0512, _model())


async def test_a_server_that_does_not_confirm_the_version_is_sent_it_separately() -> None:
    with SGLangHTTPDouble(_spec(), behave_like="0.5.12", confirms_weight_version=False) as server:
        async with SGLangHTTPEngine(server.url) as engine:
            await load_sync(engine, _buckets(1), mode="prefetch")
            await load_sync(engine, _buckets(2), mode="prefetch")
            assert await engine.version() == 2
        updates = [c.body for c in server.calls if c.path == "/update_weights_from_tensor"]
        # tried once, unconfirmed: set with /update_weight_version, and not folded again
        assert [body.get("weight_version") for body in updates] == [None, "1", None, None]
        versions = [c.body["new_version"] for c in server.calls if c.path.endswith("version")]
        assert versions == ["1", "2"]


async def test_an_old_or_unknown_server_is_never_sent_weight_version() -> None:
    with SGLangHTTPDouble(_spec(), behave_like="0.5.12", version_in_server_info=False) as server:
        async with SGLangHTTPEngine(server.url) as engine:
            await load_sync(engine, _buckets(1), mode="prefetch")
            assert await engine.version() == 1
        updates = [c.body for c in server.calls if c.path == "/update_weights_from_tensor"]
        assert all("weight_version" not in body for body in updates)
        assert "/update_weight_version" in server.paths()


# -- the pause holds only what the server must do paused ----------------------------------


@pytest.mark.parametrize("prefetch_bytes", [0, None])
async def test_payloads_are_encoded_before_the_pause(
    double: SGLangHTTPDouble, prefetch_bytes: int | None
) -> None:
    async with SGLangHTTPEngine(double.url) as engine:
        load = Load(engine, mode="prefetch", prefetch_bytes=prefetch_bytes)
        await Pipeline([load], depth=2).run(_buckets(1))
    kinds = [call.kind for call in load.report.calls]
    paused = kinds.index("pause")
    # Every bucket of a whole-sync prefetch, else the first one, was encoded first; the
    # first call inside the pause hands the sync to the server.
    assert kinds[:paused].count("prepare") == (2 if prefetch_bytes is None else 1)
    assert kinds[paused + 1] == "begin"
    assert kinds[-1] == "resume"
    paths = double.paths()
    assert paths.index("/server_info") < paths.index("/pause_generation")  # asked first
    _assert_applied(double, _model())


async def test_pause_phases_add_up_to_the_hard_pause(double: SGLangHTTPDouble) -> None:
    async with SGLangHTTPEngine(double.url) as engine:
        report = await load_sync(engine, _buckets(1), mode="prefetch")
    phases = report.pause_phases
    parts = phases.as_dict()
    assert set(parts) == {"first_payload", "engine_calls", "between_calls", "resume"}
    assert all(value >= 0.0 for value in parts.values())
    assert math.isclose(sum(parts.values()), report.hard_pause_s, rel_tol=1e-9, abs_tol=1e-12)
    assert phases.engine_calls_s > 0.0 and phases.resume_s > 0.0
    # The calls inside the pause (begin, two updates, commit) are the engine_calls part.
    paused = [c for c in report.calls if c.kind in {"begin", "load", "commit"}]
    assert math.isclose(
        phases.engine_calls_s, sum(c.end_s - c.start_s for c in paused), rel_tol=1e-9
    )


# -- no update reaches a generating server ------------------------------------------------


@pytest.mark.parametrize("mode", ["in_flight", "prefetch", "pause"])
async def test_no_update_arrives_while_the_server_generates(
    double: SGLangHTTPDouble, mode: str
) -> None:
    async with SGLangHTTPEngine(double.url) as engine:
        for version in (1, 2, 3):
            report = await load_sync(engine, _buckets(version), mode=mode)  # type: ignore[arg-type]
            assert report.committed
    assert double.paths().count("/update_weights_from_tensor") == 6
    assert double.unpaused_updates == []
    assert not double.updated_while_generating
    assert double.paused is None


async def test_in_flight_never_aborts_or_retracts_requests(double: SGLangHTTPDouble) -> None:
    async with SGLangHTTPEngine(double.url) as engine:
        report = await load_sync(engine, _buckets(1), mode="in_flight", pause_mode="retract")
    assert report.pause_mode == "in_place"
    pauses = [c.body for c in double.calls if c.path == "/pause_generation"]
    assert pauses == [{"mode": "in_place"}]
    assert report.hard_pause_s > 0.0


async def test_the_recorder_flags_an_update_sent_without_a_pause(
    double: SGLangHTTPDouble,
) -> None:
    # The path Load no longer takes (buckets straight into a generating server) is caught.
    async with SGLangHTTPEngine(double.url) as engine:
        await engine.begin(1)
        first, second = _buckets(1)
        await engine.load(first)
        await engine.pause("in_place")
        await engine.load(second)
        await engine.commit(1)
        await engine.resume()
    assert double.unpaused_updates == ["/update_weights_from_tensor"]
    assert double.updated_while_generating


async def test_no_sessions_on_0512(double_0512: SGLangHTTPDouble) -> None:
    async with SGLangHTTPEngine(double_0512.url) as engine:
        await load_sync(engine, _buckets(1))
        assert engine.server_version == "0.5.12"
    paths = double_0512.paths()
    info = [path for path in paths if path.endswith("server_info")]
    assert info == ["/server_info", "/get_server_info"]  # falls back to the old name
    assert "/begin_weight_update" not in paths
    assert "/end_weight_update" not in paths


async def test_tensor_parallel_ranks_each_decode_their_own_payload() -> None:
    with SGLangHTTPDouble(_spec(), tp_size=2) as server:
        async with SGLangHTTPEngine(server.url, tp_size=2) as engine:
            await load_sync(engine, _buckets(1))
        assert len(server.updates) == 2
        for per_rank in server.updates:
            assert len(per_rank) == 2
            for (n0, t0), (n1, t1) in zip(per_rank[0], per_rank[1], strict=True):
                assert n0 == n1
                assert torch.equal(bits(t0), bits(t1))
        _assert_applied(server, _model())


async def test_flattened_buffer_from_fetch_is_sent_as_is(double: SGLangHTTPDouble) -> None:
    tensors = _model()
    buffer, layout = flatten(tensors)  # Fetch's flat buffer, its default alignment
    views = tuple(unflatten(buffer, layout))
    bucket = WeightBucket(views, index=0, is_last=True, version=2, buffer=buffer)
    async with SGLangHTTPEngine(double.url) as engine:
        await load_sync(engine, [bucket])
    _assert_applied(double, tensors)


async def test_namespace_metadata_decodes_with_sglang(double: SGLangHTTPDouble) -> None:
    async with SGLangHTTPEngine(double.url, metadata="namespace") as engine:
        await load_sync(engine, _buckets(4))
    _assert_applied(double, _model())


async def test_cuda_work_is_waited_for_off_the_loop_before_the_post(
    double: SGLangHTTPDouble,
) -> None:
    # The server reads CUDA-IPC handles on its own streams: the bucket's ready event must
    # be waited on before the POST, and in a worker thread, never on the event loop.
    event = WaitRecordingEvent(lambda: double.paths().count("/update_weights_from_tensor"))
    first, second = _buckets(1)
    async with SGLangHTTPEngine(double.url) as engine:
        await load_sync(engine, [first.with_tensors(first.tensors, ready=event), second])
    assert event.host_waits == 1
    ((thread, updates_before),) = event.waits
    assert thread != threading.get_ident()
    assert updates_before == 0
    _assert_applied(double, _model())


# -- sessions: detection and overrides ---------------------------------------------------


def test_version_parsing() -> None:
    assert parse_version("0.5.23.post1") == (0, 5, 23)
    assert parse_version("v0.5.12rc0") == (0, 5, 12)
    assert parse_version("unknown") is None
    assert uses_sessions("0.5.23") is True
    assert uses_sessions("0.6.0") is True
    assert uses_sessions("0.5.12") is False
    assert uses_sessions("") is None


@pytest.mark.parametrize("behave_like", ["0.5.23", "0.5.12"])
async def test_sessions_probed_when_server_hides_its_version(behave_like: str) -> None:
    with SGLangHTTPDouble(
        _spec(),
        behave_like=behave_like,  # type: ignore[arg-type]
        version_in_server_info=False,
    ) as server:
        async with SGLangHTTPEngine(server.url) as engine:
            await load_sync(engine, _buckets(5))
            assert await engine.version() == 5
        assert ("/end_weight_update" in server.paths()) == (behave_like == "0.5.23")


async def test_session_off_against_0523_gets_sglangs_refusal(double: SGLangHTTPDouble) -> None:
    async with SGLangHTTPEngine(double.url, session="off") as engine:
        error, _ = await failed_sync(engine, _buckets(1))
        assert "must run between begin_weight_update" in str(error)
        assert await engine.version() is None
    assert SessionRefusal.endswith("end_weight_update()")
    assert double.paths().count("/update_weights_from_tensor") == 1  # refusal not retried


async def test_session_on_against_0512_names_the_missing_endpoint(
    double_0512: SGLangHTTPDouble,
) -> None:
    async with SGLangHTTPEngine(double_0512.url, session="on") as engine:
        error, _ = await failed_sync(engine, _buckets(1))
    assert re.search(r"/begin_weight_update does not exist", str(error))
    # forced: no probe, and no session detection from the version it reports
    assert double_0512.paths().count("/begin_weight_update") == 1
    assert engine.needs_session() is True


async def test_failed_end_weight_update_is_closed_by_the_abort(double: SGLangHTTPDouble) -> None:
    # The session stays marked open until the server confirms the close, so Load's abort
    # after the failed commit sends /end_weight_update again and the session is closed.
    double.refuse("/end_weight_update", "the scheduler is busy", times=1)
    async with SGLangHTTPEngine(double.url) as engine:
        error, report = await failed_sync(engine, _buckets(1))
        assert "/end_weight_update failed (400): the scheduler is busy" in str(error)
        assert not error.retryable
        assert report.aborted
        assert report.abort_error is None
        assert not engine.session_is_open()
        assert await engine.version() is None
    assert double.paths().count("/end_weight_update") == 2  # the commit's, then the abort's
    assert not double.session_open
    assert "/update_weight_version" not in double.paths()


# -- auth, pause, flush -------------------------------------------------------------------


async def test_bearer_api_key() -> None:
    with SGLangHTTPDouble(_spec(), api_key="s3cret") as server:
        async with SGLangHTTPEngine(server.url, api_key="s3cret") as engine:
            await load_sync(engine, _buckets(1))
        assert all(c.authorized for c in server.calls)
        async with SGLangHTTPEngine(server.url, api_key="wrong", backoff_s=0) as engine:
            error, _ = await failed_sync(engine, _buckets(2))
            assert "401" in str(error)
        assert [c.authorized for c in server.calls].count(False) == 1  # not retried


@pytest.mark.parametrize("mode", ["abort", "retract", "in_place"])
async def test_pause_modes(double: SGLangHTTPDouble, mode: str) -> None:
    async with SGLangHTTPEngine(double.url) as engine:
        await load_sync(engine, _buckets(1), mode="pause", pause_mode=mode)  # type: ignore[arg-type]
        assert double.paused is None  # resumed after the commit
    paths = double.paths()
    assert paths.index("/pause_generation") < paths.index("/begin_weight_update")
    assert paths.index("/continue_generation") > paths.index("/update_weight_version")
    pause = next(c for c in double.calls if c.path == "/pause_generation")
    assert pause.body == {"mode": mode}


async def test_flush_refused_while_requests_run_in_place(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Under an in_place pause the requests stay in the batch, and SGLang flushes only when
    # none runs: the folded flush is refused, the weights are in, and the sync commits
    # with the refusal logged instead of failing (and keeping the server paused) forever.
    with SGLangHTTPDouble(_spec(), running_requests=2) as server:
        async with SGLangHTTPEngine(server.url, retries=2, backoff_s=0) as engine:
            with caplog.at_level(logging.WARNING):
                report = await load_sync(engine, _buckets(1), mode="in_flight")
            assert report.committed
            assert await engine.version() == 1
        _assert_applied(server, _model())
        updates = [c.body for c in server.calls if c.path == "/update_weights_from_tensor"]
        assert [body["flush_cache"] for body in updates] == [False, True]  # not repeated
        assert "/flush_cache" not in server.paths()  # a second try could only be refused
        assert "radix cache was not flushed" in caplog.text
        assert server.paused is None
        # A client that retracts the running requests lets the flush through.
        async with SGLangHTTPEngine(server.url, backoff_s=0) as engine:
            await load_sync(engine, _buckets(2), mode="pause", pause_mode="retract")
            assert await engine.version() == 2
        assert server.running_requests == 2


async def test_flush_refused_outside_in_place_still_fails_the_sync() -> None:
    # Paused in abort/retract no request runs, so a refused flush is a real failure:
    # retried within the deadline, then raised with the version unchanged.
    with SGLangHTTPDouble(_spec()) as server:
        server.refuse("/update_weights_from_tensor", "cache was not flushed", times=1, after=1)
        server.refuse("/flush_cache", "requests still running or queued", times=None)
        async with SGLangHTTPEngine(server.url, retries=2, backoff_s=0) as engine:
            error, report = await failed_sync(engine, _buckets(1), mode="prefetch")
            assert re.search(r"flush_cache failed.*gave up after 3 attempts", str(error))
            assert server.paths().count("/flush_cache") == 3
            assert await engine.version() is None
            assert report.engine_dirty


async def test_no_flush_when_disabled(double: SGLangHTTPDouble) -> None:
    async with SGLangHTTPEngine(double.url, flush_cache_on_commit=False) as engine:
        await load_sync(engine, _buckets(1))
    assert "/flush_cache" not in double.paths()


# -- retries and faults -------------------------------------------------------------------


async def test_5xx_is_retried_then_succeeds(double: SGLangHTTPDouble) -> None:
    double.fail_with_503("/update_weights_from_tensor", 2)
    async with SGLangHTTPEngine(double.url, retries=3, backoff_s=0) as engine:
        await load_sync(engine, _buckets(1))
        assert await engine.version() == 1
    assert double.paths().count("/update_weights_from_tensor") == 4  # 2 refused + 2 buckets
    _assert_applied(double, _model())


async def test_5xx_gives_up_after_retries(double: SGLangHTTPDouble) -> None:
    double.fail_with_503("/update_weights_from_tensor", 10)
    async with SGLangHTTPEngine(double.url, retries=2, backoff_s=0) as engine:
        error, report = await failed_sync(engine, _buckets(1))
        assert re.search(r"503.*gave up after 3 attempts", str(error))
        assert error.retryable
        assert report.buckets == 0
        assert await engine.version() is None
    assert double.paths().count("/update_weights_from_tensor") == 3
    assert not double.session_open  # abort closed the session


async def test_retries_stop_within_loads_deadline(double: SGLangHTTPDouble) -> None:
    # 100 retries allowed, but backoffs of 0.4, 0.8, 1.6 s: within Load's 2 s deadline a
    # retry starts only if its backoff ends in time, so at most 3 attempts are made, and
    # the caller gets the server's own 503 (not Load's timeout) naming how many.
    double.fail_with_503("/update_weights_from_tensor", 1000)
    async with SGLangHTTPEngine(double.url, retries=100, backoff_s=0.4) as engine:
        error, _ = await failed_sync(engine, _buckets(1), timeout_s=2.0)
    attempts = double.paths().count("/update_weights_from_tensor")
    assert 1 < attempts <= 3
    assert f"answered 503: Service Unavailable; gave up after {attempts} attempts" in str(error)
    assert "did not answer within" not in str(error)


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (("model.layers.9.nope.weight", torch.zeros(2, 2)), "is not a parameter"),
        (("lm_head.weight", torch.zeros(7, 9, dtype=torch.bfloat16)), r"expects \(9, 7\)"),
        (("lm_head.weight", torch.zeros(9, 7)), "torch.bfloat16, got"),
    ],
    ids=["unknown-name", "shape", "dtype"],
)
async def test_validation_failures_name_the_tensor_and_are_not_retried(
    double: SGLangHTTPDouble, bad: tuple[str, torch.Tensor], match: str
) -> None:
    tensors = [*_model()[:3], bad]
    async with SGLangHTTPEngine(double.url, backoff_s=0) as engine:
        await load_sync(engine, _buckets(1))
        error, _ = await failed_sync(engine, _buckets(2, tensors))
        assert re.search(match, str(error))
        assert error.tensor == bad[0]
        assert not error.retryable
        assert await engine.version() == 1  # unchanged
    assert double.paths().count("/update_weights_from_tensor") == 4  # 2 + 2, no retry
    assert not double.session_open


async def test_success_false_is_one_clear_error(double: SGLangHTTPDouble) -> None:
    double.refuse("/update_weights_from_tensor", "out of memory while loading")
    async with SGLangHTTPEngine(double.url, backoff_s=0) as engine:
        error, _ = await failed_sync(engine, _buckets(1))
        assert re.search(r"/update_weights_from_tensor failed \(400\): out of memory", str(error))
        assert "attempts" not in str(error)  # one attempt: a refusal is not retried
        assert await engine.version() is None
    assert double.paths().count("/update_weights_from_tensor") == 1


async def test_load_failing_mid_sync_keeps_old_version(double: SGLangHTTPDouble) -> None:
    async with SGLangHTTPEngine(double.url, backoff_s=0) as engine:
        await load_sync(engine, _buckets(1))
        # sync 2: the first bucket goes in, the second is refused
        double.refuse("/update_weights_from_tensor", "rank 0 died", times=1, after=1)
        error, report = await failed_sync(engine, _buckets(2))
        assert "rank 0 died" in str(error)
        assert report.buckets == 1
        assert report.aborted
        assert await engine.version() == 1
        assert not double.session_open
        assert double.paths().count("/update_weight_version") == 1  # only from sync 1
        await load_sync(engine, _buckets(3))  # the engine is usable again
        assert await engine.version() == 3
    _assert_applied(double, _model())


async def test_unreachable_engine() -> None:
    with SGLangHTTPDouble(_spec()) as server:
        url = server.url
    async with SGLangHTTPEngine(url, retries=1, backoff_s=0) as engine:
        error, report = await failed_sync(engine, _buckets(1))
    assert re.search(r"cannot reach.*gave up after 2 attempts", str(error))
    assert error.retryable
    assert not report.aborted  # refused at the version check: nothing was begun


async def test_timeout_on_a_hung_update(double: SGLangHTTPDouble) -> None:
    double.hang("/update_weights_from_tensor")
    async with SGLangHTTPEngine(double.url, timeout_s=0.5, retries=3) as engine:
        error, report = await failed_sync(engine, _buckets(1))  # Load's deadline: 0.5 s
        assert re.search(r"did not answer within 0\.\d+ s", str(error))
        assert double.wait_until_hanging()
        assert report.abort_error is None
        assert await engine.version() is None
    assert double.paths().count("/update_weights_from_tensor") == 1  # no time left to retry
    assert not double.session_open


async def test_shared_client_is_left_open(double: SGLangHTTPDouble) -> None:
    async with httpx.AsyncClient() as client:
        async with SGLangHTTPEngine(double.url, client=client) as engine:
            await load_sync(engine, _buckets(1))
        assert not client.is_closed


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="timeout_s"):
        SGLangHTTPEngine("http://x", timeout_s=0)
    with pytest.raises(ValueError, match="tp_size"):
        SGLangHTTPEngine("http://x", tp_size=0)
    with pytest.raises(ValueError, match="session"):
        SGLangHTTPEngine("http://x", session="maybe")  # type: ignore[arg-type]


# -- pause policies of Load ---------------------------------------------------------------


async def test_pause_mode_brackets_the_whole_sync() -> None:
    with SGLangHTTPDouble(_spec(), running_requests=3) as server:
        async with SGLangHTTPEngine(server.url) as engine:
            report = await load_sync(engine, _buckets(9), mode="pause", pause_mode="retract")
            assert await engine.version() == 9
        assert report.committed
        _assert_applied(server, _model())
        paths = server.paths()
        assert paths[0] == "/pause_generation"
        assert paths.index("/continue_generation") > paths.index("/update_weight_version")
        assert server.paused is None


async def test_fault_mid_sync_keeps_the_version_and_the_engine_paused() -> None:
    bad = [*_model()[:3], ("model.layers.7.unknown.weight", torch.zeros(3))]
    with SGLangHTTPDouble(_spec()) as server:
        async with SGLangHTTPEngine(server.url, backoff_s=0) as engine:
            await load_sync(engine, _buckets(1), mode="prefetch", pause_mode="in_place")
            error, report = await failed_sync(
                engine, _buckets(2, bad), mode="prefetch", pause_mode="in_place"
            )
            assert error.tensor == "model.layers.7.unknown.weight"
            assert await engine.version() == 1
            assert report.aborted
            assert not server.session_open
            # SGLang cannot roll back the first bucket: generation stays paused (Load's
            # partial-failure policy) until a full sync commits.
            assert error.engine_dirty
            assert report.left_paused
            assert server.paused == "in_place"
            await load_sync(engine, _buckets(3), mode="prefetch", pause_mode="in_place")
            assert await engine.version() == 3
        assert server.paused is None  # resumed after the full sync's commit
        assert server.paths().count("/pause_generation") == 2  # the dirty one is not re-paused


# -- launch settings: /server_info's tp_size and quantization, read before the server is touched


def _bf16_weights() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [
        ("model.embed_tokens.weight", torch.randn(64, 32, generator=g).to(torch.bfloat16)),
        ("model.layers.0.mlp.down_proj.weight", torch.randn(160, 130, generator=g)),
        ("model.norm.weight", torch.randn(32, generator=g).to(torch.bfloat16)),
    ]


def _fp8_spec() -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """What an FP8 server holds for ``_bf16_weights``: Fp8Quantize's names and dtypes."""
    bucket = WeightBucket(tuple(_bf16_weights()), index=0, is_last=True, version=1)
    return {n: (tuple(t.shape), t.dtype) for n, t in Fp8Quantize().quantize_bucket(bucket).tensors}


def _bf16_spec() -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {n: (tuple(t.shape), torch.bfloat16) for n, t in _bf16_weights()}


async def _launch_sync(engine: SGLangHTTPEngine, version: int, *, fp8: bool) -> SyncReport:
    stages: list[Any] = [Fetch(1 << 20), *([Fp8Quantize()] if fp8 else [])]
    if not fp8:  # a bf16 sync: the linear weight goes in the server's bf16
        weights = [(n, t.to(torch.bfloat16)) for n, t in _bf16_weights()]
    else:
        weights = _bf16_weights()
    return await sync_weights(weights, engine, version=version, stages=stages, timeout_s=10.0)


def _untouched(server: SGLangHTTPDouble) -> None:
    assert all(path.endswith("server_info") for path in server.paths()), server.paths()
    assert server.weight_version == "default"
    assert server.paused is None
    assert not server.session_open
    assert not server.weights


@pytest.mark.parametrize("behave_like", ["0.5.23", "0.5.12"])
async def test_a_sync_for_another_tp_size_is_refused_before_the_server_is_touched(
    behave_like: str,
) -> None:
    with SGLangHTTPDouble(_fp8_spec(), behave_like=behave_like, tp_size=2) as server:  # type: ignore[arg-type]
        async with SGLangHTTPEngine(server.url, tp_size=1) as engine:
            with pytest.raises(EngineError) as info:
                await _launch_sync(engine, 1, fp8=True)
        message = str(info.value)
        assert "engine 'sglang_http'" in message
        assert "server reports tp_size=2" in message
        assert "built with tp_size=1" in message
        _untouched(server)
        async with SGLangHTTPEngine(server.url, tp_size=2) as engine:
            report = await _launch_sync(engine, 1, fp8=True)
            assert report.version == 1
            await _launch_sync(engine, 2, fp8=True)
        assert server.weight_version == "2"
        # Read once per engine, before its first sync; the session detection reused it.
        asked = [p for p in server.paths() if p.endswith("server_info")]
        once = ["/server_info"] if behave_like == "0.5.23" else ["/server_info", "/get_server_info"]
        assert asked == once * 2  # once by each of the two engines


async def test_an_fp8_sync_into_a_server_quantized_without_fp8_is_refused() -> None:
    with SGLangHTTPDouble(_fp8_spec(), quantization="awq") as server:
        async with SGLangHTTPEngine(server.url) as engine:
            with pytest.raises(EngineError) as info:
                await _launch_sync(engine, 1, fp8=True)
        message = str(info.value)
        assert "engine 'sglang_http'" in message
        assert "Fp8Quantize method='block'" in message
        assert "quantization='awq'" in message
        _untouched(server)


@pytest.mark.parametrize(
    ("quantization", "fp8"),
    [
        (None, True),  # an FP8 checkpoint launched without --quantization reports None
        ("fp8", True),
        ("fp8", False),  # as a bf16 checkpoint quantized online at load: not refused
        (None, False),
    ],
)
async def test_what_the_server_args_cannot_tell_apart_is_not_refused(
    quantization: str | None, fp8: bool
) -> None:
    spec = _fp8_spec() if fp8 else _bf16_spec()
    with SGLangHTTPDouble(spec, quantization=quantization) as server:
        async with SGLangHTTPEngine(server.url) as engine:
            report = await _launch_sync(engine, 1, fp8=fp8)
        assert report.version == 1
        assert server.weight_version == "1"
