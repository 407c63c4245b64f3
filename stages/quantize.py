"""The Fp8Quantize stage: which weights become FP8, how, and the config SGLang must match.

Three parts share one set of settings so that trainer and engine can never disagree:
``Fp8Selection`` decides per parameter name and shape whether it is quantized (linear
weights only; embeddings, lm_head, norms, biases and router gates stay high precision;
``ignored_layers`` with SGLang's own matching plus ``re:`` patterns; user include/exclude),
``Fp8Quantize.quantization_config()`` emits the dict the SGLang server is launched with,
and ``Fp8Quantize.process`` turns each WeightBucket into one where every selected
``X.weight`` is followed by its float32 scale. On CPU the work runs in the stage's worker
thread, which spreads all of a bucket's row bands over a few band threads; on CUDA it is
enqueued on the stage's own stream (one Triton launch per bucket and input dtype, or the
plain torch ops without Triton) and the output bucket carries the recorded event. The
numbers come from ``weightpipe.stages.fp8`` and are bit-identical on every path.
"""

from __future__ import annotations

import fnmatch
import os
import re
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, ClassVar, Literal

import anyio
import anyio.to_thread
import torch

from weightpipe.pipeline import Stage
from weightpipe.stages import fp8 as fp8_module
from weightpipe.stages._memory import BufferPool
from weightpipe.stages.bucket import WeightBucket
from weightpipe.stages.fp8 import (
    FP8_DTYPE,
    Fp8Method,
    Fp8Tensor,
    NonFiniteWeightError,
    ScaleFormat,
    fp8_output_bytes,
    quantize_fp8_many,
    reference_with_amax,
)

__all__ = [
    "Backend",
    "Fp8Quantize",
    "Fp8Selection",
    "NonFinitePolicy",
    "scale_name",
    "select_for_fp8",
]

NonFinitePolicy = Literal["error", "keep"]
Backend = Literal["auto", "torch", "triton"]

_QUANTIZABLE = (torch.bfloat16, torch.float16, torch.float32)

# Last module-path components that are never FP8 linear layers in SGLang: embeddings and
# the LM head (vocab-parallel embeddings there), and MoE routers, which SGLang builds
# unquantized (``mlp.gate``, Qwen's ``shared_expert_gate``, Mixtral-style ``router``).
_NEVER_MODULES = frozenset(
    {
        "embed_tokens",
        "embed",
        "embeddings",
        "word_embeddings",
        "wte",
        "wpe",
        "lm_head",
        "gate",
        "shared_expert_gate",
        "router",
    }
)
_NORM = re.compile(r"(^|_)(norm|layernorm|ln(_\w+)?)$|norm$")

# The checkpoint shards of SGLang's fused layers: an ignored fused name skips its shards.
_FUSED = {
    "q_proj": "qkv_proj",
    "k_proj": "qkv_proj",
    "v_proj": "qkv_proj",
    "gate_proj": "gate_up_proj",
    "up_proj": "gate_up_proj",
}


def _module_of(name: str) -> str:
    """``model.layers.0.mlp.down_proj.weight`` -> ``model.layers.0.mlp.down_proj``."""
    return name[: -len(".weight")] if name.endswith(".weight") else name


def scale_name(name: str, method: Fp8Method = "block") -> str:
    """The name SGLang loads the scale of weight ``name`` under.

    ``X.weight`` -> ``X.weight_scale_inv`` for block scales and ``X.weight_scale`` for
    channel/tensor scales (SGLang's parameter names); a stacked-expert name without the
    ``.weight`` suffix gets ``_scale_inv`` / ``_scale`` appended.
    """
    return name + ("_scale_inv" if method == "block" else "_scale")


def _path_match(ignored: str, module: str) -> bool:
    """SGLang's ignored-layer rule: equal, a dotted prefix, or a dotted sub-path."""
    ignored = ignored.rstrip(".")
    if module == ignored or module.startswith(ignored + "."):
        return True
    return f".{ignored}." in f".{module}."


