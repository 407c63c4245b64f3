"""SGLangDistributedEngine: weights to SGLang through a torch.distributed update group.

The cross-node path. The trainer is rank 0 of a process group that SGLang's TP ranks join
(``init_weights_update_group``: the trainer hosts the TCP rendezvous at
``master_address:master_port``, the engine's ranks take ranks ``rank_offset ..``). Per
bucket the trainer announces names, dtypes and shapes (``update_weights_from_distributed``)
and, at the same time, broadcasts the data from rank 0; SGLang allocates the receive
buffers from the announcement, so the announcement and the broadcast must describe the
same bytes in the same order. With ``load_format="flattened_bucket"`` (default) the whole
bucket is one uint8 broadcast laid out as SGLang's ``FlattenedTensorBucket.empty`` lays it
out: back to back, no padding, so the bucket is sent ordered by element size, largest first,
which keeps every start aligned. With ``load_format=None`` each tensor is its own
broadcast in its own dtype (the backend must support every dtype: NCCL does, gloo lacks
FP8). Sessions, the cache flush, the version and pause/resume are the control engine's
(``SGLangHTTPEngine`` or the in-process ``SGLangEngine``), and the group's own calls go
through that engine's ``SGLangClient``. No deadline is set here: Load gives every call one
(``default_timeout_s`` 600 s by default); ``timeout_s`` is torch's limit on the group's
rendezvous and collectives.

Devices and abandoned broadcasts. The broadcast device is resolved to an index once, at
construction, and every worker-thread section runs under it (a thread's current device is
its own, 0 in a new one). On CUDA, NCCL enqueues a broadcast that completes only when
every rank joined; a receiver that refused the bucket never joins. So the broadcast, its
buffer and the wait for it live on the engine's own side stream, never the device's
default stream (the trainer's kernels never queue behind it), and the worker thread polls
an event recorded after it instead of ``synchronize()``: when the announcement fails (or
Load's deadline cancels the bucket) the thread is told, stops waiting, and the group's
communicator is aborted (``ProcessGroup.abort``), which ends the queued NCCL kernel. On
gloo (CPU) nothing can end it (gloo's abort returns and the broadcast goes on): it blocks
its worker thread until the group's timeout, or until a peer's process exits. Either way
a group that saw a failed, refused or abandoned broadcast is unusable (its peers disagree
on what was sent), so it is never waited for: the next ``begin`` asks the engine to drop
it (best effort) and builds a new group under a fresh name (``{group_name}_r{n}``) on a
fresh port, which also lets a restarted receiving rank join. A group whose rendezvous
failed (refused, unanswered or cancelled) is never reused either: its thread may still
hold the port, and the engine may yet join it. The old group is kept aside and destroyed
only once no worker thread is left in it, at a
later ``begin`` or ``close``; neither waits for that.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Literal, Protocol

import anyio
import anyio.to_thread
import torch
import torch.distributed as dist

from weightpipe.pipeline import leaf_exceptions
from weightpipe.stages._layout import flatten
from weightpipe.stages.bucket import WeightBucket
from weightpipe.stages.dtypes import dtype_name
from weightpipe.stages.engines.base import EngineError, PauseMode, SyncSettings
from weightpipe.stages.engines.sglang import wire as wire
from weightpipe.stages.engines.sglang.client import SGLangClient, launch_mismatch

__all__ = [
    "DistributedControl",
    "SGLangDistributedEngine",
    "abort_update_group",
    "open_update_group",
    "resolve_device",
]

log = logging.getLogger(__name__)

DistributedLoadFormat = Literal["flattened_bucket"] | None


class DistributedControl(Protocol):
    """The control plane a distributed sync drives: an SGLang adapter of this package
    (``SGLangHTTPEngine`` or ``SGLangEngine``), whose client carries the group's calls."""

    name: str
    client: SGLangClient

    async def begin(self, version: int) -> None: ...
    async def commit(self, version: int) -> None: ...
    async def abort(self, version: int) -> None: ...
    async def version(self) -> int | None: ...
    async def pause(self, mode: PauseMode) -> None: ...
    async def resume(self) -> None: ...


