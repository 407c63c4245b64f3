"""SGLangHTTPDouble: a test double of SGLang's HTTP weight-update surface (not SGLang itself).

A real HTTP server on 127.0.0.1 (aiohttp, in a background thread with its own event loop)
that answers SGLang's weight endpoints the way SGLang 0.5.23 or 0.5.12 does: sessions and
their exact refusal message on 0.5.23, no session endpoints (404) on 0.5.12, bearer api key,
``{"success", "message"}`` bodies with 200/400, a cache flush refused while requests run.
What makes it worth having: every payload is decoded with SGLang's own code from the
installed ``sglang`` package (``normalize_serialized_named_tensor_payloads``,
``MultiprocessingSerializer.deserialize`` with its safe unpickler, ``FlattenedTensorBucket``),
rank by rank as SGLang's TP workers do, so a test passes only if real SGLang could read what
our client sent. Faults are injected by counters and events, never by timing: answer 503 k
times, refuse with success=false, hang until released. The distributed endpoints delegate to
an optional receiver object (see test_sglang_distributed).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from aiohttp import web
from sglang.srt.utils import MultiprocessingSerializer
from sglang.srt.utils.common import normalize_serialized_named_tensor_payloads
from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket, FlattenedTensorMetadata

__all__ = [
    "Call",
    "DistributedReceiver",
    "FakeSGLangEngine",
    "FakeSGLangEngine0512",
    "SGLangHTTPDouble",
    "SessionRefusal",
    "SubprocessReceiver",
    "check_against_spec",
]

Behaviour = Literal["0.5.23", "0.5.12"]

SessionRefusal = (
    "update_weights_from_tensor must run between begin_weight_update() and end_weight_update()"
)

# Request fields per version, as SGLang's request structs declare them (the 0.5.23 sets are
# checked against the installed io_struct.py by test_sglang_wire); unknown fields are a 422,
# so a client that drifts from SGLang's schema fails here.
_BASE = {"rid", "http_worker_ipc"}
UPDATE_TENSOR_FIELDS: dict[str, set[str]] = {
    "0.5.23": _BASE
    | {
        "serialized_named_tensors",
        "load_format",
        "flush_cache",
        "abort_all_requests",
        "weight_version",
        "selector",
        "torch_empty_cache",
    },
    "0.5.12": {
        "serialized_named_tensors",
        "load_format",
        "flush_cache",
        "abort_all_requests",
        "weight_version",
        "disable_draft_model",
        "torch_empty_cache",
    },
}
FIELDS_0523: dict[str, set[str]] = {
    "UpdateWeightsFromTensorReqInput": UPDATE_TENSOR_FIELDS["0.5.23"],
    "UpdateWeightsFromDistributedReqInput": _BASE
    | {
        "names",
        "dtypes",
        "shapes",
        "group_name",
        "flush_cache",
        "abort_all_requests",
        "weight_version",
        "load_format",
        "selector",
        "torch_empty_cache",
    },
    "InitWeightsUpdateGroupReqInput": _BASE
    | {"master_address", "master_port", "rank_offset", "world_size", "group_name", "backend"},
    "DestroyWeightsUpdateGroupReqInput": _BASE | {"group_name"},
    "UpdateWeightVersionReqInput": _BASE | {"new_version", "abort_all_requests"},
    "PauseGenerationReqInput": _BASE | {"mode"},
    "ContinueGenerationReqInput": _BASE | {"torch_empty_cache"},
    "BeginWeightUpdateReqInput": _BASE | {"selector"},
    "EndWeightUpdateReqInput": _BASE,
}


_BODY = web.RequestKey("body", dict)  # the parsed JSON body, stored by the middleware


@dataclass
class Call:
    """One request the double received (payload bytes left out)."""

    method: str
    path: str
    body: dict[str, Any]
    authorized: bool


class DistributedReceiver(Protocol):
    """What the double delegates the distributed endpoints to (blocking calls, run in a
    worker thread of the double's loop)."""

    def init_group(self, body: dict[str, Any]) -> tuple[bool, str]: ...

    def receive(self, body: dict[str, Any]) -> tuple[bool, str, list[tuple[str, torch.Tensor]]]: ...

    def destroy_group(self, body: dict[str, Any]) -> tuple[bool, str]: ...


@dataclass
class _Faults:
    unavailable: dict[str, int] = field(default_factory=dict)  # path -> 503s left
    refuse: dict[str, str] = field(default_factory=dict)  # path -> success=false message
    hang: set[str] = field(default_factory=set)


class SGLangHTTPDouble:
    """Test double of an SGLang server's weight endpoints, decoding with SGLang's code.

    Args:
        spec: the model's parameters: name -> (shape, dtype); an update naming anything
            else, or with another shape or dtype, is refused like SGLang's loader does.
        behave_like: ``"0.5.23"`` (sessions required) or ``"0.5.12"`` (no sessions).
        tp_size: how many ranks decode their own ``serialized_named_tensors`` entry.
        api_key: require ``Authorization: Bearer <api_key>``.
        running_requests: requests "in the running batch": a cache flush fails while any
            remain unless generation is paused in abort or retract mode.
        version_in_server_info: report ``version`` in server info (False: hide it, so a
            client has to probe for sessions).
    """

    def __init__(
        self,
        spec: dict[str, tuple[tuple[int, ...], torch.dtype]],
        *,
        behave_like: Behaviour = "0.5.23",
        tp_size: int = 1,
        api_key: str | None = None,
        running_requests: int = 0,
        version_in_server_info: bool = True,
    ) -> None:
        self.spec = dict(spec)
        self.behave_like: Behaviour = behave_like
        self.tp_size = tp_size
        self.api_key = api_key
        self.running_requests = running_requests
        self.version_in_server_info = version_in_server_info
        self.weights: dict[str, torch.Tensor] = {}
        self.weight_version = "default"
        self.session_open = False
        self.paused: str | None = None
        self.calls: list[Call] = []
        self.updates: list[list[list[tuple[str, torch.Tensor]]]] = []  # per call, per rank
        self.faults = _Faults()
        self.receiver: DistributedReceiver | None = None
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._release: asyncio.Event | None = None
        self._entered_hang = threading.Event()

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> SGLangHTTPDouble:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        started = threading.Event()
        failure: list[BaseException] = []

        def serve() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._open())
            except BaseException as exc:  # reported to start()'s caller
                failure.append(exc)
                started.set()
                loop.close()
                return
            started.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=serve, name="sglang-double", daemon=True)
        self._thread.start()
        started.wait()
        if failure:
            raise failure[0]

    async def _open(self) -> None:
        self._release = asyncio.Event()
        app = web.Application(middlewares=[self._middleware], client_max_size=1 << 30)
        routes = [
            ("GET", "/get_server_info", self._server_info),
            ("GET", "/get_model_info", self._model_info),
            ("POST", "/update_weights_from_tensor", self._update_from_tensor),
            ("POST", "/update_weight_version", self._update_weight_version),
            ("GET", "/flush_cache", self._flush_cache),
            ("POST", "/flush_cache", self._flush_cache),
            ("POST", "/pause_generation", self._pause),
            ("POST", "/continue_generation", self._continue),
            ("POST", "/init_weights_update_group", self._init_group),
            ("POST", "/update_weights_from_distributed", self._update_from_distributed),
            ("POST", "/destroy_weights_update_group", self._destroy_group),
        ]
        if self.behave_like == "0.5.23":
            routes += [
                ("GET", "/server_info", self._server_info),
                ("GET", "/model_info", self._model_info),
                ("POST", "/begin_weight_update", self._begin),
                ("POST", "/end_weight_update", self._end),
            ]
        for method, path, handler in routes:
            app.router.add_route(method, path, handler)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()

    def stop(self) -> None:
        """Release hung handlers, close the server and join its thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or loop.is_closed():
            return
        if self._release is not None:
            loop.call_soon_threadsafe(self._release.set)
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)

    def wait_until_hanging(self, timeout_s: float = 30.0) -> bool:
        """Block until a request reached a hanging endpoint (an event, not a sleep)."""
        return self._entered_hang.wait(timeout_s)

    # -- fault injection (call before the client acts) ----------------------------------

    def fail_with_503(self, path: str, times: int) -> None:
        self.faults.unavailable[path] = times

    def refuse(self, path: str, message: str) -> None:
        """Answer ``success=false`` with ``message`` on ``path`` until ``allow``."""
        self.faults.refuse[path] = message

    def allow(self, path: str) -> None:
        self.faults.refuse.pop(path, None)

    def hang(self, path: str) -> None:
        """Never answer ``path`` until the double stops."""
        self.faults.hang.add(path)

    # -- queries -----------------------------------------------------------------------

    def paths(self) -> list[str]:
        return [c.path for c in self.calls if c.authorized]

    # -- handlers ----------------------------------------------------------------------

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Any]
    ) -> web.StreamResponse:
        body: dict[str, Any] = {}
        if request.can_read_body:
            try:
                parsed = await request.json()
            except ValueError:
                return web.json_response({"detail": "body is not JSON"}, status=422)
            if not isinstance(parsed, dict):
                return web.json_response({"detail": "body must be an object"}, status=422)
            body = parsed
        authorized = self.api_key is None or (
            request.headers.get("Authorization") == f"Bearer {self.api_key}"
        )
        logged = {k: v for k, v in body.items() if k != "serialized_named_tensors"}
        self.calls.append(Call(request.method, request.path, logged, authorized))
        if not authorized:
            return web.json_response({"error": "Unauthorized"}, status=401)
        path = request.path
        if path in self.faults.hang:
            self._entered_hang.set()
            assert self._release is not None
            await self._release.wait()
            return web.json_response({"success": False, "message": "shut down"}, status=503)
        left = self.faults.unavailable.get(path, 0)
        if left > 0:
            self.faults.unavailable[path] = left - 1
            return web.Response(status=503, text="Service Unavailable")
        if path in self.faults.refuse:
            return _answer(False, self.faults.refuse[path])
        request[_BODY] = body
        result: web.StreamResponse = await handler(request)
        return result

    async def _server_info(self, request: web.Request) -> web.Response:
        info: dict[str, Any] = {"tp_size": self.tp_size}
        if self.version_in_server_info:
            info["version"] = self.behave_like
        return web.json_response(info)

    async def _model_info(self, request: web.Request) -> web.Response:
        return web.json_response({"weight_version": self.weight_version, "is_generation": True})

    async def _begin(self, request: web.Request) -> web.Response:
        if (bad := _unknown(request, "BeginWeightUpdateReqInput")) is not None:
            return bad
        if self.session_open:
            return _answer(
                False, "a weight-update session is already open; call end_weight_update() first"
            )
        self.session_open = True
        return _answer(True, "Success")

    async def _end(self, request: web.Request) -> web.Response:
        if (bad := _unknown(request, "EndWeightUpdateReqInput")) is not None:
            return bad
        if not self.session_open:
            return _answer(
                False, "no weight-update session is open; call begin_weight_update() first"
            )
        self.session_open = False
        return _answer(True, "Success")

    def _flush_allowed(self) -> bool:
        return self.running_requests == 0 or self.paused in ("abort", "retract")

    async def _update_from_tensor(self, request: web.Request) -> web.Response:
        body: dict[str, Any] = request[_BODY]
        unknown = set(body) - UPDATE_TENSOR_FIELDS[self.behave_like]
        if unknown:
            return web.json_response({"detail": f"unknown fields {sorted(unknown)}"}, status=422)
        if self.behave_like == "0.5.23" and not self.session_open:
            return _answer(False, SessionRefusal)
        payloads = body.get("serialized_named_tensors")
        if not isinstance(payloads, list) or len(payloads) != self.tp_size:
            return _answer(False, f"expected {self.tp_size} serialized payloads (one per rank)")
        # SGLang's HTTP path: base64 text -> raw pickle bytes; each TP rank then decodes
        # only its own entry with the safe unpickler.
        raw = normalize_serialized_named_tensor_payloads(payloads)
        per_rank: list[list[tuple[str, torch.Tensor]]] = []
        try:
            for rank in range(self.tp_size):
                data = MultiprocessingSerializer.deserialize(raw[rank])
                if body.get("load_format") == "flattened_bucket":
                    per_rank.append(_reconstruct_flattened(data))
                elif body.get("load_format") is None:
                    per_rank.append([(str(n), t) for n, t in data])
                else:
                    return _answer(False, f"Unknown load_format={body['load_format']}")
        except Exception as exc:  # SGLang answers a decode failure as success=false
            return _answer(False, f"Failed to deserialize: {type(exc).__name__}: {exc}")
        for tensors in per_rank:
            problem = self._check(tensors)
            if problem is not None:
                return _answer(False, problem)
        for name, tensor in per_rank[0]:
            self.weights[name] = tensor.clone()
        self.updates.append([[(n, t.clone()) for n, t in r] for r in per_rank])
        if body.get("weight_version") is not None:
            self.weight_version = str(body["weight_version"])
        if body.get("flush_cache", True) and not self._flush_allowed():
            return _answer(
                False,
                "Weights were updated, but the cache was not flushed because requests are "
                "still running or queued. Retract or finish them, then call /flush_cache.",
            )
        return _answer(True, "Success")

    def _check(self, tensors: list[tuple[str, torch.Tensor]]) -> str | None:
        return check_against_spec(self.spec, tensors)

    async def _update_weight_version(self, request: web.Request) -> web.Response:
        if (bad := _unknown(request, "UpdateWeightVersionReqInput")) is not None:
            return bad
        body = request[_BODY]
        self.weight_version = str(body["new_version"])
        return web.json_response(
            {
                "success": True,
                "message": f"Weight version updated to {body['new_version']}",
                "new_version": body["new_version"],
            }
        )

    async def _flush_cache(self, request: web.Request) -> web.Response:
        if not self._flush_allowed():
            return web.Response(status=400, text="Flush cache failed.\n")
        return web.Response(status=200, text="Cache flushed.\n")

    async def _pause(self, request: web.Request) -> web.Response:
        if (bad := _unknown(request, "PauseGenerationReqInput")) is not None:
            return bad
        mode = request[_BODY].get("mode", "abort")
        if mode not in ("abort", "retract", "in_place"):
            return web.json_response({"detail": f"bad mode {mode!r}"}, status=422)
        self.paused = mode
        if mode == "abort":
            self.running_requests = 0
        return web.json_response({"message": "Generation paused successfully.", "status": "ok"})

    async def _continue(self, request: web.Request) -> web.Response:
        if (bad := _unknown(request, "ContinueGenerationReqInput")) is not None:
            return bad
        self.paused = None
        return web.json_response({"message": "Generation continued successfully.", "status": "ok"})

    async def _init_group(self, request: web.Request) -> web.Response:
        if (bad := _unknown(request, "InitWeightsUpdateGroupReqInput")) is not None:
            return bad
        if self.receiver is None:
            return _answer(False, "no distributed receiver configured in the double")
        ok, message = await asyncio.to_thread(self.receiver.init_group, request[_BODY])
        return _answer(ok, message)

    async def _update_from_distributed(self, request: web.Request) -> web.Response:
        if (bad := _unknown(request, "UpdateWeightsFromDistributedReqInput")) is not None:
            return bad
        if self.receiver is None:
            return _answer(False, "no distributed receiver configured in the double")
        if self.behave_like == "0.5.23" and not self.session_open:
            return _answer(
                False,
                "update_weights_from_distributed must run between "
                "begin_weight_update() and end_weight_update()",
            )
        ok, message, tensors = await asyncio.to_thread(self.receiver.receive, request[_BODY])
        if ok:
            problem = self._check(tensors)
            if problem is not None:
                return _answer(False, problem)
            for name, tensor in tensors:
                self.weights[name] = tensor.clone()
            self.updates.append([list(tensors)])
        return _answer(ok, message)

    async def _destroy_group(self, request: web.Request) -> web.Response:
        if (bad := _unknown(request, "DestroyWeightsUpdateGroupReqInput")) is not None:
            return bad
        if self.receiver is None:
            return _answer(False, "no distributed receiver configured in the double")
        ok, message = await asyncio.to_thread(self.receiver.destroy_group, request[_BODY])
        return _answer(ok, message)


def check_against_spec(
    spec: dict[str, tuple[tuple[int, ...], torch.dtype]],
    tensors: list[tuple[str, torch.Tensor]],
) -> str | None:
    """SGLang-like refusal message for the first tensor the model cannot take, or None."""
    for name, tensor in tensors:
        if name not in spec:
            return f"Failed to update parameter online: KeyError: {name!r} is not a parameter"
        shape, dtype = spec[name]
        if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
            return (
                f"Failed to update parameter online: {name} expects "
                f"{tuple(shape)} {dtype}, got {tuple(tensor.shape)} {tensor.dtype}"
            )
    return None


class FakeSGLangEngine:
    """A named fake of the in-process ``sglang.Engine`` (0.5.23 surface), not SGLang.

    Its weight methods have exactly the real Engine's signatures (test_sglang_engine checks
    them against the installed engine.py) and answer ``(success, message)`` the way the
    real ones do. Payloads go the real route: plain tensors are serialized per rank with
    SGLang's ``MultiprocessingSerializer`` (as ``Engine._serialize_tensors_per_rank``
    does), flattened payloads are normalized with SGLang's helper, and each rank decodes
    its own entry with SGLang's safe unpickler and ``FlattenedTensorBucket``.
    """

    def __init__(
        self,
        spec: dict[str, tuple[tuple[int, ...], torch.dtype]],
        *,
        tp_size: int = 1,
        running_requests: int = 0,
    ) -> None:
        self.spec = dict(spec)
        self.tp_size = tp_size
        self.running_requests = running_requests
        self.weights: dict[str, torch.Tensor] = {}
        self.session_open = False
        self.calls: list[str] = []
        self.flush_cache_args: list[bool] = []
        self.refuse_next: str | None = None
        self.raise_next: BaseException | None = None
        self.block: threading.Event | None = None  # a call waits on it when set
        self.entered_block = threading.Event()
        self.shut_down = False
        self.receiver: DistributedReceiver | None = None

    def _enter(self, name: str) -> None:
        self.calls.append(name)
        if self.block is not None:
            self.entered_block.set()
            self.block.wait()
        if self.raise_next is not None:
            exc, self.raise_next = self.raise_next, None
            raise exc

    def begin_weight_update(self, selector: str = "all") -> tuple[bool, str]:
        self._enter("begin_weight_update")
        if self.session_open:
            return False, "a weight-update session is already open; call end_weight_update() first"
        self.session_open = True
        return True, "Success"

    def end_weight_update(self) -> tuple[bool, str]:
        self._enter("end_weight_update")
        if not self.session_open:
            return False, "no weight-update session is open; call begin_weight_update() first"
        self.session_open = False
        return True, "Success"

    def _requires_session(self) -> bool:
        return True

    def update_weights_from_tensor(
        self,
        named_tensors: Any,
        load_format: str | None = None,
        flush_cache: bool = True,
    ) -> tuple[bool, str]:
        self._enter("update_weights_from_tensor")
        self.flush_cache_args.append(flush_cache)
        if self.refuse_next is not None:
            message, self.refuse_next = self.refuse_next, None
            return False, message
        if self._requires_session() and not self.session_open:
            return False, SessionRefusal
        if load_format == "flattened_bucket":
            raw = normalize_serialized_named_tensor_payloads(named_tensors)
        else:
            raw = [MultiprocessingSerializer.serialize(named_tensors) for _ in range(self.tp_size)]
        decoded: list[tuple[str, torch.Tensor]] = []
        for rank in range(self.tp_size):
            data = MultiprocessingSerializer.deserialize(raw[rank])
            if load_format == "flattened_bucket":
                decoded = _reconstruct_flattened(data)
            else:
                decoded = [(str(n), t) for n, t in data]
            problem = check_against_spec(self.spec, decoded)
            if problem is not None:
                return False, problem
        for name, tensor in decoded:
            self.weights[name] = tensor.clone()
        if flush_cache and self.running_requests:
            return False, "Weights were updated, but the cache was not flushed"
        return True, "Success"

    def init_weights_update_group(
        self,
        master_address: str,
        master_port: int,
        rank_offset: int,
        world_size: int,
        group_name: str,
        backend: str = "nccl",
    ) -> tuple[bool, str]:
        self._enter("init_weights_update_group")
        if self.receiver is None:
            return False, "no distributed receiver configured in the fake"
        return self.receiver.init_group(
            {
                "master_address": master_address,
                "master_port": master_port,
                "rank_offset": rank_offset,
                "world_size": world_size,
                "group_name": group_name,
                "backend": backend,
            }
        )

    def update_weights_from_distributed(
        self,
        names: list[str],
        dtypes: list[str],
        shapes: list[list[int]],
        group_name: str = "weight_update_group",
        flush_cache: bool = True,
        load_format: str | None = None,
    ) -> tuple[bool, str]:
        self._enter("update_weights_from_distributed")
        self.flush_cache_args.append(flush_cache)
        if self.receiver is None:
            return False, "no distributed receiver configured in the fake"
        if self._requires_session() and not self.session_open:
            return False, (
                "update_weights_from_distributed must run between "
                "begin_weight_update() and end_weight_update()"
            )
        ok, message, tensors = self.receiver.receive(
            {
                "names": names,
                "dtypes": dtypes,
                "shapes": shapes,
                "group_name": group_name,
                "load_format": load_format,
            }
        )
        if not ok:
            return ok, message
        problem = check_against_spec(self.spec, tensors)
        if problem is not None:
            return False, problem
        for name, tensor in tensors:
            self.weights[name] = tensor.clone()
        return True, message

    def destroy_weights_update_group(self, group_name: str) -> tuple[bool, str]:
        self._enter("destroy_weights_update_group")
        if self.receiver is None:
            return False, "no distributed receiver configured in the fake"
        return self.receiver.destroy_group({"group_name": group_name})

    def flush_cache(self) -> Any:
        self._enter("flush_cache")
        ok = self.running_requests == 0
        return types.SimpleNamespace(success=ok, message="" if ok else "requests are running")

    def get_model_info(self) -> dict[str, Any]:
        return {"weight_version": "default"}

    def shutdown(self) -> None:
        self.shut_down = True


class FakeSGLangEngine0512(FakeSGLangEngine):
    """The fake without weight-update sessions, as sglang 0.5.12's Engine."""

    def __getattribute__(self, name: str) -> Any:
        if name in ("begin_weight_update", "end_weight_update"):
            raise AttributeError(name)
        return super().__getattribute__(name)

    def _requires_session(self) -> bool:
        return False


