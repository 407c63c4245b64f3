"""The Load stage: drives one ``Engine`` through a sync, bucket by bucket.

``Load`` is the last stage of a sync pipeline. It checks the stream of ``WeightBucket``s
(in order, one version, ending with the bucket marked ``is_last``) and hands each one to
an ``_EngineSync``: the transaction object that owns every engine call of one sync
(``begin`` before the first bucket, ``load`` for each, ``commit`` after the last, and on
any failure ``abort`` and ``resume``), the pause state, what the engine accepted, and the
deadline of each call. The sync mode picks the pause policy (``PAUSE_POLICY``, through
``pause_policy``): ``pause`` pauses when the stage opens, ``prefetch`` when the first
bucket is ready to load (or, with a ``prefetch_bytes`` look-ahead, once that many bytes or
the last bucket are ready, so fetch and quantize overlap generation for longer),
``in_flight`` never on an engine that switches a sync's parameters together at commit
(``SwitchesAtomically``: the local engine). An engine that cannot (SGLang applies each
bucket to the live model as it arrives) would otherwise run decode steps on a mix of two
versions, so ``in_flight`` on it means: requests are never aborted or retracted, fetch and
quantize overlap generation, and the load phase runs under an ``in_place`` pause, entered
like ``prefetch``'s (``prefetch_bytes=None`` prefetches the whole sync first, so the pause
is the load alone). An engine that ``PreparesBuckets`` (SGLang: the payload's encoding) is
given each bucket as it reaches Load, before the pause for it, so the pause holds only
the engine's own calls; ``LoadReport.pause_phases`` splits the pause into its parts. Whatever
happens (an engine error, a timeout, a failure upstream, cancellation) ``close`` aborts
an uncommitted sync and resumes generation, so the engine keeps serving the old version.
One sync at a time runs on an engine: a second ``Load`` opening on an engine that is in a
sync is refused at ``open`` without touching the engine.

Partial failures. An engine whose ``abort`` undoes every bucket it accepted declares
``rolls_back = True`` (the local engine); any other (SGLang applies each bucket as it
arrives) holds a half-updated model once it accepted a bucket, or new weights under the
old version once ``commit`` was sent. When such a sync fails, the engine is marked dirty
(``engine_is_dirty``, ``LoadReport.engine_dirty``, a failure inside Load raises
``EngineDirtyError``) and, under ``on_partial_failure="keep_paused"`` (the default), left
paused (paused now if the sync mode never paused it): the next sync finds it paused, does
not pause it again, and resumes generation only after its commit, which clears the mark.
``"resume"`` resumes generation anyway and logs a warning naming the engine. A sync that
failed before the engine accepted anything resumes generation as always.

The version is checked before the engine is touched (before the pause and ``begin``): an
int (not a bool), >= 0, strictly greater than the version the engine serves.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Literal, TypeVar, get_args

import anyio
import anyio.lowlevel

from weightpipe.pipeline import Stage
from weightpipe.stages.bucket import WeightBucket
from weightpipe.stages.engines.base import (
    DEFAULT_TIMEOUT_S,
    PAUSE_MODES,
    SYNC_MODES,
    Engine,
    EngineDirtyError,
    EngineError,
    PauseMode,
    PreparesBuckets,
    SyncMode,
    engine_name,
    engine_rolls_back,
    engine_switches_atomically,
)

__all__ = [
    "ON_PARTIAL_FAILURE",
    "PAUSE_POLICY",
    "EngineCall",
    "Load",
    "LoadReport",
    "OnPartialFailure",
    "PauseAt",
    "PausePhases",
    "check_version",
    "engine_is_dirty",
    "pause_policy",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

_CLOSE_SLACK_S = 1.0
"""What Load's close may take beyond the deadlines of its abort and its resume."""

PauseAt = Literal["open", "first_load", "never"]
"""When a sync stops generation: when Load opens, just before the first ``load``, never."""

