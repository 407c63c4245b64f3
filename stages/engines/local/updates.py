"""The local engine's update transaction: validate a bucket, stage it, switch at commit.

``WeightUpdates`` owns the engine's parameters, the committed version and the open sync.
A bucket is validated whole first (names, shapes, dtypes, and each FP8 weight's one scale,
named and shaped by ``weightpipe.stages.fp8.spec``), so a bad tensor is refused before
anything is staged. Then it is staged off the generation thread: every tensor is built
into a fresh storage in its parameter's layout (FP8 weights dequantised with their scale
by ``weightpipe.stages.fp8.dequantize_fp8``, bf16 ones copied, never aliased) and held
until the sync ends; nothing a decode step reads changes while a sync is open. Staging
also proves every value finite: each band it writes is summed while still in cache (a
NaN or Inf makes the sum non-finite; only then is the tensor itself searched), so a
NaN/Inf weight fails the sync naming the tensor, whether or not a quantizer saw it, for
about half a copy's time instead of a second pass over the weights. ``commit`` refuses a
sync that left a parameter out (it lists them), then switches every staged storage into
its parameter at once, between two decode steps, so no step ever runs on a mix of two
versions; ``abort`` drops the staged storages, so an aborted or refused sync leaves
exactly the old weights and version without touching a parameter.
The price is one copy of the parameters a sync touched, held until it ends; the
storages a sync retires (the old ones on commit, the staged ones on abort) become the
next sync's fresh storages. Every storage is tagged with the version it serves
(``version_of``), which lets the generation thread check what each step read. On CUDA
every staging section runs under the engine's device (``device_guard``): the worker
thread's own current device is cuda:0 whatever device the engine lives on.
"""

from __future__ import annotations

import difflib
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from types import EllipsisType
from typing import NamedTuple

import torch

from weightpipe.stages.bucket import WeightBucket
from weightpipe.stages.engines.base import EngineError
from weightpipe.stages.engines.local.model import device_guard
from weightpipe.stages.fp8 import dequantize_fp8
from weightpipe.stages.fp8.spec import FP8_DTYPE, SCALE_SUFFIXES, scale_owner, scale_shape

__all__ = [
    "PlannedWrite",
    "StagedTensor",
    "WeightUpdates",
    "dequantize_into",
    "dequantized_bands",
]

Rows = slice | EllipsisType
"""The part of a tensor one staging step writes: a band of rows, or all of it (``...``)."""

CHUNK_BYTES = 1 << 20
"""Bytes a CPU copy stages (writes, then sums) at a time: small enough that the finite
check reads what the copy just wrote from cache, large enough that the per-call overhead
stays small (measured on this project's 2-core machine: chunked copy-and-sum of 64 MiB of
bf16 costs 1.45x the copy alone; summing the whole tensor after the copy costs 16x)."""


class PlannedWrite(NamedTuple):
    """One validated tensor of a bucket: the parameter it goes to, and its FP8 scale."""

    name: str
    tensor: torch.Tensor
    scale: torch.Tensor | None