def open_update_group(
    *,
    backend: str,
    master_address: str,
    master_port: int,
    world_size: int,
    rank: int,
    group_name: str,
    timeout_s: float,
) -> Any:
    """Join (rank 0: host) the update group the way SGLang's receiving ranks build theirs.

    SGLang's ranks call torch's TCP rendezvous, wrap the store in ``PrefixStore(group_name)``
    and build the group with torch's ``_new_process_group_helper`` so that it is not the
    default group. The store keys both sides write must match exactly, so this side uses
    the same torch pieces (a private torch helper: the only way to build a non-default
    group from an explicit store without joining a default group first). Blocks until all
    ``world_size`` ranks joined or ``timeout_s`` passed.

    Raises:
        RuntimeError: the rendezvous or the group failed (port in use, timeout, peers gone).
    """
    from torch.distributed import distributed_c10d as c10d

    timeout = timedelta(seconds=timeout_s)
    rendezvous: Any = c10d.rendezvous  # type: ignore[attr-defined]
    store, rank, world_size = next(
        rendezvous(f"tcp://{master_address}:{master_port}", rank, world_size, timeout=timeout)
    )
    store.set_timeout(timeout)
    store = c10d.PrefixStore(group_name, store)
    helper: Any = c10d._new_process_group_helper
    options = (
        "backend_options"
        if "backend_options" in inspect.signature(helper).parameters
        else "pg_options"
    )
    pg, _ = helper(
        world_size,
        rank,
        [],
        dist.Backend(backend),
        store,
        group_name=group_name,
        timeout=timeout,
        **{options: None},
    )
    c10d._world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


def close_update_group(pg: Any) -> None:
    """Destroy a group made by ``open_update_group`` (best effort)."""
    try:
        dist.destroy_process_group(pg)
    except Exception as exc:  # teardown must not mask the error that led here
        log.warning("destroying the update group failed: %s", exc)


def abort_update_group(pg: Any) -> None:
    """Abort a group's communicator so that a collective left queued on it ends (NCCL's
    ``ncclCommAbort``); best effort, since not every backend can (gloo cannot)."""
    try:
        pg.abort()
    except Exception as exc:  # an abort is the last resort of a failing path
        log.warning("aborting the update group failed: %s", exc)


def _broadcast(pg: Any, tensor: torch.Tensor) -> None:
    """Broadcast from rank 0. On NCCL ``wait()`` returns at once and orders the current
    stream after the collective; on gloo it blocks until the collective is done."""
    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    opts.rootTensor = 0
    pg.broadcast([tensor], opts).wait()


def resolve_device(device: str | torch.device | None, backend: str) -> torch.device:
    """The broadcast device, resolved once: None is cuda for NCCL, else cpu; an unindexed
    ``"cuda"`` is the calling thread's current device (under torchrun: the rank's, once it
    called ``set_device``), never re-read from a worker thread later."""
    default = "cuda" if backend == "nccl" else "cpu"
    resolved = torch.device(device if device is not None else default)
    if resolved.type == "cuda" and resolved.index is None:
        resolved = torch.device("cuda", torch.cuda.current_device())
    return resolved


