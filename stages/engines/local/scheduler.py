"""The local engine's generation thread: one batch decoding at a time, work between steps.

``Scheduler`` keeps a batch of requests decoding on a background thread with a KV cache;
a batch that reaches ``max_new_tokens`` finishes and a fresh one starts from the same
prompts, so tokens keep flowing for as long as the engine runs. Work handed to
``submit`` (a commit's switch of weights) runs on that thread between two decode steps,
so every step runs one weight version, and every token is tagged with it. Asked to
(``version_of``), the thread also records what each step really read: a forward pre-hook
on every module with parameters collects the version tag of each parameter's storage as
the module reads it, so a step that read two versions would show two. A pause is entered
on the thread too, between two steps, in one of the three modes (drop the batch, retract
it to its prompts, or keep it in place). Everything the thread shares is guarded by one
condition variable; listeners (``GenerationListener``) hear each step, finished batch,
weight write and pause with that lock held.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import torch

from weightpipe.stages.engines.base import EngineError, PauseMode
from weightpipe.stages.engines.local.model import device_guard
from weightpipe.stages.engines.local.window import (
    GenerationListener,
    GenerationOutput,
    GenerationWindow,
    Version,
)

__all__ = ["Scheduler"]

T = TypeVar("T")
Counter = Literal["tokens", "outputs"]


@dataclass
class _Batch:
    """The requests decoding together: started by one prefill, finished together."""

    request_ids: list[int]
    prompts: torch.Tensor
    tokens: list[list[int]]
    cache: Any
    next_input: torch.Tensor | None
    started_version: int | None
    weights_changed: bool = False
    retractions: int = 0
    # The version of each step so far: every request of the batch got one token per step.
    step_versions: list[Version] = field(default_factory=list)


class Scheduler:
    """Runs generation on a thread of its own and work between its steps.

    Args:
        model: the model to run (an attribute: replaced models take effect next step).
        config: its ``LlamaConfig`` (for the KV cache).
        prompts: ``[batch_size, prompt_len]`` token ids every batch starts from.
        cache_argument: the keyword ``model.forward`` takes the KV cache under.
        max_new_tokens: tokens per request (an attribute: read at every step).
        version: the committed weight version, read when a batch starts and finishes,
            and at each step (the version its tokens are tagged with).
        engine: the engine's name, for errors.
        history: finished outputs kept.
        version_of: the version tag of a parameter's storage; when given, each step
            records the tags of the parameters it read (``on_step``'s ``versions``), at
            the price of one hook call per module with parameters per step.
        device: where the model lives; the generation thread runs under it (its own
            current CUDA device would be cuda:0).
    """

    def __init__(
        self,
        model: Any,
        config: Any,
        prompts: torch.Tensor,
        *,
        cache_argument: str,
        max_new_tokens: int,
        version: Callable[[], int | None],
        engine: str,
        history: int,
        version_of: Callable[[torch.Tensor], Version] | None = None,
        device: torch.device | None = None,
    ) -> None:
        self.model = model
        self._device = device if device is not None else torch.device("cpu")
        self.max_new_tokens = max_new_tokens
        self._config = config
        self._prompts = prompts
        self._batch_size = int(prompts.shape[0])
        self._cache_argument = cache_argument
        self._version = version
        self._engine = engine
        self._version_of = version_of
        # The model the hooks are on, their handles, and the set the running step fills:
        # touched by the generation thread only.
        self._hooked: Any = None
        self._hooks: list[Any] = []
        self._read: set[Version] = set()
        # Everything below is shared with the generation thread and guarded by _cond.
        self._cond = threading.Condition()
        self._work: deque[tuple[Callable[[], Any], Future[Any]]] = deque()
        self._paused = False
        self._pause_mode: PauseMode | None = None
        self._pause_request: tuple[PauseMode, Future[None]] | None = None
        self._paused_since: float | None = None
        self._paused_total_s = 0.0
        self._batch: _Batch | None = None
        self._next_request = 0
        self._outputs: deque[GenerationOutput] = deque(maxlen=history)
        self._tokens_total = 0
        self._finished_total = 0
        self._listeners: list[GenerationListener] = []
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._accepting = False  # the generation thread will still run queued work
        self._failure: BaseException | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the generation thread.

        Raises:
            RuntimeError: already started.
        """
        with self._cond:
            if self._thread is not None:
                raise RuntimeError("this local engine is already running")
            self._stopping = False
            self._accepting = True
            self._thread = threading.Thread(
                target=self._run, name="weightpipe-local-engine", daemon=True
            )
            self._thread.start()

    def request_stop(self) -> threading.Thread | None:
        """Ask the thread to stop after running the queued work; returns it to join."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            return self._thread

    def stopped(self) -> None:
        """Forget the joined thread and the batch it was running."""
        with self._cond:
            self._thread = None
            self._batch = None

    @property
    def running(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive()

    @property
    def failure(self) -> BaseException | None:
        """What ended the generation thread, if it failed."""
        return self._failure

    # ------------------------------------------------------------------ control

    def submit(self, fn: Callable[[], T]) -> Future[T] | None:
        """Queue ``fn`` for the generation thread; ``None`` when no thread will run it."""
        future: Future[T] = Future()
        with self._cond:
            if not self._accepting:
                return None
            self._work.append((fn, future))
            self._cond.notify_all()
        return future

    def request_pause(self, mode: PauseMode) -> Future[None] | None:
        """Pause before the next step; ``None`` when paused at once (no thread runs).

        Raises:
            EngineError: already paused (or a pause is pending).
        """
        with self._cond:
            if self._paused or self._pause_request is not None:
                raise EngineError(self._engine, "generation is already paused")
            if not self.running:
                self._enter_pause(mode, time.perf_counter())
                return None
            done: Future[None] = Future()
            self._pause_request = (mode, done)
            self._cond.notify_all()
            return done

    def resume(self) -> None:
        """Continue generating (a no-op when not paused)."""
        with self._cond:
            if not self._paused:
                return
            now = time.perf_counter()
            if self._paused_since is not None:
                self._paused_total_s += now - self._paused_since
            self._paused = False
            self._paused_since = None
            self._pause_mode = None
            for listener in self._listeners:
                listener.on_resume(now)
            self._cond.notify_all()

    def mark_weights_changed(self) -> None:
        """Note on the running batch that the weights changed under it."""
        with self._cond:
            if self._batch is not None:
                self._batch.weights_changed = True

    # ------------------------------------------------------------------ observation

    def add_listener(self, listener: GenerationListener) -> None:
        """Call ``listener`` from the next event on (see ``GenerationListener``)."""
        with self._cond:
            self._listeners.append(listener)

    def remove_listener(self, listener: GenerationListener) -> None:
        """Stop calling ``listener``; once this returns, no callback of it runs."""
        with self._cond:
            if listener in self._listeners:
                self._listeners.remove(listener)

    def open_window(self) -> GenerationWindow:
        """A ``GenerationWindow`` listening from now on; closing it removes it."""
        # Built and registered under the lock, so it sees the pause state it opens in.
        with self._cond:
            window = GenerationWindow(
                paused_since=self._paused_since,
                counts_mixed_steps=self._version_of is not None,
                on_close=self.remove_listener,
            )
            self._listeners.append(window)
            return window

    def outputs(self) -> list[GenerationOutput]:
        """The finished outputs kept, oldest first."""
        with self._cond:
            return list(self._outputs)

    @property
    def paused(self) -> bool:
        with self._cond:
            return self._paused

    @property
    def tokens_total(self) -> int:
        with self._cond:
            return self._tokens_total

    def paused_total_s(self) -> float:
        with self._cond:
            ongoing = 0.0
            if self._paused_since is not None:
                ongoing = max(0.0, time.perf_counter() - self._paused_since)
            return self._paused_total_s + ongoing

    def wait_for(self, counter: Counter, count: int, timeout_s: float) -> tuple[int, bool]:
        """Block until ``counter`` reaches ``count``, generation stops or fails, or time
        runs out; returns the counter and whether generation is paused."""

        def value() -> int:
            return self._tokens_total if counter == "tokens" else self._finished_total

        with self._cond:
            self._cond.wait_for(
                lambda: value() >= count or self._failure is not None or self._stopping,
                timeout_s,
            )
            return value(), self._paused

    # ------------------------------------------------------------------ the thread

    def _run(self) -> None:
        # Everything this thread runs (steps, and the work queued between them) runs
        # under the model's device.
        with device_guard(self._device):
            self._run_on_device()

    def _run_on_device(self) -> None:
        try:
            with torch.no_grad():
                self._loop()
        except BaseException as exc:  # surfaced to every later engine call
            with self._cond:
                self._failure = exc
                self._cond.notify_all()
        finally:
            with self._cond:
                self._accepting = False
                request, self._pause_request = self._pause_request, None
                if request is not None:  # stopped (or failed) before it could pause
                    self._enter_pause(request[0], time.perf_counter())
                    request[1].set_result(None)
            self._drain_work()

    def _loop(self) -> None:
        while True:
            self._drain_work()
            with self._cond:
                if self._pause_request is not None:
                    mode, done = self._pause_request
                    self._pause_request = None
                    self._enter_pause(mode, time.perf_counter())
                    done.set_result(None)
                if self._stopping:
                    return
                if self._paused or self._work:
                    if not self._work:
                        self._cond.wait()
                    continue
                batch = self._batch
                if batch is None:
                    batch = self._batch = self._new_batch()
            self._step(batch)

    def _drain_work(self) -> None:
        while True:
            with self._cond:
                if not self._work:
                    return
                fn, future = self._work.popleft()
            if not future.set_running_or_notify_cancel():
                continue
            started = time.perf_counter()
            try:
                result = fn()
            except BaseException as exc:
                future.set_exception(exc)
            else:
                future.set_result(result)
            seconds = time.perf_counter() - started
            with self._cond:
                for listener in self._listeners:
                    listener.on_write(seconds)

    def _enter_pause(self, mode: PauseMode, now: float) -> None:
        # Called with _cond held.
        batch = self._batch
        if batch is not None and mode == "abort":
            self._finish_batch(batch, "abort", now)
            self._batch = None
        elif batch is not None and mode == "retract":
            batch.tokens = [[] for _ in batch.request_ids]
            batch.step_versions = []
            batch.cache = None
            batch.next_input = None
            batch.retractions += 1
        self._paused = True
        self._pause_mode = mode
        self._paused_since = now
        for listener in self._listeners:
            listener.on_pause(now)

    def _new_batch(self) -> _Batch:
        # Called with _cond held.
        ids = list(range(self._next_request, self._next_request + self._batch_size))
        self._next_request += self._batch_size
        return _Batch(
            request_ids=ids,
            prompts=self._prompts,
            tokens=[[] for _ in ids],
            cache=None,
            next_input=None,
            started_version=self._version(),
        )

    def _finish_batch(self, batch: _Batch, reason: Literal["length", "abort"], now: float) -> None:
        # Called with _cond held.
        version = self._version()
        for request_id, prompt, tokens in zip(
            batch.request_ids, batch.prompts, batch.tokens, strict=True
        ):
            self._outputs.append(
                GenerationOutput(
                    request_id=request_id,
                    prompt=tuple(int(t) for t in prompt.tolist()),
                    tokens=tuple(tokens),
                    weight_version=version,
                    started_version=batch.started_version,
                    weights_changed=batch.weights_changed,
                    finish_reason=reason,
                    retractions=batch.retractions,
                    token_versions=tuple(batch.step_versions[: len(tokens)]),
                )
            )
        self._finished_total += len(batch.request_ids)
        for listener in self._listeners:
            listener.on_finish(now, len(batch.request_ids))
        self._cond.notify_all()

    def _step(self, batch: _Batch) -> None:
        from transformers import DynamicCache

        if batch.cache is None:
            batch.cache = DynamicCache(config=self._config)
            batch.started_version = self._version()
            inputs = batch.prompts
        else:
            assert batch.next_input is not None
            inputs = batch.next_input
        kwargs = {self._cache_argument: batch.cache}
        # Weights switch only between steps, on this thread: the version served now is
        # the one every parameter of this step holds.
        served = self._version()
        tracking = self._version_of is not None and self._track(self.model)
        if tracking:
            self._read = set()
        logits = self.model(input_ids=inputs, use_cache=True, logits_to_keep=1, **kwargs).logits
        next_tokens = logits[:, -1].argmax(dim=-1)
        values = next_tokens.tolist()
        versions = frozenset(self._read) if tracking else frozenset((served,))
        now = time.perf_counter()
        with self._cond:
            if self._batch is not batch:  # aborted or replaced while stepping
                return
            batch.next_input = next_tokens.unsqueeze(1)
            batch.step_versions.append(served)
            for tokens, value in zip(batch.tokens, values, strict=True):
                tokens.append(int(value))
            self._tokens_total += len(values)
            if len(batch.tokens[0]) >= self.max_new_tokens:
                self._finish_batch(batch, "length", now)
                self._batch = None
            for listener in self._listeners:
                listener.on_step(now, len(values), versions)
            self._cond.notify_all()

    def _track(self, model: Any) -> bool:
        """Hook ``model``'s modules (once per model) so a step records the versions it
        reads; ``False`` for a model that is no ``torch.nn.Module``."""
        if model is self._hooked:
            return True
        for handle in self._hooks:
            handle.remove()
        self._hooks, self._hooked = [], None
        if not isinstance(model, torch.nn.Module):
            return False
        for module in model.modules():
            params = tuple(module.parameters(recurse=False))
            if params:
                self._hooks.append(module.register_forward_pre_hook(self._reader(params)))
        self._hooked = model
        return True

    def _reader(self, params: tuple[torch.Tensor, ...]) -> Callable[[Any, Any], None]:
        version_of = self._version_of
        assert version_of is not None

        def read(module: Any, args: Any) -> None:
            # Runs as the module starts its forward, i.e. as it reads these parameters.
            read_set = self._read
            for param in params:
                read_set.add(version_of(param))

        return read
