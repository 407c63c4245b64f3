"""The local engine's update transaction: validate a bucket, stage it, switch at commit.

``WeightUpdates`` owns the engine's parameters, the committed version and the open sync.
A bucket is validated whole first (names, shapes, dtypes, and each FP8 weight's one scale,
named and shaped by ``weightpipe.stages.fp8.spec``), so a bad tensor is refused before
anything is staged. Then it is staged off the generation thread: every tensor is built
into a fresh storage in its parameter's layout (FP8 weights dequantised with their scale
by ``weightpipe.stages.fp8.dequantize_fp8``, bf16 ones copied, never aliased) and held
until the sync ends; nothing a decode step reads changes while a sync is open. ``commit``
switches every staged storage into its parameter at once, between two decode steps, so
no step ever runs on a mix of two versions; ``abort`` drops the staged storages, so an
aborted sync leaves exactly the old weights and version without touching a parameter.
The price is one copy of the parameters a sync touched, held until it ends; the
storages a sync retires (the old ones on commit, the staged ones on abort) become the
next sync's fresh storages. Every storage is tagged with the version it serves
(``version_of``), which lets the generation thread check what each step read.
"""

from __future__ import annotations

import difflib
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import torch

from weightpipe.stages.bucket import WeightBucket
from weightpipe.stages.engines.base import EngineError
from weightpipe.stages.fp8 import dequantize_fp8
from weightpipe.stages.fp8.spec import FP8_DTYPE, SCALE_SUFFIXES, scale_owner, scale_shape

__all__ = ["PlannedWrite", "WeightUpdates", "dequantize_into"]


class PlannedWrite(NamedTuple):
    """One validated tensor of a bucket: the parameter it goes to, and its FP8 scale."""

    name: str
    tensor: torch.Tensor
    scale: torch.Tensor | None


