"""The embedded ``local`` engine: a small Llama model that really generates and really loads.

``LocalEngine`` builds a random-init, seeded Llama-architecture model from a
``transformers.LlamaConfig`` (never a download) and keeps a batch of requests decoding on
a background thread with a KV cache; a batch that reaches ``max_new_tokens`` finishes and
a fresh one starts, so tokens keep flowing for as long as the engine runs. It speaks the
same ``Engine`` protocol as the SGLang adapters, which makes it the default engine of the
demo, the tests and the overlap benchmark. Every change to the model (a bucket's
tensors, a commit, an abort) runs on the generation thread between two decode steps, so a
step never sees a half-copied parameter and in-flight loading needs no pause. A bucket is
validated whole (name, shape, dtype, FP8 scale) before any parameter is touched; FP8
weights are dequantised with their scale (``X.weight_scale_inv`` for blocks,
``X.weight_scale`` per channel or tensor) by ``weightpipe.stages.fp8.dequantize_fp8``, the
same definition Fp8Quantize quantises by, into the bf16 parameters.
Atomicity: a bucket's tensors are built into fresh storages off the generation thread
and swapped into their parameters between two steps; the old storages are kept until the
sync ends, ``commit`` drops them and moves the version, ``abort`` swaps them back, so an
aborted sync leaves exactly the old weights and the old version (the price: one copy of
the parameters a sync touched, held until it ends). Finished outputs carry the version
they finished under, and generation windows measure tokens/s and the longest gap between
two tokens.
"""

from __future__ import annotations

import difflib
import inspect
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import anyio
import anyio.to_thread
import torch

from weightpipe.stages.bucket import WeightBucket
from weightpipe.stages.engines.base import EngineError, PauseMode
from weightpipe.stages.fp8 import FP8_DTYPE, Fp8Method, dequantize_fp8, scale_shape

__all__ = [
    "GenerationOutput",
    "GenerationStats",
    "GenerationWindow",
    "LocalEngine",
    "default_config",
]

T = TypeVar("T")

FP8 = FP8_DTYPE
# SGLang's names for a weight's scale: ``X.weight_scale_inv`` for block scales,
# ``X.weight_scale`` for per-channel and per-tensor ones (as Fp8Quantize emits them).
SCALE_SUFFIXES: dict[str, tuple[Fp8Method, ...]] = {
    "_scale_inv": ("block",),
    "_scale": ("channel", "tensor"),
}


