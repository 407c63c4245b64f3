"""SGLangDistributedEngine after a failed broadcast: a new group, never a wait for the old.

The update group is a stand-in for a gloo ``ProcessGroup`` whose broadcast nobody
receives: ``wait()`` blocks its worker thread until the test releases it (gloo: until the
group's timeout) and ``abort`` cannot end it. Destroying such a group would block too, so
the stand-in fails the test if it is destroyed while its broadcast is blocked. The round
trips over a real gloo group are in ``tests/test_fault_matrix_distributed.py``.
"""

from __future__ import annotations

import threading
from typing import Any

import anyio
import anyio.to_thread
import pytest
import torch

from weightpipe.stages.bucket import WeightBucket
from weightpipe.stages.engines.base import EngineError
from weightpipe.stages.engines.sglang import distributed
from weightpipe.stages.engines.sglang.distributed import SGLangDistributedEngine


class _Work:
    def __init__(self, group: _GlooGroup) -> None:
        self.group = group

    def wait(self) -> None:
        self.group.blocked.set()
        self.group.release.wait()
        self.group.blocked.clear()


class _GlooGroup:
    """Follows ``ProcessGroupGloo`` with no receiver: ``wait()`` blocks, ``abort`` is a no-op."""

    def __init__(self, name: str, port: int) -> None:
        self.name, self.port = name, port
        self.blocked = threading.Event()
        self.release = threading.Event()

    def broadcast(self, tensors: list[torch.Tensor], opts: Any) -> _Work:
        return _Work(self)

    def abort(self) -> None:
        return None


class _Client:
    """The control plane's client: refuses the first bucket once its broadcast blocks."""

    def __init__(self) -> None:
        self.inits: list[tuple[str, int]] = []
        self.destroyed: list[str] = []
        self.refusals = 1
        self.group: _GlooGroup | None = None

    async def init_weights_update_group(
        self, address: str, port: int, offset: int, world: int, name: str, backend: str
    ) -> None:
        self.inits.append((name, port))

    async def update_weights_from_distributed(self, *args: Any) -> None:
        if self.refusals:
            self.refusals -= 1
            group = self.group
            assert group is not None
            await anyio.to_thread.run_sync(group.blocked.wait)
            raise EngineError("sglang_http", "injected refusal", tensor="model.x.weight")

    async def destroy_weights_update_group(self, name: str) -> None:
        self.destroyed.append(name)


class _Control:
    name = "sglang_http"

    def __init__(self) -> None:
        self.client = _Client()
        self.begun: list[int] = []

    async def begin(self, version: int) -> None:
        self.begun.append(version)


async def test_a_broken_group_is_replaced_at_once_and_destroyed_once_its_thread_ended(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    control = _Control()
    groups: list[_GlooGroup] = []
    closed: list[_GlooGroup] = []

    def open_group(**kwargs: Any) -> _GlooGroup:
        group = _GlooGroup(kwargs["group_name"], kwargs["master_port"])
        if groups:
            group.release.set()  # only the first group's receiver refuses
        groups.append(group)
        control.client.group = group
        return group

    def close_group(group: _GlooGroup) -> None:
        assert not group.blocked.is_set(), f"{group.name} destroyed under a blocked broadcast"
        closed.append(group)

    monkeypatch.setattr(distributed, "open_update_group", open_group)
    monkeypatch.setattr(distributed, "close_update_group", close_group)
    engine = SGLangDistributedEngine(
        control,  # type: ignore[arg-type]
        master_address="127.0.0.1",
        master_port=29555,
        group_name="g",
        backend="gloo",
    )
    bucket = WeightBucket((("model.x.weight", torch.ones(4, 4)),), 0, True, 1)
    await engine.begin(1)
    with pytest.raises(EngineError, match="injected refusal"):
        await engine.load(bucket)
    old = groups[0]
    assert old.blocked.is_set()  # the abandoned broadcast still holds its worker thread
    try:
        with anyio.fail_after(30):  # a guard: the old code would wait until release
            await engine.begin(2)
        assert control.begun == [1, 2]
        assert control.client.destroyed == ["g"]  # the engine was asked to drop it
        new_name, new_port = control.client.inits[1]
        assert new_name == "g_r1" and new_port != 29555
        assert (engine.group_name, engine.master_port) == (new_name, new_port)
        assert groups[1].name == new_name and closed == []
        await engine.load(bucket)  # the new group carries the next bucket
    finally:
        old.release.set()
    # Once the old broadcast's thread ended, the old group is destroyed (then the new).
    for abandoned in engine._abandoned:
        assert abandoned.idle.wait(timeout=30)
    await engine.close()
    assert closed == [old, groups[1]]
    assert control.client.destroyed == ["g", "g_r1"]