class WeightUpdates:
    """The parameters, the committed version and the one open sync of a local engine.

    Thread-safe: the engine calls ``begin``/``plan``/``stage``/``abort`` on the event
    loop, ``prepare`` on a worker thread and ``commit`` on the generation thread between
    two steps; only ``commit`` changes parameters, under the lock, so ``parameter`` and
    a concurrent ``abort`` see either every old storage or every new one.

    Args:
        params: the model's parameters under each of their checkpoint names.
        engine: the engine's name, for errors.
        device: where the parameters live.
        block_size: the FP8 block shape ``[out, in]`` block scales refer to.
        prepare_threads: threads that build a bucket's tensors on CPU.
        initial_version: the version the initial weights are reported as.
    """

    def __init__(
        self,
        params: dict[str, torch.Tensor],
        *,
        engine: str,
        device: torch.device,
        block_size: tuple[int, int],
        prepare_threads: int,
        initial_version: int | None,
    ) -> None:
        self._params = params
        self._engine = engine
        self._device = device
        self._block = block_size
        self._threads = prepare_threads
        self._lock = threading.Lock()
        self._version = initial_version
        self._pending: int | None = None
        self._loaded: set[str] = set()
        self._staged: dict[str, torch.Tensor] = {}
        self._spare: dict[str, torch.Tensor] = {}
        self._pool: ThreadPoolExecutor | None = None
        # The version each storage serves, by data pointer: a step reads the tag of the
        # storage its parameter holds at that moment, so a storage switched in behind the
        # transaction's back shows up as another version. Written only under the lock;
        # read without it (one dict lookup, atomic under the GIL) on the generation thread.
        self._tags: dict[int, int | None] = {p.data_ptr(): initial_version for p in params.values()}

    @property
    def version(self) -> int | None:
        """The committed version."""
        with self._lock:
            return self._version

    @property
    def is_open(self) -> bool:
        """Whether a sync is open."""
        with self._lock:
            return self._pending is not None

    def version_of(self, tensor: torch.Tensor) -> int | None:
        """The version the storage ``tensor`` holds serves (``None`` for one the engine did
        not install, as for initial weights of ``initial_version=None``)."""
        return self._tags.get(tensor.data_ptr())

    def parameter(self, name: str) -> torch.Tensor:
        """A copy of the parameter ``name`` as served (staged storages are not, until commit).

        Raises:
            KeyError: no such parameter.
        """
        # Under the lock: a storage being copied cannot be retired and reused meanwhile.
        with self._lock:
            return self._params[name].detach().clone()

    def specs(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Every parameter's name, shape and dtype: what a bucket may carry."""
        return {name: (tuple(p.shape), p.dtype) for name, p in self._params.items()}

    def close(self) -> None:
        """Release the staging threads (started again on the next bucket if needed)."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False)

    # ------------------------------------------------------------------ the transaction

    def begin(self, version: int) -> None:
        """Open the sync of ``version``.

        Raises:
            EngineError: another sync is open.
        """
        with self._lock:
            if self._pending is not None:
                raise EngineError(
                    self._engine,
                    f"cannot begin v{version}: the sync of v{self._pending} is open",
                )
            self._pending = version
            self._loaded = set()
            self._staged = {}

    def plan(self, bucket: WeightBucket) -> tuple[int, list[PlannedWrite]]:
        """Validate the whole bucket against the open sync: its version and what to write.

        Raises:
            EngineError: no sync is open, the bucket belongs to another version, or a
                tensor has an unknown name, a wrong shape or dtype, a missing or
                misshapen scale, or was already loaded in this sync (names it).
        """
        with self._lock:
            pending = self._pending
            if pending is None:
                raise EngineError(self._engine, f"{bucket.describe()} arrived outside a sync")
            if bucket.version != pending:
                raise EngineError(
                    self._engine,
                    f"{bucket.describe()} does not belong to the open sync v{pending}",
                )
            loaded = set(self._loaded)
        return pending, self._validate(bucket, loaded)

    def prepare(
        self, bucket: WeightBucket, plan: list[PlannedWrite]
    ) -> list[tuple[str, torch.Tensor]]:
        """Fresh tensors in each parameter's layout; off the generation thread."""
        if self._device.type == "cuda":
            bucket.wait_ready()
        if self._threads > 1 and len(plan) > 1 and self._device.type == "cpu":
            # FP8 -> float32 conversion is single-threaded in torch on CPU: spread the
            # bucket's tensors over a few threads (torch releases the GIL).
            with self._lock:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(
                        self._threads, thread_name_prefix="weightpipe-local-prepare"
                    )
                pool = self._pool
            updates = list(pool.map(self._prepare_one, plan))
        else:
            updates = [self._prepare_one(entry) for entry in plan]
        if self._device.type == "cuda":
            torch.cuda.current_stream(self._device).synchronize()
        return updates

    def stage(self, updates: list[tuple[str, torch.Tensor]], version: int) -> None:
        """Hold the prepared storages for the commit of ``version``; nothing is served yet.

        Raises:
            EngineError: the sync of ``version`` was closed while the bucket was prepared
                (its storages go back to the spares), or a tensor was staged already.
        """
        with self._lock:
            refused: EngineError | None = None
            if self._pending != version:
                refused = EngineError(self._engine, f"the sync of v{version} is no longer open")
            else:
                for name, _ in updates:
                    if name in self._staged:
                        refused = EngineError(self._engine, "loaded twice in one sync", tensor=name)
                        break
            if refused is not None:
                for name, fresh in updates:
                    self._spare.setdefault(name, fresh)
                raise refused
            for name, fresh in updates:
                self._staged[name] = fresh
                self._tags[fresh.data_ptr()] = version
            self._loaded.update(name for name, _ in updates)

    def check_commit(self, version: int) -> None:
        """Raise unless the open sync is the one of ``version``.

        Raises:
            EngineError: no sync of ``version`` is open.
        """
        with self._lock:
            self._check_commit(version)

    def commit(self, version: int) -> None:
        """Switch every staged storage in at once and move the version; closes the sync.

        Runs on the generation thread between two decode steps (or on a worker when it
        is stopped): the step before it read only the old version, the step after it
        only the new one. Switching a storage costs no copy, so this is the whole of the
        pause a sync in ``in_flight`` mode costs generation.

        Raises:
            EngineError: no sync of ``version`` is open (an abort came first).
        """
        with self._lock:
            self._check_commit(version)
            params = self._params
            retired: dict[str, torch.Tensor] = {}
            with torch.no_grad():
                for name, fresh in self._staged.items():
                    retired[name] = params[name].data
                    params[name].data = fresh
            # Storages the sync did not touch belong to the new version too: a partial
            # sync's model is that version's model, not a mix.
            tags = self._tags
            for param in params.values():
                tags[param.data_ptr()] = version
            self._version = version
            self._close(retired)

    def abort(self, version: int) -> None:
        """Drop the open sync's staged storages; weights and version stay (a no-op when
        no sync is open). No parameter is touched, so any thread may call it."""
        with self._lock:
            if self._pending is None:
                return
            self._close(self._staged)

    # ------------------------------------------------------------------ bookkeeping

    def _check_commit(self, version: int) -> None:
        # Called with the lock held.
        if self._pending != version:
            open_sync = (
                "no sync is open" if self._pending is None else f"the open sync is v{self._pending}"
            )
            raise EngineError(self._engine, f"cannot commit v{version}: {open_sync}")

    def _close(self, retired: dict[str, torch.Tensor]) -> None:
        # Called with the lock held. The storages that stop being served (or never were)
        # become the next sync's spares: no fresh allocation, and no page faults, per
        # sync, at the price of keeping one spare copy of every parameter synced.
        self._spare.update(retired)
        self._pending = None
        self._staged = {}
        self._loaded = set()

    # ------------------------------------------------------------------ validation

    def _validate(self, bucket: WeightBucket, loaded: set[str]) -> list[PlannedWrite]:
        by_name: dict[str, torch.Tensor] = {}
        for name, tensor in bucket.tensors:
            if name in by_name:
                raise EngineError(self._engine, "appears twice in one bucket", tensor=name)
            by_name[name] = tensor
        plan: list[PlannedWrite] = []
        for name, tensor in bucket.tensors:
            param = self._params.get(name)
            if param is None:
                owner = scale_owner(name)
                if owner is None:
                    raise EngineError(
                        self._engine, f"unknown parameter{self._hint(name)}", tensor=name
                    )
                self._check_orphan_scale(name, tensor, owner, by_name)
                continue
            if name in loaded:
                raise EngineError(self._engine, "loaded twice in one sync", tensor=name)
            if tuple(tensor.shape) != tuple(param.shape):
                raise EngineError(
                    self._engine,
                    f"shape {tuple(tensor.shape)} does not match the parameter's "
                    f"{tuple(param.shape)}",
                    tensor=name,
                )
            scale: torch.Tensor | None = None
            if tensor.dtype == FP8_DTYPE:
                scale = self._scale_for(name, tensor, by_name)
            elif tensor.dtype != param.dtype:
                raise EngineError(
                    self._engine,
                    f"dtype {tensor.dtype}, expected {param.dtype} or torch.float8_e4m3fn "
                    "with its scale",
                    tensor=name,
                )
            plan.append(PlannedWrite(name, tensor, scale))
        return plan

    def _check_orphan_scale(
        self, name: str, tensor: torch.Tensor, owner: str, by_name: dict[str, torch.Tensor]
    ) -> None:
        """A scale must come with its FP8 weight, of a known parameter, in float32."""
        if owner not in self._params:
            raise EngineError(
                self._engine, f"scale of an unknown parameter{self._hint(owner)}", tensor=name
            )
        weight = by_name.get(owner)
        if weight is None or weight.dtype != FP8_DTYPE:
            raise EngineError(
                self._engine,
                "a scale without its float8_e4m3fn weight in the same bucket",
                tensor=name,
            )
        if tensor.dtype != torch.float32:
            raise EngineError(
                self._engine, f"scale dtype {tensor.dtype}, expected torch.float32", tensor=name
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
                self._engine, f"float8_e4m3fn without {names} in the bucket", tensor=name
            )
        if len(found) > 1:
            raise EngineError(self._engine, "float8_e4m3fn with two scales", tensor=name)
        suffix, scale = found[0]
        expected = {
            scale_shape(tuple(weight.shape), method, self._block)
            for method in SCALE_SUFFIXES[suffix]
        }
        if tuple(scale.shape) not in expected:
            raise EngineError(
                self._engine,
                f"{name + suffix!r} has shape {tuple(scale.shape)}; a {tuple(weight.shape)} "
                f"weight needs {' or '.join(str(list(e)) for e in sorted(expected))} "
                f"(block {list(self._block)})",
                tensor=name,
            )
        return scale

    def _hint(self, name: str) -> str:
        close = difflib.get_close_matches(name, self._params, n=1)
        return f"; did you mean {close[0]!r}?" if close else ""

    # ------------------------------------------------------------------ staging

    def _prepare_one(self, entry: PlannedWrite) -> tuple[str, torch.Tensor]:
        name, tensor, scale = entry
        with self._lock:
            fresh = self._spare.pop(name, None)
        if fresh is None:
            fresh = torch.empty_like(self._params[name])
        if scale is not None:
            dequantize_into(
                fresh, tensor.to(self._device), scale.to(self._device), self._block, name
            )
        else:
            # A copy, never the bucket's own storage: Fetch recycles its buffers.
            fresh.copy_(tensor)
        return name, fresh


def dequantize_into(
    out: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    block: tuple[int, int],
    name: str,
) -> None:
    """``out[...] = dequantize_fp8(weight, scale)``, one band of block rows at a time.

    The maths is ``dequantize_fp8``'s, called on each band of ``block[0]`` rows with its
    row of block scales (dequantisation is element-wise, so the result is bit for bit the
    same): the float32 temporaries stay band-sized instead of weight-sized, which on a
    CPU costs less than page-faulting three weight-sized float32 tensors per weight.
    Other scale shapes are dequantised in one call.
    """
    banded = weight.dim() == 2 and tuple(scale.shape) == scale_shape(
        tuple(weight.shape), "block", block
    )
    if not banded:
        out.copy_(dequantize_fp8(weight, scale, block=block, dtype=out.dtype, name=name))
        return
    rows = weight.shape[0]
    for band, start in enumerate(range(0, rows, block[0])):
        stop = min(start + block[0], rows)
        out[start:stop].copy_(
            dequantize_fp8(
                weight[start:stop],
                scale[band : band + 1],
                block=block,
                dtype=out.dtype,
                name=name,
            )
        )
