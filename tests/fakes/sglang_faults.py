"""Faults the SGLang fakes do not inject, for the engine fault matrix.

``FaultyFakeSGLangEngine``: the in-process fake ``sglang.Engine`` whose method fails on
its n-th call (refused, raising, or hanging until released). ``FaultyHTTPDouble``:
``SGLangHTTPDouble`` (a test double of SGLang's HTTP weight-update surface) with the HTTP
faults below.

A fault lands on the n-th request to one path: ``success_false`` (400 with
``{"success": false}``, what SGLang answers a refused call), a 500 once or on every
request, no answer until ``clear()`` (a hang past Load's deadline), the connection closed
without an answer (a reset), a 200 whose body is not JSON (a proxy's page in between), a
401 (a rotated api key). The request is answered before the double's own handler runs, so
the server did nothing: what a client does with the answer is what is tested. Faults are
counters, never timing.

The engine matrices over the double (HTTP and distributed) share their weights:
``MATRIX_NAMES``, ``matrix_tensors`` / ``matrix_buckets`` (one tensor a bucket, seeded by
the version) and ``serves`` (whether the double holds a version's weights bit for bit).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import torch
from aiohttp import web

from tests.fakes.sglang_engine import FakePausableSGLangEngine
from tests.fakes.sglang_http import SGLangHTTPDouble
from tests.helpers import bits
from weightpipe.stages.bucket import WeightBucket

__all__ = [
    "HTTP_FAULTS",
    "IN_PROCESS_FAULTS",
    "LOST_ANSWERS",
    "MATRIX_NAMES",
    "MATRIX_SHAPE",
    "RETRYABLE",
    "FaultyFakeSGLangEngine",
    "FaultyHTTPDouble",
    "HTTPFault",
    "InProcessFault",
    "matrix_buckets",
    "matrix_tensors",
    "serves",
]

HTTPFault = Literal[
    "success_false",
    "500_once",
    "500_always",
    "hang",
    "reset",
    "non_json",
    "401",
    "applied_then_hang",
    "applied_then_reset",
]
HTTP_FAULTS: tuple[HTTPFault, ...] = (
    "success_false",
    "500_once",
    "500_always",
    "hang",
    "reset",
    "non_json",
    "401",
)
LOST_ANSWERS: tuple[HTTPFault, ...] = ("applied_then_hang", "applied_then_reset")
"""The server did the work, then its answer was lost: no answer until ``clear()``, or the
connection closed (not in ``HTTP_FAULTS``: the matrix runs them on the first bucket)."""
RETRYABLE: frozenset[HTTPFault] = frozenset({"500_once", "reset", "applied_then_reset"})
"""The faults a client absorbs by repeating the call once (one 500, one reset)."""


MATRIX_NAMES = ("model.norm.weight", "model.embed_tokens.weight", "lm_head.weight")
"""The parameters a matrix trial syncs, one bucket each: a first, a middle and a last."""
MATRIX_SHAPE = (4, 6)


def matrix_tensors(
    version: int, shape: tuple[int, ...] = MATRIX_SHAPE
) -> list[tuple[str, torch.Tensor]]:
    """Version ``version``'s weights (bf16, seeded by the version: each differs)."""
    g = torch.Generator().manual_seed(version)
    return [(name, torch.randn(*shape, generator=g).to(torch.bfloat16)) for name in MATRIX_NAMES]


def matrix_buckets(version: int, shape: tuple[int, ...] = MATRIX_SHAPE) -> list[WeightBucket]:
    """``matrix_tensors`` as one bucket a tensor, the last marked ``is_last``."""
    return [
        WeightBucket(((name, t),), index=i, is_last=i == len(MATRIX_NAMES) - 1, version=version)
        for i, (name, t) in enumerate(matrix_tensors(version, shape))
    ]


def serves(
    weights: dict[str, torch.Tensor], version: int, shape: tuple[int, ...] = MATRIX_SHAPE
) -> bool:
    """Whether ``weights`` (a double's or a fake's) hold version ``version``'s, bit for bit."""
    return all(
        name in weights and torch.equal(bits(weights[name]), bits(tensor))
        for name, tensor in matrix_tensors(version, shape)
    )


@dataclass
class _Injected:
    fault: HTTPFault
    skip: int  # requests to the path served as usual first
    fired: int = 0