class SGLangDistributedEngine:
    """SGLang fed through a torch.distributed update group; this process is rank 0.

    Args:
        control: the SGLang adapter that carries the control calls (HTTP or in-process).
        master_address: where this process hosts the group's rendezvous (reachable from
            the engine's nodes).
        master_port: a free port on ``master_address`` for the first group; a rebuilt
            group takes a port the OS reports free there (``self.master_port`` is the
            current one's).
        engine_ranks: how many engine ranks join (the server's TP size times its DP size);
            the group's world size is ``1 + engine_ranks``.
        group_name: the first group's name on both sides (a rebuilt group is
            ``{group_name}_r{n}``; ``self.group_name`` is the current one's).
        backend: ``nccl`` on GPUs, ``gloo`` on CPUs (default: nccl when CUDA is available).
        load_format: ``"flattened_bucket"`` (one broadcast per bucket) or None (one per
            tensor).
        device: where broadcast buffers live (default: cuda for nccl, else cpu). An
            unindexed ``"cuda"`` is resolved here, once, to the constructing thread's
            current device; every send runs under that device, in whichever thread.
        timeout_s: torch's limit on the group's rendezvous and on every broadcast (on
            CUDA also the longest the worker thread waits for one), and
            ``default_timeout_s`` (Load's deadline for every call unless Load sets one).
    """

    name = "sglang_distributed"
    default_timeout_s: float = 600.0

    def __init__(
        self,
        control: DistributedControl,
        *,
        master_address: str,
        master_port: int,
        engine_ranks: int = 1,
        group_name: str = "weight_update_group",
        backend: str | None = None,
        load_format: DistributedLoadFormat = "flattened_bucket",
        device: str | torch.device | None = None,
        timeout_s: float = 600.0,
    ) -> None:
        if engine_ranks < 1:
            raise ValueError(f"engine_ranks must be >= 1, got {engine_ranks}")
        if load_format not in ("flattened_bucket", None):
            raise ValueError(f"load_format must be 'flattened_bucket' or None, got {load_format!r}")
        self.control = control
        self.master_address = master_address
        self.master_port = master_port
        self.world_size = 1 + engine_ranks
        self.group_name = group_name
        self.backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        self.load_format: DistributedLoadFormat = load_format
        self.device = resolve_device(device, self.backend)
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.timeout_s = timeout_s
        self.default_timeout_s = timeout_s
        self._group: Any = None
        self._group_broken = False
        self._base_group_name = group_name
        self._rebuilds = 0
        # Set while no worker-thread section runs on the current group; a broken group
        # is destroyed only once it is set (destroying it under a blocked gloo broadcast
        # would block until the group's timeout).
        self._idle = threading.Event()
        self._idle.set()
        self._abandoned: list[_Abandoned] = []
        self._engine_groups_to_drop: list[str] = []
        self._stream: Any = None  # the side stream broadcasts run on (CUDA only)
        self._stream_lock = threading.Lock()

    async def check_launch_settings(self, sync: SyncSettings) -> None:
        """Refuse, before anything changes on the server, a sync its args say cannot fit
        (``ChecksLaunchSettings``): every TP rank of the server joins the update group (as
        rank ``1 + tp_rank``), so ``engine_ranks`` must be the ``tp_size`` it reports, or
        the rendezvous waits for ranks that never come until ``timeout_s``; and FP8
        weights for a server launched with a quantization that holds none
        (``client.launch_mismatch``). Settings the server does not report are not checked.

        Raises:
            EngineError: the sync disagrees with the server's args (names both values).
        """
        info = await self.control.client.server_args()
        if not info:
            return
        engine_ranks = self.world_size - 1
        reported = info.get("tp_size")
        if (
            isinstance(reported, int)
            and not isinstance(reported, bool)
            and reported != engine_ranks
        ):
            raise EngineError(
                self.name,
                "refusing the sync before touching the server: the server reports "
                f"tp_size={reported}, so {reported} ranks join the update group, but this "
                f"engine was built with engine_ranks={engine_ranks}: build it with "
                f"engine_ranks={reported}",
            )
        # tp_size (where reported) is engine_ranks by now: what is left is quantization.
        why = launch_mismatch(engine_ranks, info, sync)
        if why is not None:
            raise EngineError(self.name, f"refusing the sync before touching the server: {why}")

    # -- the group -------------------------------------------------------------------

    async def open(self) -> None:
        """Create the update group: this process and the engine's ranks join together.

        A failed attempt (refused, unanswered, or cancelled by Load's deadline) leaves its
        rendezvous behind: this side's thread blocks in it until ``timeout_s`` and keeps
        its port bound, and an engine whose init was carried out may yet join it. So the
        next attempt takes a fresh name and port, a group that forms after its attempt
        gave up is destroyed by its own thread, and the engine is asked to drop the old
        name (best effort) unless it refused the init.

        Raises:
            EngineError: the engine refused or the group could not form.
        """
        self._reap()
        if self._group is not None and not self._group_broken:
            return
        if self._group is not None:
            await self._abandon()
        await self._drop_engine_groups()
        attempt = _Joining()
        refused = False

        def join() -> None:
            pg = open_update_group(
                backend=self.backend,
                master_address=self.master_address,
                master_port=self.master_port,
                world_size=self.world_size,
                rank=0,
                group_name=self.group_name,
                timeout_s=self.timeout_s,
            )
            with attempt.lock:
                attempt.group = pg
                late = attempt.given_up
            if late:  # formed after open gave up on it: nobody else will destroy it
                close_update_group(pg)

        async def init() -> None:
            nonlocal refused
            try:
                await self.control.client.init_weights_update_group(
                    self.master_address,
                    self.master_port,
                    1,
                    self.world_size,
                    self.group_name,
                    self.backend,
                )
            except EngineError as exc:
                refused = not exc.unanswered
                raise

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(init)
                # Abandoned on cancellation: the rendezvous cannot be interrupted.
                await anyio.to_thread.run_sync(join, abandon_on_cancel=True)
        except BaseException as exc:
            with attempt.lock:
                attempt.given_up = True
                formed = attempt.group
            if formed is not None:
                close_update_group(formed)
            name = self._retire_name("its update group did not form")
            if not refused:
                self._engine_groups_to_drop.append(name)
            error = _engine_error(exc, self.name, "the update group did not form", ())
            if error is exc:
                raise
            raise error from exc
        assert attempt.group is not None
        self._group = attempt.group
        self._group_broken = False
        self._idle = threading.Event()
        self._idle.set()

    def _retire_name(self, why: str) -> str:
        """Move the next group to a fresh name (``{group_name}_r{n}``) and port; returns
        the old name."""
        name = self.group_name
        self._rebuilds += 1
        self.group_name = f"{self._base_group_name}_r{self._rebuilds}"
        self.master_port = _free_port(self.master_address)
        log.warning(
            "%s: %s (%r); the next is %r on port %d",
            self.name,
            why,
            name,
            self.group_name,
            self.master_port,
        )
        return name

    async def _drop_engine_groups(self) -> list[str]:
        """Ask the engine to destroy the groups set aside (best effort; a rank that was
        restarted no longer has them), each wait bounded by half of what the caller's
        deadline leaves, so that a new group keeps time to form. Returns the names whose
        destruction the engine did not confirm."""
        names, self._engine_groups_to_drop = self._engine_groups_to_drop, []
        unconfirmed = []
        for name in names:
            deadline = anyio.current_effective_deadline()
            left_s = max(deadline - anyio.current_time(), 0.0)
            wait_s = math.inf if math.isinf(deadline) else left_s / 2
            failure = f"no answer within {wait_s:.3g} s"
            with anyio.move_on_after(wait_s):
                try:
                    await self.control.client.destroy_weights_update_group(name)
                    continue
                except EngineError as exc:
                    failure = str(exc)
            unconfirmed.append(name)
            log.warning("%s: destroying the engine's group %r failed: %s", self.name, name, failure)
        return unconfirmed

    async def _abandon(self) -> None:
        """Set the broken group aside and pick a fresh name and port for the next one.

        The engine is asked to drop its side (by ``open``); this side is destroyed by
        ``_reap`` once its worker thread ended.
        """
        group, idle = self._group, self._idle
        self._group = None
        name = self._retire_name("the update group is unusable after a failed broadcast")
        self._abandoned.append(_Abandoned(group, name, idle))
        self._engine_groups_to_drop.append(name)
        self._reap()  # an aborted NCCL group's thread has usually ended by now

    def _reap(self) -> None:
        """Destroy the abandoned groups no worker thread is in any more (never waits)."""
        pending = []
        for old in self._abandoned:
            if old.idle.is_set():
                close_update_group(old.group)
            else:
                pending.append(old)
        self._abandoned = pending

    async def close(self) -> None:
        """Destroy the group on both sides (best effort; under a caller's deadline the
        engine's answer is waited for half of what it leaves; a later ``open`` builds the
        next group under a fresh name and port unless the engine confirmed). Abandoned
        groups whose broadcast still blocks a worker thread are left to end at their own
        timeout."""
        self._reap()
        for old in self._abandoned:
            log.warning(
                "%s: group %r still has a broadcast blocked until its timeout; not destroyed",
                self.name,
                old.name,
            )
        group, self._group = self._group, None
        if group is not None:
            self._engine_groups_to_drop.append(self.group_name)
        unconfirmed = await self._drop_engine_groups()
        if group is None:
            return
        if self.group_name in unconfirmed:  # the engine may still hold it: never reuse it
            self._retire_name("the engine did not confirm destroying the update group")
        if self._idle.is_set():
            close_update_group(group)
        else:
            self._abandoned.append(_Abandoned(group, self.group_name, self._idle))

    async def aclose(self) -> None:
        await self.close()

    # -- Engine protocol -------------------------------------------------------------

    async def begin(self, version: int) -> None:
        """Form the group if needed, then the control engine's begin (session).

        Raises:
            EngineError: the group could not form or the session was refused.
        """
        await self.open()
        await self.control.begin(version)

    def _device_guard(self) -> contextlib.AbstractContextManager[Any]:
        """Select the engine's device for a worker-thread section (no-op on CPU)."""
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        return torch.cuda.device(self.device.index)

    def _side_stream(self) -> Any:
        with self._stream_lock:
            if self._stream is None:
                self._stream = torch.cuda.Stream(device=self.device)  # type: ignore[no-untyped-call]
            return self._stream

    def _send(
        self,
        bucket: WeightBucket,
        tensors: list[tuple[str, torch.Tensor]],
        abandoned: threading.Event,
        producer: Any = None,
    ) -> None:
        """Broadcast one bucket (worker thread), under the engine's device.

        ``producer``: for a bucket without a ready event, the stream its tensors were
        made on (the caller's current stream), which the side stream orders itself after.

        Raises:
            EngineError: a broadcast failed, did not finish within ``timeout_s``, or the
                bucket was given up (``abandoned`` set) before it finished.
        """
        with self._device_guard():
            if self.device.type != "cuda":
                bucket.wait_ready()
                self._broadcast_all(tensors, abandoned)
                return
            stream = self._side_stream()
            with torch.cuda.stream(stream):
                # The producer's work, ordered on the device (the host never waits).
                if bucket.ready is not None:
                    bucket.wait_ready(stream)
                elif producer is not None:
                    stream.wait_stream(producer)
                self._broadcast_all(tensors, abandoned)
                done = torch.cuda.Event()  # type: ignore[no-untyped-call]
                done.record(stream)
            self._wait_for(done, abandoned)

    def _broadcast_all(
        self, tensors: list[tuple[str, torch.Tensor]], abandoned: threading.Event
    ) -> None:
        if self.load_format == "flattened_bucket":
            # Packed (align 1) as SGLang's receiver allocates it: distributed_order made
            # every start a multiple of its itemsize, so no padding is inserted. Host
            # tensors are copied straight into the device buffer (on the current stream).
            _broadcast(self._group, self._flatten(tensors))
            return
        for name, t in tensors:
            if abandoned.is_set():
                raise EngineError(self.name, "the bucket was given up", tensor=name)
            try:
                _broadcast(self._group, t.detach().to(self.device).contiguous())
            except Exception as exc:
                raise EngineError(
                    self.name,
                    f"broadcasting {t.dtype} {tuple(t.shape)} over {self.backend} failed: "
                    f"{type(exc).__name__}: {exc}",
                    tensor=name,
                ) from exc

    def _flatten(self, tensors: list[tuple[str, torch.Tensor]]) -> torch.Tensor:
        """The bucket packed into one new buffer on the engine's device, copied on the
        current stream (a seam: ``tests.fakes.cuda`` stands a host tensor in for it)."""
        buffer, _ = flatten(tensors, 1, device=self.device)
        return buffer

    def _wait_for(self, done: Any, abandoned: threading.Event) -> None:
        """Wait for ``done`` without ``synchronize()``: a broadcast whose receiver never
        joins never completes, and a thread blocked in it could not be told to stop."""
        deadline = time.monotonic() + self.timeout_s
        pause_s = 1e-4
        while not done.query():
            if abandoned.is_set():
                raise EngineError(self.name, "the bucket was given up before its broadcast ended")
            if time.monotonic() > deadline:
                raise EngineError(
                    self.name, f"the broadcast did not finish within timeout_s={self.timeout_s}"
                )
            abandoned.wait(pause_s)  # returns at once when the bucket is given up
            pause_s = min(pause_s * 2, 5e-3)

    async def load(self, bucket: WeightBucket) -> None:
        """Announce the bucket and broadcast it; both finish before this returns.

        Raises:
            EngineError: the engine refused (naming the tensor when it does) or the
                broadcast failed; the group's communicator is then aborted (so a queued
                broadcast ends) and a new group is built at the next ``begin``.
        """
        if not bucket.tensors:
            return
        if self._group is None:
            raise EngineError(self.name, "load() before begin(): no update group")
        tensors = list(bucket.tensors)
        if self.load_format == "flattened_bucket":
            tensors = wire.distributed_order(tensors)
        names = [n for n, _ in tensors]
        abandoned = threading.Event()
        producer = None
        if self.device.type == "cuda" and bucket.ready is None:
            # No event: the tensors were made on this thread's current stream.
            producer = torch.cuda.current_stream(self.device)
        idle = self._idle

        def send() -> None:
            idle.clear()
            try:
                self._send(bucket, tensors, abandoned, producer)
            finally:
                idle.set()

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(
                    self.control.client.update_weights_from_distributed,
                    names,
                    [dtype_name(t.dtype) for _, t in tensors],
                    [list(t.shape) for _, t in tensors],
                    self.group_name,
                    self.load_format,
                )
                # No limiter: an abandoned broadcast (its receiver refused, or Load's
                # deadline passed) must not hold up the group's rebuild.
                await anyio.to_thread.run_sync(send, abandon_on_cancel=True)
        except BaseException as exc:
            # A broadcast without its receiver (or the reverse) leaves the group unusable:
            # end the worker's wait and abort the communicator, so nothing stays queued.
            abandoned.set()
            self._group_broken = True
            abort_update_group(self._group)
            error = _engine_error(exc, self.name, f"broadcasting {bucket.describe()} failed", names)
            if error is exc:
                raise
            raise error from exc

    async def commit(self, version: int) -> None:
        """The control engine's commit (end session, flush once, set the version).

        Raises:
            EngineError: a step failed; the version stays the old one.
        """
        await self.control.commit(version)

    async def abort(self, version: int) -> None:
        """The control engine's abort (best effort); the version stays the old one."""
        await self.control.abort(version)

    async def version(self) -> int | None:
        """The engine's weight version, from the control engine."""
        return await self.control.version()

    async def pause(self, mode: PauseMode) -> None:
        """Pause through the control engine.

        Raises:
            EngineError: the engine refused.
        """
        await self.control.pause(mode)

    async def resume(self) -> None:
        """Resume through the control engine.

        Raises:
            EngineError: the engine refused.
        """
        await self.control.resume()


