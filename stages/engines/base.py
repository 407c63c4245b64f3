"""The Engine protocol: the one small surface the Load stage drives, and its deadlines.

One sync is ``begin(version)`` -> ``load(bucket)`` for every bucket -> ``commit(version)``.
On any failure or cancellation the Load stage calls ``abort(version)`` (best effort) and
``resume()``; an engine must report the old version from ``version()`` until ``commit``
succeeded, so a half-applied sync is never visible as a new version. ``pause(mode)`` and
``resume()`` bracket the part of a sync during which generation must stop (the sync mode
decides which part). Every method may raise ``EngineError``, whose message names the
engine and, where one is at fault, the tensor.

Deadlines have one owner. Load runs every engine call under a deadline of its own
(``Load(timeout_s=...)``, by default the engine's ``default_timeout_s``); an engine sets
no timeout of its own around a call and retries a failure only when it is retryable and
only while that deadline leaves room (``retry_within_deadline``). The defaults:

=====================  ===================  ==========================================
engine                 default_timeout_s    why
=====================  ===================  ==========================================
LocalEngine            60                   in-memory; a step is milliseconds
SGLangHTTPEngine       60                   one HTTP round trip per call
SGLangEngine           600                  in-process; a load may recapture graphs
SGLangDistributedEngine 600                 a broadcast of a large bucket over NCCL
=====================  ===================  ==========================================
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal, Protocol, TypeVar, get_args, runtime_checkable

import anyio

from weightpipe.pipeline import WeightpipeError
from weightpipe.stages.bucket import WeightBucket
from weightpipe.stages.fp8.spec import Fp8Method

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "PAUSE_MODES",
    "SYNC_MODES",
    "ChecksLaunchSettings",
    "Engine",
    "EngineDirtyError",
    "EngineError",
    "ExpectsFp8Block",
    "MeasuresGeneration",
    "PauseMode",
    "PreparesBuckets",
    "RollsBack",
    "SwitchesAtomically",
    "SyncMode",
    "SyncSettings",
    "TakesFlatBuckets",
    "WireSpec",
    "WritesWireBuffer",
    "engine_name",
    "engine_rolls_back",
    "engine_switches_atomically",
    "retry_within_deadline",
    "wire_spec_of",
]

T = TypeVar("T")

PauseMode = Literal["abort", "retract", "in_place"]
"""How generation stops: drop running requests, retract them to the queue, or keep them
in place (SGLang's modes)."""
PAUSE_MODES: tuple[PauseMode, ...] = get_args(PauseMode)

SyncMode = Literal["pause", "prefetch", "in_flight"]
"""``pause``: pause for the whole sync. ``prefetch``: fetch and quantize run during
generation, pause from the first load. ``in_flight``: requests are never aborted or
retracted: on an engine that ``SwitchesAtomically`` (the local engine) generation never
pauses and all of the sync's parameters switch together at commit, between two decode
steps; on any other (SGLang, which applies each bucket as it arrives) fetch and quantize
overlap generation and the load phase runs under an ``in_place`` pause, so no decode step
reads two versions (see ``stages/load.py``)."""
SYNC_MODES: tuple[SyncMode, ...] = get_args(SyncMode)

DEFAULT_TIMEOUT_S = 60.0
"""The deadline of one engine call when neither Load nor the engine says otherwise."""


class EngineError(WeightpipeError, RuntimeError):
    """An engine refused or failed an operation.

    Attributes:
        engine: the engine's name.
        tensor: the offending tensor's name, when one is at fault.
        retryable: whether repeating the same call may succeed (5xx, reset, timeout).
        unanswered: the request may have reached the engine and no answer came (a timeout,
            a connection dropped after sending): the engine may have carried it out, so
            Load counts a load that failed so as having touched the engine.
    """

    def __init__(
        self,
        engine: str,
        message: str,
        *,
        tensor: str | None = None,
        retryable: bool = False,
        unanswered: bool = False,
    ) -> None:
        where = f" (tensor {tensor!r})" if tensor else ""
        super().__init__(f"engine {engine!r}: {message}{where}")
        self.engine = engine
        self.tensor = tensor
        self.retryable = retryable
        self.unanswered = unanswered

    engine_dirty: bool = False
    """The engine holds part of a failed sync it cannot roll back (see ``EngineDirtyError``)."""


class EngineDirtyError(EngineError):
    """A sync failed after an engine that cannot roll back accepted part of it.

    The engine holds a mix of old and new weights (or new weights under the old version):
    it is marked dirty, and, under Load's default ``on_partial_failure="keep_paused"``,
    left paused until a full sync commits. ``engine_dirty`` is always True; the failure
    that caused it is ``__cause__``.
    """

    engine_dirty: bool = True


@runtime_checkable
class Engine(Protocol):
    """A running inference engine that can take new weights."""

    name: str

    async def begin(self, version: int) -> None:
        """Start a sync that will install ``version``."""

    async def load(self, bucket: WeightBucket) -> None:
        """Apply one bucket; validates every tensor before touching any of them."""

    async def commit(self, version: int) -> None:
        """Finish the sync; only now does ``version()`` report ``version``."""

    async def abort(self, version: int) -> None:
        """Abandon the sync (best effort); ``version()`` stays the old one."""

    async def version(self) -> int | None:
        """The weight version the engine serves now (``None`` before the first sync)."""

    async def pause(self, mode: PauseMode) -> None:
        """Stop generation in the given mode."""

    async def resume(self) -> None:
        """Continue generation."""


@runtime_checkable
class RollsBack(Protocol):
    """Whether an engine's ``abort`` undoes every bucket it accepted in the sync.

    ``rolls_back = True`` (the local engine: its commit is staged, and abort discards the
    staged buckets) lets Load resume generation after any failure. An engine without the
    attribute, or with False (the SGLang adapters: SGLang applies each bucket as it
    arrives), is treated as one that cannot roll back.
    """

    rolls_back: bool


def engine_rolls_back(engine: object) -> bool:
    """True only for an engine that declares ``rolls_back = True`` (see ``RollsBack``)."""
    return getattr(engine, "rolls_back", False) is True


@runtime_checkable
class SwitchesAtomically(Protocol):
    """Whether an engine keeps serving the old weights until ``commit`` switches all of a
    sync's parameters at once, between two decode steps.

    Only such an engine may take buckets while it generates without a decode step reading
    two versions; Load pauses any other (``in_place`` in ``in_flight`` mode) for as long
    as it takes buckets. The SGLang adapters declare False: SGLang applies each bucket to
    the live parameters as it arrives, with no switch at the end.
    """

    switches_atomically: bool


@runtime_checkable
class ExpectsFp8Block(Protocol):
    """An engine that knows the block shape ``[out, in]`` its block-FP8 scales refer to
    (the local engine: its ``block_size``; SGLang's is the checkpoint's
    ``weight_block_size``, which no endpoint reports). ``sync_weights`` refuses, before
    the engine is touched, a block FP8 stage whose block differs: scale shapes can agree
    for two blocks (127 and 128 rows both give 3 blocks for 320 rows), so nothing later
    would notice that every scale is read against the wrong rows.
    """

    @property
    def fp8_block_size(self) -> tuple[int, int]: ...


@dataclass(frozen=True)
class SyncSettings:
    """What a sync is about to send, as far as an engine can check it against the
    settings it was launched with (``ChecksLaunchSettings``).

    Attributes:
        fp8_method: the method of the sync's ``Fp8Quantize`` stage (``block``, ``channel``
            or ``tensor``); None when the sync has none, so linear weights go in the
            dtype the source gave them (bf16, typically).
        fp8_block: the block ``[out, in]`` of a ``block`` stage, else None.
    """

    fp8_method: Fp8Method | None = None
    fp8_block: tuple[int, int] | None = None


@runtime_checkable
class ChecksLaunchSettings(Protocol):
    """An engine that can tell, before it is touched, that a sync cannot fit what it was
    launched with (the SGLang adapters: the server's ``tp_size`` and ``quantization``).

    ``sync_weights`` awaits ``check_launch_settings`` once per sync, under the sync's
    engine-call deadline, before the pipeline opens: before any pause, ``begin`` or
    bucket. It must not change what the engine serves, and it refuses only what is
    certainly wrong; a setting the engine does not report is not checked.

    Raises (from ``check_launch_settings``):
        EngineError: the sync disagrees with the engine's launch settings (names the
            engine and both values).
    """

    async def check_launch_settings(self, sync: SyncSettings) -> None: ...


def engine_switches_atomically(engine: object) -> bool:
    """Whether ``engine`` switches a sync's parameters together at commit.

    An engine's own ``switches_atomically`` (a bool) decides. Without one, an engine that
    ``rolls_back`` is taken to (it can undo a sync only because it stages the buckets
    until commit, which is the switch); any other is taken to apply each bucket as it
    arrives, so it is paused while it takes them.
    """
    declared = getattr(engine, "switches_atomically", None)
    if isinstance(declared, bool):
        return declared
    return engine_rolls_back(engine)


@runtime_checkable
class PreparesBuckets(Protocol):
    """An engine that can do its per-bucket work that does not touch the engine itself
    (encoding the bucket's payload: SGLang's pickled shared-memory or CUDA-IPC handles)
    ahead of ``load``.

    Load calls ``prepare`` as each bucket reaches it, before it pauses generation for the
    bucket (with a ``prefetch_bytes`` look-ahead, every held bucket is prepared while the
    engine still generates), so the pause holds only what the engine must do while
    paused. ``load`` then sends what was prepared; a bucket that was not prepared is
    encoded in ``load`` as before. ``prepare`` must not change what the engine serves.
    """

    async def prepare(self, bucket: WeightBucket) -> None: ...


class GenerationWindowLike(Protocol):
    """An open measurement of generation; ``close`` ends it and returns its statistics."""

    def close(self) -> object: ...


@runtime_checkable
class MeasuresGeneration(Protocol):
    """An engine that can measure its own generation while a sync runs (the local engine).

    ``sync_weights`` opens a window before the sync and closes it after, and puts the
    statistics in the ``SyncReport``; an engine without ``open_window`` reports none.
    """

    def open_window(self) -> GenerationWindowLike: ...


@dataclass(frozen=True)
class WireSpec:
    """How an engine wants each bucket's bytes: one flat buffer it sends as it is.

    Attributes:
        align_bytes: every tensor starts at a multiple of ``max(align_bytes, element
            size)`` of the buffer (what the engine's receiver rebuilds views from).
        shared_memory: the buffer lives in named shared memory on the host, so handing it
            to a server process on this node copies nothing (CPU tensors only).
    """

    align_bytes: int = 16
    shared_memory: bool = False

    def __post_init__(self) -> None:
        if self.align_bytes < 1 or self.align_bytes & (self.align_bytes - 1):
            raise ValueError(f"WireSpec.align_bytes must be a power of two: {self.align_bytes}")


@runtime_checkable
class TakesFlatBuckets(Protocol):
    """An engine that sends each bucket as one flat buffer (SGLang's flattened bucket).

    ``sync_weights`` asks it for its ``WireSpec`` and hands that to the last stage before
    Load, which then writes its output straight into such a buffer; Load passes it on
    without another copy. An engine without ``wire_spec`` takes tensors as they come.
    """

    def wire_spec(self) -> WireSpec | None: ...


@runtime_checkable
class WritesWireBuffer(Protocol):
    """A stage that can write its output buckets as one flat buffer to a ``WireSpec``
    (Fetch, Fp8Quantize). ``sync_weights`` calls ``use_wire`` on the last such stage
    before Load with the engine's spec (None: the engine takes tensors as they come) and
    with None on the others, before the pipeline opens."""

    def use_wire(self, spec: WireSpec | None) -> None: ...


def wire_spec_of(engine: object) -> WireSpec | None:
    """The engine's ``WireSpec``, or None for an engine that takes tensors as they come."""
    return engine.wire_spec() if isinstance(engine, TakesFlatBuckets) else None


def engine_name(engine: object) -> str:
    """The engine's ``name`` if it has a non-empty one, else its class name."""
    name = getattr(engine, "name", "")
    return name if isinstance(name, str) and name else type(engine).__name__


async def retry_within_deadline(
    call: Callable[[], Awaitable[T]],
    *,
    backoff_s: float = 0.5,
    max_backoff_s: float = 5.0,
    attempts: int | None = None,
) -> T:
    """Run ``call``; repeat it after a retryable ``EngineError`` while the deadline allows.

    The deadline is the caller's (``anyio.current_effective_deadline()``, which Load sets
    for every engine call): a retry starts only if its backoff ends before the deadline,
    so a slow failure near the end is raised as it is instead of being cut off by the
    deadline mid-retry. Without a deadline, ``attempts`` bounds the calls (default 4).
    Non-retryable errors and anything that is not an ``EngineError`` propagate at once.

    Raises:
        EngineError: the last failure (``retryable`` tells whether time ran out).
    """
    deadline = anyio.current_effective_deadline()
    limit = attempts if attempts is not None else (4 if math.isinf(deadline) else None)
    delay = backoff_s
    tried = 0
    while True:
        tried += 1
        try:
            return await call()
        except EngineError as exc:
            if not exc.retryable or (limit is not None and tried >= limit):
                raise
            if anyio.current_time() + delay >= deadline:
                raise
        await anyio.sleep(delay)
        delay = min(delay * 2, max_backoff_s)
