"""torch.distributed transport: buckets from a trainer rank to rollout ranks.

The trainer side (``DistributedSender``) is a pipeline sink: ``Pipeline([Fetch(...)])``
bucket the weights, and the sender broadcasts each bucket to every rank of a process
group. Per bucket it sends the metadata first (index, version, is_last, and every
tensor's name, dtype, shape and byte offset, as JSON: no pickle crosses the wire), then
one broadcast of the flattened uint8 buffer. The rollout side (``DistributedReceiver``,
``distributed_source``) rebuilds each bucket as views of the received buffer and yields
buckets or ``(name, tensor)`` pairs that feed the rollout's own pipeline. The layout is
the one ``_bucketing`` defines, so a Fetch bucket travels without being repacked.

gloo carries CPU tensors, NCCL CUDA tensors; the device follows the group's backend.
Every collective is waited on with ``timeout_s`` (the group's own timeout applies as
well, so create it with ``timeout=timedelta(...)``), and every failure raises
``TransportError`` naming the bucket. A sender that fails mid-sync can ``abort()`` so
receivers raise instead of waiting for a bucket that never comes.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Iterator
from datetime import timedelta
from typing import Any

import anyio
import anyio.to_thread
import torch
import torch.distributed as dist

from weightpipe.stages._layout import (
    BucketPlanner,
    TensorLayout,
    flatten,
    tensor_alignment,
    unflatten,
)
from weightpipe.stages.bucket import WeightBucket
from weightpipe.stages.dtypes import dtype_from_name, dtype_name

__all__ = [
    "DistributedReceiver",
    "DistributedSender",
    "TransportError",
    "distributed_source",
]

_PROTOCOL = 1


class TransportError(RuntimeError):
    """A transfer failed; ``bucket`` is the index of the bucket it was moving."""

    def __init__(self, bucket: int, version: int | None, message: str) -> None:
        of = f" of v{version}" if version is not None else ""
        super().__init__(f"bucket {bucket}{of}: {message}")
        self.bucket = bucket
        self.version = version


def _device_for(group: Any, device: str | torch.device | None) -> torch.device:
    """The link's device, resolved once: an unindexed ``"cuda"`` (given, or NCCL's
    default) is the constructing thread's current device, never re-read later."""
    if device is None:
        backend = str(dist.get_backend(group)).lower()
        device = "cuda" if "nccl" in backend else "cpu"
    resolved = torch.device(device)
    if resolved.type == "cuda" and resolved.index is None:
        resolved = torch.device("cuda", torch.cuda.current_device())
    return resolved