@dataclass(eq=False)
class _Joining:
    """One attempt to form the group: the group once its thread formed it, and whether
    ``open`` gave up on the attempt (then the thread destroys a group formed late)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    group: Any = None
    given_up: bool = False


@dataclass(frozen=True)
class _Abandoned:
    """A group set aside after a failed broadcast: destroyed once ``idle`` is set."""

    group: Any
    name: str
    idle: threading.Event


def _free_port(address: str) -> int:
    """A TCP port the OS reports free on ``address`` (the rendezvous binds it at once).

    Raises:
        EngineError: no port could be bound there.
    """
    try:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.bind((address, 0))
            return int(sock.getsockname()[1])
    except OSError as exc:
        raise EngineError(
            "sglang_distributed", f"no free port on {address} for a new update group: {exc}"
        ) from exc


def _engine_error(
    exc: BaseException, engine: str, what: str, names: list[str] | tuple[()]
) -> BaseException:
    """What a failed task group of this engine raises: the ``EngineError`` inside it (the
    engine's own refusal says most), else one naming ``what`` and the first failure; a
    cancellation or a KeyboardInterrupt among the failures is kept as it is."""
    leaves = leaf_exceptions(exc)
    error = next((leaf for leaf in leaves if isinstance(leaf, EngineError)), None)
    if error is not None:
        return error
    if not all(isinstance(leaf, Exception) for leaf in leaves):
        return exc
    first = leaves[0]
    return EngineError(
        engine,
        f"{what}: {type(first).__name__}: {first}",
        tensor=wire.tensor_named_in(str(first), names),
    )
