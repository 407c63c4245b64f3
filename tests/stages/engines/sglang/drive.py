"""How the SGLang adapter tests drive an engine: through the Load stage itself.

A sync is ``Pipeline([Load(engine, ...)]).run(buckets)``, so every test exercises the
begin / load / commit / abort / pause / resume order and the deadlines that Load owns,
not a second hand-written driver. A failed sync surfaces as the pipeline's ``StageError``;
``failed_sync`` returns the ``EngineError`` that caused it. ``WaitRecordingEvent`` shows
where and when an adapter waited for a bucket's CUDA work (``wire.wait_written``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import pytest

from tests.fakes.cuda import FakeCudaEvent
from weightpipe.pipeline import Pipeline, StageError
from weightpipe.stages.bucket import WeightBucket
from weightpipe.stages.engines.base import Engine, EngineError, PauseMode, SyncMode
from weightpipe.stages.load import Load, LoadReport

__all__ = ["WaitRecordingEvent", "failed_sync", "load_sync"]


class WaitRecordingEvent(FakeCudaEvent):
    """``tests.fakes.cuda.FakeCudaEvent`` (a fake of ``torch.cuda.Event``) that records,
    for each host wait, the waiting thread and what ``seen()`` answered at that moment
    (e.g. how many updates the engine had received)."""

    def __init__(self, seen: Callable[[], object]) -> None:
        super().__init__()
        self._seen = seen
        self.waits: list[tuple[int, object]] = []

    def synchronize(self) -> None:
        self.waits.append((threading.get_ident(), self._seen()))
        super().synchronize()


def _load(engine: Engine, mode: SyncMode, pause_mode: PauseMode, timeout_s: float | None) -> Load:
    # timeout_s None: Load's own default, the engine's default_timeout_s.
    return Load(engine, mode=mode, pause_mode=pause_mode, timeout_s=timeout_s)


async def load_sync(
    engine: Engine,
    buckets: Sequence[WeightBucket],
    *,
    mode: SyncMode = "in_flight",
    pause_mode: PauseMode = "retract",
    timeout_s: float | None = None,
) -> LoadReport:
    """One sync of ``buckets`` into ``engine`` through Load; returns Load's report.

    ``in_flight`` (the default) aborts no request, but an SGLang engine cannot switch
    atomically, so Load still pauses it ``in_place`` around the buckets; ``timeout_s`` is
    Load's deadline per engine call (default: the engine's ``default_timeout_s``).
    """
    load = _load(engine, mode, pause_mode, timeout_s)
    await Pipeline([load], depth=2).run(list(buckets))
    return load.report


async def failed_sync(
    engine: Engine,
    buckets: Sequence[WeightBucket],
    *,
    mode: SyncMode = "in_flight",
    pause_mode: PauseMode = "retract",
    timeout_s: float | None = None,
) -> tuple[EngineError, LoadReport]:
    """A sync that must fail in the engine: its ``EngineError`` and Load's report."""
    load = _load(engine, mode, pause_mode, timeout_s)
    with pytest.raises(StageError) as info:
        await Pipeline([load], depth=2).run(list(buckets))
    cause = info.value.__cause__
    assert isinstance(cause, EngineError), f"the sync failed outside the engine: {cause!r}"
    report = load.report
    assert not report.committed
    return cause, report
