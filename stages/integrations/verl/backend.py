"""The trainer and transport side of verl: a checkpoint-engine backend named ``weightpipe``.

verl moves weights from actor rank 0 to every rollout worker through a
``CheckpointEngine``: per step the manager calls ``prepare`` on every worker,
``build_topology`` once, ``init_process_group`` on every worker, then the actor's
``send_weights`` beside each rollout worker's ``receive_weights`` (consumed by its server
adapter), then ``finalize``. This backend runs ``send_weights`` as a weightpipe pipeline:
``Fetch`` (byte-bounded flat buckets; H2D on its own stream on GPU) -> optional
trainer-side ``Fp8Quantize`` (verl's FP8 arithmetic by default, as the updater) ->
``DistributedSender`` (one torch.distributed broadcast per bucket: NCCL on GPU, gloo on
CPU), all three overlapped through bounded channels, and
returns a metrics dict verl merges into the trainer's metrics. ``receive_weights``
yields tensors that are views of a fresh buffer per bucket, so they are owned: nothing is
overwritten behind the consumer. The group is built beside verl's own default group
(``open_update_group``), so the trainer's FSDP group and the rollout's are untouched.
Importing this module registers the backend.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import AsyncGenerator, Iterable, Iterator
from typing import Any

import anyio
import anyio.to_thread
import torch
from verl.checkpoint_engine.base import CheckpointEngine, CheckpointEngineRegistry

from weightpipe.pipeline import Pipeline, RunReport, StageError
from weightpipe.stages.bucket import WeightBucket
from weightpipe.stages.engines.base import WireSpec
from weightpipe.stages.engines.sglang.distributed import close_update_group, open_update_group
from weightpipe.stages.fetch import Fetch
from weightpipe.stages.fp8 import Fp8Arithmetic
from weightpipe.stages.integrations.verl.updater import drain, quantize_stage
from weightpipe.stages.sources import named_tensors
from weightpipe.stages.transport import DistributedReceiver, DistributedSender

__all__ = ["WeightpipeCheckpointEngine", "sync_metrics"]

_PREFIX = "weightpipe"


def _node_address() -> str:
    try:
        import ray

        if ray.is_initialized():
            return str(ray.util.get_node_ip_address()).strip("[]")
    except ImportError:  # pragma: no cover - verl always has ray
        pass
    return socket.gethostbyname(socket.gethostname())


def _free_port(address: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((address, 0))
        return int(probe.getsockname()[1])


def sync_metrics(
    run: RunReport, *, bytes_sent: int, buckets: int, seconds: float
) -> dict[str, float]:
    """verl-style metrics of one ``send_weights``: totals, then busy/blocked time per stage.

    Keys: ``weightpipe/bytes``, ``weightpipe/buckets``, ``weightpipe/seconds``,
    ``weightpipe/gb_per_s`` (1e9 bytes), and for each stage and the broadcast
    (``send``) ``weightpipe/<stage>/busy_s``, ``.../blocked_s`` (waiting to hand an item
    on: the next stage was the bottleneck) and ``.../starved_s`` (waiting for input).
    """
    metrics: dict[str, float] = {
        f"{_PREFIX}/bytes": float(bytes_sent),
        f"{_PREFIX}/buckets": float(buckets),
        f"{_PREFIX}/seconds": seconds,
        f"{_PREFIX}/gb_per_s": bytes_sent / seconds / 1e9 if seconds > 0 else 0.0,
    }
    for stage in run.stages:
        metrics[f"{_PREFIX}/{stage.name}/busy_s"] = stage.busy_s
        metrics[f"{_PREFIX}/{stage.name}/blocked_s"] = stage.blocked_s
        metrics[f"{_PREFIX}/{stage.name}/starved_s"] = stage.starved_s
    metrics[f"{_PREFIX}/send/busy_s"] = run.sink_s
    return metrics


def _next_bucket(buckets: Iterator[WeightBucket]) -> WeightBucket | None:
    return next(buckets, None)


@CheckpointEngineRegistry.register("weightpipe")
class WeightpipeCheckpointEngine(CheckpointEngine):  # type: ignore[misc]
    """verl checkpoint engine: weightpipe pipelines into a torch.distributed broadcast.

    Built by verl as ``CheckpointEngineRegistry.new("weightpipe", bucket_size=...,
    is_master=..., **engine_kwargs["weightpipe"])``.

    Args:
        bucket_size: bytes per broadcast bucket (verl's
            ``update_weights_bucket_megabytes << 20``).
        is_master: this worker is actor rank 0, the one that sends and hosts the
            group's rendezvous.
        device: ``"auto"`` (CUDA when available: NCCL; else CPU: gloo), ``"cpu"`` or a
            CUDA device.
        master_address: the address rank 0 hosts the rendezvous on (default: the Ray
            node's IP); it must be reachable from every rollout worker.
        timeout_s: limit on the rendezvous and on every collective.
        depth: channel depth between the send pipeline's stages.
        quantization_config: quantize on the trainer (the SGLang FP8 config, as for the
            updater): FP8 crosses the wire instead of bf16, and the rollout's updater
            passes FP8 tensors through unchanged.
        quantize_workers: buckets quantized concurrently on the trainer.
        fp8_arithmetic: ``"verl"`` or ``"sglang"``; None (default): verl's wherever its
            quantizer applies, as in the updater (``default_fp8_arithmetic``).
        group_name: the process group's name (distinct per concurrent engine).

    Raises:
        ValueError: a bad ``bucket_size`` or ``quantization_config``.
    """

    wire_format = "named_tensors"

    def __init__(
        self,
        bucket_size: int,
        is_master: bool = False,
        *,
        device: str = "auto",
        master_address: str | None = None,
        timeout_s: float = 300.0,
        depth: int = 2,
        quantization_config: dict[str, Any] | None = None,
        quantize_workers: int = 1,
        group_name: str = "weightpipe",
        fp8_arithmetic: Fp8Arithmetic | None = None,
    ) -> None:
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.bucket_size = bucket_size
        self.is_master = is_master
        self.master_address = master_address
        self.timeout_s = timeout_s
        self.depth = depth
        self.group_name = group_name
        self.quantize = (
            quantize_stage(quantization_config, workers=quantize_workers, arithmetic=fp8_arithmetic)
            if quantization_config is not None
            else None
        )
        # The broadcast needs one contiguous buffer per bucket: the last stage before it
        # writes one (Fetch when it is alone, else the quantizer), and the sender sends
        # that buffer as it is. Fetch ahead of the quantizer passes views (one pass).
        self.fetch = Fetch(
            bucket_size, device=self.device, flatten=True if self.quantize is None else "auto"
        )
        if self.quantize is not None:
            self.quantize.use_wire(WireSpec())
        self.rank: int | None = None
        self.world_size: int | None = None
        self._group: Any = None
        self._version = 0

    # -- verl's per-step contract ------------------------------------------------------

    def prepare(self) -> dict[str, Any]:
        """Rank 0's rendezvous endpoint (``master_address``, ``master_port``); ``{}`` elsewhere."""
        if not self.is_master:
            return {}
        address = self.master_address or _node_address()
        return {"master_address": address, "master_port": _free_port(address)}

    @classmethod
    def build_topology(
        cls, actor_wg_world_size: int, rollout_world_size: int, metadata: list[dict[str, Any]]
    ) -> tuple[dict[str, list[Any]], dict[str, list[Any]]]:
        """Actor rank 0 is group rank 0; other actor workers sit out (-1); rollouts 1..N.

        ``metadata`` is every worker's ``prepare()``, actor workers first.

        Raises:
            ValueError: actor rank 0 is not the master (its metadata has no endpoint).
        """
        master = metadata[0] if metadata else {}
        if not isinstance(master, dict) or "master_port" not in master:
            raise ValueError(
                "weightpipe checkpoint engine: actor rank 0 must be built with is_master=True "
                f"(its prepare() returned {master!r})"
            )
        world_size = 1 + rollout_world_size
        endpoint = {
            "master_address": master["master_address"],
            "master_port": master["master_port"],
        }
        actor = {
            "rank": [0] + [-1] * (actor_wg_world_size - 1),
            "world_size": [world_size] * actor_wg_world_size,
            **{k: [v] * actor_wg_world_size for k, v in endpoint.items()},
        }
        rollout = {
            "rank": list(range(1, world_size)),
            "world_size": [world_size] * rollout_world_size,
            **{k: [v] * rollout_world_size for k, v in endpoint.items()},
        }
        return actor, rollout

    def init_process_group(
        self, rank: int, world_size: int, master_address: str, master_port: int
    ) -> None:
        """Join the broadcast group (blocks until every rank joined); rank -1 sits out.

        Raises:
            RuntimeError: the rendezvous failed or timed out.
        """
        self.rank = rank
        self.world_size = world_size
        if rank < 0:
            return
        if self._group is not None:
            self.finalize()
        self._group = open_update_group(
            backend="nccl" if self.device.type == "cuda" else "gloo",
            master_address=master_address,
            master_port=int(master_port),
            world_size=world_size,
            rank=rank,
            group_name=self.group_name,
            timeout_s=self.timeout_s,
        )

    def finalize(self) -> None:
        """Destroy the group (the next step builds a new one on a fresh port)."""
        group, self._group = self._group, None
        if group is not None:
            close_update_group(group)

    # -- transfer ----------------------------------------------------------------------

    async def send_weights(
        self, weights: Iterable[Any], global_steps: int | None = None
    ) -> dict[str, float]:
        """Stream ``weights`` to every rollout worker; returns the sync's metrics.

        Ranks outside the group walk the stream (producing it is collective over the
        actor group) and return ``{}``.

        Raises:
            RuntimeError: ``init_process_group`` was not called, or a rollout rank sends.
            StageError: fetching, quantizing or a broadcast failed (names the stage and
                bucket); the receivers are told to abort (best effort).
        """
        if self.rank is None:
            raise RuntimeError("weightpipe checkpoint engine: call init_process_group first")
        if self.rank < 0:
            await drain(weights)
            return {}
        if self.rank != 0 or self._group is None:
            raise RuntimeError(f"weightpipe checkpoint engine: rank {self.rank} does not send")
        self._version = int(global_steps) if global_steps is not None else self._version + 1
        self.fetch.version = self._version
        stages: list[Any] = [self.fetch]
        if self.quantize is not None:
            stages.append(self.quantize)
        sender = DistributedSender(self._group, src=0, timeout_s=self.timeout_s, device=self.device)
        started = time.perf_counter()
        try:
            run = await Pipeline(stages, self.depth).run(named_tensors(weights), sink=sender)
        except StageError as exc:
            if exc.phase != "sink":
                # Upstream failed with the link healthy: tell the receivers, so they raise
                # now instead of at their timeout. A failed broadcast means a broken link.
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(self._abort, sender, str(exc))
            raise
        seconds = time.perf_counter() - started
        return sync_metrics(
            run, bytes_sent=sender.bytes_sent, buckets=sender.buckets_sent, seconds=seconds
        )

    def _abort(self, sender: DistributedSender, reason: str) -> None:
        # Best effort: if it fails, the receivers' own timeout still ends their wait.
        with contextlib.suppress(Exception):
            sender.abort(reason[:500], bucket=sender.buckets_sent, version=self._version)

    async def receive_weights(
        self, global_steps: int | None = None
    ) -> AsyncGenerator[tuple[str, torch.Tensor], None]:
        """Yield one sync's ``(name, tensor)`` pairs; each bucket is a fresh buffer (owned).

        Broadcasts block, so each bucket is received in a worker thread; the next one is
        received only when the consumer asks for a tensor past the current bucket.

        Raises:
            RuntimeError: ``init_process_group`` was not called on a receiving rank.
            TransportError: a broadcast failed or timed out, or the sender aborted.
        """
        if self._group is None or self.rank is None or self.rank < 1:
            raise RuntimeError(
                f"weightpipe checkpoint engine: rank {self.rank} has no group to receive on"
            )
        receiver = DistributedReceiver(
            self._group, src=0, timeout_s=self.timeout_s, device=self.device
        )
        buckets = receiver.buckets()
        try:
            while True:
                bucket = await anyio.to_thread.run_sync(_next_bucket, buckets)
                if bucket is None:
                    return
                for pair in bucket.tensors:
                    yield pair
        finally:
            close = getattr(buckets, "close", None)  # a generator: release it now
            if callable(close):
                close()
