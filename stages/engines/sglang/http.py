"""SGLangHTTPEngine: the production Engine, driving a running SGLang server over HTTP.

One sync maps onto SGLang's weight endpoints: ``begin`` opens a weight-update session
(SGLang >= 0.5.23 refuses tensor updates outside one; 0.5.12 has none), every bucket is one
``/update_weights_from_tensor`` call carrying one payload per TP rank with
``flush_cache=false`` (a flush per bucket fails while requests run), and ``commit`` closes
the session, flushes the cache once and only then sets the weight version, so a failed sync
never reports the new version. Every call has a timeout (a pause/update race can hang the
server) and is retried with backoff only when repeating it may help: 5xx answers, dropped
connections and a refused cache flush; never a validation failure. Tensor payloads are
shared-memory or CUDA-IPC handles (see ``_sglang_wire``), so this path needs the trainer
and the server on the same node; across nodes use ``SGLangDistributedEngine``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any, Literal

import anyio
import anyio.to_thread
import httpx
import torch

from weightpipe.stages.bucket import WeightBucket
from weightpipe.stages.engines.base import EngineError, PauseMode
from weightpipe.stages.engines.sglang import wire as wire

__all__ = ["LoadFormat", "SGLangHTTPEngine", "SessionMode", "parse_version", "uses_sessions"]

log = logging.getLogger(__name__)

SessionMode = Literal["auto", "on", "off"]
"""``auto``: sessions when the server reports a version >= 0.5.23 (or, with no readable
version, when ``/begin_weight_update`` exists); ``on``/``off`` force it."""

LoadFormat = Literal["flattened_bucket", "named_tensors"]
"""``flattened_bucket``: one uint8 buffer plus metadata per rank (FP8 weights and fp32
scales share it); ``named_tensors``: a plain ``[(name, tensor)]`` list per rank."""

SESSION_MIN_VERSION = (0, 5, 23)

_RETRY_STATUS = frozenset({500, 502, 503, 504})
_CACHE_NOT_FLUSHED = re.compile(r"not (been )?flushed|running or (queued|waiting)", re.I)


def parse_version(text: str) -> tuple[int, ...] | None:
    """``"0.5.23.post1"`` -> ``(0, 5, 23)``; ``None`` when no leading number."""
    match = re.match(r"\s*v?(\d+(?:\.\d+)*)", text)
    if not match:
        return None
    return tuple(int(part) for part in match.group(1).split("."))


def uses_sessions(server_version: str) -> bool | None:
    """Whether an SGLang of this version needs begin/end_weight_update (None: unknown)."""
    parsed = parse_version(server_version)
    if parsed is None:
        return None
    return parsed[:3] >= SESSION_MIN_VERSION


class _Retryable(Exception):
    """An attempt failed in a way that repeating it may fix."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class _EndpointMissing(EngineError):
    """The server has no such endpoint (404): an older SGLang, or not SGLang at all."""


