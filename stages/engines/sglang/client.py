"""SGLangClient: the one SGLang client behind the HTTP and the in-process adapters.

It owns everything the two adapters share: when to retry (only an ``EngineError`` whose
``retryable`` is set, only within the caller's deadline, at most ``1 + retries``
attempts), weight-update sessions (needed from SGLang 0.5.23, absent in 0.5.12: detected
by the engine's capability, else by its reported version, else by probing
``begin_weight_update``; the open-session flag is set once a begin was sent and not
refused, and clears only once the engine confirmed the close, so an abort after a failed
close, or after a begin that timed out, still closes it), the bucket rule (every bucket
with ``flush_cache=false`` but the sync's last, one flush per sync, a flush per bucket
failing while requests run), the commit order (end the session, flush once, only then set
the weight version, so a failed sync never reports the new version), the CUDA readiness
rule of ``wire`` and the payload encoding in a worker thread.

The pause holds only what the server must do paused. ``prepare`` (called by Load before it
pauses for a bucket) detects sessions and encodes the bucket's payload, so the first call
inside the pause is the begin and every update is sent as soon as it may be. Calls are
folded where the server takes them in one: the sync's last update carries the flush
(``flush_cache=true``; a flush it refuses because requests run leaves the weights in and
falls back to one flush at commit) and, without a session, where the transport's update
takes ``weight_version`` and the server is one whose update request has that field (a
reported version >= 0.5.12), the version too; the server confirms it in its answer
("Weight version updated to ..."), and a server that does not is sent
``update_weight_version`` and not asked again. With a session the version is never folded:
the update would set it before ``end_weight_update`` confirmed the close. Under an
``in_place`` pause the running requests stay in the batch and SGLang refuses every flush
while any run, so the flush is tried once and a refusal is logged, not fatal (the radix
cache keeps prefixes computed by the old version).

A transport only carries one attempt of one SGLang operation: ``HTTPTransport`` (httpx, in
``http``) and ``EngineTransport`` (the blocking ``sglang.Engine`` methods in a worker
thread, in ``inprocess``). No deadline is set here: Load gives every engine call one, and
a transport sizes its own wait from what is left.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import anyio
import anyio.to_thread
import torch

from weightpipe.stages.bucket import WeightBucket
from weightpipe.stages.engines.base import (
    EngineError,
    PauseMode,
    SyncSettings,
    WireSpec,
    retry_within_deadline,
)
from weightpipe.stages.engines.sglang import wire as wire

__all__ = [
    "NOT_FP8_QUANTIZATIONS",
    "SESSION_MIN_VERSION",
    "LoadFormat",
    "OperationMissing",
    "SGLangClient",
    "SGLangTransport",
    "SessionMode",
    "cache_not_flushed",
    "launch_mismatch",
    "parse_version",
    "uses_sessions",
]

log = logging.getLogger(__name__)

SessionMode = Literal["auto", "on", "off"]
"""``auto``: sessions when the engine has them (in-process: ``begin_weight_update``
exists; HTTP: the server reports a version >= 0.5.23, or, with no readable version,
``/begin_weight_update`` exists); ``on``/``off`` force it."""
SESSION_MODES: tuple[SessionMode, ...] = ("auto", "on", "off")

LoadFormat = Literal["flattened_bucket", "named_tensors"]
"""``flattened_bucket``: one uint8 buffer plus metadata per rank (FP8 weights and fp32
scales share it); ``named_tensors``: a plain ``[(name, tensor)]`` list per rank."""
LOAD_FORMATS: tuple[LoadFormat, ...] = ("flattened_bucket", "named_tensors")

SESSION_MIN_VERSION = (0, 5, 23)
"""The first SGLang that refuses tensor updates outside a weight-update session."""

FOLD_VERSION_MIN_VERSION = (0, 5, 12)
"""The oldest SGLang whose ``UpdateWeightsFromTensorReqInput`` is known to carry
``weight_version`` (0.5.12 and 0.5.23 both do); an older or unknown server is sent
``update_weight_version`` instead."""

_VERSION_CONFIRMED = re.compile(r"weight version updated to (\S+?)\.?(\s|$)", re.I)

# SGLang's answers when a flush was refused because requests still run (the update itself
# succeeded, or it was the flush): repeating the flush once they finish may succeed.
_CACHE_NOT_FLUSHED = re.compile(r"not (been )?flushed|running or (queued|waiting)", re.I)


_FLUSH_REFUSED = object()
"""What ``request`` returns for an update whose folded flush was refused."""


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


def cache_not_flushed(op: str, message: str) -> bool:
    """Whether a refusal of ``op`` is SGLang's "cache not flushed, requests running"."""
    return op == "flush_cache" or bool(_CACHE_NOT_FLUSHED.search(message))


