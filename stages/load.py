"""The Load stage: drives one ``Engine`` through a sync, bucket by bucket.

``Load`` is the last stage of a sync pipeline. It turns the stream of ``WeightBucket``s
into the engine protocol: ``begin`` before the first bucket, ``load`` for each, ``commit``
after the bucket marked ``is_last`` (the pipeline keeps buckets in order, so the version
moves only once every bucket was accepted). The sync mode decides when generation stops:
``pause`` pauses when the stage opens (for the whole sync), ``prefetch`` when the first
bucket is ready to load (or, with a ``prefetch_bytes`` look-ahead, once that many bytes or
the last bucket are ready, so fetch and quantize overlap generation for longer),
``in_flight`` never. Whatever happens (an engine error, a timeout, a failure upstream,
cancellation) ``close`` aborts an uncommitted sync and resumes generation, so the engine
keeps serving the old version. Every engine call runs under
``timeout_s``, since a pause/update race in an engine can hang forever. The stage keeps
its state per sync (reset in ``open``) and exposes a frozen ``LoadReport``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import ClassVar, TypeVar

import anyio

from weightpipe.pipeline import Stage
from weightpipe.stages.bucket import WeightBucket
from weightpipe.stages.engines.base import (
    PAUSE_MODES,
    SYNC_MODES,
    Engine,
    EngineError,
    PauseMode,
    SyncMode,
)

__all__ = ["Load", "LoadReport"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class LoadReport:
    """What one sync did to the engine.

    Attributes:
        engine: the engine's name.
        mode / pause_mode: how the sync ran.
        version: the version the buckets carried (``None`` when none arrived).
        committed: ``commit`` succeeded: the engine serves ``version``.
        aborted: ``abort`` was called (successfully or not) because the sync did not commit.
        buckets / tensors / bytes: what the engine accepted.
        load_s: seconds inside ``engine.load`` calls.
        hard_pause_s: seconds from the engine's pause returning (generation stopped) to
            its resume returning (0 when generation never paused).
        abort_error: why ``abort`` itself failed, if it did (logged, never raised: the
            failure that caused the abort is the one the caller sees).
        names: the names of the tensors the engine accepted, in order (FP8 scales
            included as ``<weight>_scale_inv``).
    """

    engine: str
    mode: SyncMode
    pause_mode: PauseMode
    version: int | None
    committed: bool
    aborted: bool
    buckets: int
    tensors: int
    bytes: int
    load_s: float
    hard_pause_s: float
    abort_error: str | None = None
    names: tuple[str, ...] = ()


class Load(Stage[WeightBucket, WeightBucket]):
    """Load buckets into ``engine``; the sync commits after the bucket with ``is_last``.

    Args:
        engine: any ``Engine`` (SGLang adapters, ``LocalEngine``, a test fake).
        mode: ``pause``, ``prefetch`` (default) or ``in_flight`` (see the module doc).
        pause_mode: how the engine pauses (``abort``, ``retract``, ``in_place``).
        timeout_s: limit for each engine call; a call past it raises ``EngineError``.
        version: when given, every bucket must carry this version.
        prefetch_bytes: ``prefetch`` mode only: how many bytes of buckets to hold back,
            generation still running, before pausing to load them. 0 (default) pauses
            at the first bucket; ``None`` holds the whole sync, so the hard pause shrinks
            to the engine's load phase, at the cost of keeping every bucket of the sync
            alive at once. Load holds at most ``prefetch_bytes`` plus one bucket.

    Each loaded bucket is passed on unchanged, so a further stage (a second engine) may
    follow; as the last stage its outputs are dropped at once.

    Raises (from ``process``/``flush``, wrapped by the pipeline in a ``StageError``):
        EngineError: the engine refused or failed a call, or did not answer in time.
        ValueError: a bucket out of order, of another version, after the last one, or
            not a ``WeightBucket``; the stream ended without a last bucket.
    """

    name: ClassVar[str] = "load"

    def __init__(
        self,
        engine: Engine,
        *,
        mode: SyncMode = "prefetch",
        pause_mode: PauseMode = "retract",
        timeout_s: float = 60.0,
        version: int | None = None,
        prefetch_bytes: int | None = 0,
    ) -> None:
        if mode not in SYNC_MODES:
            raise ValueError(f"unknown sync mode {mode!r}; expected one of {SYNC_MODES}")
        if pause_mode not in PAUSE_MODES:
            raise ValueError(f"unknown pause mode {pause_mode!r}; expected one of {PAUSE_MODES}")
        if prefetch_bytes is not None and prefetch_bytes < 0:
            raise ValueError(f"prefetch_bytes must be >= 0 or None, got {prefetch_bytes!r}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        self.engine = engine
        self.mode: SyncMode = mode
        self.pause_mode: PauseMode = pause_mode
        self.timeout_s = timeout_s
        self.version = version
        self.prefetch_bytes = prefetch_bytes
        self._engine_name = str(getattr(engine, "name", "") or type(engine).__name__)
        self._reset()
        self._last_report: LoadReport | None = None

    def _reset(self) -> None:
        self._sync_version: int | None = None
        self._begun = False
        self._committed = False
        self._aborted = False
        self._paused = False
        self._paused_at = 0.0
        self._hard_pause_s = 0.0
        self._buckets = 0
        self._tensors = 0
        self._bytes = 0
        self._load_s = 0.0
        self._abort_error: str | None = None
        self._names: list[str] = []
        self._received = 0
        self._held: list[WeightBucket] = []
        self._held_bytes = 0

    @property
    def report(self) -> LoadReport:
        """The last finished sync's report, or a live one while a sync runs."""
        if self._last_report is not None and not self._begun and not self._paused:
            return self._last_report
        return self._snapshot()

    def _snapshot(self) -> LoadReport:
        hard_pause = self._hard_pause_s
        if self._paused:
            hard_pause += time.perf_counter() - self._paused_at
        return LoadReport(
            engine=self._engine_name,
            mode=self.mode,
            pause_mode=self.pause_mode,
            version=self._sync_version,
            committed=self._committed,
            aborted=self._aborted,
            buckets=self._buckets,
            tensors=self._tensors,
            bytes=self._bytes,
            load_s=self._load_s,
            hard_pause_s=hard_pause,
            abort_error=self._abort_error,
            names=tuple(self._names),
        )

    async def open(self) -> None:
        """Start a sync; in ``pause`` mode generation stops here, before any fetch.

        Raises:
            EngineError: the engine failed to pause or timed out (resume is tried here first,
                since the pipeline does not close a stage whose ``open`` failed).
        """
        self._reset()
        self._last_report = None
        if self.mode == "pause":
            try:
                await self._pause()
            except BaseException:
                # The pipeline does not close a stage whose open failed: undo here.
                with anyio.CancelScope(shield=True):
                    try:
                        await self._resume()
                    except Exception as exc:
                        logger.warning("resume on engine %r failed: %s", self._engine_name, exc)
                self._last_report = self._snapshot()
                self._paused = False
                raise

    async def process(self, item: WeightBucket) -> AsyncIterator[WeightBucket]:
        """Load one bucket (beginning the sync first, committing after the last one).

        In ``prefetch`` mode with a ``prefetch_bytes`` budget, buckets are held back
        (generation still running) until the budget or the last bucket is reached, then
        generation pauses and they are loaded in order.
        """
        bucket = self._check(item)
        self._received += 1
        if self.mode == "prefetch" and not self._begun:
            self._held.append(bucket)
            self._held_bytes += bucket.nbytes
            budget = self.prefetch_bytes
            if not bucket.is_last and (budget is None or self._held_bytes < budget):
                return
            held, self._held, self._held_bytes = self._held, [], 0
            await self._pause()
            for one in held:
                await self._load(one)
                yield one
            return
        await self._load(bucket)
        yield bucket

    async def _load(self, bucket: WeightBucket) -> None:
        if not self._begun:
            # Marked before the call: a begin that failed or timed out may still have
            # opened a session on the engine, so close aborts it too.
            self._begun = True
            await self._call("begin", lambda: self.engine.begin(bucket.version))
        started = time.perf_counter()
        await self._call(f"load of {bucket.describe()}", lambda: self.engine.load(bucket))
        self._load_s += time.perf_counter() - started
        self._buckets += 1
        self._tensors += len(bucket.tensors)
        self._names.extend(name for name, _ in bucket.tensors)
        self._bytes += bucket.nbytes
        if bucket.is_last:
            await self._call("commit", lambda: self.engine.commit(bucket.version))
            self._committed = True
            if self._paused:  # no reason to keep generation waiting until close
                await self._resume()

    async def flush(self) -> AsyncIterator[WeightBucket]:
        """Fail a stream that ended without its last bucket (``close`` then aborts)."""
        if not self._committed:
            if self._received == 0:
                raise ValueError("the sync carried no buckets; nothing was loaded")
            raise ValueError(
                f"the stream ended after {self._received} buckets without one marked is_last; "
                f"v{self._sync_version} was not committed"
            )
        return
        yield

    async def close(self) -> None:
        """Abort an uncommitted sync (best effort), then resume generation.

        Raises:
            EngineError: generation could not be resumed (after the abort was tried).
        """
        try:
            self._held, self._held_bytes = [], 0  # never loaded: nothing to undo
            if self._begun and not self._committed and self._sync_version is not None:
                self._aborted = True
                version = self._sync_version
                try:
                    await self._call("abort", lambda: self.engine.abort(version))
                except Exception as exc:  # must not hide the failure that caused the abort
                    self._abort_error = f"{type(exc).__name__}: {exc}"
                    logger.warning(
                        "abort of v%s on engine %r failed: %s", version, self._engine_name, exc
                    )
            if self._paused:
                await self._resume()
        finally:
            self._last_report = self._snapshot()
            self._begun = False
            self._paused = False

    def _check(self, item: object) -> WeightBucket:
        if not isinstance(item, WeightBucket):
            raise ValueError(
                f"Load takes WeightBuckets, got {type(item).__name__}; put Fetch before it"
            )
        if self._committed:
            raise ValueError(f"{item.describe()} arrived after the last bucket was committed")
        if item.index != self._received:
            raise ValueError(f"{item.describe()} arrived in position {self._received}")
        expected = self.version if self._sync_version is None else self._sync_version
        if expected is not None and item.version != expected:
            raise ValueError(f"{item.describe()} does not belong to the sync of v{expected}")
        self._sync_version = item.version
        return item

    async def _pause(self) -> None:
        # Counted as paused before the call returns: if it fails half-way, close resumes.
        self._paused = True
        self._paused_at = time.perf_counter()
        await self._call(f"pause({self.pause_mode!r})", lambda: self.engine.pause(self.pause_mode))
        # Generation stops when pause returns (an engine finishes its current step first):
        # the hard pause runs from here to the end of resume.
        self._paused_at = time.perf_counter()

    async def _resume(self) -> None:
        await self._call("resume", self.engine.resume)
        self._hard_pause_s += time.perf_counter() - self._paused_at
        self._paused = False

    async def _call(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        """One engine call under ``timeout_s``; a timeout becomes an ``EngineError``."""
        try:
            with anyio.fail_after(self.timeout_s):
                return await call()
        except TimeoutError as exc:
            raise EngineError(
                self._engine_name,
                f"{what} did not answer within {self.timeout_s} s",
                retryable=True,
            ) from exc