def default_config(**overrides: Any) -> Any:
    """The local engine's default ``LlamaConfig`` (about 4M parameters, bf16).

    Small on purpose: one decode step of a batch of 8 takes a few to a few tens of ms on
    two CPU cores. Keyword arguments override any field (``hidden_size=512``, ...).
    """
    from transformers import LlamaConfig

    fields: dict[str, Any] = {
        "hidden_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "intermediate_size": 688,
        "vocab_size": 2048,
        "max_position_embeddings": 512,
        "tie_word_embeddings": False,
    }
    fields.update(overrides)
    return LlamaConfig(**fields)


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
        weights_changed: weights were written, committed or restored while it ran, so
            its tokens may come from more than one set of weights.
        finish_reason: ``"length"``, or ``"abort"`` when a pause in ``abort`` mode dropped it.
        retractions: how often a ``retract`` pause restarted it from its prompt.
    """

    request_id: int
    prompt: tuple[int, ...]
    tokens: tuple[int, ...]
    weight_version: int | None
    started_version: int | None
    weights_changed: bool
    finish_reason: Literal["length", "abort"]
    retractions: int


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
        weight_writes: buckets, commits and aborts applied between steps.
        weight_write_s: time spent applying them on the generation thread.
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


class GenerationWindow:
    """Measures generation from its opening; ``close()`` returns the window's statistics.

    Obtained from ``LocalEngine.open_window()``; updated by the generation thread.
    """

    def __init__(self, engine: LocalEngine) -> None:
        self._engine = engine
        self._lock = engine._cond
        self.opened = time.perf_counter()
        self._last_token = self.opened
        self._longest_gap = 0.0
        self._intervals: list[float] = []
        self._tokens = 0
        self._steps = 0
        self._finished = 0
        self._paused_s = 0.0
        self._writes = 0
        self._write_s = 0.0
        self._closed: GenerationStats | None = None

    def _on_step(self, now: float, tokens: int) -> None:
        gap = now - self._last_token
        self._longest_gap = max(self._longest_gap, gap)
        if self._steps > 0:
            self._intervals.append(gap)
        self._last_token = now
        self._tokens += tokens
        self._steps += 1

    def _on_write(self, seconds: float) -> None:
        self._writes += 1
        self._write_s += seconds

    def _on_pause(self, seconds: float) -> None:
        self._paused_s += seconds

    def snapshot(self) -> GenerationStats:
        """The statistics so far, without closing."""
        with self._lock:
            return self._stats(time.perf_counter())

    def close(self) -> GenerationStats:
        """Stop measuring and return the window's statistics (idempotent)."""
        with self._lock:
            if self._closed is None:
                self._closed = self._stats(time.perf_counter())
                self._engine._windows.discard(self)
            return self._closed

    def _stats(self, now: float) -> GenerationStats:
        elapsed = now - self.opened
        paused = self._paused_s + self._engine._paused_for(now, since=self.opened)
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
            paused_s=paused,
            weight_writes=self._writes,
            weight_write_s=self._write_s,
        )


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
        device: ``"cuda"`` when available, else ``"cpu"``, unless given.
        block_size: the FP8 block shape ``[out, in]`` that block scales refer to.
        initial_version: the version the random weights are reported as.
        history: finished outputs kept for ``outputs()``.
        prepare_threads: threads that build a bucket's new tensors (dequantisation).

    ``start()`` (or ``async with``) starts the generation thread; without it, ``load``
    and friends apply directly and nothing generates.
    """

    name: str = "local"

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
    ) -> None:
        from transformers import LlamaForCausalLM

        if min(batch_size, prompt_len, max_new_tokens, prepare_threads) < 1:
            raise ValueError(
                "batch_size, prompt_len, max_new_tokens and prepare_threads must be >= 1"
            )
        self.prepare_threads = prepare_threads
        self.config = config if config is not None else default_config()
        self.device = torch.device(
            device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
        )
        self.dtype = dtype
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.block_size = block_size
        self.seed = seed
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model: Any = LlamaForCausalLM(self.config)
            generator = torch.Generator().manual_seed(seed + 1)
            self._prompts = torch.randint(
                0, int(self.config.vocab_size), (batch_size, prompt_len), generator=generator
            )
        self.model: Any = model.to(device=self.device, dtype=dtype).eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        # Tied weights answer to both of their checkpoint names.
        self._params: dict[str, torch.Tensor] = dict(
            self.model.named_parameters(remove_duplicate=False)
        )
        self._cache_kwarg = (
            "cache"
            if "cache" in inspect.signature(self.model.forward).parameters
            else "past_key_values"
        )
        self._prompts = self._prompts.to(self.device)

        # Everything below is shared with the generation thread and guarded by _cond.
        self._cond = threading.Condition()
        self._version = initial_version
        self._pending: int | None = None
        self._loaded: set[str] = set()
        self._undo: dict[str, torch.Tensor] = {}
        self._spare: dict[str, torch.Tensor] = {}
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
        self._windows: set[GenerationWindow] = set()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._accepting = False  # the generation thread will still run queued work
        self._failure: BaseException | None = None
        self._limiter = anyio.CapacityLimiter(1)
        self._pool: ThreadPoolExecutor | None = None

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
        with self._cond:
            if self._thread is not None:
                raise RuntimeError("this local engine is already running")
            self._stopping = False
            self._accepting = True
            self._thread = threading.Thread(
                target=self._run, name="weightpipe-local-engine", daemon=True
            )
            self._thread.start()

    async def stop(self) -> None:
        """Stop generating; pending weight changes are applied first. Idempotent."""
        with self._cond:
            thread = self._thread
            self._stopping = True
            self._cond.notify_all()
        if thread is not None:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(thread.join)
        with self._cond:
            self._thread = None
            self._batch = None
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False)

    @property
    def running(self) -> bool:
        """Whether the generation thread is alive."""
        thread = self._thread
        return thread is not None and thread.is_alive()

    # ------------------------------------------------------------------ protocol

    async def begin(self, version: int) -> None:
        """Start a sync that will install ``version``.

        Raises:
            EngineError: another sync is in progress, or generation failed.
        """
        self._check_alive()
        with self._cond:
            if self._pending is not None:
                raise EngineError(
                    self.name, f"cannot begin v{version}: the sync of v{self._pending} is open"
                )
            self._pending = version
            self._loaded = set()
            self._undo = {}

    async def load(self, bucket: WeightBucket) -> None:
        """Validate every tensor of ``bucket``, then apply them all between two steps.

        Tensors of the parameter's dtype are copied into it; an FP8 ``X.weight`` with its
        float32 scale in the same bucket (``X.weight_scale_inv`` for ``block_size``
        blocks, ``X.weight_scale`` per channel or per tensor) is dequantised into it.

        Raises:
            EngineError: no sync is open, the bucket belongs to another version, or a
                tensor has an unknown name, a wrong shape or dtype, a missing or misshapen
                scale, or was already loaded in this sync (the error names it; nothing
                of the bucket was applied).
        """
        self._check_alive()
        with self._cond:
            pending = self._pending
            if pending is None:
                raise EngineError(self.name, f"{bucket.describe()} arrived outside a sync")
            if bucket.version != pending:
                raise EngineError(
                    self.name, f"{bucket.describe()} does not belong to the open sync v{pending}"
                )
            loaded = set(self._loaded)
        plan = self._validate(bucket, loaded)
        # Dequantisation is the heavy part: done on a worker thread while generation goes
        # on, so the generation thread only pays for the final copies.
        updates = await anyio.to_thread.run_sync(self._prepare, bucket, plan, limiter=self._limiter)
        await self._submit(lambda: self._apply(updates, pending))

    async def commit(self, version: int) -> None:
        """Finish the sync: from the next step on, outputs report ``version``.

        Raises:
            EngineError: no sync of ``version`` is open, or generation failed.
        """
        self._check_alive()
        with self._cond:
            if self._pending != version:
                raise EngineError(self.name, f"cannot commit v{version}: {self._open_sync()}")
        await self._submit(lambda: self._finish(version, commit=True))

    async def abort(self, version: int) -> None:
        """Abandon the open sync: restore every parameter it wrote; version unchanged.

        A no-op when no sync is open.

        Raises:
            EngineError: generation failed, so the weights could not be restored.
        """
        with self._cond:
            if self._pending is None:
                return
        self._check_alive()
        await self._submit(lambda: self._finish(version, commit=False))

    async def version(self) -> int | None:
        """The committed weight version."""
        with self._cond:
            return self._version

    async def pause(self, mode: PauseMode) -> None:
        """Stop generation; returns once no step runs any more.

        ``abort`` finishes the running requests as aborted, ``retract`` restarts them
        from their prompts on resume, ``in_place`` keeps their KV cache and continues.

        Raises:
            EngineError: already paused, an unknown mode, or generation failed.
        """
        if mode not in ("abort", "retract", "in_place"):
            raise EngineError(self.name, f"unknown pause mode {mode!r}")
        self._check_alive()
        done: Future[None] = Future()
        with self._cond:
            if self._paused or self._pause_request is not None:
                raise EngineError(self.name, "generation is already paused")
            if not self.running:
                self._enter_pause(mode, time.perf_counter())
                return
            self._pause_request = (mode, done)
            self._cond.notify_all()
        await self._wait(done)

    async def resume(self) -> None:
        """Continue generation (a no-op when not paused)."""
        with self._cond:
            if not self._paused:
                return
            now = time.perf_counter()
            if self._paused_since is not None:
                paused = now - self._paused_since
                self._paused_total_s += paused
                for window in self._windows:
                    window._on_pause(now - max(self._paused_since, window.opened))
            self._paused = False
            self._paused_since = None
            self._pause_mode = None
            self._cond.notify_all()

    # ------------------------------------------------------------------ observation

    def open_window(self) -> GenerationWindow:
        """Start measuring generation; close the window to get its ``GenerationStats``."""
        window = GenerationWindow(self)
        with self._cond:
            self._windows.add(window)
        return window

    def outputs(self) -> list[GenerationOutput]:
        """The most recent finished outputs, oldest first."""
        with self._cond:
            return list(self._outputs)

    @property
    def paused(self) -> bool:
        with self._cond:
            return self._paused

    @property
    def tokens_generated(self) -> int:
        with self._cond:
            return self._tokens_total

    @property
    def paused_total_s(self) -> float:
        """Seconds generation has been paused since the engine was built."""
        with self._cond:
            return self._paused_total_s + self._paused_for(time.perf_counter())

    async def wait_for_tokens(self, count: int, *, timeout_s: float = 60.0) -> int:
        """Wait until ``count`` tokens were generated since the engine was built.

        Raises:
            EngineError: not reached within ``timeout_s`` (paused, stopped or failed).
        """
        return await self._wait_until(
            lambda: self._tokens_total >= count,
            lambda: self._tokens_total,
            f"{count} tokens",
            timeout_s,
        )

    async def wait_for_outputs(self, count: int, *, timeout_s: float = 60.0) -> int:
        """Wait until ``count`` requests finished since the engine was built.

        Raises:
            EngineError: not reached within ``timeout_s``.
        """
        return await self._wait_until(
            lambda: self._finished_total >= count,
            lambda: self._finished_total,
            f"{count} finished outputs",
            timeout_s,
        )

    def parameter(self, name: str) -> torch.Tensor:
        """A copy of the parameter called ``name`` (HF checkpoint name).

        Raises:
            KeyError: no such parameter.
        """
        with self._cond:
            return self._params[name].detach().clone()

    def parameter_specs(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Every parameter's name, shape and dtype."""
        return {name: (tuple(p.shape), p.dtype) for name, p in self._params.items()}

    def random_weights(self, seed: int) -> dict[str, torch.Tensor]:
        """New weights of this engine's shapes and dtype, as a trainer would produce them.

        Seeded and independent of the engine's own weights (on CPU).
        """
        from transformers import LlamaForCausalLM

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model: Any = LlamaForCausalLM(self.config)
            model = model.to(self.dtype)
        return {name: p.detach() for name, p in model.named_parameters()}

    # ------------------------------------------------------------------ loading

    def _validate(
        self, bucket: WeightBucket, loaded: set[str]
    ) -> list[tuple[str, torch.Tensor, torch.Tensor | None]]:
        """Check the whole bucket; return ``(param, tensor, scale or None)`` to apply."""
        by_name: dict[str, torch.Tensor] = {}
        for name, tensor in bucket.tensors:
            if name in by_name:
                raise EngineError(self.name, "appears twice in one bucket", tensor=name)
            by_name[name] = tensor
        plan: list[tuple[str, torch.Tensor, torch.Tensor | None]] = []
        for name, tensor in bucket.tensors:
            param = self._params.get(name)
            if param is None:
                scale_of = _scale_owner(name)
                if scale_of is None:
                    raise EngineError(
                        self.name, f"unknown parameter{self._hint(name)}", tensor=name
                    )
                self._check_orphan_scale(name, tensor, scale_of, by_name)
                continue
            if name in loaded:
                raise EngineError(self.name, "loaded twice in one sync", tensor=name)
            if tuple(tensor.shape) != tuple(param.shape):
                raise EngineError(
                    self.name,
                    f"shape {tuple(tensor.shape)} does not match the parameter's "
                    f"{tuple(param.shape)}",
                    tensor=name,
                )
            scale: torch.Tensor | None = None
            if tensor.dtype == FP8:
                scale = self._scale_for(name, tensor, by_name)
            elif tensor.dtype != param.dtype:
                raise EngineError(
                    self.name,
                    f"dtype {tensor.dtype}, expected {param.dtype} or torch.float8_e4m3fn "
                    "with its scale",
                    tensor=name,
                )
            plan.append((name, tensor, scale))
        return plan

    def _check_orphan_scale(
        self, name: str, tensor: torch.Tensor, weight_name: str, by_name: dict[str, torch.Tensor]
    ) -> None:
        if weight_name not in self._params:
            raise EngineError(
                self.name, f"scale of an unknown parameter{self._hint(weight_name)}", tensor=name
            )
        weight = by_name.get(weight_name)
        if weight is None or weight.dtype != FP8:
            raise EngineError(
                self.name,
                "a scale without its float8_e4m3fn weight in the same bucket",
                tensor=name,
            )
        if tensor.dtype != torch.float32:
            raise EngineError(
                self.name, f"scale dtype {tensor.dtype}, expected torch.float32", tensor=name
            )

    def _scale_for(
        self, name: str, weight: torch.Tensor, by_name: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """The FP8 weight's one scale in the bucket, its shape checked for its name."""
        found = [
            (suffix, by_name[name + suffix])
            for suffix in SCALE_SUFFIXES
            if name + suffix in by_name
        ]
        if not found:
            names = " or ".join(repr(name + suffix) for suffix in SCALE_SUFFIXES)
            raise EngineError(
                self.name, f"float8_e4m3fn without {names} in the bucket", tensor=name
            )
        if len(found) > 1:
            raise EngineError(self.name, "float8_e4m3fn with two scales", tensor=name)
        suffix, scale = found[0]
        expected = {
            scale_shape(tuple(weight.shape), method, self.block_size)
            for method in SCALE_SUFFIXES[suffix]
        }
        if tuple(scale.shape) not in expected:
            raise EngineError(
                self.name,
                f"{name + suffix!r} has shape {tuple(scale.shape)}; a {tuple(weight.shape)} "
                f"weight needs {' or '.join(str(list(e)) for e in sorted(expected))} "
                f"(block {list(self.block_size)})",
                tensor=name,
            )
        return scale

    def _hint(self, name: str) -> str:
        close = difflib.get_close_matches(name, self._params, n=1)
        return f"; did you mean {close[0]!r}?" if close else ""

    def _prepare(
        self, bucket: WeightBucket, plan: list[tuple[str, torch.Tensor, torch.Tensor | None]]
    ) -> list[tuple[str, torch.Tensor]]:
        """Fresh tensors in each parameter's layout, built off the generation thread."""
        if self.device.type == "cuda":
            bucket.wait_ready()
        if self.prepare_threads > 1 and len(plan) > 1 and self.device.type == "cpu":
            # FP8 -> float32 conversion is single-threaded in torch on CPU: spread the
            # bucket's tensors over a few threads (torch releases the GIL).
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    self.prepare_threads, thread_name_prefix="weightpipe-local-prepare"
                )
            updates = list(self._pool.map(self._prepare_one, plan))
        else:
            updates = [self._prepare_one(entry) for entry in plan]
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        return updates

    def _prepare_one(
        self, entry: tuple[str, torch.Tensor, torch.Tensor | None]
    ) -> tuple[str, torch.Tensor]:
        name, tensor, scale = entry
        param = self._params[name]
        with self._cond:
            fresh = self._spare.pop(name, None)
        if fresh is None:
            fresh = torch.empty_like(param)
        if scale is not None:
            _dequantize_into(
                fresh, tensor.to(self.device), scale.to(self.device), self.block_size, name
            )
        else:
            # A copy, never the bucket's own storage: Fetch recycles its buffers.
            fresh.copy_(tensor)
        return name, fresh

    def _apply(self, updates: list[tuple[str, torch.Tensor]], version: int) -> None:
        # Runs on the generation thread (or a worker when not running), between steps.
        # Swapping storages costs no copy here, so a bucket adds almost nothing to the
        # gap between two tokens; the old storage is the undo record.
        with self._cond:
            if self._pending != version:  # aborted while the bucket was being prepared
                raise EngineError(self.name, f"the sync of v{version} is no longer open")
        with torch.no_grad():
            for name, fresh in updates:
                param = self._params[name]
                if name not in self._undo:
                    self._undo[name] = param.data
                param.data = fresh
        with self._cond:
            self._loaded.update(name for name, _ in updates)
            self._mark_weights_changed()

    def _finish(self, version: int, *, commit: bool) -> None:
        # The storages that stop being served (the old ones on commit, the new ones on
        # abort) become the next sync's spares: no fresh allocation, and no page faults,
        # per sync, at the price of keeping one spare copy of every parameter synced.
        with torch.no_grad():
            if commit:
                retired = self._undo
            else:
                retired = {name: self._params[name].data for name in self._undo}
                for name, old in self._undo.items():
                    self._params[name].data = old
        with self._cond:
            if commit:
                self._version = version
            self._spare.update(retired)
            self._pending = None
            self._undo = {}
            self._loaded = set()
            self._mark_weights_changed()

    def _mark_weights_changed(self) -> None:
        if self._batch is not None:
            self._batch.weights_changed = True

    def _open_sync(self) -> str:
        return "no sync is open" if self._pending is None else f"the open sync is v{self._pending}"

    # ------------------------------------------------------------------ threading helpers

    def _check_alive(self) -> None:
        if self._failure is not None:
            raise EngineError(
                self.name, f"generation failed: {type(self._failure).__name__}: {self._failure}"
            ) from self._failure

    async def _submit(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the generation thread between two steps, or on a worker if stopped."""
        future: Future[T] = Future()
        with self._cond:
            queued = self._accepting
            if queued:
                self._work.append((fn, future))
                self._cond.notify_all()
        if not queued:
            return await anyio.to_thread.run_sync(fn, limiter=self._limiter)
        return await self._wait(future)

    async def _wait(self, future: Future[T]) -> T:
        # The worker thread only waits on the future; abandoning it on cancellation is
        # safe because the generation thread completes every future it takes.
        return await anyio.to_thread.run_sync(future.result, abandon_on_cancel=True)

    async def _wait_until(
        self, done: Callable[[], bool], value: Callable[[], int], what: str, timeout_s: float
    ) -> int:
        def wait() -> bool:
            with self._cond:
                return self._cond.wait_for(
                    lambda: done() or self._failure is not None or self._stopping, timeout_s
                )

        await anyio.to_thread.run_sync(wait, abandon_on_cancel=True)
        self._check_alive()
        with self._cond:
            if not done():
                raise EngineError(
                    self.name,
                    f"waited {timeout_s} s for {what}; have {value()}"
                    + (" (paused)" if self._paused else ""),
                )
            return value()

    def _paused_for(self, now: float, since: float = 0.0) -> float:
        if self._paused_since is None:
            return 0.0
        return max(0.0, now - max(self._paused_since, since))

    def _enter_pause(self, mode: PauseMode, now: float) -> None:
        # Called with _cond held.
        batch = self._batch
        if batch is not None and mode == "abort":
            self._finish_batch(batch, "abort", now)
            self._batch = None
        elif batch is not None and mode == "retract":
            batch.tokens = [[] for _ in batch.request_ids]
            batch.cache = None
            batch.next_input = None
            batch.retractions += 1
        self._paused = True
        self._pause_mode = mode
        self._paused_since = now

    def _finish_batch(self, batch: _Batch, reason: Literal["length", "abort"], now: float) -> None:
        for request_id, prompt, tokens in zip(
            batch.request_ids, batch.prompts, batch.tokens, strict=True
        ):
            self._outputs.append(
                GenerationOutput(
                    request_id=request_id,
                    prompt=tuple(int(t) for t in prompt.tolist()),
                    tokens=tuple(tokens),
                    weight_version=self._version,
                    started_version=batch.started_version,
                    weights_changed=batch.weights_changed,
                    finish_reason=reason,
                    retractions=batch.retractions,
                )
            )
        self._finished_total += len(batch.request_ids)
        for window in self._windows:
            window._finished += len(batch.request_ids)
        self._cond.notify_all()

    # ------------------------------------------------------------------ generation thread

    def _run(self) -> None:
        try:
            with torch.no_grad():
                self._loop()
        except BaseException as exc:  # surfaced to every later call by _check_alive
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
                for window in self._windows:
                    window._on_write(seconds)

    def _new_batch(self) -> _Batch:
        # Called with _cond held.
        ids = list(range(self._next_request, self._next_request + self.batch_size))
        self._next_request += self.batch_size
        return _Batch(
            request_ids=ids,
            prompts=self._prompts,
            tokens=[[] for _ in ids],
            cache=None,
            next_input=None,
            started_version=self._version,
        )

    def _step(self, batch: _Batch) -> None:
        from transformers import DynamicCache

        if batch.cache is None:
            batch.cache = DynamicCache(config=self.config)
            batch.started_version = self._version
            inputs = batch.prompts
        else:
            assert batch.next_input is not None
            inputs = batch.next_input
        kwargs = {self._cache_kwarg: batch.cache}
        logits = self.model(input_ids=inputs, use_cache=True, logits_to_keep=1, **kwargs).logits
        next_tokens = logits[:, -1].argmax(dim=-1)
        values = next_tokens.tolist()
        now = time.perf_counter()
        with self._cond:
            if self._batch is not batch:  # aborted or replaced while stepping
                return
            batch.next_input = next_tokens.unsqueeze(1)
            for tokens, value in zip(batch.tokens, values, strict=True):
                tokens.append(int(value))
            self._tokens_total += len(values)
            done = len(batch.tokens[0]) >= self.max_new_tokens
            if done:
                self._finish_batch(batch, "length", now)
                self._batch = None
            for window in self._windows:
                window._on_step(now, len(values))
            self._cond.notify_all()


def _scale_owner(name: str) -> str | None:
    """``X.weight`` for a scale name ``X.weight_scale_inv`` / ``X.weight_scale``, else None."""
    for suffix in SCALE_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


def _dequantize_into(
    out: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    block: tuple[int, int],
    name: str,
) -> None:
    """``out[...] = dequantize_fp8(weight, scale)``, bit for bit, without big temporaries.

    Block scales are applied one band of ``block[0]`` rows at a time through a small
    float32 scratch, so no weight-sized float32 tensors are allocated and page-faulted
    (which costs more than the maths on a CPU); each element is still
    ``float32(q) * float32(scale)`` rounded to ``out.dtype``, exactly as
    ``weightpipe.stages.fp8.dequantize_fp8`` computes it. Other scale shapes go through
    that function itself.
    """
    scale = scale.to(torch.float32)
    if weight.dim() != 2 or tuple(scale.shape) != scale_shape(tuple(weight.shape), "block", block):
        out.copy_(dequantize_fp8(weight, scale, block=block, dtype=out.dtype, name=name))
        return
    rows, cols = weight.shape
    column_scales = scale.repeat_interleave(block[1], dim=1)[:, :cols]
    scratch = torch.empty((min(block[0], rows), cols), dtype=torch.float32, device=out.device)
    for band, start in enumerate(range(0, rows, block[0])):
        stop = min(start + block[0], rows)
        part = scratch[: stop - start]
        part.copy_(weight[start:stop])
        part.mul_(column_scales[band])
        out[start:stop].copy_(part)
