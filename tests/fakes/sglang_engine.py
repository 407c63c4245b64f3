"""Test fakes of the in-process ``sglang.Engine`` (0.5.23 and 0.5.12 surfaces), not SGLang.

The real Engine cannot start without a GPU build of its kernels, so the SGLangEngine adapter
is tested against ``FakeSGLangEngine``, which follows SGLang 0.5.23's ``Engine``: its weight
methods have the real signatures (tests/stages/engines/sglang/test_inprocess.py checks them
against the installed 0.5.23 engine.py), they are blocking and answer ``(success,
message)``, a tensor or distributed update outside a weight-update session is refused with
0.5.23's own message, and decoding is SGLang's own code. ``FakeSGLangEngine0512`` follows
0.5.12's Engine, which has no ``begin_weight_update``/``end_weight_update``;
``FakePausableSGLangEngine`` adds pause/continue, which neither version's Engine has (a
future one may); ``FakeSGLangModule`` stands in for the ``sglang`` module so the
adapter's lazy construction can be observed. Faults are injected per method (refuse once,
raise once, hang until released), and the fake counts how many of its methods run at once,
which the real Engine (one event loop driven by ``run_until_complete``) cannot survive.
"""

from __future__ import annotations

import functools
import threading
import types
from collections.abc import Callable
from typing import Any, TypeVar, cast

import torch
from sglang.srt.utils import MultiprocessingSerializer
from sglang.srt.utils.common import normalize_serialized_named_tensor_payloads

from .sglang_model import SessionRefusal, check_against_spec, reconstruct_flattened
from .sglang_receiver import DistributedReceiver

__all__ = [
    "FakePausableSGLangEngine",
    "FakeSGLangEngine",
    "FakeSGLangEngine0512",
    "FakeSGLangModule",
]

F = TypeVar("F", bound=Callable[..., Any])


def _engine_method(method: F) -> F:
    """Record the call, count it in flight, and apply the faults injected for it."""

    @functools.wraps(method)
    def wrapper(self: FakeSGLangEngine, *args: Any, **kwargs: Any) -> Any:
        name = method.__name__
        with self._lock:
            self.calls.append(name)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if name in self._hang:
                self.entered_hang.set()
                self._released.wait()
            if self.raise_next is not None:
                exc, self.raise_next = self.raise_next, None
                raise exc
            if name in self._refuse_once:
                return False, self._refuse_once.pop(name)
            return method(self, *args, **kwargs)
        finally:
            with self._lock:
                self.in_flight -= 1

    return cast(F, wrapper)


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
        self.raise_next: BaseException | None = None  # the next call raises it
        self.in_flight = 0
        self.max_in_flight = 0  # the most methods that ever ran at once
        self.entered_hang = threading.Event()
        self.shut_down = False
        self.receiver: DistributedReceiver | None = None
        self._lock = threading.Lock()
        self._hang: set[str] = set()
        self._released = threading.Event()
        self._refuse_once: dict[str, str] = {}

    # -- fault injection -----------------------------------------------------------------

    def refuse_once(self, method: str, message: str) -> None:
        """The next call of ``method`` answers ``(False, message)`` and does nothing."""
        self._refuse_once[method] = message

    def hang(self, method: str) -> None:
        """Calls of ``method`` block until ``release`` (``entered_hang`` is set on entry)."""
        self._hang.add(method)

    def release(self) -> None:
        """Let hung calls go on (they then do their work), and stop hanging."""
        self._hang.clear()
        self._released.set()

    # -- the Engine's methods ------------------------------------------------------------

    @_engine_method
    def begin_weight_update(self, selector: str = "all") -> tuple[bool, str]:
        if self.session_open:
            return False, "a weight-update session is already open; call end_weight_update() first"
        self.session_open = True
        return True, "Success"

    @_engine_method
    def end_weight_update(self) -> tuple[bool, str]:
        if not self.session_open:
            return False, "no weight-update session is open; call begin_weight_update() first"
        self.session_open = False
        return True, "Success"

    def _requires_session(self) -> bool:
        return True

    @_engine_method
    def update_weights_from_tensor(
        self,
        named_tensors: Any,
        load_format: str | None = None,
        flush_cache: bool = True,
    ) -> tuple[bool, str]:
        self.flush_cache_args.append(flush_cache)
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
                decoded = reconstruct_flattened(data)
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

    @_engine_method
    def init_weights_update_group(
        self,
        master_address: str,
        master_port: int,
        rank_offset: int,
        world_size: int,
        group_name: str,
        backend: str = "nccl",
    ) -> tuple[bool, str]:
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

    @_engine_method
    def update_weights_from_distributed(
        self,
        names: list[str],
        dtypes: list[str],
        shapes: list[list[int]],
        group_name: str = "weight_update_group",
        flush_cache: bool = True,
        load_format: str | None = None,
    ) -> tuple[bool, str]:
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

    @_engine_method
    def destroy_weights_update_group(self, group_name: str) -> tuple[bool, str]:
        if self.receiver is None:
            return False, "no distributed receiver configured in the fake"
        return self.receiver.destroy_group({"group_name": group_name})

    @_engine_method
    def flush_cache(self) -> Any:
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


class FakePausableSGLangEngine(FakeSGLangEngine):
    """The fake with ``pause_generation``/``continue_generation``, which the real 0.5.23
    Engine lacks; records them in ``calls``."""

    def pause_generation(self, mode: str = "abort") -> None:
        self.calls.append(f"pause:{mode}")

    def continue_generation(self) -> None:
        self.calls.append("continue")


class FakeSGLangModule:
    """A fake of the ``sglang`` module: ``Engine(**kwargs)`` records its keyword arguments
    in ``built`` and returns a ``FakeSGLangEngine`` for ``spec``."""

    def __init__(self, spec: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> None:
        self.spec = spec
        self.built: list[dict[str, Any]] = []

    def Engine(self, **kwargs: Any) -> FakeSGLangEngine:
        self.built.append(kwargs)
        return FakeSGLangEngine(self.spec)