PAUSE_POLICY: dict[SyncMode, PauseAt] = {
    "pause": "open",
    "prefetch": "first_load",
    "in_flight": "never",
}
"""The pause policy of each sync mode on an engine that switches atomically (the one
table of it; ``pause_policy`` adds the rule for any other engine)."""


def pause_policy(
    mode: SyncMode, pause_mode: PauseMode, *, switches_atomically: bool
) -> tuple[PauseAt, PauseMode]:
    """When a sync in ``mode`` pauses, and how: ``PAUSE_POLICY[mode]`` and ``pause_mode``,
    except ``in_flight`` on an engine that cannot switch atomically: it pauses like
    ``prefetch`` (at the first load, after the ``prefetch_bytes`` look-ahead) and always
    ``in_place``, since ``in_flight`` promises that no request is aborted or retracted."""
    if mode == "in_flight" and not switches_atomically:
        return "first_load", "in_place"
    return PAUSE_POLICY[mode], pause_mode


OnPartialFailure = Literal["keep_paused", "resume"]
"""What Load does with an engine that cannot roll back and accepted part of a failed sync:
keep it paused until a full sync commits (the default), or resume it (logged)."""
ON_PARTIAL_FAILURE: tuple[OnPartialFailure, ...] = get_args(OnPartialFailure)


def check_version(version: object, current: int | None = None, *, engine: str = "") -> int:
    """``version`` if it may be installed on an engine serving ``current``, else raise.

    Raises:
        ValueError: ``version`` is not an int (a bool or a str is refused), is negative, or
            is not strictly greater than ``current``; the message names both values.
    """
    where = f" on engine {engine!r}" if engine else ""
    if isinstance(version, bool) or not isinstance(version, int):
        raise ValueError(f"version must be an int, got {type(version).__name__} {version!r}{where}")
    if version < 0:
        raise ValueError(f"version must be >= 0, got {version}{where}")
    if current is not None and version <= current:
        raise ValueError(
            f"version {version} is not greater than the version {current} the engine "
            f"serves{where}; versions must increase strictly"
        )
    return version


@dataclass(frozen=True)
class EngineCall:
    """One engine call of a sync, as Load made it (a trace draws it on the engine's track).

    Attributes:
        what: the call as errors name it: ``"version query"``, ``"pause('retract')"``,
            ``"begin"``, ``"load of bucket 3 (...)"``, ``"commit"``, ``"abort"``, ``"resume"``.
        start_s / end_s: ``time.perf_counter()`` when it was made and when it returned
            or failed.
        error: the exception's type name when it failed or timed out, else ``None``.
    """

    what: str
    start_s: float
    end_s: float
    error: str | None = None

    @property
    def kind(self) -> str:
        """The call's first word: ``version``, ``pause``, ``begin``, ``load``, ``commit``..."""
        return self.what.split(" ", 1)[0].split("(", 1)[0]


