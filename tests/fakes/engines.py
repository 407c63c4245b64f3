"""Test fakes of engines and models: a scriptable ``Engine``, a checkpoint engine's
receiving side, a small model config and a model that fails.

``FakeEngine`` is a fake of the ``Engine`` protocol (no model behind it): it records every
call and can be told to fail (or never answer) at any step, so the Load stage's fault
handling can be tested without a model; ``FakeCheckpointEngine`` is a fake of a checkpoint
engine's receiving side (an async generator of weights); ``fake_broken_model`` stands in for
a model whose forward pass fails.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping
from typing import Any

import anyio
import torch

from weightpipe.stages.bucket import WeightBucket
from weightpipe.stages.engines.base import EngineError, PauseMode

__all__ = [
    "FakeCheckpointEngine",
    "FakeEngine",
    "fake_broken_model",
    "small_llama_config",
]


class FakeEngine:
    """A fake of the ``Engine`` protocol (no model behind it): records calls, fails where told.

    Args:
        fail_at: call name (``begin``, ``load``, ``commit``, ``abort``, ``pause``,
            ``resume``) -> how it fails: ``"error"`` raises ``EngineError``,
            ``"refuse"`` raises the error an engine answering ``success=false`` gives,
            ``"hang"`` never answers (the Load stage's timeout must fire).
        fail_load_at: which bucket index ``load`` fails at (default: the first).
        initial_version: what ``version()`` reports before any commit.

    The version moves only on a successful ``commit``; ``paused`` tracks pause/resume.
    """

    name = "fake"

    def __init__(
        self,
        *,
        fail_at: Mapping[str, str] | None = None,
        fail_load_at: int = 0,
        initial_version: int | None = 0,
    ) -> None:
        self.fail_at = dict(fail_at or {})
        self.fail_load_at = fail_load_at
        self.committed_version = initial_version
        self.calls: list[tuple[str, object]] = []
        self.loaded: list[WeightBucket] = []
        self.paused = False
        self.pause_modes: list[PauseMode] = []
        self.open_version: int | None = None

    def call_names(self) -> list[str]:
        return [name for name, _ in self.calls]

    async def _maybe_fail(self, call: str, tensor: str | None = None) -> None:
        how = self.fail_at.get(call)
        if how is None:
            return
        if how == "hang":
            await anyio.sleep_forever()
        if how == "refuse":
            raise EngineError(self.name, f"{call} answered success=false: fake refusal")
        raise EngineError(self.name, f"{call} failed (fake)", tensor=tensor)

    async def begin(self, version: int) -> None:
        self.calls.append(("begin", version))
        await self._maybe_fail("begin")
        self.open_version = version

    async def load(self, bucket: WeightBucket) -> None:
        self.calls.append(("load", bucket.index))
        if bucket.index == self.fail_load_at:
            first = bucket.tensors[0][0] if bucket.tensors else None
            await self._maybe_fail("load", first)
        self.loaded.append(bucket)

    async def commit(self, version: int) -> None:
        self.calls.append(("commit", version))
        await self._maybe_fail("commit")
        self.committed_version = version
        self.open_version = None

    async def abort(self, version: int) -> None:
        self.calls.append(("abort", version))
        self.open_version = None
        await self._maybe_fail("abort")

    async def version(self) -> int | None:
        return self.committed_version

    async def pause(self, mode: PauseMode) -> None:
        self.calls.append(("pause", mode))
        self.pause_modes.append(mode)
        self.paused = True
        await self._maybe_fail("pause")

    async def resume(self) -> None:
        self.calls.append(("resume", None))
        await self._maybe_fail("resume")
        self.paused = False


def small_llama_config(**overrides: Any) -> Any:
    """A Llama config small enough for fast tests, with FP8 edge blocks.

    The MLP weights are 320x192 and 192x320, so ``[128, 128]`` blocks have partial edges
    in both dimensions.
    """
    from weightpipe.stages.engines.local import default_config

    return default_config(
        hidden_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=320,
        vocab_size=512,
        max_position_embeddings=256,
        **overrides,
    )


def fake_broken_model(**kwargs: object) -> object:
    """A fake model (stands in for a transformers model): every forward call raises, for
    the local engine's failure path."""
    raise RuntimeError("fake model failure")


class FakeCheckpointEngine:
    """A fake of a checkpoint engine's receiving side: an async generator of the weights of
    ``model`` (copied at construction)."""

    def __init__(self, model: Any) -> None:
        self.weights = [(n, p.detach().clone()) for n, p in model.named_parameters()]

    async def receive_weights(self) -> AsyncGenerator[tuple[str, torch.Tensor], None]:
        for name, tensor in self.weights:
            yield name, tensor
