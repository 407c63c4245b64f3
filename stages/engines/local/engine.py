"""``LocalEngine``: the embedded engine, adapting model, scheduler and updates to ``Engine``.

It builds the seeded model (``model``), runs it on the generation thread (``scheduler``)
and writes weights through the update transaction (``updates``), and speaks the same
``Engine`` protocol as the SGLang adapters, which makes it the default engine of the
demo, the tests and the overlap benchmark. A bucket is validated on the caller's thread
and staged (dequantised into a spare storage) on a worker thread while generation goes
on; nothing a step reads changes until ``commit`` switches all of the sync's parameters
together on the generation thread, between two decode steps. So in every sync mode each
decode step runs exactly one weight version, every token carries it
(``GenerationOutput.token_versions``), and the only pause an ``in_flight`` sync costs is
that switch (``GenerationStats.swap_s``); ``abort`` just drops the staged storages. A
sync is refused, before anything is switched, when a value is NaN or Inf or when it left a
parameter out. With
``track_versions=True`` each step also records the versions of the parameters it read,
which is how the tests check that no step ever read two. It measures its own generation
(``MeasuresGeneration``): ``open_window()`` returns a ``GenerationWindow``, and any
``GenerationListener`` can be added to hear each step.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

import anyio
import anyio.to_thread
import torch

from weightpipe.stages.bucket import WeightBucket
from weightpipe.stages.engines.base import PAUSE_MODES, EngineError, PauseMode
from weightpipe.stages.engines.local.model import (
    build_model,
    build_prompts,
    cache_argument,
    default_config,
    named_parameters,
    resolve_device,
)
from weightpipe.stages.engines.local.scheduler import Counter, Scheduler
from weightpipe.stages.engines.local.updates import WeightUpdates
from weightpipe.stages.engines.local.window import (
    GenerationListener,
    GenerationOutput,
    GenerationWindow,
)
from weightpipe.stages.fp8.spec import as_block

__all__ = ["LocalEngine"]

T = TypeVar("T")


class LocalEngine:
    """An embedded generation engine speaking the ``Engine`` protocol.

    Example::

        async with LocalEngine() as engine:
            await engine.wait_for_tokens(64)
            report = await sync_weights(buckets, engine, version=1)

    Args:
        config: a ``transformers.LlamaConfig``; ``default_config()`` when ``None``.
        seed: seeds the random initialisation and the prompts.
        batch_size: requests decoding together.
        prompt_len: tokens per prompt.
        max_new_tokens: tokens per request before it finishes and a new one starts (an
            attribute: a change takes effect at the next step).
        dtype: the parameters' dtype (bf16 by default; FP8 buckets dequantise into it).
        device: ``"cuda"`` when available, else ``"cpu"``, unless given; an unindexed
            ``"cuda"`` is the constructing thread's current device (``self.device`` is
            always indexed).
        block_size: the FP8 block shape ``[out, in]`` that block scales refer to.
        initial_version: the version the random weights are reported as.
        history: finished outputs kept for ``outputs()``.
        prepare_threads: threads that build a bucket's new tensors (dequantisation).
        track_versions: record, per decode step, the versions of the parameters it read
            (``GenerationListener.on_step``, ``GenerationStats.mixed_steps``): one hook
            per module with parameters per step, so off unless asked for.

    ``start()`` (or ``async with``) starts the generation thread; without it, ``load``
    and friends apply directly and nothing generates.

    Deadlines: like every engine, it sets no timeout around a protocol call; Load's
    deadline (``default_timeout_s`` unless Load says otherwise) cancels the wait. Only
    ``wait_for_tokens`` / ``wait_for_outputs``, which Load never calls, take a
    ``timeout_s``: they wait for the generation thread to reach a count, which nothing
    else bounds.

    Raises:
        ValueError: a size below 1, or a ``block_size`` that is not two positive ints.
    """

    name: str = "local"
    default_timeout_s: float = 60.0
    """Load's deadline per call unless it is given one (see ``engines.base``)."""
    rolls_back: bool = True
    """Its commit is staged and ``abort`` discards the staged buckets (``RollsBack``)."""
    switches_atomically: bool = True
    """Every parameter of a sync switches at once, between two decode steps, so Load
    never pauses it in ``in_flight`` mode (``SwitchesAtomically``)."""

    def __init__(
        self,
        config: Any = None,
        *,
        seed: int = 0,
        batch_size: int = 8,
        prompt_len: int = 8,
        max_new_tokens: int = 32,
        dtype: torch.dtype = torch.bfloat16,
        device: str | torch.device | None = None,
        block_size: tuple[int, int] = (128, 128),
        initial_version: int | None = 0,
        history: int = 1024,
        prepare_threads: int = 2,
        track_versions: bool = False,
    ) -> None:
        if min(batch_size, prompt_len, max_new_tokens, prepare_threads) < 1:
            raise ValueError(
                "batch_size, prompt_len, max_new_tokens and prepare_threads must be >= 1"
            )
        self.block_size = as_block(block_size, what="block_size")
        self.prepare_threads = prepare_threads
        self.config = config if config is not None else default_config()
        # Resolved once, here: every worker section (staging, the generation thread) then
        # runs under this index, never under its own thread's current device.
        self.device = resolve_device(device)
        self.dtype = dtype
        self.batch_size = batch_size
        self.seed = seed
        model = build_model(self.config, seed=seed, device=self.device, dtype=dtype)
        prompts = build_prompts(
            self.config, batch_size=batch_size, prompt_len=prompt_len, seed=seed + 1
        )
        self._updates = WeightUpdates(
            named_parameters(model),
            engine=self.name,
            device=self.device,
            block_size=self.block_size,
            prepare_threads=prepare_threads,
            initial_version=initial_version,
        )
        self._scheduler = Scheduler(
            model,
            self.config,
            prompts.to(self.device),
            cache_argument=cache_argument(model),
            max_new_tokens=max_new_tokens,
            version=lambda: self._updates.version,
            engine=self.name,
            history=history,
            version_of=self._updates.version_of if track_versions else None,
            device=self.device,
        )
        # One staging (or a commit while stopped) at a time, on a worker thread.
        self._limiter = anyio.CapacityLimiter(1)

    @property
    def model(self) -> Any:
        """The ``transformers`` model generating (replacing it takes effect next step)."""
        return self._scheduler.model

    @model.setter
    def model(self, model: Any) -> None:
        self._scheduler.model = model

    @property
    def max_new_tokens(self) -> int:
        """Tokens per request; a change takes effect at the next step."""
        return self._scheduler.max_new_tokens

    @max_new_tokens.setter
    def max_new_tokens(self, value: int) -> None:
        self._scheduler.max_new_tokens = value

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> LocalEngine:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Start generating on a background thread.

        Raises:
            RuntimeError: already started.
        """
        self._scheduler.start()

    async def stop(self) -> None:
        """Stop generating; pending weight changes are applied first. Idempotent."""
        thread = self._scheduler.request_stop()
        if thread is not None:
            # The thread finishes its step and the queued work, then ends: no deadline
            # of its own, and shielded, so a cancelled caller still leaves it stopped.
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(thread.join)
        self._scheduler.stopped()
        # The staging threads are joined too (off the loop: one may finish a copy), so
        # none outlives the engine.
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self._updates.close)

    @property
    def fp8_block_size(self) -> tuple[int, int]:
        """The block shape its block-FP8 scales refer to (``ExpectsFp8Block``)."""
        return self.block_size

    @property
    def running(self) -> bool:
        """Whether the generation thread is alive."""
        return self._scheduler.running

    # ------------------------------------------------------------------ protocol

    async def begin(self, version: int) -> None:
        """Start a sync that will install ``version``.

        Raises:
            EngineError: another sync is in progress, or generation failed.
        """
        self._check_alive()
        self._updates.begin(version)

    async def load(self, bucket: WeightBucket) -> None:
        """Validate every tensor of ``bucket``, then stage them all for the commit.

        Staging builds each tensor in a spare storage off the generation thread; the
        parameters generation reads do not change until ``commit``.

        Tensors of the parameter's dtype are copied into it; an FP8 ``X.weight`` with its
        float32 scale in the same bucket (``X.weight_scale_inv`` for ``block_size``
        blocks, ``X.weight_scale`` per channel or per tensor) is dequantised into it.

        Every value staged is checked finite in the same pass that writes it (see
        ``updates``), whether or not a quantizer upstream checked it.

        Raises:
            EngineError: no sync is open, the bucket belongs to another version, or a
                tensor has an unknown name, a wrong shape or dtype, a missing or misshapen
                scale, was already loaded in this sync, or holds NaN or Inf (the error
                names it; nothing of the bucket was staged).
        """
        self._check_alive()
        version, plan = self._updates.plan(bucket)
        # Dequantisation is the heavy part: done on a worker thread while generation goes
        # on; not abandoned on cancellation, so no staging outlives its sync's abort.
        staged = await anyio.to_thread.run_sync(
            self._updates.prepare, bucket, plan, limiter=self._limiter
        )
        self._updates.stage(staged, version)

    async def commit(self, version: int) -> None:
        """Switch every staged parameter at once, between two decode steps: the step
        before read only the old version, every step from the next on reads ``version``.

        Checked first, so that nothing is switched and the version stays: the sync must
        have sent every parameter (a tied one under either name).

        Raises:
            EngineError: no sync of ``version`` is open, it left parameters out (the
                error lists them), or generation failed.
        """
        self._check_alive()
        self._updates.check_commit(version)
        await self._submit(lambda: self._commit(version))

    async def abort(self, version: int) -> None:
        """Abandon the open sync: drop what it staged; weights and version unchanged.

        Generation never read a staged storage, so nothing is restored and the generation
        thread is not involved (this works even after generation failed). A no-op when no
        sync is open, as when a commit abandoned by its deadline has switched meanwhile.
        """
        self._updates.abort(version)

    async def version(self) -> int | None:
        """The committed weight version."""
        return self._updates.version

    async def pause(self, mode: PauseMode) -> None:
        """Stop generation; returns once no step runs any more.

        ``abort`` finishes the running requests as aborted, ``retract`` restarts them
        from their prompts on resume, ``in_place`` keeps their KV cache and continues.

        Raises:
            EngineError: already paused, an unknown mode, or generation failed.
        """
        if mode not in PAUSE_MODES:
            raise EngineError(self.name, f"unknown pause mode {mode!r}")
        self._check_alive()
        done = self._scheduler.request_pause(mode)
        if done is not None:
            await self._wait(done)

    async def resume(self) -> None:
        """Continue generation (a no-op when not paused)."""
        self._scheduler.resume()

    # ------------------------------------------------------------------ observation

    def open_window(self) -> GenerationWindow:
        """Start measuring generation; close the window to get its ``GenerationStats``."""
        return self._scheduler.open_window()

    def add_listener(self, listener: GenerationListener) -> None:
        """Call ``listener`` on every step, finished batch, weight write and pause.

        The callbacks run with the engine's lock held, on the generation thread (see
        ``GenerationListener``): they must be cheap and must not call the engine. One
        that raises fails the engine, like a failing decode step.
        """
        self._scheduler.add_listener(listener)

    def remove_listener(self, listener: GenerationListener) -> None:
        """Stop calling ``listener`` (a no-op for one not added); no callback follows."""
        self._scheduler.remove_listener(listener)

    def outputs(self) -> list[GenerationOutput]:
        """The most recent finished outputs, oldest first."""
        return self._scheduler.outputs()

    @property
    def paused(self) -> bool:
        """Whether generation is paused."""
        return self._scheduler.paused

    @property
    def tokens_generated(self) -> int:
        """Tokens generated since the engine was built."""
        return self._scheduler.tokens_total

    @property
    def paused_total_s(self) -> float:
        """Seconds generation has been paused since the engine was built."""
        return self._scheduler.paused_total_s()

    async def wait_for_tokens(self, count: int, *, timeout_s: float = 60.0) -> int:
        """Wait until ``count`` tokens were generated since the engine was built.

        Raises:
            EngineError: not reached within ``timeout_s`` (paused, stopped or failed).
        """
        return await self._wait_for("tokens", count, f"{count} tokens", timeout_s)

    async def wait_for_outputs(self, count: int, *, timeout_s: float = 60.0) -> int:
        """Wait until ``count`` requests finished since the engine was built.

        Raises:
            EngineError: not reached within ``timeout_s``.
        """
        return await self._wait_for("outputs", count, f"{count} finished outputs", timeout_s)

    def parameter(self, name: str) -> torch.Tensor:
        """A copy of the parameter called ``name`` (HF checkpoint name) as generation reads
        it now: what an open sync staged shows only once it commits.

        Raises:
            KeyError: no such parameter.
        """
        return self._updates.parameter(name)

    def parameter_specs(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Every parameter's name, shape and dtype (tied weights under both names)."""
        return self._updates.specs()

    # ------------------------------------------------------------------ helpers

    def _commit(self, version: int) -> None:
        # On the generation thread between two steps (or a worker when not running).
        self._updates.commit(version)
        self._scheduler.mark_weights_changed()

    def _check_alive(self) -> None:
        failure = self._scheduler.failure
        if failure is not None:
            raise EngineError(
                self.name, f"generation failed: {type(failure).__name__}: {failure}"
            ) from failure

    async def _submit(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the generation thread between two steps, or on a worker if stopped."""
        future = self._scheduler.submit(fn)
        if future is None:
            return await anyio.to_thread.run_sync(fn, limiter=self._limiter)
        return await self._wait(future)

    async def _wait(self, future: Future[T]) -> T:
        # The worker thread only waits on the future; abandoning it on cancellation is
        # safe because the generation thread completes every future it takes.
        return await anyio.to_thread.run_sync(future.result, abandon_on_cancel=True)

    async def _wait_for(self, counter: Counter, count: int, what: str, timeout_s: float) -> int:
        value, paused = await anyio.to_thread.run_sync(
            self._scheduler.wait_for, counter, count, timeout_s, abandon_on_cancel=True
        )
        self._check_alive()
        if value < count:
            raise EngineError(
                self.name,
                f"waited {timeout_s} s for {what}; have {value}" + (" (paused)" if paused else ""),
            )
        return value