@lru_cache(maxsize=256)
def _compile(pattern: str) -> re.Pattern[str]:
    """``re:REGEX`` as given; anything else is an fnmatch glob over the full name."""
    if pattern.startswith("re:"):
        return re.compile(pattern[3:])
    return re.compile(fnmatch.translate(pattern))


@dataclass(frozen=True)
class Fp8Selection:
    """The rules deciding which parameters are quantized to FP8.

    A parameter is quantized when all of these hold:

    - its name ends with ``.weight`` and it is 2-D, or it is a 3-D stack of expert
      matrices (``experts`` in its module path; ``.weight`` or a transformers-style
      ``experts.gate_up_proj`` name), quantized per expert matrix;
    - its module is not an embedding, ``lm_head``, a norm or a router gate
      (``mlp.gate``, ``shared_expert_gate``, ``router``);
    - its module is not matched by ``ignored_layers`` (SGLang's dotted-path rule, with
      and without a leading ``model.``, fused ``qkv_proj``/``gate_up_proj`` entries
      covering their shards; ``re:REGEX`` entries use ``re.match`` on the module name, as
      SGLang's compressed-tensors configs do);
    - it matches one of ``include`` if any are given and none of ``exclude``
      (fnmatch globs, or ``re:REGEX`` with ``re.match``, over the full parameter name).

    The dtype is checked separately (only bf16/fp16/fp32 tensors are quantized).
    """

    ignored_layers: tuple[str, ...] = ()
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for pattern in (*self.ignored_layers, *self.include, *self.exclude):
            if not isinstance(pattern, str) or not pattern:
                raise ValueError(f"FP8 selection pattern {pattern!r} must be a non-empty str")
            try:
                _compile(pattern)
            except re.error as exc:
                raise ValueError(f"FP8 selection pattern {pattern!r}: {exc}") from exc

    def __call__(self, name: str, shape: Sequence[int]) -> bool:
        """True when ``name`` of ``shape`` is quantized."""
        return self.why_not(name, shape) is None

    def why_not(self, name: str, shape: Sequence[int]) -> str | None:
        """None when quantized, else a short reason (used in logs and tests)."""
        module = _module_of(name)
        last = module.rsplit(".", 1)[-1]
        stacked = len(shape) == 3 and ".experts" in f".{module}"
        if not (name.endswith(".weight") or (stacked and last.endswith("_proj"))):
            return "not a weight"
        if len(shape) != 2 and not stacked:
            return f"{len(shape)}-D"
        if last in _NEVER_MODULES:
            return f"{last} stays high precision"
        if _NORM.search(last):
            return "norm"
        if self.ignored(module):
            return "ignored_layers"
        if self.include and not any(_compile(p).match(name) for p in self.include):
            return "not included"
        if any(_compile(p).match(name) for p in self.exclude):
            return "excluded"
        return None

    def ignored(self, module: str) -> bool:
        """Whether ``ignored_layers`` covers ``module`` (a module path, no ``.weight``)."""
        if not self.ignored_layers:
            return False
        base = module.removeprefix("model.")
        candidates = {base, f"model.{base}"}
        head, _, last = module.rpartition(".")
        if last in _FUSED:
            fused = f"{head}.{_FUSED[last]}" if head else _FUSED[last]
            fused_base = fused.removeprefix("model.")
            candidates |= {fused_base, f"model.{fused_base}"}
        for entry in self.ignored_layers:
            if entry.startswith("re:"):
                if any(_compile(entry).match(c) for c in candidates):
                    return True
                continue
            entry_base = entry.removeprefix("model.")
            for ignored in (entry_base, f"model.{entry_base}"):
                if any(_path_match(ignored, c) for c in candidates):
                    return True
        return False

    def engine_ignored_layers(self, parameters: Iterable[tuple[str, Sequence[int]]]) -> list[str]:
        """The ``ignored_layers`` list SGLang needs to agree with this selection.

        Literal entries are kept; every module with a >= 2-D ``.weight`` this selection
        leaves unquantized is listed by name (so ``re:`` patterns and include/exclude,
        which SGLang's fp8 config does not understand, become plain module names).

        Raises:
            ValueError: some but not all shards of a fused SGLang layer (q/k/v,
                gate/up) would be quantized: SGLang refuses to load that.
        """
        out = [entry for entry in self.ignored_layers if not entry.startswith("re:")]
        decided: dict[str, dict[str, bool]] = {}
        for name, shape in parameters:
            if not name.endswith(".weight") or len(shape) < 2:
                continue
            module = _module_of(name)
            quantized = self(name, shape)
            head, _, last = module.rpartition(".")
            if last in _FUSED:
                decided.setdefault(f"{head}.{_FUSED[last]}", {})[last] = quantized
            if not quantized and not any(_path_match(e, module) for e in out):
                out.append(module)
        for fused, shards in decided.items():
            if len(set(shards.values())) > 1:
                which = ", ".join(
                    f"{k}={'fp8' if v else 'kept'}" for k, v in sorted(shards.items())
                )
                raise ValueError(
                    f"FP8 selection splits SGLang's fused layer {fused!r} ({which}); "
                    "quantize all of its shards or none"
                )
        return out


