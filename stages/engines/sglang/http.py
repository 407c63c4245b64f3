"""SGLangHTTPEngine: the production Engine, driving a running SGLang server over HTTP.

A thin adapter: ``HTTPTransport`` carries one attempt of one SGLang operation over httpx
(bearer api key, 404 as ``OperationMissing``, 5xx / dropped connections / timeouts as
retryable ``EngineError``, 401/403 and validation failures as final ones), and
``SGLangClient`` owns everything else: sessions (0.5.23 refuses tensor updates outside
one; 0.5.12 has none), retries within the caller's deadline, ``flush_cache=false`` on
every bucket but the last, which carries the one flush (and, without a session, the
version), and setting ``weight_version`` only after the session closed, so a failed sync
never reports the new version; payloads encoded before the pause (``prepare``). No timeout
is layered on top: Load gives every call a deadline and one attempt waits at most what
that deadline leaves (else ``default_timeout_s``). Tensor payloads are shared-memory or
CUDA-IPC handles (see ``wire``), so this path needs the trainer and the server on the same
node; across nodes use ``SGLangDistributedEngine``. Server-provided text (a refusal's
message, a body) enters an error or a log line only with the api key redacted, since a
server or a proxy may reflect the request's headers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import anyio
import httpx
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
    parse_version,
    uses_sessions,
)

__all__ = [
    "HTTPTransport",
    "LoadFormat",
    "SGLangHTTPEngine",
    "SessionMode",
    "parse_version",
    "uses_sessions",
]

_RETRY_STATUS = frozenset({500, 502, 503, 504})
_TEXT_ANSWERS = frozenset({"/flush_cache"})
"""Endpoints whose success SGLang answers as text, not JSON."""
_AUTH_STATUS = frozenset({401, 403})
# Operations whose request carries abort_all_requests (the HTTP structs have it; the
# in-process Engine methods do not take it).
_UPDATES = frozenset({"update_weights_from_tensor", "update_weights_from_distributed"})


class HTTPTransport:
    """One attempt of an SGLang operation over HTTP (see ``SGLangTransport``).

    Args:
        name: the engine's name, used in errors.
        url: the server's base URL with its scheme (``http://`` or ``https://``).
        api_key: sent as ``Authorization: Bearer`` when given.
        default_timeout_s: the wait of one attempt when the caller set no deadline.
        client: an ``httpx.AsyncClient`` to use; ``aclose`` closes only one it created.

    Raises:
        ValueError: a URL without an http(s) scheme or host.
    """

    serializes_named_tensors = True
    update_takes_weight_version = True  # UpdateWeightsFromTensorReqInput.weight_version

    def __init__(
        self,
        name: str,
        url: str,
        *,
        api_key: str | None = None,
        default_timeout_s: float = 60.0,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        parsed = httpx.URL(url)
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ValueError(
                f"engine url {url!r} needs a scheme and a host, e.g. http://127.0.0.1:30000"
            )
        self.name = name
        self.url = url.rstrip("/")
        self.default_timeout_s = default_timeout_s
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._secret = api_key or None
        self._client = client
        self._owns_client = client is None

    def redact(self, text: str) -> str:
        """``text`` with the api key replaced by ``[redacted]`` (for server-provided text)."""
        if self._secret is None:
            return text
        return text.replace(self._secret, "[redacted]")

    def _message(self, response: httpx.Response) -> str:
        return self.redact(_message(response))

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=httpx.Timeout(self.default_timeout_s))
        return self._client

    async def aclose(self) -> None:
        """Close the HTTP client if this transport created it."""
        if self._client is not None and self._owns_client:
            await self._client.aclose()
            self._client = None

    def sessions_by_capability(self) -> bool | None:
        return None  # only the server knows: its version, or whether the endpoint exists

    def tensor_fields(
        self,
        load_format: LoadFormat,
        payloads: list[bytes] | None,
        tensors: list[tuple[str, torch.Tensor]],
    ) -> dict[str, Any]:
        assert payloads is not None, "HTTP payloads are always serialized by the client"
        return {
            "serialized_named_tensors": wire.b64encode_payloads(payloads),
            "load_format": "flattened_bucket" if load_format == "flattened_bucket" else None,
        }

    def _attempt_timeout(self) -> float:
        """What the caller's deadline leaves for this attempt (the default without one)."""
        deadline = anyio.current_effective_deadline()
        if math.isinf(deadline):
            return self.default_timeout_s
        return max(deadline - anyio.current_time(), 1e-3)

    async def _attempt(
        self, method: str, path: str, body: dict[str, Any] | None, tensors: Sequence[str]
    ) -> httpx.Response:
        timeout = self._attempt_timeout()
        try:
            response = await self._http().request(
                method, self.url + path, json=body, headers=self._headers, timeout=timeout
            )
        except httpx.TimeoutException as exc:
            raise EngineError(
                self.name,
                f"{path} did not answer within {timeout:.3g} s ({type(exc).__name__})",
                retryable=True,
                unanswered=not isinstance(exc, (httpx.ConnectTimeout, httpx.PoolTimeout)),
            ) from exc
        except (httpx.NetworkError, httpx.RemoteProtocolError) as exc:  # refused, reset
            raise EngineError(
                self.name,
                f"{path}: cannot reach {self.url} ({type(exc).__name__}: {self.redact(str(exc))})",
                retryable=True,
                # Refused: never sent. Reset or cut off: perhaps carried out.
                unanswered=not isinstance(exc, httpx.ConnectError),
            ) from exc
        except httpx.HTTPError as exc:  # a request httpx cannot make: repeating won't help
            raise EngineError(
                self.name,
                f"{path}: request failed ({type(exc).__name__}: {self.redact(str(exc))})",
            ) from exc
        status = response.status_code
        if status in _RETRY_STATUS:
            raise EngineError(
                self.name, f"{path} answered {status}: {self._message(response)}", retryable=True
            )
        if status in _AUTH_STATUS:
            raise EngineError(
                self.name,
                f"{path} refused the credentials ({status}): {self._message(response)}; "
                "check api_key against the server's --api-key",
            )
        if status == 404:
            raise OperationMissing(self.name, f"{path} does not exist on {self.url} (404)")
        ok = status < 400
        payload = _json(response)
        if ok and payload is None and path not in _TEXT_ANSWERS:
            # Every SGLang endpoint but /flush_cache answers JSON: a 2xx without it is a
            # proxy or another server, and nothing says the call was carried out.
            raise EngineError(
                self.name,
                f"{path} answered {status} without a JSON body "
                f"({self.redact(response.text[:200])!r}); is {self.url} an SGLang server?",
                tensor=wire.tensor_named_in(response.text, tensors),
                unanswered=True,
            )
        if ok and isinstance(payload, dict) and payload.get("success") is False:
            ok = False
        if not ok:
            message = self._message(response)
            refused = status == 400 or status < 300
            raise EngineError(
                self.name,
                f"{path} failed ({status}): {message}",
                tensor=wire.tensor_named_in(message, tensors),
                retryable=refused and cache_not_flushed(path.lstrip("/"), message),
            )
        return response

    async def _get_first(self, paths: Sequence[str]) -> dict[str, Any]:
        """GET the first of ``paths`` the server has (newer names first)."""
        last: OperationMissing | None = None
        for path in paths:
            try:
                response = await self._attempt("GET", path, None, ())
            except OperationMissing as exc:
                last = exc
                continue
            payload = _json(response)
            if not isinstance(payload, dict):
                raise EngineError(
                    self.name, f"{path} answered non-JSON: {self.redact(response.text[:200])}"
                )
            return payload
        assert last is not None
        raise last

    async def call(self, op: str, fields: dict[str, Any], *, tensors: Sequence[str] = ()) -> Any:
        if op == "get_server_info":
            return await self._get_first(("/server_info", "/get_server_info"))
        if op == "get_weight_version":
            info = await self._get_first(("/model_info", "/get_model_info"))
            return info.get("weight_version")
        body = dict(fields)
        if op in _UPDATES:
            body.setdefault("abort_all_requests", False)
        return _json(await self._attempt("POST", "/" + op, body, tensors))


