"""Helpers for tests that drive the real ``LocalEngine``, and a fake generation listener.

- ``local_engine``: a small, fast ``LocalEngine`` (``small_llama_config``, batches of 4,
  4 new tokens) with any constructor argument overridden.
- ``new_weights`` / ``snapshot`` / ``assert_weights``: what a trainer would send the
  engine, what it serves now, and a check that it serves exactly the given tensors.
- ``complete``: a test's few tensors made into a whole sync (the engine refuses an
  incomplete one), the other parameters as the engine serves them now.
- ``RecordingListener``: a fake ``GenerationListener`` (follows the protocol the engine's
  own ``GenerationWindow`` implements) that records every callback in order, and the
  set of weight versions each step read.
- ``StepAfterLoad``: a stage to put after Load (no real counterpart): while generation
  runs, it lets the engine take one more step after each bucket the engine accepted.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from tests.fakes.engines import small_llama_config
from weightpipe.pipeline import Stage
from weightpipe.stages.bucket import WeightBucket
from weightpipe.stages.engines.local import LocalEngine, random_weights

__all__ = [
    "BATCH",
    "NEW_TOKENS",
    "RecordingListener",
    "StepAfterLoad",
    "assert_weights",
    "complete",
    "local_engine",
    "new_weights",
    "snapshot",
]

BATCH = 4
"""The batch size of ``local_engine()``: a step yields this many tokens."""
NEW_TOKENS = 4
"""Tokens per request of ``local_engine()``."""


def local_engine(*, config: Any = None, **options: Any) -> LocalEngine:
    """A small local engine (not started); ``options`` go to ``LocalEngine``."""
    options.setdefault("batch_size", BATCH)
    options.setdefault("max_new_tokens", NEW_TOKENS)
    return LocalEngine(config if config is not None else small_llama_config(), **options)


def new_weights(engine: LocalEngine, seed: int) -> dict[str, torch.Tensor]:
    """Seeded new weights of the engine's shapes and dtype, as a trainer would send them."""
    return random_weights(engine.config, seed=seed, dtype=engine.dtype)


def snapshot(engine: LocalEngine) -> dict[str, torch.Tensor]:
    """A copy of every parameter the engine serves now."""
    return {name: engine.parameter(name) for name in engine.parameter_specs()}


def assert_weights(engine: LocalEngine, expected: dict[str, torch.Tensor]) -> None:
    """The engine serves exactly ``expected`` (bit for bit; names the first that differs)."""
    for name, tensor in expected.items():
        assert torch.equal(engine.parameter(name), tensor), name


def complete(
    engine: LocalEngine, tensors: list[tuple[str, torch.Tensor]]
) -> list[tuple[str, torch.Tensor]]:
    """``tensors`` (first, in order) plus every parameter they leave out, as the engine
    serves it now, under one name per parameter (a tied weight sent under either name
    counts), so the sync is complete and changes only what ``tensors`` change."""
    names: dict[int, list[str]] = {}
    for name, param in engine.model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    sent = {name for name, _ in tensors}
    rest = [
        (aliases[0], engine.parameter(aliases[0]))
        for aliases in names.values()
        if not sent.intersection(aliases)
    ]
    return [*tensors, *rest]


class RecordingListener:
    """A fake ``GenerationListener``: records ``(callback, argument)`` pairs in call order,
    the names of the threads that called it, and per step the versions it read."""

    def __init__(self) -> None:
        self.events: list[tuple[str, float]] = []
        self.threads: set[str] = set()
        self.step_versions: list[frozenset[int | None]] = []

    def _record(self, callback: str, value: float) -> None:
        self.events.append((callback, value))
        self.threads.add(threading.current_thread().name)

    def on_step(self, now: float, tokens: int, versions: frozenset[int | None]) -> None:
        self.step_versions.append(versions)
        self._record("step", tokens)

    def on_finish(self, now: float, requests: int) -> None:
        self._record("finish", requests)

    def on_write(self, seconds: float) -> None:
        self._record("write", seconds)

    def on_pause(self, now: float) -> None:
        self._record("pause", now)

    def on_resume(self, now: float) -> None:
        self._record("resume", now)

    def names(self) -> list[str]:
        """The callbacks in call order."""
        return [name for name, _ in self.events]


class StepAfterLoad(Stage[WeightBucket, WeightBucket]):
    """After Load: unless generation is paused, waits for one more decode step after each
    bucket the engine accepted, so steps surely run between the buckets of a sync."""

    name = "step_after_load"

    def __init__(self, engine: LocalEngine) -> None:
        self.engine = engine

    async def process(self, item: WeightBucket) -> list[WeightBucket]:
        if not self.engine.paused:
            await self.engine.wait_for_tokens(self.engine.tokens_generated + BATCH)
        return [item]
