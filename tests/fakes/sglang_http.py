"""SGLangHTTPDouble: a test double of SGLang's HTTP weight-update surface (not SGLang itself).

A real HTTP server on 127.0.0.1 (aiohttp, in a background thread with its own event loop)
that answers SGLang's weight endpoints the way SGLang 0.5.23 (``behave_like="0.5.23"``, the
default) or 0.5.12 does, as read from those wheels' ``http_server.py`` and ``io_struct.py``:
on 0.5.23 ``/server_info`` and ``/model_info``, ``/begin_weight_update`` and
``/end_weight_update`` and the exact refusal of a tensor or distributed update outside a
session; on 0.5.12 only the ``/get_*`` info routes and no session endpoints (404); both with
the bearer ``--api-key`` check (401), ``{"success", "message"}`` bodies with 200/400, the
request fields of that version's structs (others are a 422), and a cache flush refused
while requests run unless generation is paused in abort or retract mode. The session
refusal (``SessionRefusal``) is SGLang 0.5.23's own text; every other message is the
double's own wording, so tests assert on what a client does with it, not on its words.
What makes it worth having: every payload is decoded with SGLang's own code from the
installed ``sglang`` package (``normalize_serialized_named_tensor_payloads``,
``MultiprocessingSerializer.deserialize`` with its safe unpickler, ``FlattenedTensorBucket``),
rank by rank as SGLang's TP workers do, so a test passes only if real SGLang could read what
our client sent. Faults are injected by counters and events, never by timing: answer 503 k
times, refuse with success=false, hang until released. The distributed endpoints delegate to
an optional receiver object (see sglang_receiver and
tests/stages/engines/sglang/test_distributed.py).

It also records what a loader must never do: every weight update that arrives while
generation is not paused (``unpaused_updates``: SGLang would apply it between two decode
steps of the running batch, which would then read two weight versions). An update's
``weight_version`` is taken only when the whole call succeeded, and the answer then says
" Weight version updated to <v>." as SGLang 0.5.23's tokenizer manager appends it
(``confirms_weight_version=False``: a server that takes the field without saying so).

``/generate`` is a minimal stand-in for SGLang's, there so a test can check what an output's
``meta_info["weight_version"]`` means while a sync runs. It follows SGLang 0.5.23's
tokenizer manager in the two points that matter: a request that arrives while generation is
paused waits (on SGLang's ``is_pause`` condition) until ``/continue_generation``, whatever
the pause mode, and ``weight_version`` is the server's version at the moment the output is
built, not when the request arrived. It answers at once otherwise: the double has no running
batch, so no request spans a pause (under a real ``in_place`` pause one can, and its spans
then show the switch). Text and token ids are a digest of the prompt and the loaded weights,
so they are deterministic; every answer is recorded as a ``Generation`` with the digest of
each parameter it was computed on (``weights_seen``), so a test can tell a v1 output from a
v2 one and from one computed on a mix. ``hold_until`` holds a request to one path until the
generation state reaches a condition (e.g. a request waits on the pause), so a test orders
events with the double's own state, never with sleeps.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from aiohttp import web
from sglang.srt.utils import MultiprocessingSerializer
from sglang.srt.utils.common import normalize_serialized_named_tensor_payloads

from .sglang_model import SessionRefusal, check_against_spec, reconstruct_flattened
from .sglang_receiver import DistributedReceiver

__all__ = [
    "FIELDS_0523",
    "GENERATE_FIELDS",
    "UPDATE_TENSOR_FIELDS",
    "Call",
    "Generation",
    "SGLangHTTPDouble",
    "tensor_digest",
]

Behaviour = Literal["0.5.23", "0.5.12"]

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


# the parsed JSON body, stored by the middleware
_BODY: web.RequestKey[dict[str, Any]] = web.RequestKey("body", dict)

# The endpoints that change the served weights.
_UPDATE_PATHS = frozenset(
    {"/update_weights_from_tensor", "/update_weights_from_distributed", "/update_weights_from_disk"}
)


@dataclass
class Call:
    """One request the double received (payload bytes left out); ``received_s`` is
    ``time.perf_counter()`` when its body was read (for benchmarks, never for asserts)."""

    method: str
    path: str
    body: dict[str, Any]
    authorized: bool
    received_s: float = 0.0


GENERATE_FIELDS = frozenset({"text", "input_ids", "sampling_params", "rid", "stream"})
"""The part of SGLang's ``GenerateReqInput`` the double serves; any other field is a 422, so
a test never relies on something the double would silently ignore."""


def tensor_digest(tensor: torch.Tensor) -> str:
    """A digest of ``tensor``'s dtype, shape and bytes: equal digests mean bit-identical."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    digest = hashlib.blake2b(f"{flat.dtype}{tuple(tensor.shape)}".encode(), digest_size=16)
    digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class Generation:
    """One ``/generate`` the double answered, and what computed it.

    Attributes:
        rid: the request id, as ``meta_info["id"]`` answered it (the request's ``rid``, or
            the double's own ``gen-<n>``).
        weight_version: ``meta_info["weight_version"]`` as answered.
        weights_seen: parameter name -> ``tensor_digest`` of the tensor it held when the
            output was computed (only parameters loaded by then).
        waited: True when the request arrived while generation was paused and was answered
            after the continue.
    """

    rid: str
    weight_version: str
    weights_seen: Mapping[str, str]
    waited: bool