class SGLangHTTPEngine:
    """An SGLang server reached over HTTP (same node: payloads are memory handles).

    Args:
        url: the server's base URL, e.g. ``http://127.0.0.1:30000``.
        api_key: sent as ``Authorization: Bearer`` when the server runs with ``--api-key``.
        timeout_s: limit on every call, connection and response included.
        retries: further attempts after a retryable failure (0 = try once).
        backoff_s: wait before the first retry, doubled for each further one.
        session: weight-update sessions (see ``SessionMode``).
        load_format: payload shape (see ``LoadFormat``).
        tp_size: the server's tensor-parallel size: one payload per rank.
        flush_cache_on_commit: flush the radix cache once at commit (buckets never flush).
        metadata: which metadata objects a flattened bucket carries (``_sglang_wire``).
        cpu_sharing_strategy: torch sharing strategy used while pickling CPU tensors;
            ``file_system`` lets the (unrelated) server process open them.
        client: an ``httpx.AsyncClient`` to use; the engine closes only one it created.
    """

    name = "sglang_http"

    def __init__(
        self,
        url: str,
        *,
        api_key: str | None = None,
        timeout_s: float = 60.0,
        retries: int = 3,
        backoff_s: float = 0.5,
        session: SessionMode = "auto",
        load_format: LoadFormat = "flattened_bucket",
        tp_size: int = 1,
        flush_cache_on_commit: bool = True,
        metadata: wire.MetadataKind = "auto",
        cpu_sharing_strategy: str | None = "file_system",
        client: httpx.AsyncClient | None = None,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if retries < 0 or backoff_s < 0:
            raise ValueError("retries and backoff_s must be >= 0")
        if tp_size < 1:
            raise ValueError(f"tp_size must be >= 1, got {tp_size}")
        if session not in ("auto", "on", "off"):
            raise ValueError(f"session must be 'auto', 'on' or 'off', got {session!r}")
        if load_format not in ("flattened_bucket", "named_tensors"):
            raise ValueError(f"unknown load_format {load_format!r}")
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.session_mode: SessionMode = session
        self.load_format: LoadFormat = load_format
        self.tp_size = tp_size
        self.flush_cache_on_commit = flush_cache_on_commit
        self.metadata: wire.MetadataKind = metadata
        self.cpu_sharing_strategy = cpu_sharing_strategy
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = client
        self._owns_client = client is None
        self._sessions: bool | None = {"on": True, "off": False, "auto": None}[session]
        self._session_open = False
        self._encode_limiter = anyio.CapacityLimiter(1)
        self.server_version: str | None = None

    # -- lifecycle -------------------------------------------------------------------

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=httpx.Timeout(self.timeout_s))
        return self._client

    async def aclose(self) -> None:
        """Close the HTTP client if this engine created it."""
        if self._client is not None and self._owns_client:
            await self._client.aclose()
            self._client = None

    async def __aenter__(self) -> SGLangHTTPEngine:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- HTTP ------------------------------------------------------------------------

    async def _attempt(
        self, method: str, path: str, body: dict[str, Any] | None, tensors: Sequence[str]
    ) -> httpx.Response:
        """One request; raises _Retryable or EngineError on failure, else the response."""
        try:
            with anyio.fail_after(self.timeout_s):
                response = await self._http().request(
                    method, self.url + path, json=body, headers=self._headers
                )
        except TimeoutError as exc:
            # Not retried: a hung update (SGLang's pause/update race) would hang again.
            raise EngineError(
                self.name, f"{path} timed out after {self.timeout_s:g} s", retryable=True
            ) from exc
        except httpx.TimeoutException as exc:
            raise EngineError(
                self.name, f"{path} timed out after {self.timeout_s:g} s ({exc})", retryable=True
            ) from exc
        except httpx.TransportError as exc:  # refused, reset, closed mid-answer
            raise _Retryable(
                f"{path}: cannot reach {self.url} ({type(exc).__name__}: {exc})"
            ) from exc
        if response.status_code in _RETRY_STATUS:
            raise _Retryable(f"{path} answered {response.status_code}: {_message(response)}")
        if response.status_code == 404:
            raise _EndpointMissing(self.name, f"{path} does not exist on {self.url} (404)")
        ok = response.status_code < 400
        payload = _json(response)
        if ok and isinstance(payload, dict) and payload.get("success") is False:
            ok = False
        if not ok:
            message = _message(response)
            refused = response.status_code == 400 or response.status_code < 300
            if refused and (path == "/flush_cache" or _CACHE_NOT_FLUSHED.search(message)):
                raise _Retryable(f"{path} failed: {message}")
            raise EngineError(
                self.name,
                f"{path} failed ({response.status_code}): {message}",
                tensor=wire.tensor_named_in(message, tensors),
            )
        return response

    async def _call(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        tensors: Sequence[str] = (),
        retries: int | None = None,
    ) -> httpx.Response:
        """A request with timeout and retries on retryable failures.

        Raises:
            EngineError: naming the endpoint and the server's message (and a tensor the
                message names), after the last retry for retryable failures.
        """
        attempts = 1 + (self.retries if retries is None else retries)
        delay = self.backoff_s
        for attempt in range(attempts):
            try:
                return await self._attempt(method, path, body, tensors)
            except _Retryable as failure:
                if attempt + 1 >= attempts:
                    tries = f" (gave up after {attempts} attempts)" if attempts > 1 else ""
                    raise EngineError(
                        self.name, failure.message + tries, retryable=True
                    ) from failure
                log.warning("%s: %s; retrying in %.2f s", self.name, failure, delay)
                await anyio.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")  # pragma: no cover

    async def _get_first(self, paths: Sequence[str]) -> dict[str, Any]:
        """GET the first of ``paths`` the server has (newer names first)."""
        last: EngineError | None = None
        for path in paths:
            try:
                response = await self._call("GET", path)
            except _EndpointMissing as exc:
                last = exc
                continue
            payload = _json(response)
            if not isinstance(payload, dict):
                raise EngineError(self.name, f"{path} answered non-JSON: {response.text[:200]}")
            return payload
        assert last is not None
        raise last

    async def server_info(self) -> dict[str, Any]:
        """``/server_info`` (or ``/get_server_info`` on older servers).

        Raises:
            EngineError: on any failure.
        """
        return await self._get_first(("/server_info", "/get_server_info"))

    async def _detect_sessions(self) -> bool | None:
        if self._sessions is not None:
            return self._sessions
        try:
            info = await self.server_info()
        except _EndpointMissing:
            return None  # decided by probing /begin_weight_update
        self.server_version = str(info.get("version", ""))
        self._sessions = uses_sessions(self.server_version)
        return self._sessions

    # -- Engine protocol -------------------------------------------------------------

    async def begin(self, version: int) -> None:
        """Open a weight-update session where the server needs one.

        Raises:
            EngineError: the server is unreachable or refuses the session.
        """
        sessions = await self._detect_sessions()
        if sessions is False:
            return
        try:
            await self._call("POST", "/begin_weight_update", {"selector": "all"})
        except _EndpointMissing:
            if sessions is None:
                self._sessions = False  # no readable version and no endpoint: pre-0.5.23
                return
            raise
        self._sessions = True
        self._session_open = True

    def _encode(self, bucket: WeightBucket) -> list[str]:
        tensors = [(name, t) for name, t in bucket.tensors]
        if self.load_format == "flattened_bucket":
            payloads = wire.encode_flattened_bucket(
                tensors,
                tp_size=self.tp_size,
                buffer=bucket.buffer,
                metadata=self.metadata,
                cpu_strategy=self.cpu_sharing_strategy,
            )
        else:
            payloads = wire.encode_named_tensors(
                tensors, tp_size=self.tp_size, cpu_strategy=self.cpu_sharing_strategy
            )
        return wire.b64encode_payloads(payloads)

    async def load(self, bucket: WeightBucket) -> None:
        """Send one bucket as ``/update_weights_from_tensor`` with ``flush_cache=false``.

        Raises:
            EngineError: the server refused the bucket (naming the tensor when its message
                does) or could not be reached.
        """
        if not bucket.tensors:
            return
        # The pickler copies CPU tensors into shared memory: heavy, so off the loop.
        bucket.wait_ready()
        if any(t.is_cuda for _, t in bucket.tensors):
            torch.cuda.current_stream().synchronize()  # IPC readers see finished data
        encoded = await anyio.to_thread.run_sync(self._encode, bucket, limiter=self._encode_limiter)
        body: dict[str, Any] = {
            "serialized_named_tensors": encoded,
            "load_format": "flattened_bucket" if self.load_format == "flattened_bucket" else None,
            "flush_cache": False,
            "abort_all_requests": False,
        }
        await self._call("POST", "/update_weights_from_tensor", body, tensors=bucket.names)

    async def commit(self, version: int) -> None:
        """Close the session, flush the cache once, then set ``weight_version``.

        Raises:
            EngineError: any step failed; the reported version is then still the old one.
        """
        if self._session_open:
            self._session_open = False
            await self._call("POST", "/end_weight_update", {})
        if self.flush_cache_on_commit:
            await self._call("POST", "/flush_cache")
        await self._call(
            "POST",
            "/update_weight_version",
            {"new_version": str(version), "abort_all_requests": False},
        )

    async def abort(self, version: int) -> None:
        """Close an open session, best effort; the weight version is left untouched.

        SGLang cannot roll weights back: buckets already loaded stay loaded until the next
        sync overwrites them, but the reported version stays the old one.
        """
        if not self._session_open:
            return
        self._session_open = False
        try:
            await self._call("POST", "/end_weight_update", {}, retries=0)
        except EngineError as exc:
            log.warning("%s: closing the session on abort failed: %s", self.name, exc)

    async def version(self) -> int | None:
        """The server's ``weight_version`` as an int (None when unset or not a number).

        Raises:
            EngineError: the server is unreachable.
        """
        info = await self._get_first(("/model_info", "/get_model_info"))
        raw = info.get("weight_version")
        try:
            return int(str(raw))
        except ValueError:
            return None

    async def pause(self, mode: PauseMode) -> None:
        """``/pause_generation`` in ``mode`` (abort | retract | in_place).

        Raises:
            EngineError: the server refused or could not be reached.
        """
        await self._call("POST", "/pause_generation", {"mode": mode})

    async def resume(self) -> None:
        """``/continue_generation``.

        Raises:
            EngineError: the server refused or could not be reached.
        """
        await self._call("POST", "/continue_generation", {})

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
        """``/init_weights_update_group``: returns once the server's ranks joined.

        Raises:
            EngineError: the server refused, failed or timed out.
        """
        body = wire.init_group_request(
            master_address, master_port, rank_offset, world_size, group_name, backend
        )
        await self._call("POST", "/init_weights_update_group", body, retries=0)

    async def update_weights_from_distributed(
        self,
        names: Sequence[str],
        dtypes: Sequence[str],
        shapes: Sequence[Sequence[int]],
        group_name: str,
        load_format: str | None,
    ) -> None:
        """``/update_weights_from_distributed`` with ``flush_cache=false``: returns once the
        server received the broadcast and loaded it.

        Raises:
            EngineError: the server refused (naming a tensor its message names), failed or
                timed out. Never retried: the broadcast it pairs with happens once.
        """
        body = wire.distributed_update_request(names, dtypes, shapes, group_name, load_format)
        body["abort_all_requests"] = False
        await self._call("POST", "/update_weights_from_distributed", body, tensors=names, retries=0)

    async def destroy_weights_update_group(self, group_name: str) -> None:
        """``/destroy_weights_update_group``.

        Raises:
            EngineError: the server refused, failed or timed out.
        """
        await self._call(
            "POST", "/destroy_weights_update_group", {"group_name": group_name}, retries=0
        )

    def session_is_open(self) -> bool:
        """Whether this client opened a weight-update session that is still open."""
        return self._session_open

    def needs_session(self) -> bool | None:
        """Whether the server needs sessions (None until detected)."""
        return self._sessions


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _message(response: httpx.Response) -> str:
    payload = _json(response)
    if isinstance(payload, dict):
        for key in ("message", "detail", "error"):
            value = payload.get(key)
            if isinstance(value, dict):
                value = value.get("message", value)
            if value:
                return str(value)
    text = response.text.strip()
    return text[:500] if text else f"HTTP {response.status_code}"
