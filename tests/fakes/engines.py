"""Test fakes of engines and models: a scriptable ``Engine``, a checkpoint engine's
receiving side, a small model config and a model that fails.

``FakeEngine`` is a fake of the ``Engine`` protocol (no model behind it): it records every
call and can be told to fail (or never answer) at any step, so the Load stage's fault
handling can be tested without a model. ``FakeSteppingEngine`` adds the local engine's
pause: a request that its generation thread enters at the end of a step, which the test
ends by an event. ``FakeMeasuringEngine`` adds the local engine's generation window.
``FakeCheckpointEngine`` is a fake of a checkpoint engine's receiving side (an async
generator of weights); ``fake_broken_model`` stands in for a model whose forward pass fails.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping
from typing import TYPE_CHECKING, Any

import anyio
import torch

from weightpipe.stages.bucket import WeightBucket
from weightpipe.stages.engines.base import EngineError, PauseMode

if TYPE_CHECKING:  # the local engine is imported only by the tests that build one
    from weightpipe.stages.engines.local import GenerationStats

__all__ = [
    "FakeCheckpointEngine",
    "FakeEngine",
    "FakeMeasuringEngine",
    "FakeSteppingEngine",
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
        default_timeout_s: the deadline Load gives each call when it is given none
            (like the real adapters' ``default_timeout_s``); ``None``: no such attribute.

    The version moves only on a successful ``commit``; ``paused`` tracks pause/resume.
    Like ``LocalEngine``, ``pause`` refuses an engine that is already paused and
    ``resume`` of an engine that is not paused does nothing. Every error it raised is in
    ``raised``, so a test can check that the caller got that very error.
    """

    name = "fake"

    def __init__(
        self,
        *,
        fail_at: Mapping[str, str] | None = None,
        fail_load_at: int = 0,
        initial_version: int | None = 0,
        default_timeout_s: float | None = None,
    ) -> None:
        self.fail_at = dict(fail_at or {})
        self.fail_load_at = fail_load_at
        self.committed_version = initial_version
        self.calls: list[tuple[str, object]] = []
        self.loaded: list[WeightBucket] = []
        self.paused = False
        self.pause_modes: list[PauseMode] = []
        self.open_version: int | None = None
        self.raised: list[EngineError] = []
        self.hung = anyio.Event()  # set when a call starts hanging
        if default_timeout_s is not None:
            self.default_timeout_s = default_timeout_s

    def call_names(self) -> list[str]:
        return [name for name, _ in self.calls]

    async def _maybe_fail(self, call: str, tensor: str | None = None) -> None:
        how = self.fail_at.get(call)
        if how is None:
            return
        if how == "hang":
            self.hung.set()
            await anyio.sleep_forever()
        if how == "refuse":
            error = EngineError(self.name, f"{call} answered success=false: fake refusal")
        else:
            error = EngineError(self.name, f"{call} failed (fake)", tensor=tensor)
        self.raised.append(error)
        raise error

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
        self._refuse_second_pause()
        self.paused = True
        await self._maybe_fail("pause")

    def _pausing(self) -> bool:
        return self.paused

    def _refuse_second_pause(self) -> None:
        if self._pausing():
            error = EngineError(self.name, "generation is already paused")
            self.raised.append(error)
            raise error

    async def resume(self) -> None:
        self.calls.append(("resume", None))
        await self._maybe_fail("resume")
        self.paused = False


class FakeSteppingEngine(FakeEngine):
    """A ``FakeEngine`` whose pause follows ``LocalEngine.pause``: the call files a pause
    request that the generation thread enters only at the end of its current step.

    ``pause_requested`` is set when a request is filed; the test ends the step with
    ``finish_step()``, which enters a requested pause (``paused`` becomes True) and lets
    the ``pause`` call return. As in the local engine, a caller that stops waiting (is
    cancelled) does not withdraw the request, and a ``resume`` that arrives before the
    pause was entered is a no-op: the pause is entered afterwards all the same.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.pause_requested = anyio.Event()
        self._entered: anyio.Event | None = None

    async def pause(self, mode: PauseMode) -> None:
        self.calls.append(("pause", mode))
        self.pause_modes.append(mode)
        self._refuse_second_pause()
        entered = self._entered = anyio.Event()
        self.pause_requested.set()
        await entered.wait()

    def _pausing(self) -> bool:
        return self.paused or self._entered is not None

    def finish_step(self) -> None:
        """The generation thread ends its step and enters a requested pause, if any."""
        if self._entered is not None:
            self.paused = True
            self._entered.set()
            self._entered = None


class FakeMeasuringEngine(FakeEngine):
    """A ``FakeEngine`` that measures its generation like ``LocalEngine.open_window``: the
    window's ``close()`` returns ``stats`` (a ``GenerationStats``); ``windows_open``
    counts windows opened and not yet closed."""

    def __init__(self, stats: GenerationStats, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.stats = stats
        self.windows_open = 0

    def open_window(self) -> _FakeWindow:
        self.windows_open += 1
        return _FakeWindow(self)


class _FakeWindow:
    def __init__(self, engine: FakeMeasuringEngine) -> None:
        self._engine = engine

    def close(self) -> GenerationStats:
        self._engine.windows_open -= 1
        return self._engine.stats


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