@dataclass(frozen=True)
class PausePhases:
    """Where a sync's hard pause went; the four parts add up to ``hard_pause_s``.

    Attributes:
        first_payload_s: from generation stopping to the first call that hands the sync
            to the engine (``begin``, else the first ``load``): waiting for the first
            bucket and encoding its payload inside the pause. Near 0 once buckets are
            prepared before the pause (``PreparesBuckets``).
        engine_calls_s: inside the engine's own calls while paused (``begin``, every
            ``load``, ``commit``; ``abort`` on a failure): what the engine must do paused.
        between_calls_s: the rest before ``resume``: waiting for later buckets from
            upstream and preparing them inside the pause (0 when the whole sync was
            prefetched and prepared first).
        resume_s: the ``resume`` call (generation restarts when it returns).
    """

    first_payload_s: float = 0.0
    engine_calls_s: float = 0.0
    between_calls_s: float = 0.0
    resume_s: float = 0.0

    def as_dict(self) -> dict[str, float]:
        """``{"first_payload": ..., "engine_calls": ..., "between_calls": ..., "resume": ...}``
        in seconds (for JSON and tables)."""
        return {
            "first_payload": self.first_payload_s,
            "engine_calls": self.engine_calls_s,
            "between_calls": self.between_calls_s,
            "resume": self.resume_s,
        }


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
        engine_dirty: after this sync the engine holds part of a failed sync it cannot
            roll back (see the module's partial-failure policy).
        left_paused: generation was left paused because the engine is dirty.
        calls: every engine call of the sync, in order, with its start and end
            (``prepare of bucket ...`` for an engine that ``PreparesBuckets``).
        pause_phases: the hard pause split into its parts (``PausePhases``).
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
    engine_dirty: bool = False
    left_paused: bool = False
    calls: tuple[EngineCall, ...] = ()
    pause_phases: PausePhases = PausePhases()


# Engines in a sync, by id() (any object can be a key; an entry lives exactly as long as
# the sync that holds the engine, which keeps the engine alive): id -> who holds it. A
# threading lock, since two event loops in two threads may share an engine.
_engines_in_sync: dict[int, str] = {}
_engines_lock = threading.Lock()

# Dirty engines, by id(): id -> (the engine, kept alive so its id is not reused; whether
# it was left paused). Under ``_engines_lock``.
_dirty_engines: dict[int, tuple[object, bool]] = {}


# The calls (by first word of ``EngineCall.what``) that hand the sync to the engine.
_HANDOVER_CALLS = frozenset({"begin", "load", "commit", "abort"})


def engine_is_dirty(engine: object) -> bool:
    """Whether ``engine`` holds part of a failed sync it could not roll back."""
    with _engines_lock:
        return id(engine) in _dirty_engines


class _EngineSync:
    """One sync's transaction on one engine: every engine call, the pause, the accounting.

    Created by ``Load.open``; ``claim`` makes it the engine's only sync until ``close``.
    ``load`` begins the sync before the first bucket and commits after the last;
    ``close`` aborts an uncommitted sync (best effort) and resumes a paused engine. Each
    call runs under ``timeout_s``; a timeout becomes a retryable ``EngineError`` naming
    the call and the engine.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        name: str,
        owner: str,
        pause_mode: PauseMode,
        timeout_s: float,
        on_partial_failure: OnPartialFailure = "keep_paused",
    ) -> None:
        self.engine = engine
        self.rolls_back = engine_rolls_back(engine)
        self.prepares = isinstance(engine, PreparesBuckets)
        self.on_partial_failure: OnPartialFailure = on_partial_failure
        self.dirty = False
        self.left_paused = False
        self.version_checked = False
        self._commit_sent = False
        self.name = name
        self.owner = owner
        self.pause_mode: PauseMode = pause_mode
        self.timeout_s = timeout_s
        self.begun = False
        self.committed = False
        self.aborted = False
        self.paused = False
        self.abort_error: str | None = None
        self.buckets = 0
        self._maybe_loaded = False
        self.tensors = 0
        self.bytes = 0
        self.load_s = 0.0
        self.names: list[str] = []
        self.calls: list[EngineCall] = []
        self._pause_asked = False
        self._paused_at = 0.0
        self._hard_pause_s = 0.0
        self._claimed = False
        # The pause's parts (PausePhases): the first hand-over's start, engine calls and
        # resume while paused.
        self._first_handover_s: float | None = None
        self._paused_calls_s = 0.0
        self._resume_s = 0.0

    def claim(self) -> None:
        """Make this the engine's only sync until ``close``.

        Raises:
            EngineError: another sync holds the engine (it is left untouched).
        """
        with _engines_lock:
            holder = _engines_in_sync.get(id(self.engine))
            if holder is not None:
                raise EngineError(
                    self.name,
                    f"{self.owner} cannot start a sync while {holder} is syncing this "
                    "engine; one sync at a time per engine",
                )
            _engines_in_sync[id(self.engine)] = self.owner
            self._claimed = True
            dirty = _dirty_engines.get(id(self.engine))
        if dirty is not None:
            # A previous sync left part of itself on the engine: this one must commit
            # before generation may resume. An engine left paused is not paused again.
            self.dirty = True
            if dirty[1]:
                self._pause_asked = True
                self.paused = True
                self._paused_at = time.perf_counter()

    async def check_version(self, version: object) -> None:
        """Refuse a version that is not an int > the engine's, before touching the engine
        (once per sync; reading ``version()`` changes nothing).

        Raises:
            ValueError: see ``check_version``.
            EngineError: ``version()`` failed or did not answer in time.
        """
        if self.version_checked:
            return
        check_version(version, engine=self.name)
        current = await self._call("version query", self.engine.version)
        check_version(version, current, engine=self.name)
        self.version_checked = True

    @property
    def touched(self) -> bool:
        """The engine accepted a bucket of this sync (or may have: a load it never
        answered), or was sent the commit."""
        return self.buckets > 0 or self._maybe_loaded or self._commit_sent

    def hard_pause_s(self) -> float:
        if self.paused:
            return self._hard_pause_s + time.perf_counter() - self._paused_at
        return self._hard_pause_s

    def pause_phases(self) -> PausePhases:
        """The hard pause so far, split (see ``PausePhases``)."""
        total = self.hard_pause_s()
        first = min(self._first_handover_s or 0.0, total)
        calls = min(self._paused_calls_s, total - first)
        resume = min(self._resume_s, total - first - calls)
        return PausePhases(first, calls, max(total - first - calls - resume, 0.0), resume)

    async def prepare(self, bucket: WeightBucket) -> None:
        """Let an engine that ``PreparesBuckets`` encode ``bucket`` now (under the deadline).

        Raises:
            EngineError: the engine failed to prepare it, or did not in time.
        """
        if self.prepares:
            engine = self.engine
            assert isinstance(engine, PreparesBuckets)
            await self._call(f"prepare of {bucket.describe()}", lambda: engine.prepare(bucket))

    async def pause(self) -> None:
        """Stop generation (once per sync; later calls return at once)."""
        if self._pause_asked:
            return
        self._pause_asked = True
        # Counted as paused before the call returns: if it fails half-way, close resumes.
        self.paused = True
        self._paused_at = time.perf_counter()
        # A pause once asked for takes effect whether or not the caller keeps waiting (the
        # local engine enters it after its current step, an HTTP server serves a request
        # already sent). A resume sent before it took effect is a no-op, and the pause
        # then lands with nobody left to resume it. So the call is shielded from
        # cancellation (never from its deadline), and a cancellation is delivered as
        # soon as the pause returned, when close's resume can undo it.
        with anyio.CancelScope(shield=True):
            await self._call(
                f"pause({self.pause_mode!r})", lambda: self.engine.pause(self.pause_mode)
            )
        # Generation stops when pause returns (an engine finishes its current step first):
        # the hard pause runs from here to the end of resume.
        self._paused_at = time.perf_counter()
        await anyio.lowlevel.checkpoint_if_cancelled()

    async def load(self, bucket: WeightBucket) -> None:
        """Load one bucket: ``begin`` first if needed, ``commit`` (and resume) after the last."""
        if not self.begun:
            # Marked before the call: a begin that failed or timed out may still have
            # opened a session on the engine, so close aborts it too.
            self.begun = True
            await self._call("begin", lambda: self.engine.begin(bucket.version))
        started = time.perf_counter()
        what = f"load of {bucket.describe()}"
        try:
            # Until the engine answers, the bucket may be in: a timeout, a dropped answer
            # or a cancellation leaves it counted as touching the engine.
            self._maybe_loaded = True
            try:
                await self._call(what, lambda: self.engine.load(bucket))
            except EngineError as exc:
                self._maybe_loaded = exc.unanswered
                raise
            self._maybe_loaded = False
            self.load_s += time.perf_counter() - started
            self.buckets += 1
            self.tensors += len(bucket.tensors)
            self.names.extend(name for name, _ in bucket.tensors)
            self.bytes += bucket.nbytes
            if bucket.is_last:
                what = "commit"
                self._commit_sent = True
                await self._call("commit", lambda: self.engine.commit(bucket.version))
        except Exception as exc:
            if self.rolls_back or not self.touched:
                raise
            if isinstance(exc, EngineError):
                # The engine's own error stays the one raised (its tensor, its retryable),
                # told that it left the engine dirty.
                exc.engine_dirty = True
                exc.args = (f"{exc}; {self._dirty_words()}", *exc.args[1:])
                raise
            raise EngineDirtyError(
                self.name, f"{what} failed ({type(exc).__name__}: {exc}); {self._dirty_words()}"
            ) from exc
        if not bucket.is_last:
            return
        self.committed = True
        with _engines_lock:
            _dirty_engines.pop(id(self.engine), None)
        self.dirty = False
        if self.paused:  # no reason to keep generation waiting until close
            await self._resume()

    def _dirty_words(self) -> str:
        accepted = f"after the engine accepted {self.buckets} bucket(s)"
        if self._maybe_loaded:
            accepted += " and may have applied one it never answered"
        if self._commit_sent:
            accepted += " and was sent the commit"
        then = (
            "it is left paused and marked dirty until a full sync commits"
            if self.on_partial_failure == "keep_paused"
            else "it is marked dirty and generation was resumed on it (on_partial_failure='resume')"
        )
        return f"the sync failed {accepted}; the engine cannot roll back, so {then}"

    async def close(self, version: int | None) -> None:
        """Abort an uncommitted sync of ``version`` (best effort), then resume generation.

        The caller shields it. Releases the engine for the next sync in any case.

        Raises:
            EngineError: generation could not be resumed (after the abort was tried).
        """
        try:
            if self.begun and not self.committed and version is not None:
                self.aborted = True
                try:
                    await self._call("abort", lambda: self.engine.abort(version))
                except Exception as exc:  # must not hide the failure that caused the abort
                    self.abort_error = f"{type(exc).__name__}: {exc}"
                    logger.warning("abort of v%s on engine %r failed: %s", version, self.name, exc)
            if not self.committed and not self.rolls_back and (self.touched or self.dirty):
                await self._mark_dirty()
            elif self.paused:
                await self._resume()
        finally:
            if self._claimed:
                with _engines_lock:
                    _engines_in_sync.pop(id(self.engine), None)
                self._claimed = False

    async def _mark_dirty(self) -> None:
        """The engine holds part of a failed sync: keep it paused, or resume it (logged)."""
        self.dirty = True
        if self.on_partial_failure == "resume":
            logger.warning(
                "engine %r holds part of a failed sync it cannot roll back; resuming "
                "generation on it anyway (on_partial_failure='resume')",
                self.name,
            )
            if self.paused:
                await self._resume()
        else:
            logger.error(
                "engine %r holds part of a failed sync it cannot roll back; generation stays "
                "paused until a full sync commits",
                self.name,
            )
            try:
                if not self.paused:  # a sync that never paused: stop serving the mixed model
                    await self.pause()
            finally:
                self.left_paused = self.paused
        with _engines_lock:
            _dirty_engines[id(self.engine)] = (self.engine, self.left_paused)

    async def _resume(self) -> None:
        started = time.perf_counter()
        try:
            await self._call("resume", self.engine.resume)
        finally:
            self._resume_s += time.perf_counter() - started
        self._hard_pause_s += time.perf_counter() - self._paused_at
        self.paused = False

    async def _call(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        """One engine call under ``timeout_s``; a timeout becomes an ``EngineError``."""
        started = time.perf_counter()
        # A call that hands the sync to a paused engine: part of what it must do paused.
        handover = self.paused and what.split(" ", 1)[0] in _HANDOVER_CALLS
        if handover and self._first_handover_s is None:
            self._first_handover_s = max(started - self._paused_at, 0.0)
        error: str | None = None
        try:
            with anyio.fail_after(self.timeout_s):
                return await call()
        except TimeoutError as exc:
            error = "TimeoutError"
            raise EngineError(
                self.name,
                f"{what} did not answer within {self.timeout_s} s",
                retryable=True,
                unanswered=True,
            ) from exc
        except BaseException as exc:
            error = type(exc).__name__
            raise
        finally:
            ended = time.perf_counter()
            if handover:
                self._paused_calls_s += ended - started
            self.calls.append(EngineCall(what, started, ended, error))


def _resolve_timeout(engine: Engine, timeout_s: float | None) -> float:
    """``timeout_s``, else the engine's ``default_timeout_s``, else ``DEFAULT_TIMEOUT_S``."""
    where = "timeout_s"
    if timeout_s is None:
        timeout_s = getattr(engine, "default_timeout_s", None)
        where = f"engine {engine_name(engine)!r}: default_timeout_s"
        if timeout_s is None:
            return DEFAULT_TIMEOUT_S
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)):
        raise ValueError(f"{where} must be a number of seconds, got {timeout_s!r}")
    if not (timeout_s > 0 and math.isfinite(timeout_s)):
        raise ValueError(f"{where} must be > 0 and finite, got {timeout_s!r}")
    return float(timeout_s)


