"""The engine fault matrix for the distributed adapter: a subset, over a real gloo group.

This process is the trainer (rank 0); a spawned process is SGLang's receiving rank
(``SubprocessReceiver``, SGLang's own receive code); the control plane is
``FaultyHTTPDouble`` in the 0.5.23 behaviour. The subset is the control plane's calls
around the broadcasts: the begin, the end of the session and the version update refused
(success=false, 400), and one 500 on the end of the session (retried); and the faults
around a broadcast: the second bucket's announcement refused (on gloo the sender's
broadcast may then block its worker thread until the group's timeout) and the receiving
rank killed in the middle of the second bucket's broadcast (then restarted, as a
supervisor would). The invariants are those of
``test_fault_matrix_engines``: the version stays v1 after a failure, the engine is dirty
and kept paused once it took a bucket, the session is closed, and a clean sync then
commits.
"""

from __future__ import annotations

from collections.abc import Iterator

import anyio
import pytest
import torch

from tests.fakes.sglang_faults import FaultyHTTPDouble, HTTPFault
from tests.fakes.sglang_receiver import SubprocessReceiver
from tests.helpers import bits, free_port
from weightpipe.pipeline import Pipeline, StageError
from weightpipe.stages.bucket import WeightBucket
from weightpipe.stages.engines.sglang.distributed import SGLangDistributedEngine
from weightpipe.stages.engines.sglang.http import SGLangHTTPEngine
from weightpipe.stages.load import Load, engine_is_dirty

pytestmark = pytest.mark.slow

GROUP_TIMEOUT_S = 60.0
"""torch's limit on the rendezvous (the spawned rank imports torch and sglang first)."""
NAMES = ("model.norm.weight", "model.embed_tokens.weight", "lm_head.weight")

TRIALS: list[tuple[str, str, HTTPFault]] = [
    ("begin", "/begin_weight_update", "success_false"),
    ("end of session", "/end_weight_update", "success_false"),
    ("end of session", "/end_weight_update", "500_once"),
    ("version update", "/update_weight_version", "success_false"),
]
TOUCHES = frozenset({"end of session", "version update"})

SHORT_GROUP_TIMEOUT_S = 20.0
"""torch's limit on the group in the broadcast trials: how long an abandoned gloo broadcast
blocks its thread. The rendezvous needs no more, since the receiving rank is ``ready()``
(torch and sglang imported) before each group is formed."""
LOAD_TIMEOUT_S = 10.0
"""Load's deadline in the broadcast trials, under the group's timeout: a sync that waited
behind the blocked broadcast would miss it."""
BROADCAST_FAULTS = ("announcement_refused", "rank_killed")


@pytest.fixture(scope="module")
def receiver() -> Iterator[SubprocessReceiver]:
    rank = SubprocessReceiver()
    try:
        yield rank
    finally:
        rank.close()


SHAPE = (4, 6)
BIG_SHAPE = (4096, 2048)
"""16 MiB of bf16 per tensor in the broadcast trials: more than the loopback socket buffers
hold, so a gloo broadcast nobody receives blocks its sender (a small one completes)."""


def _tensors(version: int, shape: tuple[int, int] = SHAPE) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(version)
    return [(name, torch.randn(*shape, generator=g).to(torch.bfloat16)) for name in NAMES]


def _buckets(version: int, shape: tuple[int, int] = SHAPE) -> list[WeightBucket]:
    return [
        WeightBucket(((name, tensor),), index=i, is_last=i == len(NAMES) - 1, version=version)
        for i, (name, tensor) in enumerate(_tensors(version, shape))
    ]


def _serves(server: FaultyHTTPDouble, version: int, shape: tuple[int, int] = SHAPE) -> bool:
    return all(
        name in server.weights and torch.equal(bits(server.weights[name]), bits(tensor))
        for name, tensor in _tensors(version, shape)
    )


def _load(engine: SGLangDistributedEngine, version: int) -> Load:
    return Load(engine, mode="pause", version=version, timeout_s=GROUP_TIMEOUT_S)


