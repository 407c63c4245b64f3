"""SGLangEngine: the Engine adapter for an in-process ``sglang.Engine``.

A thin adapter over ``SGLangClient`` (sessions, retries, the bucket rule, the commit
order). ``EngineTransport`` carries the calls: SGLang's offline Engine runs its scheduler
in child processes and exposes blocking methods (each drives the Engine's own event loop
with ``run_until_complete``), so every call runs in a worker thread, one at a time even
after a call was abandoned at its deadline (the next call, the abort that follows a
timeout included, waits under its own deadline for that thread to leave the Engine,
instead of racing it inside the Engine; a resume that gave up waiting runs as soon as
that thread leaves, so a pause landing late is still undone). Sessions are detected
by capability (``begin_weight_update`` exists from 0.5.23). The in-process Engine has no
weight-version setter, so the transport keeps the committed version itself, and no pause
API, so ``pause``/``resume`` use the Engine's own methods when a future SGLang has them and
are otherwise no-ops (in-process updates already take the scheduler's writer lock).
``sglang`` is imported only when the adapter has to build the Engine itself.
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

import anyio
import anyio.to_thread
import torch

from weightpipe.stages.bucket import WeightBucket
from weightpipe.stages.engines.base import EngineError, PauseMode, SyncSettings, WireSpec
from weightpipe.stages.engines.sglang import wire as wire
from weightpipe.stages.engines.sglang.client import (
    LoadFormat,
    OperationMissing,
    SessionMode,
    SGLangClient,
    cache_not_flushed,
)

__all__ = ["EngineTransport", "SGLangEngine", "import_sglang"]

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "pip install 'sglang[all]' (on a GPU machine; the library alone: "
    "pip install --no-deps sglang plus its pure-Python dependencies)"
)

# How often a thread waiting for a hung Engine call checks whether its caller gave up.
_ABANDON_POLL_S = 0.05

# Calls the adapter answers itself: the in-process Engine has no weight-version API.
_LOCAL_OPS = frozenset({"get_weight_version", "update_weight_version"})
# Calls that are no-ops when the Engine lacks them (0.5.23's Engine has no pause API).
_OPTIONAL_OPS = frozenset({"pause_generation", "continue_generation"})


def import_sglang() -> Any:
    """Import ``sglang`` lazily.

    Raises:
        ImportError: sglang is not installed, with the command that installs it.
    """
    try:
        return importlib.import_module("sglang")
    except ImportError as exc:
        raise ImportError(
            f"the in-process SGLang engine needs the sglang package ({exc}); "
            f"install it with: {INSTALL_HINT}"
        ) from exc


class EngineTransport:
    """One attempt of an SGLang operation on an ``sglang.Engine`` (see ``SGLangTransport``).

    Args:
        name: the engine's name, used in errors.
        engine: a constructed ``sglang.Engine``, or ``None`` to build one on first use.
        engine_kwargs: arguments for ``sglang.Engine`` when ``engine`` is None.
        initial_version: what ``get_weight_version`` answers before the first commit.
    """

    serializes_named_tensors = False  # Engine.update_weights_from_tensor pickles per rank
    update_takes_weight_version = False  # the version is kept here, at no cost

    def __init__(
        self,
        name: str,
        engine: Any,
        engine_kwargs: dict[str, Any],
        initial_version: int | None,
    ) -> None:
        self.name = name
        self.engine = engine
        self.engine_kwargs = engine_kwargs
        self.weight_version: str | None = None if initial_version is None else str(initial_version)
        self._lock = anyio.Lock()
        self._engine_lock = threading.Lock()  # held by the thread inside an Engine method
        self._resume_owed = False  # a resume abandoned behind a hung call (see ``run``)
        self._warned: set[str] = set()

    async def run(self, fn: Callable[[], Any], *, op: str = "") -> Any:
        """Run one blocking Engine call (``op``, for the resume rule) in a worker thread,
        never two at once.

        The caller's deadline may abandon the wait (the Engine's methods cannot be
        interrupted), but not the one-call-at-a-time rule, which lives in the worker
        thread: a call's thread takes ``_engine_lock`` before touching the Engine and
        holds it until the Engine returns, so a call abandoned at its deadline still
        holds it while it hangs. The next call (an abort, typically) waits for it under
        its own deadline; if that deadline passes first, the waiting thread gives up
        without calling the Engine at all, so no abandoned call runs later either, with
        one exception: a resume. A resume abandoned behind a hung call (a pause or a
        begin that did not answer) is owed, and runs as soon as the hung call returns,
        before any later call: dropped, it would leave the pause that lands late in
        force with nobody left to resume it.
        """
        async with self._lock:  # callers queue in order; the thread lock is the rule
            abandoned = threading.Event()
            started = threading.Event()
            resume = op == "continue_generation"

            def job() -> Any:
                if not self._engine_lock.acquire(blocking=False):
                    log.warning("%s: waiting for an earlier call that is still running", self.name)
                    while not self._engine_lock.acquire(timeout=_ABANDON_POLL_S):
                        if abandoned.is_set():
                            if resume and self._engine_lock.acquire(blocking=False):
                                self._leave()  # the Engine is free now: pay it here
                            return None  # nobody waits for this call any more
                try:
                    if resume and not abandoned.is_set():
                        started.set()
                        self._resume_owed = False  # this call is the resume owed
                        return fn()
                    self._pay_resume()  # an owed resume comes before anything later
                    if abandoned.is_set():
                        return None  # (an owed resume of this call's was just paid)
                    return fn()
                finally:
                    self._leave()

            try:
                return await anyio.to_thread.run_sync(job, abandon_on_cancel=True)
            except BaseException:
                abandoned.set()
                if resume and not started.is_set():
                    # Owed before the next caller may queue: it pays it before its own call.
                    log.warning(
                        "%s: continue_generation() waits for an earlier call that is still "
                        "running; it runs as soon as that call returns",
                        self.name,
                    )
                    self._resume_owed = True
                raise

    def _pay_resume(self) -> None:
        """Run an owed resume (the Engine lock held)."""
        if not self._resume_owed:
            return
        self._resume_owed = False
        method = getattr(self.engine, "continue_generation", None)
        if not callable(method):
            return
        try:
            method()
        except Exception as exc:  # nobody waits for it: logged, the next sync resumes
            log.error("%s: the owed continue_generation() failed: %s", self.name, exc)

    def _leave(self) -> None:
        """Release the Engine, paying an owed resume first, also one owed meanwhile."""
        while True:
            self._pay_resume()
            self._engine_lock.release()
            if not self._resume_owed or not self._engine_lock.acquire(blocking=False):
                return

    async def open(self) -> None:
        """Build the Engine if none was given (imports sglang).

        Raises:
            ImportError: sglang is not installed.
        """
        if self.engine is None:
            sglang = import_sglang()
            kwargs = dict(self.engine_kwargs)
            self.engine = await self.run(lambda: sglang.Engine(**kwargs))

    async def aclose(self) -> None:
        """Shut down an Engine this transport built (one passed in is left running)."""
        if self.engine is not None and self.engine_kwargs:
            engine, self.engine = self.engine, None
            await self.run(engine.shutdown)

    def sessions_by_capability(self) -> bool | None:
        if self.engine is None:
            return None
        return callable(getattr(self.engine, "begin_weight_update", None))

    def tensor_fields(
        self,
        load_format: LoadFormat,
        payloads: list[bytes] | None,
        tensors: list[tuple[str, torch.Tensor]],
    ) -> dict[str, Any]:
        if load_format == "flattened_bucket":
            return {"named_tensors": payloads, "load_format": "flattened_bucket"}
        return {"named_tensors": tensors, "load_format": None}

    async def call(self, op: str, fields: dict[str, Any], *, tensors: Sequence[str] = ()) -> Any:
        await self.open()
        if op in _LOCAL_OPS:
            if op == "update_weight_version":
                self.weight_version = str(fields["new_version"])
            return self.weight_version
        method = getattr(self.engine, op, None)
        if not callable(method):
            if op in _OPTIONAL_OPS:
                if op not in self._warned:
                    self._warned.add(op)
                    log.info("%s: sglang.Engine has no %s(); skipping it", self.name, op)
                return None
            raise OperationMissing(self.name, f"sglang.Engine has no {op}()")
        kwargs = dict(fields)
        try:
            result = await self.run(lambda: method(**kwargs), op=op)
        except Exception as exc:
            text = f"{type(exc).__name__}: {exc}"
            raise EngineError(
                self.name, f"{op} raised {text}", tensor=wire.tensor_named_in(text, tensors)
            ) from exc
        ok, message = _outcome(result)
        if not ok:
            raise EngineError(
                self.name,
                f"{op} failed: {message}",
                tensor=wire.tensor_named_in(message, tensors),
                retryable=cache_not_flushed(op, message),
            )
        return result


class SGLangEngine:
    """An ``sglang.Engine`` in this process.

    Args:
        engine: a constructed ``sglang.Engine``; when ``None``, one is built from
            ``engine_kwargs`` (``sglang.Engine(**engine_kwargs)``) on first use.
        timeout_s: ``default_timeout_s``: Load's deadline for every call unless Load
            sets its own.
        retries: at most this many further attempts after a retryable failure (a cache
            flush refused while requests run), within the deadline.
        backoff_s: wait before the first retry, doubled for each further one.
        session: weight-update sessions: ``auto`` uses them when the Engine has
            ``begin_weight_update``.
        load_format: payload shape (see ``client.LoadFormat``).
        tp_size: the Engine's tensor-parallel size (flattened payloads are per rank);
            also passed to ``sglang.Engine`` when the adapter builds it.
        flush_cache_on_commit: flush the radix cache once at commit.
        metadata: flattened-bucket metadata objects (see ``wire``).
        initial_version: what ``version()`` reports before the first commit.
        engine_kwargs: arguments for ``sglang.Engine`` when ``engine`` is None.
    """

    name = "sglang_engine"
    default_timeout_s: float = 600.0
    switches_atomically = False
    """SGLang applies each bucket to the live model as it arrives (``SwitchesAtomically``):
    Load pauses it while it takes buckets, ``in_place`` in ``in_flight`` mode."""

    def __init__(
        self,
        engine: Any = None,
        *,
        timeout_s: float = 600.0,
        retries: int = 3,
        backoff_s: float = 0.5,
        session: SessionMode = "auto",
        load_format: LoadFormat = "flattened_bucket",
        tp_size: int = 1,
        flush_cache_on_commit: bool = True,
        metadata: wire.MetadataKind = "auto",
        initial_version: int | None = None,
        **engine_kwargs: Any,
    ) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if engine is None and not engine_kwargs:
            raise ValueError("pass a sglang.Engine or the keyword arguments to build one")
        self.default_timeout_s = timeout_s
        build = {"tp_size": tp_size, **engine_kwargs} if engine is None else {}
        self.transport = EngineTransport(self.name, engine, build, initial_version)
        self.client = SGLangClient(
            self.transport,
            session=session,
            load_format=load_format,
            tp_size=tp_size,
            flush_cache_on_commit=flush_cache_on_commit,
            metadata=metadata,
            retries=retries,
            backoff_s=backoff_s,
        )

    @property
    def engine(self) -> Any:
        """The ``sglang.Engine`` (None until built, or after ``aclose`` shut it down)."""
        return self.transport.engine

    async def open(self) -> None:
        """Build the Engine if none was given (imports sglang).

        Raises:
            ImportError: sglang is not installed.
        """
        await self.transport.open()

    async def aclose(self) -> None:
        """Shut down an Engine this adapter built (one passed in is left running)."""
        await self.transport.aclose()

    def wire_spec(self) -> WireSpec | None:
        """The buffer layout this engine sends as it is (``TakesFlatBuckets``): the stage
        before Load writes into it, so a bucket reaches the wire without another copy."""
        return self.client.wire_spec()

    async def check_launch_settings(self, sync: SyncSettings) -> None:
        """Refuse, before the Engine is touched, a sync its ``get_server_info()`` says
        cannot fit (``ChecksLaunchSettings``): another ``tp_size``, or FP8 weights for an
        Engine launched with a quantization that holds none (``client.launch_mismatch``).
        Asked once; an Engine without ``get_server_info`` is not checked. Builds the
        Engine first if needed.

        Raises:
            EngineError: the sync disagrees with the Engine's args (names both values).
            ImportError: the Engine has to be built and sglang is missing.
        """
        await self.open()
        await self.client.check_launch_settings(sync)

    # -- Engine protocol: SGLangClient does the work ----------------------------------

    async def prepare(self, bucket: WeightBucket) -> None:
        """Encode a flattened bucket's payload before Load pauses for it
        (``PreparesBuckets``); builds the Engine first if needed.

        Raises:
            ImportError: the Engine has to be built and sglang is missing.
        """
        await self.open()  # sessions are detected by the Engine's capability
        await self.client.prepare(bucket)

    async def begin(self, version: int) -> None:
        """Open a weight-update session where the Engine has them.

        Raises:
            EngineError: the Engine refused or failed.
            ImportError: the Engine has to be built and sglang is missing.
        """
        await self.open()  # sessions are detected by the Engine's capability
        await self.client.begin(version)

    async def load(self, bucket: WeightBucket) -> None:
        """Apply one bucket with ``flush_cache=False``.

        Raises:
            EngineError: the Engine refused (naming a tensor its message names) or failed.
        """
        await self.client.load(bucket)

    async def commit(self, version: int) -> None:
        """End the session, flush the cache once; only then report ``version``.

        Raises:
            EngineError: a step failed; ``version()`` still reports the old version.
        """
        await self.client.commit(version)

    async def abort(self, version: int) -> None:
        """End an open session; the version stays the old one.

        Raises:
            EngineError: the Engine did not confirm the close.
        """
        await self.client.abort(version)

    async def version(self) -> int | None:
        """The last committed version (``initial_version`` before the first commit)."""
        return await self.client.version()

    async def pause(self, mode: PauseMode) -> None:
        """The Engine's ``pause_generation(mode=...)`` when it has one, else nothing.

        Raises:
            EngineError: the Engine's pause failed.
        """
        await self.client.pause(mode)

    async def resume(self) -> None:
        """The Engine's ``continue_generation()`` when it has one, else nothing.

        Raises:
            EngineError: the Engine's continue failed.
        """
        await self.client.resume()

    def session_is_open(self) -> bool:
        """Whether this adapter opened a weight-update session that is still open."""
        return self.client.session_open

    def needs_session(self) -> bool | None:
        """Whether the Engine needs sessions (None until an Engine exists)."""
        if self.client.needs_session is not None:
            return self.client.needs_session
        return self.transport.sessions_by_capability()


def _outcome(result: Any) -> tuple[bool, str]:
    """SGLang answers ``(success, message)``, an object with ``success``, or nothing."""
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], bool):
        return result[0], str(result[1])
    if isinstance(result, bool):
        return result, ""
    success = getattr(result, "success", None)
    if isinstance(success, bool):
        return success, str(getattr(result, "message", ""))
    return True, ""