NOT_FP8_QUANTIZATIONS: frozenset[str] = frozenset(
    {
        "awq",
        "awq_marlin",
        "gptq",
        "gptq_marlin",
        "bitsandbytes",
        "gguf",
        "w8a8_int8",
        "moe_wna16",
        "mxfp4",
        "modelopt_fp4",
        "nvfp4_online",
        "petit_nvfp4",
        "mlx_q4",
        "mlx_q8",
        "auto-round-int8",
        "quark_mxfp4",
    }
)
"""Values of SGLang's ``--quantization`` (``ServerArgs.quantization``, reported by
``/server_info``) under which the linear layers hold int4, int8, FP4 or GGUF weights, never
``float8_e4m3fn`` with scales: an FP8 sync cannot be loaded into such a server. The FP8
methods (``fp8``, ``w8a8_fp8``, ``modelopt_fp8``, ``mxfp8``, ...), the mixed and
checkpoint-described ones (``compressed-tensors``, ``quark``, ``modelopt_mixed``, ...) and
``None`` are not in it: see ``launch_mismatch``."""


def launch_mismatch(tp_size: int, info: dict[str, Any], sync: SyncSettings) -> str | None:
    """Why a sync cannot fit the server args ``info`` reports, or None when nothing certain.

    Checked, each only when ``info`` reports it: ``tp_size`` (an int) equals the client's
    (one payload per TP rank; a server with more ranks than payloads, or fewer, cannot
    load the update); and an FP8 sync (``sync.fp8_method`` set) against a ``quantization``
    in ``NOT_FP8_QUANTIZATIONS``. Not checkable from the server args, so never refused:
    ``quantization`` None means the checkpoint's own ``quantization_config`` decides (an
    FP8 checkpoint launched without ``--quantization`` reports None, as a bf16 one does);
    ``fp8`` is reported alike for an FP8 checkpoint and for a bf16 one quantized online
    at load, so neither a bf16 sync nor an FP8 one is certainly wrong there; and the
    checkpoint's ``weight_block_size`` is reported by no endpoint.
    """
    reported = info.get("tp_size")
    if isinstance(reported, int) and not isinstance(reported, bool) and reported != tp_size:
        return (
            f"the server reports tp_size={reported}, but this client was built with "
            f"tp_size={tp_size} (one payload per tensor-parallel rank): build it with "
            f"tp_size={reported}"
        )
    quantization = info.get("quantization")
    if sync.fp8_method is not None and quantization in NOT_FP8_QUANTIZATIONS:
        return (
            f"the sync sends FP8 weights (Fp8Quantize method={sync.fp8_method!r}), but the "
            f"server was launched with quantization={quantization!r}, whose layers hold no "
            "float8_e4m3fn weights: launch it on an FP8 checkpoint (or --quantization fp8), "
            "or sync without Fp8Quantize into a bf16 server"
        )
    return None


class OperationMissing(EngineError):
    """The engine has no such operation (HTTP 404, or no such ``sglang.Engine`` method):
    an older SGLang, or not SGLang at all. Never retryable."""