class Load(Stage[WeightBucket, WeightBucket]):
    """Load buckets into ``engine``; the sync commits after the bucket with ``is_last``.

    Args:
        engine: any ``Engine`` (SGLang adapters, ``LocalEngine``, a test fake).
        mode: ``pause``, ``prefetch`` (default) or ``in_flight`` (see ``pause_policy``).
        pause_mode: how the engine pauses (``abort``, ``retract``, ``in_place``); an
            ``in_flight`` sync on an engine that cannot switch atomically pauses
            ``in_place`` whatever this says (no request is aborted or retracted).
        timeout_s: the deadline of each engine call; a call past it raises a retryable
            ``EngineError`` naming the call and the engine. ``None`` (default): the
            engine's ``default_timeout_s`` attribute, or ``DEFAULT_TIMEOUT_S`` (60 s) of
            ``weightpipe.stages.engines.base`` if it has none (the table there lists each
            engine's). Load is the one owner of this deadline: an engine retries a
            retryable failure only inside it (``retry_within_deadline``). A pause is
            waited for to its end even when the sync is cancelled meanwhile (see
            ``close``), so a cancellation can take up to this long to land.
        version: when given, every bucket must carry this version.
        prefetch_bytes: ``prefetch`` mode, and ``in_flight`` on an engine that cannot
            switch atomically: how many bytes of buckets to hold back, generation still
            running, before pausing to load them. 0 (default) pauses at the first bucket;
            ``None`` holds the whole sync, so the hard pause shrinks to the engine's load
            phase, at the cost of keeping every bucket of the sync alive at once (and,
            for an engine that ``PreparesBuckets``, its encoded payload). Load holds at
            most ``prefetch_bytes`` plus one bucket.
        name: the stage's name in the pipeline (default ``"load"``; the pipeline numbers
            a repeated name ``load-2``), so a second Load (a second engine) can say
            which it is in errors and reports.
        on_partial_failure: ``keep_paused`` (default) or ``resume``: what happens to an
            engine that cannot roll back and accepted part of a failed sync (see the
            module's partial-failure policy).

    ``close_timeout_s`` (the pipeline's bound on ``close``) is ``2 * timeout_s`` plus a
    second: room for an abort and a resume, each under its own deadline.

    Each loaded bucket is passed on unchanged, so a further stage (a second engine) may
    follow; as the last stage its outputs are dropped at once.

    Raises (from ``open``/``process``/``flush``/``close``, wrapped by the pipeline in a
    ``StageError``):
        EngineError: the engine refused or failed a call, or did not answer in time;
            another sync holds the engine (at ``open``, before any engine call).
            ``EngineDirtyError`` (``engine_dirty`` True) when the engine cannot roll back
            and had accepted part of the sync.
        ValueError: a version that is not an int greater than the engine's (before the
            engine is touched: no pause, no begin), a bucket out of order, of another
            version, after the last one, or not a ``WeightBucket``; the stream ended
            without a last bucket.
    Raises (from the constructor): ValueError: an unknown mode, a bad ``timeout_s``
    (or engine ``default_timeout_s``), ``prefetch_bytes``, ``name``, ``version`` or
    ``on_partial_failure``.
    """

    name: str = "load"

    def __init__(
        self,
        engine: Engine,
        *,
        mode: SyncMode = "prefetch",
        pause_mode: PauseMode = "retract",
        timeout_s: float | None = None,
        version: int | None = None,
        prefetch_bytes: int | None = 0,
        name: str = "load",
        on_partial_failure: OnPartialFailure = "keep_paused",
    ) -> None:
        if mode not in SYNC_MODES:
            raise ValueError(f"unknown sync mode {mode!r}; expected one of {SYNC_MODES}")
        if pause_mode not in PAUSE_MODES:
            raise ValueError(f"unknown pause mode {pause_mode!r}; expected one of {PAUSE_MODES}")
        if prefetch_bytes is not None and prefetch_bytes < 0:
            raise ValueError(f"prefetch_bytes must be >= 0 or None, got {prefetch_bytes!r}")
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        if on_partial_failure not in ON_PARTIAL_FAILURE:
            raise ValueError(
                f"unknown on_partial_failure {on_partial_failure!r}; "
                f"expected one of {ON_PARTIAL_FAILURE}"
            )
        if version is not None:
            check_version(version, engine=engine_name(engine))
        self.on_partial_failure: OnPartialFailure = on_partial_failure
        self.name = name
        self.engine = engine
        self.mode: SyncMode = mode
        self.switches_atomically = engine_switches_atomically(engine)
        self.pause_at: PauseAt
        self.pause_mode: PauseMode
        self.pause_at, self.pause_mode = pause_policy(
            mode, pause_mode, switches_atomically=self.switches_atomically
        )
        self.timeout_s = _resolve_timeout(engine, timeout_s)
        # The pipeline bounds each stage's close; Load's holds an abort and a resume, each
        # under its own deadline, and must not be cut before the resume was sent (the
        # engine would stay paused). The slack lets Load's named deadlines fire first.
        self.close_timeout_s = 2 * self.timeout_s + _CLOSE_SLACK_S
        self.version = version
        self.prefetch_bytes = prefetch_bytes
        self._engine_name = engine_name(engine)
        self._sync: _EngineSync | None = None
        self._last_report: LoadReport | None = None
        self._start_stream()

    def _start_stream(self) -> None:
        self._sync_version: int | None = None
        self._received = 0
        self._holding = self.pause_at == "first_load"
        self._held: list[WeightBucket] = []
        self._held_bytes = 0

    @property
    def report(self) -> LoadReport:
        """The live report while a sync runs, else the last finished sync's."""
        if self._sync is not None:
            return self._report(self._sync)
        if self._last_report is not None:
            return self._last_report
        return self._report(None)

    def _report(self, sync: _EngineSync | None) -> LoadReport:
        return LoadReport(
            engine=self._engine_name,
            mode=self.mode,
            pause_mode=self.pause_mode,
            version=self._sync_version,
            committed=sync is not None and sync.committed,
            aborted=sync is not None and sync.aborted,
            buckets=0 if sync is None else sync.buckets,
            tensors=0 if sync is None else sync.tensors,
            bytes=0 if sync is None else sync.bytes,
            load_s=0.0 if sync is None else sync.load_s,
            hard_pause_s=0.0 if sync is None else sync.hard_pause_s(),
            abort_error=None if sync is None else sync.abort_error,
            names=() if sync is None else tuple(sync.names),
            engine_dirty=engine_is_dirty(self.engine) if sync is None else sync.dirty,
            left_paused=sync is not None and sync.left_paused,
            calls=() if sync is None else tuple(sync.calls),
            pause_phases=PausePhases() if sync is None else sync.pause_phases(),
        )

    async def open(self) -> None:
        """Start a sync: claim the engine; in ``pause`` mode generation stops here.

        Raises:
            EngineError: another sync holds the engine (nothing was called), or the engine
                failed to pause or timed out (resume is tried here first, since the
                pipeline does not close a stage whose ``open`` failed).
            ValueError: ``version`` is not greater than the engine's (nothing was changed).
        """
        sync = _EngineSync(
            self.engine,
            name=self._engine_name,
            owner=f"Load {self.name!r}",
            pause_mode=self.pause_mode,
            timeout_s=self.timeout_s,
            on_partial_failure=self.on_partial_failure,
        )
        sync.claim()
        self._sync = sync
        self._last_report = None
        self._start_stream()
        if self.version is not None or self.pause_at == "open":
            try:
                if self.version is not None:
                    await sync.check_version(self.version)
                if self.pause_at == "open":
                    await sync.pause()
            except BaseException:
                with anyio.CancelScope(shield=True):
                    try:
                        await self._finish(sync)
                    except Exception as exc:  # the pause's failure is the one to raise
                        logger.warning("resume on engine %r failed: %s", self._engine_name, exc)
                raise

    async def process(self, item: WeightBucket) -> AsyncIterator[WeightBucket]:
        """Load the buckets ready to load: this one, or when the policy pauses at the first
        load, those held back until the look-ahead budget or the last bucket is reached;
        pause first if the policy says so. Each bucket is prepared as it arrives (an
        engine that ``PreparesBuckets``), so before the pause for it."""
        sync = self._current()
        bucket = self._check(item, sync)
        await sync.check_version(bucket.version)  # before the engine is touched
        await sync.prepare(bucket)
        ready = self._admit(bucket)
        if ready and self.pause_at == "first_load":
            await sync.pause()
        for bucket in ready:
            await sync.load(bucket)
            yield bucket

    async def flush(self) -> AsyncIterator[WeightBucket]:
        """Fail a stream that ended without its last bucket (``close`` then aborts)."""
        if not self._current().committed:
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
        if self._sync is not None:
            await self._finish(self._sync)

    async def _finish(self, sync: _EngineSync) -> None:
        self._held, self._held_bytes = [], 0  # never loaded: nothing to undo
        try:
            await sync.close(self._sync_version)
        finally:
            self._last_report = self._report(sync)
            self._sync = None

    def _current(self) -> _EngineSync:
        if self._sync is None:
            raise RuntimeError(f"Load {self.name!r} was not opened: run it in a Pipeline")
        return self._sync

    def _admit(self, bucket: WeightBucket) -> list[WeightBucket]:
        """The buckets to load now (none while ``prefetch`` holds back for its budget)."""
        if not self._holding:
            return [bucket]
        self._held.append(bucket)
        self._held_bytes += bucket.nbytes
        budget = self.prefetch_bytes
        if not bucket.is_last and (budget is None or self._held_bytes < budget):
            return []
        ready, self._held, self._held_bytes = self._held, [], 0
        self._holding = False
        return ready

    def _check(self, item: object, sync: _EngineSync) -> WeightBucket:
        if not isinstance(item, WeightBucket):
            raise ValueError(
                f"Load takes WeightBuckets, got {type(item).__name__}; put Fetch before it"
            )
        if sync.committed:
            raise ValueError(f"{item.describe()} arrived after the last bucket was committed")
        if item.index != self._received:
            raise ValueError(f"{item.describe()} arrived in position {self._received}")
        expected = self.version if self._sync_version is None else self._sync_version
        if expected is not None and item.version != expected:
            raise ValueError(f"{item.describe()} does not belong to the sync of v{expected}")
        self._sync_version = item.version
        self._received += 1
        return item