@dataclass
class _Faults:
    unavailable: dict[str, int] = field(default_factory=dict)  # path -> 503s left
    # path -> (success=false message, refusals left (None: until allow), requests to let
    # through first)
    refuse: dict[str, tuple[str, int | None, int]] = field(default_factory=dict)
    hang: set[str] = field(default_factory=set)


class SGLangHTTPDouble:
    """Test double of an SGLang server's weight endpoints, decoding with SGLang's code.

    Args:
        spec: the model's parameters: name -> (shape, dtype); an update naming anything
            else, or with another shape or dtype, is refused like SGLang's loader does.
        behave_like: ``"0.5.23"`` (sessions required) or ``"0.5.12"`` (no sessions).
        tp_size: how many ranks decode their own ``serialized_named_tensors`` entry;
            reported by server info as ``tp_size``, as SGLang reports its server args.
        quantization: the ``--quantization`` the server was launched with, reported by
            server info as ``quantization`` (None, as SGLang reports it when the
            checkpoint's own config decides). It changes nothing else: the double's
            ``spec`` says what its parameters hold.
        api_key: require ``Authorization: Bearer <api_key>``.
        running_requests: requests "in the running batch": a cache flush fails while any
            remain unless generation is paused in abort or retract mode.
        version_in_server_info: report ``version`` in server info (False: hide it, so a
            client has to probe for sessions).
        confirms_weight_version: say "Weight version updated to <v>." in the answer of an
            update that carried ``weight_version`` (False: take it silently).
    """

    def __init__(
        self,
        spec: dict[str, tuple[tuple[int, ...], torch.dtype]],
        *,
        behave_like: Behaviour = "0.5.23",
        tp_size: int = 1,
        quantization: str | None = None,
        api_key: str | None = None,
        running_requests: int = 0,
        version_in_server_info: bool = True,
        confirms_weight_version: bool = True,
    ) -> None:
        self.spec = dict(spec)
        self.behave_like: Behaviour = behave_like
        self.tp_size = tp_size
        self.quantization = quantization
        self.api_key = api_key
        self.running_requests = running_requests
        self.version_in_server_info = version_in_server_info
        self.confirms_weight_version = confirms_weight_version
        self.unpaused_updates: list[str] = []
        """Paths of weight updates that arrived while generation was not paused."""
        self.weights: dict[str, torch.Tensor] = {}
        self.weight_digests: dict[str, str] = {}
        """``tensor_digest`` of each entry of ``weights``, kept as each update lands."""
        self.generations: list[Generation] = []
        """Every answered ``/generate``, in the order the double answered them."""
        self.generate_waiting = 0
        """``/generate`` requests waiting for the continue right now."""
        self.hold_timeouts: list[str] = []
        """Paths whose ``hold_until`` condition never came true within its timeout."""
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
        # Generation state (pause, waiting and answered /generate) lives in the double's
        # loop; this condition wakes waiting /generate requests and hold_until's holds.
        self._state: asyncio.Condition | None = None
        self._holds: dict[str, tuple[Callable[[SGLangHTTPDouble], bool], float]] = {}
        self._stopping = False

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
        self._state = asyncio.Condition()
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
            ("POST", "/generate", self._generate),
            ("PUT", "/generate", self._generate),
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
        if self._state is not None:
            asyncio.run_coroutine_threadsafe(self._wake_for_stop(), loop).result(timeout=30)
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)

    async def _wake_for_stop(self) -> None:
        assert self._state is not None
        async with self._state:
            self._stopping = True
            self._state.notify_all()

    def wait_until_hanging(self, timeout_s: float = 30.0) -> bool:
        """Block until a request reached a hanging endpoint (an event, not a sleep)."""
        return self._entered_hang.wait(timeout_s)

    # -- fault injection (call before the client acts) ----------------------------------

    def fail_with_503(self, path: str, times: int) -> None:
        self.faults.unavailable[path] = times

    def refuse(self, path: str, message: str, *, times: int | None = None, after: int = 0) -> None:
        """Answer ``success=false`` (400) with ``message`` on ``path``: ``times`` times,
        or until ``allow`` when ``times`` is None, once ``after`` more requests to it were
        served as usual. The endpoint does nothing while it refuses."""
        self.faults.refuse[path] = (message, times, after)

    def allow(self, path: str) -> None:
        self.faults.refuse.pop(path, None)

    def hang(self, path: str) -> None:
        """Never answer ``path`` until the double stops."""
        self.faults.hang.add(path)

    def hold_until(
        self,
        path: str,
        until: Callable[[SGLangHTTPDouble], bool],
        *,
        timeout_s: float = 10.0,
    ) -> None:
        """Hold the next request to ``path``, before the double handles it, until
        ``until(self)`` is true. ``until`` runs in the double's loop each time the
        generation state changes (a ``/generate`` arrives, waits or is answered; a pause or
        continue), so it may read ``generations``, ``generate_waiting`` and ``paused``. A
        hold that times out is recorded in ``hold_timeouts`` and the request then goes on,
        so a test fails on an assertion rather than hanging."""
        self._holds[path] = (until, timeout_s)

    # -- queries -----------------------------------------------------------------------

    def paths(self) -> list[str]:
        return [c.path for c in self.calls if c.authorized]

    @property
    def updated_while_generating(self) -> bool:
        """Whether any weight update arrived while generation was not paused."""
        return bool(self.unpaused_updates)

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
        self.calls.append(
            Call(request.method, request.path, logged, authorized, time.perf_counter())
        )
        if not authorized:
            return web.json_response({"error": "Unauthorized"}, status=401)
        hold = self._holds.pop(request.path, None)
        if hold is not None:
            await self._hold(request.path, *hold)
        if request.path in _UPDATE_PATHS and self.paused is None:
            self.unpaused_updates.append(request.path)
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
            message, times, after = self.faults.refuse[path]
            if after > 0:
                self.faults.refuse[path] = (message, times, after - 1)
            else:
                if times is not None:
                    if times <= 1:
                        del self.faults.refuse[path]
                    else:
                        self.faults.refuse[path] = (message, times - 1, 0)
                return _answer(False, message)
        request[_BODY] = body
        result: web.StreamResponse = await handler(request)
        return result

    async def _hold(
        self, path: str, until: Callable[[SGLangHTTPDouble], bool], timeout_s: float
    ) -> None:
        assert self._state is not None
        async with self._state:
            try:
                await asyncio.wait_for(
                    self._state.wait_for(lambda: self._stopping or until(self)), timeout_s
                )
            except TimeoutError:
                self.hold_timeouts.append(path)

    def _store(self, name: str, tensor: torch.Tensor) -> None:
        self.weights[name] = tensor.clone()
        self.weight_digests[name] = tensor_digest(tensor)

    async def _generate(self, request: web.Request) -> web.Response:
        body: dict[str, Any] = request[_BODY]
        unknown = set(body) - GENERATE_FIELDS
        if unknown:
            return web.json_response({"detail": f"unknown fields {sorted(unknown)}"}, status=422)
        if body.get("stream"):
            return web.json_response({"error": "the double does not stream"}, status=400)
        text, input_ids = body.get("text"), body.get("input_ids")
        if (text is None) == (input_ids is None):
            return web.json_response(
                {"error": "give exactly one of text and input_ids"}, status=400
            )
        if not isinstance(text, str | None) or not (
            input_ids is None
            or (isinstance(input_ids, list) and all(isinstance(i, int) for i in input_ids))
        ):
            return web.json_response({"error": "one prompt: a string or token ids"}, status=400)
        max_new_tokens = (body.get("sampling_params") or {}).get("max_new_tokens", 128)
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            return web.json_response({"error": "max_new_tokens must be an int >= 0"}, status=400)
        assert self._state is not None
        async with self._state:
            waited = self.paused is not None
            if waited:
                # SGLang's tokenizer manager holds a new request on its is_pause condition
                # until continue_generation, in every pause mode.
                self.generate_waiting += 1
                self._state.notify_all()
                try:
                    await self._state.wait_for(lambda: self._stopping or self.paused is None)
                finally:
                    self.generate_waiting -= 1
                if self._stopping:
                    return web.json_response({"error": "server shut down"}, status=503)
            # The output is built now: on the weights loaded now, labelled with the
            # version the server reports now (SGLang reads it when it builds meta_info).
            seen = dict(self.weight_digests)
            rid = str(body.get("rid") or f"gen-{len(self.generations)}")
            generation = Generation(rid, self.weight_version, seen, waited)
            self.generations.append(generation)
            self._state.notify_all()
        prompt = text if text is not None else " ".join(map(str, input_ids or []))
        digest = hashlib.blake2b(prompt.encode(), digest_size=64)
        for name in sorted(seen):
            digest.update(f"{name}={seen[name]}".encode())
        raw = digest.digest()
        output_ids = [raw[i % len(raw)] for i in range(max_new_tokens)]
        return web.json_response(
            {
                "text": "".join(chr(ord("a") + t % 26) for t in output_ids),
                "output_ids": output_ids,
                "meta_info": {
                    "id": rid,
                    "finish_reason": {"type": "length", "length": max_new_tokens},
                    "prompt_tokens": len(prompt.split()),
                    "weight_version": generation.weight_version,
                    "completion_tokens": max_new_tokens,
                    "cached_tokens": 0,
                },
            }
        )

    async def _server_info(self, request: web.Request) -> web.Response:
        # SGLang answers with every resolved server arg (0.5.23: ServerArgs.resolved_dict();
        # 0.5.12: the dataclass as a dict), tp_size and quantization among them.
        info: dict[str, Any] = {"tp_size": self.tp_size, "quantization": self.quantization}
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
                    per_rank.append(reconstruct_flattened(data))
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
            self._store(name, tensor)
        self.updates.append([[(n, t.clone()) for n, t in r] for r in per_rank])
        if body.get("flush_cache", True) and not self._flush_allowed():
            return _answer(
                False,
                "Weights were updated, but the cache was not flushed because requests are "
                "still running or queued. Retract or finish them, then call /flush_cache.",
            )
        message = "Success"
        if body.get("weight_version") is not None:
            self.weight_version = str(body["weight_version"])
            if self.confirms_weight_version:
                message += f" Weight version updated to {body['weight_version']}."
        return _answer(True, message)

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
        assert self._state is not None
        async with self._state:
            self.paused = mode
            self._state.notify_all()
        if mode == "abort":
            self.running_requests = 0
        return web.json_response({"message": "Generation paused successfully.", "status": "ok"})

    async def _continue(self, request: web.Request) -> web.Response:
        if (bad := _unknown(request, "ContinueGenerationReqInput")) is not None:
            return bad
        assert self._state is not None
        async with self._state:
            self.paused = None
            self._state.notify_all()
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
                self._store(name, tensor)
            self.updates.append([list(tensors)])
        return _answer(ok, message)

    async def _destroy_group(self, request: web.Request) -> web.Response:
        if (bad := _unknown(request, "DestroyWeightsUpdateGroupReqInput")) is not None:
            return bad
        if self.receiver is None:
            return _answer(False, "no distributed receiver configured in the double")
        ok, message = await asyncio.to_thread(self.receiver.destroy_group, request[_BODY])
        return _answer(ok, message)


def _answer(success: bool, message: str) -> web.Response:
    return web.json_response(
        {"success": success, "message": message}, status=200 if success else 400
    )


def _unknown(request: web.Request, struct: str) -> web.Response | None:
    body = request[_BODY]
    unknown = set(body) - FIELDS_0523[struct]
    if unknown:
        return web.json_response({"detail": f"unknown fields {sorted(unknown)}"}, status=422)
    return None