def _device_guard(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """Select ``device`` for a worker-thread section: a thread's current CUDA device is
    its own (0 in a new thread), and NCCL, allocations and stream look-ups follow it."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    return torch.cuda.device(device.index)


class _Link:
    """Broadcasts on one group with a timeout on every collective."""

    def __init__(self, group: Any, src: int, timeout_s: float, device: torch.device) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.group = group
        self.src = src
        self.timeout = timedelta(seconds=timeout_s)
        self.device = device

    def broadcast(self, tensor: torch.Tensor, bucket: int, version: int | None, what: str) -> None:
        try:
            with _device_guard(self.device):
                work = dist.broadcast(tensor, src=self.src, group=self.group, async_op=True)
                assert work is not None
                work.wait(timeout=self.timeout)
        except Exception as exc:
            raise TransportError(
                bucket, version, f"broadcast of {what} from rank {self.src} failed: {exc}"
            ) from exc

    def send_meta(self, meta: dict[str, Any], bucket: int, version: int | None) -> None:
        payload = json.dumps(meta).encode()
        with _device_guard(self.device):
            length = torch.tensor([len(payload)], dtype=torch.int64, device=self.device)
            self.broadcast(length, bucket, version, "the metadata length")
            data = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(self.device)
            self.broadcast(data, bucket, version, f"{len(payload)} bytes of metadata")

    def receive_meta(self, bucket: int) -> dict[str, Any]:
        with _device_guard(self.device):
            length = torch.zeros(1, dtype=torch.int64, device=self.device)
            self.broadcast(length, bucket, None, "the metadata length")
            data = torch.empty(int(length.item()), dtype=torch.uint8, device=self.device)
            self.broadcast(data, bucket, None, f"{int(length.item())} bytes of metadata")
        try:
            meta = json.loads(bytes(data.cpu().numpy()))
        except ValueError as exc:
            raise TransportError(bucket, None, f"unreadable metadata: {exc}") from exc
        if not isinstance(meta, dict) or meta.get("protocol") != _PROTOCOL:
            raise TransportError(bucket, None, f"metadata of an unknown protocol: {meta!r:.200}")
        return meta


def _layout_in(
    buffer: torch.Tensor, tensors: Iterable[tuple[str, torch.Tensor]]
) -> list[TensorLayout] | None:
    """The layout of tensors that are views of ``buffer``, or None if one is not."""
    base = buffer.data_ptr()
    size = buffer.numel()
    layouts = []
    for name, tensor in tensors:
        offset = tensor.data_ptr() - base
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes and (not tensor.is_contiguous() or offset < 0 or offset + nbytes > size):
            return None
        if tensor.device != buffer.device:
            return None
        layouts.append(
            TensorLayout(name, tensor.dtype, tuple(tensor.shape), max(offset, 0), nbytes)
        )
    return layouts


class DistributedSender:
    """The trainer side: broadcast buckets from rank ``src`` to the whole ``group``.

    Use it as a pipeline sink, ``await Pipeline([Fetch(...)]).run(source, sink=sender)``,
    or call ``send_bucket`` / ``send`` from a thread. Buckets must arrive in order,
    starting at index 0 for each sync and ending with ``is_last``; receivers check both.

    Args:
        group: the process group (``None``: the default group). This rank must be ``src``.
        src: the global rank that sends.
        timeout_s: the longest one collective may take.
        device: where broadcast buffers live (default: CUDA for NCCL, else CPU). An
            unindexed ``"cuda"`` is resolved here, once, to the current device of the
            constructing thread; every send then runs under that device, whichever
            thread calls it.
        align_bytes: alignment used when a bucket has to be flattened here.

    Raises:
        ValueError: ``timeout_s`` <= 0.
    """

    def __init__(
        self,
        group: Any = None,
        *,
        src: int = 0,
        timeout_s: float = 300.0,
        device: str | torch.device | None = None,
        align_bytes: int = 256,
    ) -> None:
        self._link = _Link(group, src, timeout_s, _device_for(group, device))
        self.align_bytes = align_bytes
        self._limiter = anyio.CapacityLimiter(1)
        self.buckets_sent = 0
        self.bytes_sent = 0

    async def __call__(self, bucket: WeightBucket) -> None:
        """Send one bucket from a worker thread (the pipeline-sink form)."""
        await anyio.to_thread.run_sync(self.send_bucket, bucket, limiter=self._limiter)

    def send_bucket(self, bucket: WeightBucket) -> None:
        """Broadcast one bucket: its metadata, then its bytes in one collective.

        Callable from any thread: it runs under the link's device.

        Raises:
            TransportError: a collective failed or timed out (names the bucket).
        """
        with _device_guard(self._link.device):
            self._send_bucket(bucket)

    def _send_bucket(self, bucket: WeightBucket) -> None:
        # First wait for the producer: a flatten below reads the bucket's bytes, and NCCL
        # orders itself after the current stream of the link's device (CPU: no-op).
        link = self._link
        if bucket.ready is not None and link.device.type == "cuda":
            bucket.wait_ready(torch.cuda.current_stream(link.device))
        else:
            bucket.wait_ready()
        layouts = None
        buffer = bucket.buffer
        if buffer is not None:
            layouts = _layout_in(buffer, bucket.tensors)
        if buffer is None or layouts is None:
            buffer, flat_layouts = flatten(list(bucket.tensors), self.align_bytes)
            layouts = list(flat_layouts)
        if buffer.device != link.device:
            buffer = buffer.to(link.device)
        meta = {
            "protocol": _PROTOCOL,
            "kind": "bucket",
            "index": bucket.index,
            "version": bucket.version,
            "is_last": bucket.is_last,
            "nbytes": int(buffer.numel()),
            "tensors": [
                [e.name, dtype_name(e.dtype), list(e.shape), e.offset, e.nbytes] for e in layouts
            ],
        }
        link.send_meta(meta, bucket.index, bucket.version)
        if buffer.numel():
            link.broadcast(buffer, bucket.index, bucket.version, f"{buffer.numel()} bytes")
        self.buckets_sent += 1
        self.bytes_sent += int(buffer.numel())

    def send(
        self,
        named_tensors: Iterable[tuple[str, torch.Tensor]],
        *,
        version: int,
        bucket_bytes: int = 256 << 20,
    ) -> int:
        """Bucket and broadcast a whole sync without a pipeline; returns the bucket count.

        An empty ``named_tensors`` sends one empty last bucket.

        Raises:
            TransportError: a collective failed (names the bucket).
        """
        planner = BucketPlanner(bucket_bytes)
        current: list[tuple[str, torch.Tensor]] = []
        index = 0
        for name, tensor in named_tensors:
            nbytes = tensor.numel() * tensor.element_size()
            opens, _ = planner.place(nbytes, tensor_alignment(tensor.dtype, self.align_bytes))
            if opens and current:
                self._send_pairs(current, index, version, is_last=False)
                index += 1
                current = []
            current.append((name, tensor))
        self._send_pairs(current, index, version, is_last=True)
        return index + 1

    def _send_pairs(
        self, pairs: list[tuple[str, torch.Tensor]], index: int, version: int, *, is_last: bool
    ) -> None:
        buffer, layouts = flatten(pairs, self.align_bytes, device=self._link.device)
        tensors = tuple(unflatten(buffer, layouts))
        self.send_bucket(WeightBucket(tensors, index, is_last, version, buffer=buffer))

    def abort(self, reason: str, *, bucket: int = -1, version: int | None = None) -> None:
        """Tell receivers the sync failed, so they raise instead of waiting (best effort).

        Raises:
            TransportError: the abort message itself could not be sent.
        """
        meta = {"protocol": _PROTOCOL, "kind": "abort", "reason": reason, "version": version}
        self._link.send_meta(meta, bucket, version)


class DistributedReceiver:
    """The rollout side: receive one sync's buckets broadcast by ``src``.

    ``buckets()`` yields each bucket (tensors are views of its received buffer);
    ``named_tensors()`` yields the pairs one by one. Both are sync generators that block
    in collectives: hand them to a pipeline (``as_async_iter`` advances them in a worker
    thread) or iterate them from a thread. ``device`` is as ``DistributedSender``'s: an
    unindexed ``"cuda"`` is resolved here, and every receive runs under it.

    Raises:
        ValueError: ``timeout_s`` <= 0.
    """

    def __init__(
        self,
        group: Any = None,
        *,
        src: int = 0,
        timeout_s: float = 300.0,
        device: str | torch.device | None = None,
    ) -> None:
        self._link = _Link(group, src, timeout_s, _device_for(group, device))

    def buckets(self) -> Iterator[WeightBucket]:
        """Receive buckets until the one marked ``is_last``.

        Raises:
            TransportError: a collective failed or timed out, the sender aborted, or the
                metadata is malformed or out of order (names the bucket).
        """
        expected = 0
        version: int | None = None
        while True:
            meta = self._link.receive_meta(expected)
            if meta.get("kind") == "abort":
                raise TransportError(
                    expected, meta.get("version"), f"the sender aborted: {meta.get('reason')}"
                )
            bucket = self._receive_bucket(meta, expected, version)
            version = bucket.version
            expected += 1
            yield bucket
            if bucket.is_last:
                return

    def named_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Receive one sync and yield its ``(name, tensor)`` pairs in order.

        Raises:
            TransportError: see ``buckets``.
        """
        for bucket in self.buckets():
            yield from bucket.tensors

    def _receive_bucket(
        self, meta: dict[str, Any], expected: int, version: int | None
    ) -> WeightBucket:
        try:
            index = int(meta["index"])
            bucket_version = int(meta["version"])
            is_last = bool(meta["is_last"])
            nbytes = int(meta["nbytes"])
            layouts = [
                TensorLayout(
                    str(name),
                    dtype_from_name(str(dtype)),
                    tuple(int(s) for s in shape),
                    int(offset),
                    int(size),
                )
                for name, dtype, shape, offset, size in meta["tensors"]
            ]
        except (KeyError, TypeError, ValueError) as exc:
            raise TransportError(expected, version, f"malformed metadata: {exc}") from exc
        if index != expected or (version is not None and bucket_version != version):
            raise TransportError(
                expected,
                version,
                f"out of order: got bucket {index} of v{bucket_version}",
            )
        with _device_guard(self._link.device):
            buffer = torch.empty(nbytes, dtype=torch.uint8, device=self._link.device)
            if nbytes:
                self._link.broadcast(buffer, index, bucket_version, f"{nbytes} bytes")
        try:
            tensors = unflatten(buffer, layouts)
        except ValueError as exc:
            raise TransportError(index, bucket_version, str(exc)) from exc
        return WeightBucket(tuple(tensors), index, is_last, bucket_version, buffer=buffer)


def distributed_source(
    group: Any = None,
    *,
    src: int = 0,
    timeout_s: float = 300.0,
    device: str | torch.device | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """The ``(name, tensor)`` pairs of one sync broadcast by ``src`` (a pipeline source).

    Raises:
        TransportError: see ``DistributedReceiver.buckets``.
    """
    return DistributedReceiver(group, src=src, timeout_s=timeout_s, device=device).named_tensors()
