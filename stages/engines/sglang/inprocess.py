"""SGLangEngine: the Engine adapter for an in-process ``sglang.Engine``.

SGLang's offline Engine runs its scheduler in child processes and exposes blocking methods
(each drives the Engine's own event loop with ``run_until_complete``), so every call runs
in a worker thread owned by this adapter, one at a time, under a timeout. The sync maps
onto the same steps as over HTTP: a weight-update session where the Engine has one
(``begin_weight_update`` exists from 0.5.23), every bucket through
``update_weights_from_tensor(..., flush_cache=False)``, one ``flush_cache`` at commit. The
in-process Engine has no weight-version setter, so the adapter keeps the committed version
itself, and no pause API, so ``pause``/``resume`` use the Engine's own methods when a
future SGLang has them and are otherwise no-ops (in-process updates already take the
scheduler's writer lock). ``sglang`` is imported only when the adapter has to build the
Engine itself.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

import anyio
import anyio.to_thread

from weightpipe.stages.bucket import WeightBucket
from weightpipe.stages.engines.base import EngineError, PauseMode
from weightpipe.stages.engines.sglang import wire as wire
from weightpipe.stages.engines.sglang.http import LoadFormat, SessionMode

__all__ = ["SGLangEngine", "import_sglang"]

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "pip install 'sglang[all]' (on a GPU machine; the library alone: "
    "pip install --no-deps sglang plus its pure-Python dependencies)"
)


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


class SGLangEngine:
    """An ``sglang.Engine`` in this process.

    Args:
        engine: a constructed ``sglang.Engine``; when ``None``, one is built from
            ``engine_kwargs`` (``sglang.Engine(**engine_kwargs)``) on first use.
        timeout_s: limit on every Engine call.
        session: weight-update sessions: ``auto`` uses them when the Engine has
            ``begin_weight_update``.
        load_format: payload shape (see ``sglang_http.LoadFormat``).
        tp_size: the Engine's tensor-parallel size (flattened payloads are per rank);
            also passed to ``sglang.Engine`` when the adapter builds it.
        flush_cache_on_commit: flush the radix cache once at commit.
        metadata: flattened-bucket metadata objects (see ``_sglang_wire``).
        initial_version: what ``version()`` reports before the first commit.
        engine_kwargs: arguments for ``sglang.Engine`` when ``engine`` is None.
    """

    name = "sglang_engine"

    def __init__(
        self,
        engine: Any = None,
        *,
        timeout_s: float = 600.0,
        session: SessionMode = "auto",
        load_format: LoadFormat = "flattened_bucket",
        tp_size: int = 1,
        flush_cache_on_commit: bool = True,
        metadata: wire.MetadataKind = "auto",
        initial_version: int | None = None,
        **engine_kwargs: Any,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if tp_size < 1:
            raise ValueError(f"tp_size must be >= 1, got {tp_size}")
        if engine is None and not engine_kwargs:
            raise ValueError("pass a sglang.Engine or the keyword arguments to build one")
        self.engine = engine
        self.engine_kwargs = engine_kwargs
        self.timeout_s = timeout_s
        self.session_mode: SessionMode = session
        self.load_format: LoadFormat = load_format
        self.tp_size = tp_size
        self.flush_cache_on_commit = flush_cache_on_commit
        self.metadata: wire.MetadataKind = metadata
        self._version = initial_version
        self._session_open = False
        self._limiter = anyio.CapacityLimiter(1)
        self._warned_pause = False

    async def open(self) -> None:
        """Build the Engine if none was given (imports sglang).

        Raises:
            ImportError: sglang is not installed.
        """
        if self.engine is None:
            sglang = import_sglang()
            kwargs = {"tp_size": self.tp_size, **self.engine_kwargs}
            self.engine = await anyio.to_thread.run_sync(
                lambda: sglang.Engine(**kwargs), limiter=self._limiter
            )

    async def _run(self, what: str, fn: Callable[[], Any], tensors: Sequence[str] = ()) -> Any:
        """Run one blocking Engine call in the adapter's thread under the timeout.

        Raises:
            EngineError: the call raised, timed out, or answered success=False.
        """
        await self.open()
        try:
            with anyio.fail_after(self.timeout_s):
                result = await anyio.to_thread.run_sync(
                    fn, limiter=self._limiter, abandon_on_cancel=True
                )
        except TimeoutError as exc:
            raise EngineError(
                self.name, f"{what} timed out after {self.timeout_s:g} s", retryable=True
            ) from exc
        except Exception as exc:
            text = f"{type(exc).__name__}: {exc}"
            raise EngineError(
                self.name, f"{what} raised {text}", tensor=wire.tensor_named_in(text, tensors)
            ) from exc
        ok, message = _outcome(result)
        if not ok:
            raise EngineError(
                self.name,
                f"{what} failed: {message}",
                tensor=wire.tensor_named_in(message, tensors),
            )
        return result

    def _sessions(self) -> bool:
        if self.session_mode == "auto":
            return callable(getattr(self.engine, "begin_weight_update", None))
        return self.session_mode == "on"

    async def begin(self, version: int) -> None:
        """Open a weight-update session where the Engine has them.

        Raises:
            EngineError: the Engine refused, failed or timed out.
            ImportError: the Engine has to be built and sglang is missing.
        """
        await self.open()
        if self._sessions():
            await self._run("begin_weight_update", lambda: self.engine.begin_weight_update())
            self._session_open = True

    async def load(self, bucket: WeightBucket) -> None:
        """Apply one bucket with ``flush_cache=False``.

        Raises:
            EngineError: the Engine refused (naming a tensor its message names), failed or
                timed out.
        """
        if not bucket.tensors:
            return
        bucket.wait_ready()
        tensors = list(bucket.tensors)
        if self.load_format == "flattened_bucket":
            payloads = await anyio.to_thread.run_sync(
                lambda: wire.encode_flattened_bucket(
                    tensors, tp_size=self.tp_size, buffer=bucket.buffer, metadata=self.metadata
                )
            )

            def call() -> Any:
                assert self.engine is not None
                return self.engine.update_weights_from_tensor(
                    named_tensors=payloads, load_format="flattened_bucket", flush_cache=False
                )
        else:

            def call() -> Any:
                assert self.engine is not None
                return self.engine.update_weights_from_tensor(
                    named_tensors=tensors, load_format=None, flush_cache=False
                )

        await self._run("update_weights_from_tensor", call, bucket.names)

    async def commit(self, version: int) -> None:
        """End the session, flush the cache once; only then report ``version``.

        Raises:
            EngineError: a step failed; ``version()`` still reports the old version.
        """
        if self._session_open:
            self._session_open = False
            await self._run("end_weight_update", lambda: self.engine.end_weight_update())
        if self.flush_cache_on_commit:
            await self._run("flush_cache", lambda: self.engine.flush_cache())
        self._version = version

    async def abort(self, version: int) -> None:
        """End an open session, best effort; the version stays the old one."""
        if not self._session_open:
            return
        self._session_open = False
        try:
            await self._run("end_weight_update", lambda: self.engine.end_weight_update())
        except EngineError as exc:
            log.warning("%s: closing the session on abort failed: %s", self.name, exc)

    async def version(self) -> int | None:
        """The last committed version (``initial_version`` before the first commit)."""
        return self._version

    async def pause(self, mode: PauseMode) -> None:
        """The Engine's ``pause_generation(mode=...)`` when it has one, else nothing.

        Raises:
            EngineError: the Engine's pause failed.
        """
        await self.open()
        pause = getattr(self.engine, "pause_generation", None)
        if callable(pause):
            await self._run("pause_generation", lambda: pause(mode=mode))
        elif not self._warned_pause:
            self._warned_pause = True
            log.info("%s: sglang.Engine has no pause_generation; not pausing", self.name)

    async def resume(self) -> None:
        """The Engine's ``continue_generation()`` when it has one, else nothing.

        Raises:
            EngineError: the Engine's continue failed.
        """
        resume = getattr(self.engine, "continue_generation", None)
        if callable(resume):
            await self._run("continue_generation", lambda: resume())

    async def aclose(self) -> None:
        """Shut down an Engine this adapter built (one passed in is left running)."""
        if self.engine is not None and self.engine_kwargs:
            engine, self.engine = self.engine, None
            await anyio.to_thread.run_sync(engine.shutdown, limiter=self._limiter)

    # -- the distributed update group (driven by SGLangDistributedEngine) -------------

    async def init_weights_update_group(
        self,
        master_address: str,
        master_port: int,
        rank_offset: int,
        world_size: int,
        group_name: str,
        backend: str,
    ) -> None:
        """The Engine's ``init_weights_update_group``: returns once its ranks joined.

        Raises:
            EngineError: the Engine refused, failed or timed out.
        """
        await self._run(
            "init_weights_update_group",
            lambda: self.engine.init_weights_update_group(
                **wire.init_group_request(
                    master_address, master_port, rank_offset, world_size, group_name, backend
                )
            ),
        )

    async def update_weights_from_distributed(
        self,
        names: Sequence[str],
        dtypes: Sequence[str],
        shapes: Sequence[Sequence[int]],
        group_name: str,
        load_format: str | None,
    ) -> None:
        """The Engine's ``update_weights_from_distributed`` with ``flush_cache=False``.

        Raises:
            EngineError: the Engine refused (naming a tensor), failed or timed out.
        """
        await self._run(
            "update_weights_from_distributed",
            lambda: self.engine.update_weights_from_distributed(
                **wire.distributed_update_request(names, dtypes, shapes, group_name, load_format)
            ),
            names,
        )

    async def destroy_weights_update_group(self, group_name: str) -> None:
        """The Engine's ``destroy_weights_update_group``.

        Raises:
            EngineError: the Engine refused, failed or timed out.
        """
        await self._run(
            "destroy_weights_update_group",
            lambda: self.engine.destroy_weights_update_group(group_name=group_name),
        )

    def session_is_open(self) -> bool:
        """Whether this adapter opened a weight-update session that is still open."""
        return self._session_open

    def needs_session(self) -> bool | None:
        """Whether the Engine needs sessions (None until an Engine exists)."""
        return None if self.engine is None else self._sessions()


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