def select_for_fp8(
    name: str,
    shape: Sequence[int],
    *,
    ignored_layers: Sequence[str] = (),
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
) -> bool:
    """Whether parameter ``name`` of ``shape`` is quantized; the rules of ``Fp8Selection``.

    Raises:
        ValueError: a pattern is empty or an invalid ``re:`` regex.
    """
    return Fp8Selection(tuple(ignored_layers), tuple(include), tuple(exclude))(name, shape)


def _default_cpu_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


class Fp8Quantize(Stage[WeightBucket, WeightBucket]):
    """FP8-quantize the selected weights of each bucket; cast the rest to ``keep_dtype``.

    Each selected ``X.weight`` is replaced by ``X.weight`` (float8_e4m3fn, same shape)
    directly followed by its scale (``X.weight_scale_inv`` for block, ``X.weight_scale``
    for channel/tensor; float32); other floating-point tensors are cast to ``keep_dtype``
    (``None``: left as they are), anything else passes through. The output bucket keeps
    the input's index, is_last and version and adds ``meta`` counts ``quantized``,
    ``kept`` (not quantized) and ``nonfinite_kept``. Input tensors are never modified.

    Args:
        block: FP8 block ``[out, in]`` for ``method="block"``.
        method: ``block`` (SGLang/DeepSeek block FP8), ``channel`` or ``tensor``.
        scale_fmt: ``float32``, or ``ue8m0`` (power-of-two scales, for DeepGEMM).
        nonfinite: a weight with NaN/Inf: ``error`` raises ``NonFiniteWeightError`` naming
            it; ``keep`` sends it unquantized (cast to ``keep_dtype``) and counts it.
        keep_dtype: dtype of the floating-point tensors left unquantized.
        ignored_layers, include, exclude: see ``Fp8Selection``.
        workers: concurrent ``process`` calls the pipeline may run (buckets in flight).
        backend: ``auto`` (CPU: band threads; CUDA: Triton if installed, else torch),
            ``torch``, or ``triton`` (CUDA, or CPU under ``TRITON_INTERPRET=1``).
        cpu_threads: band threads per CPU bucket (default: the cores, at most 4).
    """

    name: ClassVar[str] = "quantize"

    def __init__(
        self,
        *,
        block: tuple[int, int] = (128, 128),
        method: Fp8Method = "block",
        scale_fmt: ScaleFormat = "float32",
        nonfinite: NonFinitePolicy = "error",
        keep_dtype: torch.dtype | None = torch.bfloat16,
        ignored_layers: Sequence[str] = (),
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
        workers: int = 1,
        backend: Backend = "auto",
        cpu_threads: int | None = None,
    ) -> None:
        block = (int(block[0]), int(block[1]))
        if min(block) < 1:
            raise ValueError(f"Fp8Quantize: block must be two positive ints, got {block}")
        if method not in ("block", "channel", "tensor"):
            raise ValueError(f"Fp8Quantize: unknown method {method!r}")
        if scale_fmt not in ("float32", "ue8m0"):
            raise ValueError(f"Fp8Quantize: unknown scale_fmt {scale_fmt!r}")
        if nonfinite not in ("error", "keep"):
            raise ValueError(f"Fp8Quantize: nonfinite must be 'error' or 'keep', not {nonfinite!r}")
        if keep_dtype is not None and not keep_dtype.is_floating_point:
            raise ValueError(f"Fp8Quantize: keep_dtype {keep_dtype} is not a floating dtype")
        if backend not in ("auto", "torch", "triton"):
            raise ValueError(f"Fp8Quantize: unknown backend {backend!r}")
        if workers < 1:
            raise ValueError(f"Fp8Quantize: workers must be >= 1, got {workers}")
        if cpu_threads is not None and cpu_threads < 1:
            raise ValueError(f"Fp8Quantize: cpu_threads must be >= 1, got {cpu_threads}")
        self.block = block
        self.method: Fp8Method = method
        self.scale_fmt: ScaleFormat = scale_fmt
        self.nonfinite: NonFinitePolicy = nonfinite
        self.keep_dtype = keep_dtype
        self.selection = Fp8Selection(tuple(ignored_layers), tuple(include), tuple(exclude))
        self.workers = workers
        self.backend: Backend = backend
        self.cpu_threads = cpu_threads if cpu_threads is not None else _default_cpu_threads()
        self._limiter: anyio.CapacityLimiter | None = None
        self._streams: dict[int, Any] = {}
        # Output arenas of CPU buckets: buckets in flight here and downstream (a few
        # channel slots) plus one being written.
        self._arenas = BufferPool(0, keep=workers + 4, pin=False)
        self._arena_lock = threading.Lock()

    # ------------------------------------------------------------------ engine config

    def quantization_config(
        self, parameters: Iterable[tuple[str, Sequence[int]]] | None = None
    ) -> dict[str, Any]:
        """The ``quantization_config`` to launch SGLang with (``quantization="fp8"``).

        ``parameters`` (``(name, shape)`` of the model, e.g. from ``named_parameters``)
        lets the unquantized linear modules and any ``re:`` / include / exclude rules be
        spelled out as plain ``ignored_layers`` names, which is all SGLang's fp8 config
        matches. Block: ``{"quant_method": "fp8", "fmt": "e4m3", "activation_scheme":
        "dynamic", "weight_block_size": [bo, bi], "ignored_layers": [...]}`` (plus
        ``"scale_fmt": "ue8m0"`` when set); tensor: the same without
        ``weight_block_size``; channel: a compressed-tensors ``float-quantized`` config
        with channel-wise weights and dynamic per-token activations.

        Raises:
            ValueError: the rules use ``re:`` patterns or include/exclude but
                ``parameters`` was not given (SGLang could not apply them), or they would
                split a fused layer's shards.
        """
        sel = self.selection
        if parameters is None:
            if sel.include or sel.exclude or any(e.startswith("re:") for e in sel.ignored_layers):
                raise ValueError(
                    "Fp8Quantize.quantization_config: re: patterns and include/exclude "
                    "must be expanded against the model; pass parameters=(name, shape) pairs"
                )
            ignored = list(sel.ignored_layers)
        else:
            ignored = sel.engine_ignored_layers(parameters)
        if self.method == "channel":
            return {
                "quant_method": "compressed-tensors",
                "format": "float-quantized",
                "quantization_status": "compressed",
                "config_groups": {
                    "group_0": {
                        "targets": ["Linear"],
                        "weights": {
                            "num_bits": 8,
                            "type": "float",
                            "strategy": "channel",
                            "symmetric": True,
                            "dynamic": False,
                        },
                        "input_activations": {
                            "num_bits": 8,
                            "type": "float",
                            "strategy": "token",
                            "symmetric": True,
                            "dynamic": True,
                        },
                    }
                },
                "ignore": ignored,
            }
        config: dict[str, Any] = {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
        }
        if self.method == "block":
            config["weight_block_size"] = list(self.block)
        config["ignored_layers"] = ignored
        if self.scale_fmt == "ue8m0":
            config["scale_fmt"] = "ue8m0"
        return config

    # ------------------------------------------------------------------ stage

    async def open(self) -> None:
        if self.backend == "triton":
            from weightpipe.stages.fp8 import _triton as _fp8_triton

            if not _fp8_triton.available():
                raise RuntimeError("Fp8Quantize: backend='triton' but Triton is not installed")
            if self.method != "block" or not _fp8_triton.supports_block(self.block):
                raise ValueError(
                    "Fp8Quantize: the Triton backend does block FP8 with power-of-two "
                    f"blocks only (method={self.method!r}, block={list(self.block)})"
                )
        self._limiter = anyio.CapacityLimiter(self.workers)
        if self.method == "block" and self.backend != "triton" and not torch.cuda.is_available():
            # Compile the CPU kernel (numba, ~2 s once per process) before the first
            # bucket rather than inside the first sync.
            await anyio.to_thread.run_sync(fp8_module.warm_up_cpu_kernel)

    async def close(self) -> None:
        self._streams.clear()

    async def process(self, item: WeightBucket) -> list[WeightBucket]:
        limiter = self._limiter if self._limiter is not None else anyio.CapacityLimiter(1)
        return [await anyio.to_thread.run_sync(self.quantize_bucket, item, limiter=limiter)]

    def quantize_bucket(self, bucket: WeightBucket) -> WeightBucket:
        """The blocking body of ``process`` (callable directly, from any thread).

        Raises:
            NonFiniteWeightError: with ``nonfinite="error"``, naming the first bad tensor.
        """
        plan = [
            self._wants(name, tensor) for name, tensor in bucket.tensors
        ]  # per tensor: quantize?
        cuda_idx = [i for i, (_, t) in enumerate(bucket.tensors) if t.is_cuda]
        results: dict[int, Fp8Tensor | None] = {}
        ready = None
        if cuda_idx:
            ready = self._quantize_cuda(bucket, plan, cuda_idx, results)
        cpu_idx = [i for i, (_, t) in enumerate(bucket.tensors) if not t.is_cuda and plan[i]]
        if cpu_idx:
            self._quantize_cpu(bucket, cpu_idx, results)

        out: list[tuple[str, torch.Tensor]] = []
        quantized = kept = nonfinite_kept = 0
        for i, (name, tensor) in enumerate(bucket.tensors):
            result = results.get(i)
            if plan[i] and result is None:
                if self.nonfinite == "error":
                    raise NonFiniteWeightError(name)
                nonfinite_kept += 1
            if result is not None:
                out.append((name, result.qweight))
                out.append((scale_name(name, self.method), result.scale))
                quantized += 1
            else:
                out.append((name, self._keep(tensor)))
                kept += 1
        if ready is not None and any(not plan[i] or i not in results for i in cuda_idx):
            # Casts of kept CUDA tensors were enqueued after the event: record again.
            ready = self._record(bucket.tensors[cuda_idx[0]][1].device)
        return bucket.with_tensors(
            tuple(out),
            ready=ready,
            quantized=quantized,
            kept=kept,
            nonfinite_kept=nonfinite_kept,
        )

    # ------------------------------------------------------------------ internals

    def _wants(self, name: str, tensor: torch.Tensor) -> bool:
        return tensor.dtype in _QUANTIZABLE and self.selection(name, tensor.shape)

    def _keep(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.keep_dtype is None or not tensor.is_floating_point() or tensor.dtype == FP8_DTYPE:
            return tensor
        if tensor.is_cuda:
            with torch.cuda.stream(self._stream(tensor.device)):
                return tensor.to(self.keep_dtype)
        return tensor.to(self.keep_dtype)

    def _quantize_cpu(
        self, bucket: WeightBucket, idx: list[int], results: dict[int, Fp8Tensor | None]
    ) -> None:
        named = [bucket.tensors[i] for i in idx]
        if self.backend == "triton":
            from weightpipe.stages.fp8 import _triton as _fp8_triton

            outs, flags = _fp8_triton.quantize_block_batch(
                [t for _, t in named], self.block, self.scale_fmt
            )
            for i, result, bad in zip(idx, outs, flags.tolist(), strict=True):
                results[i] = None if bad else result
            return
        arena = self._take_arena(fp8_output_bytes(named))
        many = quantize_fp8_many(
            named,
            method=self.method,
            block=self.block,
            scale_fmt=self.scale_fmt,
            threads=self.cpu_threads,
            arena=arena,
        )
        results.update(zip(idx, many, strict=True))

    def _take_arena(self, nbytes: int) -> torch.Tensor:
        # One recycled buffer holds a bucket's FP8 outputs. It is reused only once every
        # view of it downstream is gone (the pool checks the storage's use count), so a
        # bucket still waiting to be loaded is never overwritten; at most `keep` arenas
        # are retained, the rest freed when dropped.
        with self._arena_lock:
            self._arenas.capacity = max(self._arenas.capacity, nbytes)
            return self._arenas.take(nbytes)

    def _stream(self, device: torch.device) -> Any:
        index = device.index if device.index is not None else torch.cuda.current_device()
        stream = self._streams.get(index)
        if stream is None:
            stream = torch.cuda.Stream(device=index)  # type: ignore[no-untyped-call]
            self._streams[index] = stream
        return stream

    def _record(self, device: torch.device) -> Any:
        event = torch.cuda.Event()  # type: ignore[no-untyped-call]
        event.record(self._stream(device))
        return event

    def _quantize_cuda(
        self,
        bucket: WeightBucket,
        plan: list[bool],
        idx: list[int],
        results: dict[int, Fp8Tensor | None],
    ) -> Any:
        """Enqueue the bucket's CUDA quantization on this stage's stream.

        No host sync per tensor: everything is enqueued, the NaN/Inf flags are copied to
        pinned memory, one event is recorded, and the host waits once for that event
        (in this worker thread) because the flags decide the output's tensors.
        """
        device = bucket.tensors[idx[0]][1].device
        stream = self._stream(device)
        chosen = [i for i in idx if plan[i]]
        producer = torch.cuda.current_stream(device)
        with torch.cuda.device(device), torch.cuda.stream(stream):
            if bucket.ready is not None:
                bucket.wait_ready(stream)
            else:
                # No event: the tensors were made on this thread's current stream (the
                # default one unless the caller chose another); order after it.
                stream.wait_stream(producer)
            for i in idx:
                # The inputs were allocated on the producer's stream and are read on ours.
                bucket.tensors[i][1].record_stream(stream)
            if not chosen:
                return self._record(device)
            weights = [bucket.tensors[i][1] for i in chosen]
            outs, flags = self._cuda_batch(weights)
            host_flags = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
            host_flags.copy_(flags, non_blocking=True)
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record(stream)
        event.synchronize()
        for i, result, bad in zip(chosen, outs, host_flags.tolist(), strict=True):
            results[i] = None if bad else result
        return event

    def _cuda_batch(self, weights: list[torch.Tensor]) -> tuple[list[Fp8Tensor], torch.Tensor]:
        from weightpipe.stages.fp8 import _triton as _fp8_triton

        use_triton = (
            self.backend != "torch"
            and self.method == "block"
            and _fp8_triton.available()
            and _fp8_triton.supports_block(self.block)
        )
        if use_triton:
            return _fp8_triton.quantize_block_batch(weights, self.block, self.scale_fmt)
        outs: list[Fp8Tensor] = []
        bad: list[torch.Tensor] = []
        for w in weights:
            # The reference ops on the stream; finiteness stays a device flag (no sync).
            result, amax = reference_with_amax(w, self.method, self.block, self.scale_fmt)
            outs.append(result)
            bad.append((~torch.isfinite(amax).all()).to(torch.int32))
        return outs, torch.stack(bad)