class StagedTensor(NamedTuple):
    """A tensor built for the commit: its fresh storage and the sums of the bands written
    (0-d tensors on the engine's device, read once the staging stream is synchronised)."""

    name: str
    fresh: torch.Tensor
    sums: list[torch.Tensor]


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

    A sync must send every parameter (each tied one under either of its names): an
    incomplete one is refused at commit, naming what it left out, because the stale
    parameters would be served under the new version.
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
        # Each name's parameter under one name (a tied weight's first): what a sync
        # staged, what it left out and the spares are keyed by it, so a tied weight is
        # one parameter whichever name a source sends it under.
        first: dict[int, str] = {}
        self._canonical = {name: first.setdefault(id(p), name) for name, p in params.items()}
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
        """Release the staging threads and wait for them to end (they are started again on
        the next bucket if needed); a staging task not yet started is dropped."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

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

    def prepare(self, bucket: WeightBucket, plan: list[PlannedWrite]) -> list[StagedTensor]:
        """Fresh tensors in each parameter's layout, each proven finite; off the
        generation thread, under the engine's CUDA device.

        Raises:
            EngineError: a tensor holds NaN or Inf (after dequantisation with its scale,
                for an FP8 one); names it. Nothing is staged: the bucket's storages go
                back to the spares.
        """
        with device_guard(self._device):
            # The bucket's ready event is waited for on the current stream of the
            # bucket's device, which is where a copy out of it runs (torch copies between
            # devices on the source's current stream, synchronised with the destination's).
            bucket.wait_ready()
            if self._threads > 1 and len(plan) > 1 and self._device.type == "cpu":
                # FP8 -> float32 conversion is single-threaded in torch on CPU: spread the
                # bucket's tensors over a few threads (torch releases the GIL). CPU only,
                # so these threads need no device guard.
                with self._lock:
                    if self._pool is None:
                        self._pool = ThreadPoolExecutor(
                            self._threads, thread_name_prefix="weightpipe-local-prepare"
                        )
                    pool = self._pool
                staged = list(pool.map(self._prepare_one, plan))
            else:
                staged = [self._prepare_one(entry) for entry in plan]
            if self._device.type == "cuda":
                # The copies (and the sums) ran on this thread's current stream of the
                # engine's device; the bucket may be recycled once load returns.
                torch.cuda.current_stream(self._device).synchronize()
            try:
                self._check_finite(staged)
            except EngineError:
                with self._lock:
                    for entry in staged:
                        self._spare.setdefault(self._canonical[entry.name], entry.fresh)
                raise
        return staged

    def stage(self, updates: list[StagedTensor], version: int) -> None:
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
                for name, _, _ in updates:
                    if self._canonical[name] in self._staged:
                        refused = EngineError(self._engine, "loaded twice in one sync", tensor=name)
                        break
            if refused is not None:
                for name, fresh, _ in updates:
                    self._spare.setdefault(self._canonical[name], fresh)
                raise refused
            for name, fresh, _ in updates:
                self._staged[self._canonical[name]] = fresh
                self._tags[fresh.data_ptr()] = version
            self._loaded.update(self._canonical[name] for name, _, _ in updates)

    def check_commit(self, version: int) -> None:
        """Raise unless the open sync is the one of ``version`` and staged every parameter.

        Raises:
            EngineError: no sync of ``version`` is open, or it left parameters out (lists
                them; the sync stays open, for the caller to abort).
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
            EngineError: no sync of ``version`` is open (an abort came first), or it left
                parameters out (nothing is switched).
        """
        with self._lock:
            self._check_commit(version)
            params = self._params
            retired: dict[str, torch.Tensor] = {}
            with torch.no_grad():
                for name, fresh in self._staged.items():
                    retired[name] = params[name].data
                    params[name].data = fresh
            # Every parameter was staged (checked above); the loop also covers a tied
            # parameter staged under its other name.
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
        parameters = dict.fromkeys(self._canonical.values())
        missing = [name for name in parameters if name not in self._staged]
        if missing:
            shown = ", ".join(repr(name) for name in missing[:_LISTED])
            more = f" and {len(missing) - _LISTED} more" if len(missing) > _LISTED else ""
            raise EngineError(
                self._engine,
                f"cannot commit v{version}: the sync left out {len(missing)} of the "
                f"{len(parameters)} parameters ({shown}{more}); an incomplete sync would "
                "serve them stale under the new version",
                tensor=missing[0] if len(missing) == 1 else None,
            )

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
        planned: dict[str, str] = {}  # canonical name -> the name the bucket used
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
            canonical = self._canonical[name]
            if canonical in loaded:
                raise EngineError(self._engine, "loaded twice in one sync", tensor=name)
            if canonical in planned:
                raise EngineError(
                    self._engine,
                    f"appears twice in one bucket (also as {planned[canonical]!r}: tied weights "
                    "are one parameter)",
                    tensor=name,
                )
            planned[canonical] = name
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

    def _prepare_one(self, entry: PlannedWrite) -> StagedTensor:
        name, tensor, scale = entry
        with self._lock:
            fresh = self._spare.pop(self._canonical[name], None)
        if fresh is None:
            fresh = self._empty_like(self._params[name])
        sums: list[torch.Tensor] = []
        if scale is not None:
            weight, scale = self._to_device(tensor), self._to_device(scale)
            for rows, band in dequantized_bands(weight, scale, self._block, fresh.dtype, name):
                self._copy(fresh[rows], band)
                sums.append(fresh[rows].sum())
        else:
            # A copy, never the bucket's own storage: Fetch recycles its buffers.
            for rows in self._chunks(fresh):
                self._copy(fresh[rows], tensor[rows])
                sums.append(fresh[rows].sum())
        return StagedTensor(name, fresh, sums)

    def _chunks(self, fresh: torch.Tensor) -> Iterator[Rows]:
        """Bands of about ``CHUNK_BYTES`` on a CPU (see there); on a GPU, which has no
        cache to keep them in and pays per launch, the whole tensor at once."""
        row_bytes = fresh[0].nbytes if fresh.dim() > 0 and len(fresh) > 0 else 0
        if self._device.type != "cpu" or not row_bytes or fresh.nbytes <= CHUNK_BYTES:
            yield ...
            return
        rows = max(1, CHUNK_BYTES // row_bytes)
        for start in range(0, len(fresh), rows):
            yield slice(start, start + rows)

    def _check_finite(self, staged: list[StagedTensor]) -> None:
        """Raise for the first tensor holding NaN or Inf.

        A NaN or Inf makes its band's sum non-finite; a finite sum proves the band finite.
        A non-finite sum may also be an overflow of large finite values, so the tensor
        itself is searched before it is refused. One read of all the sums (on CUDA, after
        the stream was synchronised: no host wait of its own).
        """
        sums = [s for entry in staged for s in entry.sums]
        if not sums:
            return
        finite: list[bool] = torch.stack(sums).isfinite().tolist()
        start = 0
        for entry in staged:
            stop = start + len(entry.sums)
            if not all(finite[start:stop]):
                problem = _nonfinite(entry.fresh)
                if problem is not None:
                    raise EngineError(self._engine, problem, tensor=entry.name)
            start = stop

    # Seams for the fake CUDA layer (tests.fakes.cuda), as Fetch keeps: device memory
    # cannot be faked for real tensors, so a test routes these through its stand-ins.

    def _empty_like(self, param: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(param)

    def _copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        # On a CUDA engine the copy is queued on the current stream, which ``prepare``
        # synchronises before the bucket can be recycled. On a CPU engine it must block:
        # a non-blocking copy out of a CUDA bucket could still be running when the sum
        # (and the commit) read the storage.
        dst.copy_(src, non_blocking=self._device.type == "cuda")

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        # Blocking on a CPU engine for the same reason (``.to("cpu", non_blocking=True)``
        # of a CUDA tensor returns before its data has arrived).
        return tensor.to(self._device, non_blocking=self._device.type == "cuda")


_LISTED = 5
"""Names an incomplete sync's error lists before it says how many more."""


