"""What the local engine's generation tells its listeners, and the window that measures it.

``GenerationListener`` is the public protocol between the generation thread and whoever
watches it: five callbacks for a decode step (with the weight versions it read),
finished requests, a weight write, and the start and end of a pause.
``GenerationWindow`` is one such listener: opened by ``LocalEngine.open_window()``, it
turns the callbacks into a frozen ``GenerationStats`` (tokens/s, the longest gap between
two tokens, time paused, weight writes, the longest switch of weights, steps that read
two versions) when closed. ``GenerationOutput`` is one finished request, each token
tagged with its version. The window knows nothing of the engine but the callbacks and
the ``on_close`` it is given; the engine knows nothing of the window but that it is a
listener.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

Version = int | None

__all__ = [
    "GenerationListener",
    "GenerationOutput",
    "GenerationStats",
    "GenerationWindow",
]


@dataclass(frozen=True)
class GenerationOutput:
    """One finished request.

    Attributes:
        request_id: unique per engine, increasing.
        prompt: the prompt's token ids.
        tokens: the generated token ids (fewer than ``max_new_tokens`` when aborted).
        weight_version: the committed version when it finished (SGLang's
            ``meta_info["weight_version"]``).
        started_version: the committed version when it (last) started.
        weights_changed: a sync committed while it ran, so its tokens come from more than
            one version (``token_versions`` says which from which).
        finish_reason: ``"length"``, or ``"abort"`` when a pause in ``abort`` mode dropped it.
        retractions: how often a ``retract`` pause restarted it from its prompt.
        token_versions: for each of ``tokens``, the weight version of the decode step
            that computed it (every step runs one version: a commit switches between
            two steps). A request that spans a sync reads ``(0, 0, 1, 1, ...)``; its
            later tokens attend to KV entries the earlier version computed, as in any
            engine that keeps the cache across an update.
    """

    request_id: int
    prompt: tuple[int, ...]
    tokens: tuple[int, ...]
    weight_version: int | None
    started_version: int | None
    weights_changed: bool
    finish_reason: Literal["length", "abort"]
    retractions: int
    token_versions: tuple[Version, ...] = ()

    @property
    def switches(self) -> tuple[int, ...]:
        """Indices of the tokens computed by another version than the token before."""
        versions = self.token_versions
        return tuple(i for i in range(1, len(versions)) if versions[i] != versions[i - 1])


@dataclass(frozen=True)
class GenerationStats:
    """What generation did during one window.

    Attributes:
        elapsed_s: the window's length.
        tokens: tokens generated (a batch step yields one per running request).
        steps: forward passes (prefills and decode steps).
        finished: requests finished (aborted ones included).
        tokens_per_s: ``tokens / elapsed_s``.
        longest_gap_s: the longest time without a new token, measured from the window's
            opening to its first token, between tokens, and from the last token to its
            closing (so a pause that spans the window counts whole).
        median_step_s: median time between two consecutive tokens (0 with under two);
            ``longest_gap_s - median_step_s`` is what a sync added to a step.
        paused_s: time generation was paused inside the window.
        weight_writes: weight switches (commits) run on the generation thread between
            steps; loading a bucket only stages it, off that thread.
        weight_write_s: time spent on them on the generation thread.
        swap_s: the longest of them: how long one commit held generation between two
            steps to switch a sync's parameters together, the hard pause of a sync in
            ``in_flight`` mode (in the other modes it runs inside the pause).
        mixed_steps: steps that read parameters of more than one weight version (always
            0 for a correct engine); ``None`` unless the engine was built with
            ``track_versions=True``, since only then does a step record what it read.
    """

    elapsed_s: float
    tokens: int
    steps: int
    finished: int
    tokens_per_s: float
    longest_gap_s: float
    median_step_s: float
    paused_s: float
    weight_writes: int
    weight_write_s: float
    swap_s: float = 0.0
    mixed_steps: int | None = None


class GenerationListener(Protocol):
    """Hears what the local engine's generation does (``LocalEngine.add_listener``).

    Every callback is made with the engine's lock held, on the thread that changed the
    state: the generation thread for steps, finished requests, weight writes and the
    start of a pause while the engine runs; the caller of ``pause()`` when it is stopped,
    and the caller of ``resume()`` for the end of a pause. So a callback must be cheap
    (it delays the next decode step), must not block, and must not call the engine.
    Times are ``time.perf_counter()`` seconds.
    """

    def on_step(self, now: float, tokens: int, versions: frozenset[Version]) -> None:
        """A forward pass produced ``tokens`` new tokens (one per running request),
        reading the parameters of ``versions``: what each parameter held when the step
        read it with ``track_versions=True``, else the version served when it began."""

    def on_finish(self, now: float, requests: int) -> None:
        """``requests`` requests finished (by length, or aborted by a pause)."""

    def on_write(self, seconds: float) -> None:
        """A weight switch (a commit) took ``seconds`` between steps."""

    def on_pause(self, now: float) -> None:
        """Generation stopped."""

    def on_resume(self, now: float) -> None:
        """Generation continues."""


class GenerationWindow:
    """Measures generation from its opening; ``close()`` returns the window's statistics.

    Obtained from ``LocalEngine.open_window()``, which registers it as a listener. A
    window can also be built and registered by hand (``engine.add_listener(window)``);
    ``paused_since`` then says when the pause in progress at its opening began.

    Args:
        paused_since: the start of the pause in progress at opening, else ``None``.
        counts_mixed_steps: the engine records the versions each step read, so the
            window can count steps that read two (``GenerationStats.mixed_steps``).
        on_close: called once, with the window, when it closes (the engine passes its
            ``remove_listener``); never with the window's lock held.
    """

    def __init__(
        self,
        *,
        paused_since: float | None = None,
        counts_mixed_steps: bool = False,
        on_close: Callable[[GenerationWindow], None] | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self._on_close = on_close
        self.opened = time.perf_counter()
        self._last_token = self.opened
        self._longest_gap = 0.0
        self._intervals: list[float] = []
        self._tokens = 0
        self._steps = 0
        self._finished = 0
        self._paused_since = paused_since
        self._paused_s = 0.0
        self._writes = 0
        self._write_s = 0.0
        self._longest_write_s = 0.0
        self._mixed: int | None = 0 if counts_mixed_steps else None
        self._closed: GenerationStats | None = None

    # GenerationListener: called by the engine with its lock held; each takes only the
    # window's own lock, which is never held while calling out.

    def on_step(self, now: float, tokens: int, versions: frozenset[Version]) -> None:
        with self._lock:
            if self._mixed is not None and len(versions) > 1:
                self._mixed += 1
            gap = now - self._last_token
            self._longest_gap = max(self._longest_gap, gap)
            if self._steps > 0:
                self._intervals.append(gap)
            self._last_token = now
            self._tokens += tokens
            self._steps += 1

    def on_finish(self, now: float, requests: int) -> None:
        with self._lock:
            self._finished += requests

    def on_write(self, seconds: float) -> None:
        with self._lock:
            self._writes += 1
            self._write_s += seconds
            self._longest_write_s = max(self._longest_write_s, seconds)

    def on_pause(self, now: float) -> None:
        with self._lock:
            self._paused_since = now

    def on_resume(self, now: float) -> None:
        with self._lock:
            self._paused_s += self._ongoing_pause(now)
            self._paused_since = None

    def snapshot(self) -> GenerationStats:
        """The statistics so far, without closing."""
        with self._lock:
            return self._stats(time.perf_counter())

    def close(self) -> GenerationStats:
        """Stop measuring and return the window's statistics (idempotent)."""
        # Detach first: once on_close returns, no callback can arrive any more, and the
        # engine's lock is never taken while this window's lock is held.
        with self._lock:
            on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close(self)
        with self._lock:
            if self._closed is None:
                self._closed = self._stats(time.perf_counter())
            return self._closed

    def _ongoing_pause(self, now: float) -> float:
        if self._paused_since is None:
            return 0.0
        return max(0.0, now - max(self._paused_since, self.opened))

    def _stats(self, now: float) -> GenerationStats:
        elapsed = now - self.opened
        intervals = sorted(self._intervals)
        median = intervals[len(intervals) // 2] if intervals else 0.0
        return GenerationStats(
            elapsed_s=elapsed,
            tokens=self._tokens,
            steps=self._steps,
            finished=self._finished,
            tokens_per_s=self._tokens / elapsed if elapsed > 0 else 0.0,
            longest_gap_s=max(self._longest_gap, now - self._last_token),
            median_step_s=median,
            paused_s=self._paused_s + self._ongoing_pause(now),
            weight_writes=self._writes,
            weight_write_s=self._write_s,
            swap_s=self._longest_write_s,
            mixed_steps=self._mixed,
        )