class SubprocessReceiver:
    """Stands in for SGLang's receiving TP rank of a distributed update (not SGLang itself).

    A spawned process that joins the update group with SGLang's own
    ``init_custom_process_group`` and receives the way SGLang's weight updater does:
    ``FlattenedTensorBucket.empty`` from the announced names/dtypes/shapes and one
    broadcast into it for ``flattened_bucket``, else one broadcast per tensor. Plug it into
    ``SGLangHTTPDouble.receiver`` (or a fake Engine) to serve the distributed endpoints.
    """

    def __init__(self, tp_rank: int = 0) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(
            target=_receiver_main, args=(child, tp_rank), name="sglang-receiver", daemon=True
        )
        self._proc.start()
        child.close()
        self._lock = threading.Lock()

    def _ask(self, command: str, body: dict[str, Any]) -> Any:
        with self._lock:
            self._conn.send((command, body))
            return self._conn.recv()

    def init_group(self, body: dict[str, Any]) -> tuple[bool, str]:
        ok, message = self._ask("init", body)
        return bool(ok), str(message)

    def receive(self, body: dict[str, Any]) -> tuple[bool, str, list[tuple[str, torch.Tensor]]]:
        ok, message, raw = self._ask("recv", body)
        tensors = [
            (
                name,
                torch.frombuffer(bytearray(data), dtype=torch.uint8)
                .view(getattr(torch, dtype))
                .reshape(shape),
            )
            for name, dtype, shape, data in raw
        ]
        return bool(ok), str(message), tensors

    def destroy_group(self, body: dict[str, Any]) -> tuple[bool, str]:
        ok, message = self._ask("destroy", body)
        return bool(ok), str(message)

    def close(self) -> None:
        if self._proc.is_alive():
            with contextlib.suppress(OSError):
                self._conn.send(("stop", {}))
            self._proc.join(timeout=30)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(timeout=30)
        self._conn.close()
        self._proc.close()