class SGLangTransport(Protocol):
    """One attempt of one SGLang operation; what differs between HTTP and in-process.

    Operations are SGLang's own names (``begin_weight_update``, ``update_weights_from_tensor``,
    ``flush_cache``, ``pause_generation``, ...) with SGLang's request fields, plus
    ``get_server_info``, ``get_weight_version`` and ``update_weight_version``.
    """

    name: str
    serializes_named_tensors: bool
    """Whether ``named_tensors`` payloads must be pickled per rank by the client (HTTP) or
    are passed as tensors for the engine to serialize (in-process)."""
    update_takes_weight_version: bool
    """Whether ``update_weights_from_tensor`` through this transport has a
    ``weight_version`` field (SGLang's HTTP request does; ``Engine``'s method does not, and
    the in-process transport keeps the version itself, at no cost)."""

    def sessions_by_capability(self) -> bool | None:
        """Whether the engine has weight-update sessions, when known without a call."""
        ...

    async def call(self, op: str, fields: dict[str, Any], *, tensors: Sequence[str] = ()) -> Any:
        """One attempt of ``op``; returns the engine's answer.

        Raises:
            OperationMissing: the engine has no ``op``.
            EngineError: any other failure (``retryable`` set where repeating may help),
                naming the tensor among ``tensors`` that the engine's message names.
        """
        ...

    def tensor_fields(
        self,
        load_format: LoadFormat,
        payloads: list[bytes] | None,
        tensors: list[tuple[str, torch.Tensor]],
    ) -> dict[str, Any]:
        """The tensor fields of ``update_weights_from_tensor`` (runs in a worker thread)."""
        ...