class FaultyHTTPDouble(SGLangHTTPDouble):
    """``SGLangHTTPDouble`` plus one injected fault per path (see the module)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.injected: dict[str, _Injected] = {}
        self._hung: asyncio.Event | None = None

    def __enter__(self) -> FaultyHTTPDouble:
        self.start()
        return self

    def inject(self, path: str, fault: HTTPFault, *, skip: int = 0) -> None:
        """``fault`` on ``path`` once ``skip`` requests to it were served as usual;
        ``500_always`` and ``hang`` then answer every request, the others one."""
        self.injected[path] = _Injected(fault, skip)

    def fired(self, path: str) -> int:
        """How many requests to ``path`` got the injected fault."""
        injected = self.injected.get(path)
        return 0 if injected is None else injected.fired

    def clear(self) -> None:
        """Drop every injected fault and release the requests that hang."""
        self.injected.clear()
        loop, hung = self._loop, self._hung
        if loop is not None and hung is not None and not loop.is_closed():
            loop.call_soon_threadsafe(hung.set)

    def _take(self, path: str) -> HTTPFault | None:
        injected = self.injected.get(path)
        if injected is None:
            return None
        if injected.skip > 0:
            injected.skip -= 1
            return None
        if injected.fired and injected.fault not in ("500_always", "hang", "applied_then_hang"):
            return None
        injected.fired += 1
        return injected.fault

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Any]
    ) -> web.StreamResponse:
        fault = self._take(request.path)
        if fault is None:
            answer: web.StreamResponse = await super()._middleware(request, handler)
            return answer
        if fault in LOST_ANSWERS:
            await super()._middleware(request, handler)  # the work is done; the answer lost
            fault = "hang" if fault == "applied_then_hang" else "reset"
        if fault == "success_false":
            return web.json_response({"success": False, "message": "injected refusal"}, status=400)
        if fault in ("500_once", "500_always"):
            return web.Response(status=500, text="Internal Server Error")
        if fault == "401":
            return web.json_response({"error": "Unauthorized"}, status=401)
        if fault == "non_json":
            return web.Response(
                status=200, text="<html>a proxy's page</html>", content_type="text/html"
            )
        if fault == "hang":
            if self._hung is None:
                self._hung = asyncio.Event()
            await self._hung.wait()
            return web.Response(status=503, text="released")
        # reset: close the connection without an answer
        transport = request.transport
        if transport is not None:
            transport.abort()
        raise ConnectionResetError("injected connection reset")


InProcessFault = Literal["refuse", "raise", "hang"]
"""Faults of one in-process ``sglang.Engine`` method: answer ``(False, message)`` (what
SGLang returns for a refused call), raise (what a crashed scheduler does), or hang until
``release_hang()`` and then do the call's work and answer as usual (``sglang.Engine``'s
methods block their caller until the scheduler answers, and cannot be interrupted: a
call whose caller gave up at its deadline still runs to its end, its work done)."""
IN_PROCESS_FAULTS: tuple[InProcessFault, ...] = ("refuse", "raise")
"""The faults that answer at once (``hang`` has its own trials)."""

T = TypeVar("T")


class FaultyFakeSGLangEngine(FakePausableSGLangEngine):
    """``FakePausableSGLangEngine`` (a fake of the in-process ``sglang.Engine`` with the
    pause methods) whose ``method`` fails once, on its ``skip + 1``-th call after ``inject``.

    ``at_once``/``max_at_once`` count the faultable methods running at once (a hung one
    included), which the real Engine (one event loop driven by ``run_until_complete``)
    cannot survive above 1. ``hung`` is set when a hung call enters its hang,
    ``hang_returned`` once it has done its work and answered.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fault: tuple[str, InProcessFault, int] | None = None
        self.fired = False
        self.at_once = 0
        self.max_at_once = 0
        self.hung = threading.Event()
        self.hang_returned = threading.Event()
        self._unhang = threading.Event()
        self._count_lock = threading.Lock()

    def inject(self, method: str, fault: InProcessFault, *, skip: int = 0) -> None:
        self.fault = (method, fault, skip)
        self.fired = False

    def release_hang(self) -> None:
        """Let the hung call go on: it does its work and answers."""
        self._unhang.set()

    def _run(self, method: str, work: Callable[[], T]) -> T | tuple[bool, str]:
        """``work`` (the fake's own method) under the injected fault, counted in flight."""
        with self._count_lock:
            self.at_once += 1
            self.max_at_once = max(self.max_at_once, self.at_once)
        hung = False
        try:
            fault = self._take(method)
            if fault == "refuse":
                return False, f"injected refusal of {method}"
            if fault == "raise":
                raise RuntimeError(f"injected crash in {method}")
            if fault == "hang":
                hung = True
                self.hung.set()
                self._unhang.wait()
            return work()
        finally:
            with self._count_lock:
                self.at_once -= 1
            if hung:
                self.hang_returned.set()

    def _take(self, method: str) -> InProcessFault | None:
        if self.fault is None or self.fault[0] != method:
            return None
        _, fault, skip = self.fault
        if skip > 0:
            self.fault = (method, fault, skip - 1)
            return None
        self.fault = None
        self.fired = True
        return fault

    def begin_weight_update(self, selector: str = "all") -> tuple[bool, str]:
        return self._run(
            "begin_weight_update",
            lambda: super(FaultyFakeSGLangEngine, self).begin_weight_update(selector),
        )

    def end_weight_update(self) -> tuple[bool, str]:
        return self._run(
            "end_weight_update", lambda: super(FaultyFakeSGLangEngine, self).end_weight_update()
        )

    def update_weights_from_tensor(
        self, named_tensors: Any, load_format: str | None = None, flush_cache: bool = True
    ) -> tuple[bool, str]:
        return self._run(
            "update_weights_from_tensor",
            lambda: super(FaultyFakeSGLangEngine, self).update_weights_from_tensor(
                named_tensors, load_format, flush_cache
            ),
        )

    def pause_generation(self, mode: str = "abort") -> None:
        # pause and continue answer nothing: a refusal is dropped, as SGLang has none to give
        self._run(
            "pause_generation", lambda: super(FaultyFakeSGLangEngine, self).pause_generation(mode)
        )

    def continue_generation(self) -> None:
        self._run(
            "continue_generation", lambda: super(FaultyFakeSGLangEngine, self).continue_generation()
        )