def _receiver_main(conn: Any, tp_rank: int) -> None:
    """The receiving rank's loop (runs in the spawned process)."""
    import torch.distributed as dist
    from sglang.srt.utils.common import init_custom_process_group

    groups: dict[str, Any] = {}
    while True:
        command, body = conn.recv()
        if command == "stop":
            break
        try:
            if command == "init":
                groups[body["group_name"]] = init_custom_process_group(
                    backend=body["backend"],
                    init_method=f"tcp://{body['master_address']}:{body['master_port']}",
                    world_size=body["world_size"],
                    rank=body["rank_offset"] + tp_rank,
                    group_name=body["group_name"],
                )
                conn.send((True, "Succeeded to initialize custom process group."))
            elif command == "recv":
                group = groups[body["group_name"]]
                names, dtypes, shapes = body["names"], body["dtypes"], body["shapes"]
                if body.get("load_format") == "flattened_bucket":
                    bucket = FlattenedTensorBucket.empty(names, dtypes, shapes, "cpu")
                    dist.broadcast(bucket.get_flattened_tensor(), src=0, group=group)
                    received = bucket.reconstruct_tensors()
                else:
                    received = []
                    handles = []
                    for name, dtype, shape in zip(names, dtypes, shapes, strict=True):
                        weight = torch.empty(shape, dtype=getattr(torch, dtype))
                        handles.append(dist.broadcast(weight, src=0, group=group, async_op=True))
                        received.append((name, weight))
                    for handle in handles:
                        handle.wait()
                raw = [
                    (
                        n,
                        str(t.dtype).removeprefix("torch."),
                        list(t.shape),
                        t.contiguous().view(torch.uint8).numpy().tobytes(),
                    )
                    for n, t in received
                ]
                conn.send((True, "Succeeded to update parameter online.", raw))
            elif command == "destroy":
                dist.destroy_process_group(groups.pop(body["group_name"]))
                conn.send((True, "Succeeded to destroy custom process group."))
        except Exception as exc:
            failure = f"Failed to {command}: {type(exc).__name__}: {exc}"
            conn.send((False, failure, []) if command == "recv" else (False, failure))
    for group in groups.values():
        dist.destroy_process_group(group)


def _reconstruct_flattened(data: Any) -> list[tuple[str, torch.Tensor]]:
    """What SGLang's weight updater does with a flattened_bucket payload."""
    metadata = [
        FlattenedTensorMetadata(
            name=m.name,
            shape=m.shape,
            dtype=m.dtype,
            start_idx=m.start_idx,
            end_idx=m.end_idx,
            numel=m.numel,
        )
        for m in data["metadata"]
    ]
    bucket = FlattenedTensorBucket(flattened_tensor=data["flattened_tensor"], metadata=metadata)
    return [(str(n), t) for n, t in bucket.reconstruct_tensors()]


def _answer(success: bool, message: str) -> web.Response:
    return web.json_response(
        {"success": success, "message": message}, status=200 if success else 400
    )


def _unknown(request: web.Request, struct: str) -> web.Response | None:
    unknown = set(request[_BODY]) - FIELDS_0523[struct]
    if unknown:
        return web.json_response({"detail": f"unknown fields {sorted(unknown)}"}, status=422)
    return None