def _nonfinite(tensor: torch.Tensor) -> str | None:
    """What is not finite in ``tensor`` (counts and the first index), or ``None``."""
    bad = ~torch.isfinite(tensor)
    count = int(bad.sum())
    if not count:
        return None
    nans = int(torch.isnan(tensor).sum())
    first = int(bad.reshape(-1).nonzero()[0])
    index = [int(i) for i in torch.unravel_index(torch.tensor(first), tensor.shape)]
    return (
        f"holds {nans} NaN and {count - nans} Inf values (the first at {index}); "
        "a non-finite weight fails the sync"
    )


def dequantized_bands(
    weight: torch.Tensor,
    scale: torch.Tensor,
    block: tuple[int, int],
    dtype: torch.dtype,
    name: str,
) -> Iterator[tuple[Rows, torch.Tensor]]:
    """``dequantize_fp8(weight, scale)`` as ``dtype``, one band of ``block[0]`` rows at a
    time with its row of block scales, with the rows each band covers.

    Dequantisation is element-wise, so the bands together are bit for bit the one call's
    result: the float32 temporaries stay band-sized instead of weight-sized, which on a
    CPU costs less than page-faulting three weight-sized float32 tensors per weight.
    Other scale shapes come as one band (``...``).
    """
    banded = weight.dim() == 2 and tuple(scale.shape) == scale_shape(
        tuple(weight.shape), "block", block
    )
    if not banded:
        yield ..., dequantize_fp8(weight, scale, block=block, dtype=dtype, name=name)
        return
    rows = weight.shape[0]
    for band, start in enumerate(range(0, rows, block[0])):
        stop = min(start + block[0], rows)
        yield (
            slice(start, stop),
            dequantize_fp8(
                weight[start:stop], scale[band : band + 1], block=block, dtype=dtype, name=name
            ),
        )


def dequantize_into(
    out: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    block: tuple[int, int],
    name: str,
) -> None:
    """``out[...] = dequantize_fp8(weight, scale)``, one band at a time
    (``dequantized_bands``)."""
    for rows, band in dequantized_bands(weight, scale, block, out.dtype, name):
        out[rows].copy_(band)