@pytest.mark.parametrize(("call", "path", "fault"), TRIALS, ids=[f"{t[0]}-{t[2]}" for t in TRIALS])
async def test_distributed_fault(
    receiver: SubprocessReceiver, call: str, path: str, fault: HTTPFault
) -> None:
    spec = {name: ((4, 6), torch.bfloat16) for name in NAMES}
    with FaultyHTTPDouble(spec) as server:
        server.receiver = receiver
        async with SGLangHTTPEngine(server.url, retries=3, backoff_s=0) as control:
            engine = SGLangDistributedEngine(
                control,
                master_address="127.0.0.1",
                master_port=free_port(),
                group_name=f"wp_fault_{call.replace(' ', '_')}_{fault}",
                timeout_s=GROUP_TIMEOUT_S,
            )
            try:
                await Pipeline([_load(engine, 1)]).run(_buckets(1))
                server.inject(path, fault)
                load = _load(engine, 2)
                error: StageError | None = None
                with anyio.fail_after(2 * GROUP_TIMEOUT_S):
                    try:
                        await Pipeline([load]).run(_buckets(2))
                    except StageError as exc:
                        error = exc
                assert server.fired(path)
                server.clear()
                if fault == "500_once":
                    assert error is None
                    assert server.weight_version == "2"
                    assert _serves(server, 2)
                else:
                    assert error is not None
                    assert server.weight_version == "1"
                    dirty = call in TOUCHES
                    assert load.report.engine_dirty == dirty
                    assert (server.paused == "retract") == dirty
                    if not dirty:
                        assert _serves(server, 1)
                assert not server.session_open
                await Pipeline([_load(engine, 3)]).run(_buckets(3))
                assert server.weight_version == "3"
                assert _serves(server, 3)
                assert server.paused is None
                assert not engine_is_dirty(engine)
            finally:
                await engine.close()


@pytest.mark.parametrize("fault", BROADCAST_FAULTS)
async def test_distributed_broadcast_fault(receiver: SubprocessReceiver, fault: str) -> None:
    spec = {name: (BIG_SHAPE, torch.bfloat16) for name in NAMES}
    receiver.ready()
    with FaultyHTTPDouble(spec) as server:
        server.receiver = receiver
        async with SGLangHTTPEngine(server.url, retries=3, backoff_s=0) as control:
            engine = SGLangDistributedEngine(
                control,
                master_address="127.0.0.1",
                master_port=free_port(),
                group_name=f"wp_fault_{fault}",
                timeout_s=SHORT_GROUP_TIMEOUT_S,
            )

            def load(version: int) -> Load:
                return Load(engine, mode="pause", version=version, timeout_s=LOAD_TIMEOUT_S)

            try:
                await Pipeline([load(1)]).run(_buckets(1, BIG_SHAPE))
                first_group = (engine.group_name, engine.master_port)
                if fault == "announcement_refused":
                    server.inject("/update_weights_from_distributed", "success_false", skip=1)
                else:
                    receiver.die_at_receive(2)
                failing = load(2)
                with pytest.raises(StageError) as raised:
                    await Pipeline([failing]).run(_buckets(2, BIG_SHAPE))
                # The refusal or the dead rank failed the sync, not Load's deadline (a dead
                # rank is seen by the control plane or by the sender's broadcast first).
                message = str(raised.value)
                if fault == "announcement_refused":
                    assert "injected refusal" in message
                else:
                    assert "died" in message or "broadcasting" in message
                assert server.weight_version == "1"
                assert failing.report.engine_dirty  # the first bucket was taken
                assert server.paused == "retract"
                assert not server.session_open
                server.clear()
                if fault == "rank_killed":
                    receiver.restart()
                    receiver.ready()
                # A new group (name and port) formed, within Load's deadline: the sync did
                # not wait behind the old group's broadcast.
                await Pipeline([load(3)]).run(_buckets(3, BIG_SHAPE))
                assert (engine.group_name, engine.master_port) != first_group
                assert server.weight_version == "3"
                assert _serves(server, 3, BIG_SHAPE)
                assert server.paused is None
                assert not engine_is_dirty(engine)
                assert not server.session_open
            finally:
                await engine.close()