class SGLangClient:
    """Sessions, retries, the bucket rule and the commit order over one transport.

    Args:
        transport: carries the calls (``HTTPTransport`` or ``EngineTransport``).
        session: weight-update sessions (see ``SessionMode``).
        load_format: payload shape (see ``LoadFormat``).
        tp_size: the engine's tensor-parallel size: one payload per rank.
        flush_cache_on_commit: flush the radix cache once at commit (buckets never flush).
        metadata: which metadata objects a flattened bucket carries (``wire.MetadataKind``).
        cpu_sharing_strategy: torch sharing strategy while pickling CPU tensors;
            ``file_system`` lets an unrelated process on this node open them.
        retries: further attempts after a retryable failure, within the deadline.
        backoff_s: wait before the first retry, doubled for each further one.
    """

    def __init__(
        self,
        transport: SGLangTransport,
        *,
        session: SessionMode = "auto",
        load_format: LoadFormat = "flattened_bucket",
        tp_size: int = 1,
        flush_cache_on_commit: bool = True,
        metadata: wire.MetadataKind = "auto",
        cpu_sharing_strategy: str | None = "file_system",
        retries: int = 3,
        backoff_s: float = 0.5,
    ) -> None:
        if retries < 0 or backoff_s < 0:
            raise ValueError(f"retries and backoff_s must be >= 0, got {retries}, {backoff_s}")
        if tp_size < 1:
            raise ValueError(f"tp_size must be >= 1, got {tp_size}")
        if session not in SESSION_MODES:
            raise ValueError(f"session must be one of {SESSION_MODES}, got {session!r}")
        if load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {load_format!r}")
        self.transport = transport
        self.session_mode: SessionMode = session
        self.load_format: LoadFormat = load_format
        self.tp_size = tp_size
        self.flush_cache_on_commit = flush_cache_on_commit
        self.metadata: wire.MetadataKind = metadata
        self.cpu_sharing_strategy = cpu_sharing_strategy
        self.retries = retries
        self.backoff_s = backoff_s
        self.server_version: str | None = None
        # The server args, read once (_read_server_info): None until read; {} when the
        # engine reports none.
        self._server_info: dict[str, Any] | None = None
        self._needs_session: bool | None = {"on": True, "off": False, "auto": None}[session]
        self._session_open = False
        self._encode_limiter = anyio.CapacityLimiter(1)
        # Payloads encoded before the pause: (version, index) -> (bucket, request fields).
        self._prepared: dict[tuple[int, int], tuple[WeightBucket, _Encoded]] = {}
        # What the handles of every update sent in this session point into: kept until the
        # session ends (commit or abort), since a server may still map them.
        self._sent: list[wire.BucketPayload] = []
        # How the server is paused now (a flush cannot succeed under in_place with requests).
        self._paused_mode: PauseMode | None = None
        # Whether the last update may carry weight_version (None: not decided yet).
        self._folds_version: bool | None = None
        # What the sync's last update already did (reset at begin).
        self._flushed = False
        self._flush_refused = False
        self._version_set: int | None = None

    def wire_spec(self) -> WireSpec | None:
        """How this client sends a bucket: one flat buffer with 16-byte starts for
        ``flattened_bucket`` (in named shared memory when CPU tensors go as
        ``file_system`` handles, so pickling copies nothing), None for ``named_tensors``."""
        if self.load_format != "flattened_bucket":
            return None
        return WireSpec(wire.ALIGN_BYTES, shared_memory=self.cpu_sharing_strategy == "file_system")

    @property
    def name(self) -> str:
        return self.transport.name

    @property
    def session_open(self) -> bool:
        """Whether a session this client opened may still be open: set once a begin was
        sent and not refused, cleared only when the engine confirmed the close."""
        return self._session_open

    @property
    def needs_session(self) -> bool | None:
        """Whether the engine needs sessions (None until detected)."""
        return self._needs_session

    async def request(
        self,
        op: str,
        fields: dict[str, Any] | None = None,
        *,
        tensors: Sequence[str] = (),
        retry: bool = True,
        flush_refused_ok: bool = False,
        refresh: Callable[[], Any] | None = None,
    ) -> Any:
        """``op`` through the transport, repeated after retryable failures (``retry``)
        within the caller's deadline and ``1 + retries`` attempts. ``flush_refused_ok``:
        an update whose own flush was refused because requests run is not repeated (its
        weights are in): ``_FLUSH_REFUSED`` is returned instead. ``refresh``: awaited
        before every attempt after the first for that attempt's fields (an update's
        payloads are pickled afresh per attempt: a server that decoded the first one
        consumed its handles).

        Raises:
            EngineError: the last failure (``OperationMissing`` when the engine lacks ``op``);
                after more than one attempt its message ends with "gave up after N
                attempts", and ``retryable`` stays set (time or attempts ran out).
        """
        body = {} if fields is None else fields
        attempts = 0
        unanswered = False

        async def attempt() -> Any:
            nonlocal attempts, body, unanswered
            attempts += 1
            if attempts > 1 and refresh is not None:
                body = await refresh()
            try:
                return await self.transport.call(op, body, tensors=tensors)
            except EngineError as exc:
                unanswered = unanswered or exc.unanswered
                if flush_refused_ok and _CACHE_NOT_FLUSHED.search(str(exc)):
                    return _FLUSH_REFUSED
                raise

        try:
            return await retry_within_deadline(
                attempt, backoff_s=self.backoff_s, attempts=1 + self.retries if retry else 1
            )
        except EngineError as exc:
            if attempts > 1:
                exc.args = (f"{exc}; gave up after {attempts} attempts", *exc.args[1:])
            # One unanswered attempt may have been carried out, whatever the last said.
            exc.unanswered = exc.unanswered or unanswered
            raise

    # -- sessions --------------------------------------------------------------------

    async def _detect_sessions(self) -> bool | None:
        if self._needs_session is not None:
            return self._needs_session
        known = self.transport.sessions_by_capability()
        if known is None:
            await self._read_server_info()
            if self.server_version is not None:  # else decided by probing begin
                known = uses_sessions(self.server_version)
        self._needs_session = known
        return known

    async def _end_session(self) -> None:
        await self.request("end_weight_update")
        self._session_open = False  # only now: the engine confirmed the close

    async def _detect_version_fold(self) -> bool:
        """Whether the last update may carry ``weight_version`` (see the module)."""
        if self._folds_version is None:
            fold = False
            if self.transport.update_takes_weight_version:
                await self._read_server_info()
                parsed = parse_version(self.server_version or "")
                fold = parsed is not None and parsed[:3] >= FOLD_VERSION_MIN_VERSION
            self._folds_version = fold
        return self._folds_version

    async def check_launch_settings(self, sync: SyncSettings) -> None:
        """Refuse ``sync`` where the server's args say it cannot fit (``launch_mismatch``),
        before anything is sent that changes the server. The args are asked once
        (``get_server_info``; the session detection reuses the answer); an engine that has
        no such operation is not checked, and one whose answer fails is not checked this
        time (the sync's own calls then meet the failure) and asked again next time.

        Raises:
            EngineError: the sync disagrees with the server's args (names both values).
        """
        info = await self.server_args()
        why = None if info is None else launch_mismatch(self.tp_size, info, sync)
        if why is not None:
            raise EngineError(self.name, f"refusing the sync before touching the server: {why}")

    async def server_args(self) -> dict[str, Any] | None:
        """The server's args (``get_server_info``), asked once and kept; ``{}`` for an
        engine without the operation, None (asked again next time, logged) when the
        answer failed."""
        try:
            return await self._read_server_info()
        except EngineError as exc:
            log.warning("%s: could not read the server args to check the sync: %s", self.name, exc)
            return None

    async def _read_server_info(self) -> dict[str, Any]:
        """``get_server_info`` once per client (the launch check, the session and
        version-fold detection all read it): ``{}`` for an engine without the operation;
        sets ``server_version`` from it. A failed answer raises and is not kept.

        Raises:
            EngineError: the server could not be asked.
        """
        if self._server_info is None:
            try:
                info = await self.request("get_server_info")
            except OperationMissing:
                info = {}
            self._server_info = info if isinstance(info, dict) else {}
            version = self._server_info.get("version")
            if version and self.server_version is None:
                self.server_version = str(version)
        return self._server_info

    async def prepare(self, bucket: WeightBucket) -> None:
        """Everything about ``bucket`` that need not wait for the pause: detect sessions
        and what the last update may carry (once), and encode the payload (in a worker
        thread), which ``load`` then sends as it is.

        Raises:
            EngineError: the server could not be asked what it supports.
        """
        await self._detect_sessions()
        await self._detect_version_fold()
        if not bucket.tensors:
            return
        await wire.wait_written(bucket)
        encoded = await anyio.to_thread.run_sync(
            self._encode, list(bucket.tensors), bucket.buffer, limiter=self._encode_limiter
        )
        # Payloads of an earlier (failed) sync are never sent: drop them.
        stale = [key for key in self._prepared if key[0] != bucket.version]
        for key in stale:
            del self._prepared[key]
        self._prepared[(bucket.version, bucket.index)] = (bucket, encoded)

    async def begin(self, version: int) -> None:
        """Open a weight-update session where the engine needs one.

        Raises:
            EngineError: the engine is unreachable or refuses the session.
        """
        self._flushed = self._flush_refused = False
        self._version_set = None
        self._release_sent()
        if self._session_open:
            # An abort that could not close the last session: close it now, and if the
            # engine says there is none, the begin below tells whether it is free.
            try:
                await self._end_session()
            except EngineError as exc:
                log.warning("%s: closing a session left open failed: %s", self.name, exc)
                self._session_open = False
        sessions = await self._detect_sessions()
        if sessions is False:
            return
        try:
            await self.request("begin_weight_update", {"selector": "all"})
        except OperationMissing:
            if sessions is None:
                self._needs_session = False  # no readable version and no endpoint: 0.5.12
                return
            raise
        except EngineError as exc:
            # A begin that timed out or was dropped may still have opened the session:
            # counted as open, so the abort (or the next begin) closes it.
            self._session_open = exc.retryable
            raise
        except BaseException:  # cancelled (Load's deadline) with the request sent
            self._session_open = True
            raise
        self._needs_session = True
        self._session_open = True

    # -- buckets ---------------------------------------------------------------------

    def _encode(
        self, tensors: list[tuple[str, torch.Tensor]], buffer: torch.Tensor | None
    ) -> _Encoded:
        """The bucket's payload object (flattened once) and its first attempt's fields."""
        payload: wire.BucketPayload | None = None
        if self.load_format == "flattened_bucket":
            payload = wire.prepare_flattened_bucket(
                tensors,
                tp_size=self.tp_size,
                buffer=buffer,
                metadata=self.metadata,
                cpu_strategy=self.cpu_sharing_strategy,
            )
        elif self.transport.serializes_named_tensors:
            payload = wire.prepare_named_tensors(
                tensors, tp_size=self.tp_size, cpu_strategy=self.cpu_sharing_strategy
            )
        encoded = _Encoded(payload, tensors, {})
        encoded.fields = self._fields(encoded)
        return encoded

    def _fields(self, encoded: _Encoded) -> dict[str, Any]:
        """One attempt's fields: fresh pickles of the payload (their own handles)."""
        payloads = None if encoded.payload is None else encoded.payload.encode()
        return self.transport.tensor_fields(self.load_format, payloads, encoded.tensors)

    async def load(self, bucket: WeightBucket) -> None:
        """Send one bucket as ``update_weights_from_tensor`` with ``flush_cache=false``;
        the sync's last bucket carries the flush (and, where the module says, the
        version) instead. A bucket ``prepare`` encoded is sent as it was encoded.

        Raises:
            EngineError: the engine refused the bucket (naming the tensor when its message
                does) or could not be reached.
        """
        if not bucket.tensors:
            return
        entry = self._prepared.pop((bucket.version, bucket.index), None)
        if entry is not None and entry[0] is bucket:
            encoded = entry[1]
        else:
            await wire.wait_written(bucket)
            # The pickler copies CPU tensors into shared memory: heavy, so off the loop.
            encoded = await anyio.to_thread.run_sync(
                self._encode, list(bucket.tensors), bucket.buffer, limiter=self._encode_limiter
            )
        if encoded.payload is not None:
            self._sent.append(encoded.payload)  # alive until the session ends
        fields = encoded.fields
        op = "update_weights_from_tensor"
        flush = bucket.is_last and self.flush_cache_on_commit
        version = (
            str(bucket.version)
            if bucket.is_last and not self._session_open and self._folds_version
            else None
        )
        extra: dict[str, Any] = {"flush_cache": flush}
        if version is not None:
            extra["weight_version"] = version
        fields.update(extra)

        async def refresh() -> dict[str, Any]:
            fresh = await anyio.to_thread.run_sync(
                self._fields, encoded, limiter=self._encode_limiter
            )
            fresh.update(extra)
            return fresh

        answer = await self.request(
            op, fields, tensors=bucket.names, flush_refused_ok=flush, refresh=refresh
        )
        if answer is _FLUSH_REFUSED:
            # The weights are in; the flush waits for commit (the version too: the server
            # set it only if the whole call succeeded).
            self._flush_refused = True
            return
        self._flushed = flush
        if version is not None:
            message = str(answer.get("message", "")) if isinstance(answer, dict) else ""
            confirmed = _VERSION_CONFIRMED.search(message)
            if confirmed is not None and confirmed.group(1) == version:
                self._version_set = bucket.version
            else:
                log.info(
                    "%s: the server did not confirm weight_version on an update; setting "
                    "it with update_weight_version from now on",
                    self.name,
                )
                self._folds_version = False

    # -- the end of a sync -----------------------------------------------------------

    async def commit(self, version: int) -> None:
        """Close the session, flush the cache once, then set the weight version (the
        flush, and without a session the version, are skipped when the sync's last update
        already carried them; see the module).

        Raises:
            EngineError: any step failed; the reported version is then still the old one
                (and a session whose close failed is still marked open, for ``abort``).
        """
        if self._session_open:
            await self._end_session()
        if self.flush_cache_on_commit and not self._flushed:
            await self._flush()
        if self._version_set != version:
            await self.request(
                "update_weight_version", {"new_version": str(version), "abort_all_requests": False}
            )
        self._flushed = self._flush_refused = False
        self._version_set = None
        self._release_sent()

    def _release_sent(self) -> None:
        """Drop the buffers this session's updates pointed into (the server is done with
        them: the session closed, or a new one begins); CUDA-IPC references the server
        never opened are collected too."""
        sent, self._sent = self._sent, []
        if any(payload.on_cuda for payload in sent):
            del sent
            torch.cuda.ipc_collect()  # type: ignore[no-untyped-call]

    async def _flush(self) -> None:
        """Flush the radix cache once (retried), or under an ``in_place`` pause, where
        SGLang refuses a flush while requests run, try it once and log a refusal."""
        if self._paused_mode != "in_place":
            await self.request("flush_cache")
            return
        if not self._flush_refused:  # a refusal of the folded flush would only repeat
            try:
                await self.request("flush_cache", retry=False)
                return
            except EngineError as exc:
                if not cache_not_flushed("flush_cache", str(exc)):
                    raise
        log.warning(
            "%s: the radix cache was not flushed: requests stay in the batch under an "
            "in_place pause and SGLang flushes only when none runs; cached prefixes "
            "computed by the old weights may be reused",
            self.name,
        )

    async def abort(self, version: int) -> None:
        """Close an open session; the weight version is left untouched.

        SGLang cannot roll weights back: buckets already loaded stay loaded until the next
        sync overwrites them, but the reported version stays the old one.

        Raises:
            EngineError: the close failed (the session stays marked open; the next
                ``begin`` tries to close it again).
        """
        self._prepared.clear()
        self._flushed = self._flush_refused = False
        self._version_set = None
        if self._session_open:
            await self._end_session()
        self._release_sent()

    async def version(self) -> int | None:
        """The engine's weight version as an int (None when unset or not a number).

        Raises:
            EngineError: the engine is unreachable.
        """
        raw = await self.request("get_weight_version")
        try:
            return int(str(raw))
        except ValueError:
            return None

    async def pause(self, mode: PauseMode) -> None:
        """``pause_generation`` in ``mode``.

        Raises:
            EngineError: the engine refused or could not be reached.
        """
        await self.request("pause_generation", {"mode": mode})
        self._paused_mode = mode

    async def resume(self) -> None:
        """``continue_generation``.

        Raises:
            EngineError: the engine refused or could not be reached.
        """
        await self.request("continue_generation")
        self._paused_mode = None

    # -- the distributed update group (driven by SGLangDistributedEngine) -------------
    # Never retried: each pairs with a rendezvous or a broadcast that happens once.

    async def init_weights_update_group(
        self,
        master_address: str,
        master_port: int,
        rank_offset: int,
        world_size: int,
        group_name: str,
        backend: str,
    ) -> None:
        """``init_weights_update_group``: returns once the engine's ranks joined.

        Raises:
            EngineError: the engine refused or failed.
        """
        fields = wire.init_group_request(
            master_address, master_port, rank_offset, world_size, group_name, backend
        )
        await self.request("init_weights_update_group", fields, retry=False)

    async def update_weights_from_distributed(
        self,
        names: Sequence[str],
        dtypes: Sequence[str],
        shapes: Sequence[Sequence[int]],
        group_name: str,
        load_format: str | None,
    ) -> None:
        """``update_weights_from_distributed`` with ``flush_cache=false``: returns once the
        engine received the broadcast and loaded it.

        Raises:
            EngineError: the engine refused (naming a tensor its message names) or failed.
        """
        fields = wire.distributed_update_request(names, dtypes, shapes, group_name, load_format)
        await self.request("update_weights_from_distributed", fields, tensors=names, retry=False)

    async def destroy_weights_update_group(self, group_name: str) -> None:
        """``destroy_weights_update_group``.

        Raises:
            EngineError: the engine refused or failed.
        """
        await self.request("destroy_weights_update_group", {"group_name": group_name}, retry=False)


@dataclass(eq=False)
class _Encoded:
    """A bucket ready to send: its payload object (None when the transport takes the
    tensors themselves), the tensors, and the first attempt's fields."""

    payload: wire.BucketPayload | None
    tensors: list[tuple[str, torch.Tensor]]
    fields: dict[str, Any]
