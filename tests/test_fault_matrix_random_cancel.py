"""Random cancellation: 200 seeded trials cancel a sync into the generating local engine.

Each trial's watcher passes a seeded random number of scheduler checkpoints (no sleeps),
then cancels the sync's scope: anywhere from before the first engine call to after the
commit, with Fetch's worker threads and the engine's staging threads in flight. After
every trial, whatever the moment:
- the engine serves either the old version or the new one, and exactly that version's
  weights (bit for bit);
- it is not paused and not dirty (the local engine rolls back);
- the cancellation propagated (no ``StageError``, nothing swallowed), and the run left no
  task on the loop and no thread beyond those it started with (anyio's idle worker pool
  aside);
- the next trial's sync may start (the engine is not held by a cancelled one).
"""

from __future__ import annotations

import asyncio
import random
import threading

import anyio
import anyio.lowlevel
import torch

from tests.fakes.local import local_engine, new_weights
from weightpipe.stages.fetch import Fetch
from weightpipe.stages.load import engine_is_dirty
from weightpipe.stages.sync import sync_weights

TRIALS = 200
WEIGHT_SETS = 4
HEADROOM = 1.25
"""The watcher waits 0 to this times the checkpoints a clean sync took (measured on the
first): most trials cancel mid-sync, some let it commit first."""


def _threads() -> list[str]:
    return sorted(t.name for t in threading.enumerate() if t.name != "AnyIO worker thread")


async def test_random_cancellation_keeps_every_invariant() -> None:
    engine = local_engine()
    sets = [new_weights(engine, seed=10 + k) for k in range(WEIGHT_SETS)]
    bucket_bytes = 64 << 10
    outcomes = {"committed": 0, "cancelled": 0}
    async with engine:
        expected: dict[int, dict[str, torch.Tensor]] = {
            0: {name: engine.parameter(name) for name in sets[0]}
        }
        await engine.wait_for_tokens(1)
        # the first sync starts every thread a sync uses (the prepare pool, anyio's) and
        # counts the checkpoints another task passes meanwhile: a sync's length in them
        passed = 0

        async def count() -> None:
            nonlocal passed
            while True:
                await anyio.lowlevel.checkpoint()
                passed += 1

        async with anyio.create_task_group() as group:
            group.start_soon(count)
            await sync_weights(
                list(sets[1].items()), engine, version=1, stages=[Fetch(bucket_bytes)]
            )
            group.cancel_scope.cancel()
        most = max(10, int(passed * HEADROOM))
        expected[1] = sets[1]
        threads = _threads()
        tasks = set(asyncio.all_tasks())
        for trial in range(TRIALS):
            version = trial + 2
            before = await engine.version()
            checkpoints = random.Random(trial).randint(0, most)
            scope = anyio.CancelScope()

            async def cancel_later(
                count: int = checkpoints, target: anyio.CancelScope = scope
            ) -> None:
                for _ in range(count):
                    await anyio.lowlevel.checkpoint()
                target.cancel()

            with anyio.fail_after(30):
                async with anyio.create_task_group() as group:
                    group.start_soon(cancel_later)
                    with scope:
                        await sync_weights(
                            list(sets[version % WEIGHT_SETS].items()),
                            engine,
                            version=version,
                            stages=[Fetch(bucket_bytes)],
                        )
                    group.cancel_scope.cancel()
            now = await engine.version()
            assert now in (before, version), f"trial {trial}: v{now}"
            assert now is not None
            if now == version:
                expected[version] = sets[version % WEIGHT_SETS]
                outcomes["committed"] += 1
            else:
                assert scope.cancelled_caught, f"trial {trial}: not committed, not cancelled"
                outcomes["cancelled"] += 1
            for name, tensor in expected[now].items():
                assert torch.equal(engine.parameter(name), tensor), f"trial {trial}: {name}"
            assert not engine.paused, f"trial {trial}: left paused"
            assert not engine_is_dirty(engine), f"trial {trial}: dirty"
            assert set(asyncio.all_tasks()) == tasks, f"trial {trial}: a task was left"
            assert _threads() == threads, f"trial {trial}: threads {_threads()}"
    # the seeds reach both outcomes, so the trials really cancel at different moments
    assert outcomes["committed"] > 0, (outcomes, most)
    assert outcomes["cancelled"] > 0