class SGLangHTTPEngine:
    """An SGLang server reached over HTTP (same node: payloads are memory handles).

    Args:
        url: the server's base URL with its scheme, e.g. ``http://127.0.0.1:30000``.
        api_key: sent as ``Authorization: Bearer`` when the server runs with ``--api-key``.
        timeout_s: ``default_timeout_s``: Load's deadline for every call unless Load sets
            its own, and the wait of one attempt when a caller sets no deadline.
        retries: at most this many further attempts after a retryable failure (5xx,
            dropped connection, timeout, a refused flush), and only within the deadline.
        backoff_s: wait before the first retry, doubled for each further one.
        session: weight-update sessions (see ``SessionMode``).
        load_format: payload shape (see ``LoadFormat``).
        tp_size: the server's tensor-parallel size: one payload per rank.
        flush_cache_on_commit: flush the radix cache once at commit (buckets never flush).
        metadata: which metadata objects a flattened bucket carries (``wire``).
        cpu_sharing_strategy: torch sharing strategy used while pickling CPU tensors;
            ``file_system`` lets the (unrelated) server process open them.
        client: an ``httpx.AsyncClient`` to use; the engine closes only one it created.

    Raises:
        ValueError: a URL without a scheme, or a bad number or choice.
    """

    name = "sglang_http"
    default_timeout_s: float = 60.0
    switches_atomically = False
    """SGLang applies each bucket to the live model as it arrives (``SwitchesAtomically``):
    Load pauses it while it takes buckets, ``in_place`` in ``in_flight`` mode."""

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
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.default_timeout_s = timeout_s
        self.transport = HTTPTransport(
            self.name, url, api_key=api_key, default_timeout_s=timeout_s, client=client
        )
        self.client = SGLangClient(
            self.transport,
            session=session,
            load_format=load_format,
            tp_size=tp_size,
            flush_cache_on_commit=flush_cache_on_commit,
            metadata=metadata,
            cpu_sharing_strategy=cpu_sharing_strategy,
            retries=retries,
            backoff_s=backoff_s,
        )

    @property
    def url(self) -> str:
        return self.transport.url

    @property
    def server_version(self) -> str | None:
        """The version the server reported (None until read, or when it hides it)."""
        return self.client.server_version

    async def aclose(self) -> None:
        """Close the HTTP client if this engine created it."""
        await self.transport.aclose()

    async def __aenter__(self) -> SGLangHTTPEngine:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def server_info(self) -> dict[str, Any]:
        """``/server_info`` (or ``/get_server_info`` on older servers).

        Raises:
            EngineError: on any failure.
        """
        info: dict[str, Any] = await self.client.request("get_server_info")
        return info

    def wire_spec(self) -> WireSpec | None:
        """The buffer layout this engine sends as it is (``TakesFlatBuckets``): the stage
        before Load writes into it, so a bucket reaches the wire without another copy."""
        return self.client.wire_spec()

    async def check_launch_settings(self, sync: SyncSettings) -> None:
        """Refuse, before the server is touched, a sync its ``/server_info`` says cannot fit
        (``ChecksLaunchSettings``): another ``tp_size``, or FP8 weights for a server
        launched with a quantization that holds none (see ``client.launch_mismatch``).
        The server args are read once, and the session detection reuses them.

        Raises:
            EngineError: the sync disagrees with the server's args (names both values).
        """
        await self.client.check_launch_settings(sync)

    # -- Engine protocol: SGLangClient does the work ----------------------------------

    async def prepare(self, bucket: WeightBucket) -> None:
        """Encode the bucket's payload before Load pauses for it (``PreparesBuckets``),
        and, once, ask the server what it supports (sessions, ``weight_version`` on an
        update); nothing the server serves changes.

        Raises:
            EngineError: the server could not be reached.
        """
        await self.client.prepare(bucket)

    async def begin(self, version: int) -> None:
        """Open a weight-update session where the server needs one.

        Raises:
            EngineError: the server is unreachable or refuses the session.
        """
        await self.client.begin(version)

    async def load(self, bucket: WeightBucket) -> None:
        """Send one bucket as ``/update_weights_from_tensor`` with ``flush_cache=false``
        (the sync's last carries the flush, and without a session the version).

        Raises:
            EngineError: the server refused the bucket (naming the tensor when its message
                does) or could not be reached.
        """
        await self.client.load(bucket)

    async def commit(self, version: int) -> None:
        """Close the session, flush the cache once, then set ``weight_version`` (each
        skipped when the last update already carried it).

        Raises:
            EngineError: any step failed; the reported version is then still the old one.
        """
        await self.client.commit(version)

    async def abort(self, version: int) -> None:
        """Close an open session; the weight version is left untouched.

        Raises:
            EngineError: the server did not confirm the close.
        """
        await self.client.abort(version)

    async def version(self) -> int | None:
        """The server's ``weight_version`` as an int (None when unset or not a number).

        Raises:
            EngineError: the server is unreachable.
        """
        return await self.client.version()

    async def pause(self, mode: PauseMode) -> None:
        """``/pause_generation`` in ``mode`` (abort | retract | in_place).

        Raises:
            EngineError: the server refused or could not be reached.
        """
        await self.client.pause(mode)

    async def resume(self) -> None:
        """``/continue_generation``.

        Raises:
            EngineError: the server refused or could not be reached.
        """
        await self.client.resume()

    def session_is_open(self) -> bool:
        """Whether this client opened a weight-update session that is still open."""
        return self.client.session_open

    def needs_session(self) -> bool | None:
        """Whether the server needs sessions (None until detected)."""
        return self.client.needs_session


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
