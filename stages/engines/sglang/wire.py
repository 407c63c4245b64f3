"""Our encoding of SGLang's weight-update payloads (what travels in ``serialized_named_tensors``).

SGLang's ``/update_weights_from_tensor`` takes one payload per TP rank; each payload is a
``torch.multiprocessing`` ForkingPickler pickle (CPU tensors become shared-memory handles,
CUDA tensors CUDA-IPC handles), base64-encoded inside JSON, and the server decodes it with
an allow-listed unpickler. Two payload shapes exist: plain ``[(name, tensor), ...]`` and,
with ``load_format="flattened_bucket"``, ``{"flattened_tensor": uint8, "metadata": [...]}``
whose metadata entries the server reads by attribute (name, shape, dtype, start_idx,
end_idx, numel). This module writes both from the one bucket layout model of
``weightpipe.stages._layout`` (a bucket Fetch already flattened is sent as it is), orders
a bucket for the byte layout SGLang's distributed receiver allocates
(``FlattenedTensorBucket.empty``: no padding, so starts must be aligned by ordering), and
owns the one rule for handing CUDA tensors to another process (``wait_written``). It
never imports sglang unless asked for SGLang's own metadata class, and the tests prove
the result decodes with SGLang's code, not ours.

CUDA tensors travel as SGLang's own sender sends them (its ``monkey_patch_torch_reductions``):
torch's CUDA-IPC reduction with the storage's device index replaced by that GPU's UUID, which
the server (patched the same way before every decode) maps back to its own index. A trainer
and a server with different ``CUDA_VISIBLE_DEVICES`` number the same GPU differently; the
UUID is the same everywhere. Unlike SGLang, this is done by our own pickler's
``reducer_override``, never by patching torch for the whole process.

IPC lifetime: a CUDA-IPC handle points at the sender's memory. ``BucketPayload`` owns what
its pickles point into (the flat buffer it made, or the tensors it pickled) for as long as
it lives, and ``encode()`` writes fresh pickles (fresh IPC reference counts) per call: a
caller that may resend (a retried request) keeps the ``BucketPayload`` until the engine can
no longer decode any attempt (the session is closed) and encodes once per attempt, so a
retry never points at memory that was freed and reused.
"""

from __future__ import annotations

import base64
import functools
import importlib
import io
import re
import threading
import types
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.reduction import ForkingPickler
from typing import Any, Literal

import anyio.to_thread
import torch
import torch.multiprocessing  # registers torch's tensor/storage reducers on ForkingPickler
from torch.multiprocessing import reductions

from weightpipe.stages._layout import TensorLayout, flatten, views_layout
from weightpipe.stages.bucket import WeightBucket

__all__ = [
    "ALIGN_BYTES",
    "BucketPayload",
    "MetadataKind",
    "Payloads",
    "b64encode_payloads",
    "device_uuid",
    "distributed_order",
    "distributed_update_request",
    "encode_flattened_bucket",
    "encode_named_tensors",
    "init_group_request",
    "metadata_objects",
    "prepare_flattened_bucket",
    "prepare_named_tensors",
    "tensor_named_in",
    "wait_written",
]

ALIGN_BYTES = 16
"""Start of every tensor inside a flattened payload is a multiple of this. SGLang rebuilds
each tensor as ``flat[start:end].view(dtype)``, which needs ``start % itemsize == 0``; 16
covers every dtype up to complex128 (SGLang's own bucket does not pad, and a fp32 after an
odd-length bf16 fails to rebuild)."""

MetadataKind = Literal["auto", "sglang", "namespace"]
"""Which object carries flattened-bucket metadata on the wire. ``sglang``: SGLang's own
``FlattenedTensorMetadata`` (needs ``sglang`` importable here). ``namespace``: a
``types.SimpleNamespace`` with the same attributes (allowed by SGLang's safe unpickler, and
SGLang's loaders read the metadata only by attribute). ``auto``: sglang's class when
importable, else the namespace."""

_SGLANG_BUCKET_MODULE = "sglang.srt.weight_sync.tensor_bucket"

# set_sharing_strategy is process-wide; hold it while a pickle is written under a
# different strategy so two encoders never interleave their set/restore.
_STRATEGY_LOCK = threading.Lock()


@functools.cache
def _sglang_metadata_class() -> Any:
    """SGLang's ``FlattenedTensorMetadata``, looked up once (``None`` without sglang)."""
    try:
        return importlib.import_module(_SGLANG_BUCKET_MODULE).FlattenedTensorMetadata
    except ImportError:
        return None


def metadata_objects(layout: Sequence[TensorLayout], kind: MetadataKind = "auto") -> list[Any]:
    """The ``metadata`` list of a flattened-bucket payload, one entry per layout entry.

    Raises:
        ImportError: ``kind="sglang"`` and sglang is not importable.
    """
    cls = None if kind == "namespace" else _sglang_metadata_class()
    if cls is None and kind == "sglang":
        raise ImportError(
            "metadata='sglang' needs the sglang package here "
            "(pip install --no-deps sglang); use metadata='namespace' without it"
        )
    make = cls if cls is not None else types.SimpleNamespace
    return [
        make(
            name=entry.name,
            shape=torch.Size(entry.shape),
            dtype=entry.dtype,
            start_idx=entry.offset,
            end_idx=entry.end,
            numel=entry.nbytes,  # SGLang's numel counts bytes of the uint8 view
        )
        for entry in layout
    ]


def _get_strategy() -> str:
    return str(torch.multiprocessing.get_sharing_strategy())  # type: ignore[no-untyped-call]


def _set_strategy(strategy: str) -> None:
    torch.multiprocessing.set_sharing_strategy(strategy)  # type: ignore[no-untyped-call]


@contextmanager
def _sharing_strategy(strategy: str | None) -> Iterator[None]:
    if strategy is None or strategy == _get_strategy():
        yield
        return
    with _STRATEGY_LOCK:
        previous = _get_strategy()
        _set_strategy(strategy)
        try:
            yield
        finally:
            _set_strategy(previous)


# Where torch's CUDA-IPC reduction puts the storage's device index in the rebuild
# arguments (``rebuild_cuda_tensor``'s ``storage_device``); SGLang's sender and receiver
# rely on the same position.
_DEVICE_ARG = 6


def _cuda_index(tensor: torch.Tensor) -> int | None:
    """The CUDA device index of ``tensor``'s storage, None for a host tensor (a seam:
    ``tests.fakes.cuda`` marks stand-in tensors as living on a fake device)."""
    return tensor.device.index if tensor.is_cuda else None


def _reduce_cuda(tensor: torch.Tensor) -> tuple[Any, tuple[Any, ...]]:
    """torch's own CUDA-IPC reduction of ``tensor`` (a seam, as ``_cuda_index``)."""
    return reductions.reduce_tensor(tensor)  # type: ignore[no-untyped-call,no-any-return]


def device_uuid(index: int) -> str:
    """The GPU's UUID as SGLang's sender writes it (``str`` of the device properties')."""
    return str(torch.cuda.get_device_properties(index).uuid)


class _WirePickler(ForkingPickler):
    """ForkingPickler whose CUDA tensors name their GPU by UUID, not by device index."""

    def reducer_override(self, obj: Any) -> Any:
        index = _cuda_index(obj) if isinstance(obj, torch.Tensor) else None
        if index is None:
            return NotImplemented
        # Encoding runs in worker threads (current device 0): the IPC handle and the
        # event torch records for the receiver to wait on belong to the tensor's device.
        with torch.cuda.device(index):
            rebuild, args = _reduce_cuda(obj)
        device = args[_DEVICE_ARG]
        if isinstance(device, int):  # a str is already a UUID (torch patched by SGLang)
            args = (*args[:_DEVICE_ARG], device_uuid(device), *args[_DEVICE_ARG + 1 :])
        return rebuild, args


def _pickle(obj: object, cpu_strategy: str | None) -> bytes:
    buf = io.BytesIO()
    with _sharing_strategy(cpu_strategy):
        _WirePickler(buf).dump(obj)
    return buf.getvalue()


@dataclass(frozen=True, eq=False)
class BucketPayload:
    """One bucket's payload object and the memory its pickles point into.

    Attributes:
        obj: what is pickled (``[(name, tensor), ...]`` or the flattened-bucket dict).
        holds: the tensors the pickles' handles point into (the flat buffer made for
            them, or the tensors themselves): alive as long as this object is.
        tp_size: payloads per ``encode()`` (one per TP rank: each rank decodes only its
            own, and each pickle takes its own CUDA-IPC reference).
        cpu_strategy: torch's sharing strategy while pickling host tensors.
    """

    obj: Any
    holds: tuple[torch.Tensor, ...]
    tp_size: int
    cpu_strategy: str | None

    @property
    def on_cuda(self) -> bool:
        """Whether the pickles carry CUDA-IPC handles (then lifetime matters)."""
        return any(_cuda_index(t) is not None for t in self.holds)

    def encode(self) -> Payloads:
        """Fresh pickles, one per TP rank; call once per attempt (see the module)."""
        return Payloads((_pickle(self.obj, self.cpu_strategy) for _ in range(self.tp_size)), self)


class Payloads(list[bytes]):
    """The per-rank pickles of one ``encode()``; ``source`` keeps their memory alive."""

    def __init__(self, items: Iterator[bytes] | Sequence[bytes], source: BucketPayload) -> None:
        super().__init__(items)
        self.source = source


def encode_named_tensors(
    tensors: Sequence[tuple[str, torch.Tensor]],
    *,
    tp_size: int = 1,
    cpu_strategy: str | None = "file_system",
) -> Payloads:
    """One payload per TP rank of plain ``[(name, tensor), ...]`` (``load_format=None``).

    Each rank gets its own pickle so that each holds its own CUDA-IPC reference (SGLang
    decodes only its own entry). CPU tensors are moved to shared memory by the pickler;
    ``cpu_strategy="file_system"`` makes that memory openable by an unrelated process on
    the same node (the default strategy only works for child processes).

    The returned list keeps the tensors alive (``Payloads.source``).

    Raises:
        ValueError: if ``tp_size < 1``.
    """
    return prepare_named_tensors(tensors, tp_size=tp_size, cpu_strategy=cpu_strategy).encode()


def prepare_named_tensors(
    tensors: Sequence[tuple[str, torch.Tensor]],
    *,
    tp_size: int = 1,
    cpu_strategy: str | None = "file_system",
) -> BucketPayload:
    """The ``BucketPayload`` of ``encode_named_tensors`` (encode it once per attempt).

    Raises:
        ValueError: if ``tp_size < 1``.
    """
    if tp_size < 1:
        raise ValueError(f"tp_size must be >= 1, got {tp_size}")
    items = [(name, t.detach()) for name, t in tensors]
    return BucketPayload(items, tuple(t for _, t in items), tp_size, cpu_strategy)


def encode_flattened_bucket(
    tensors: Sequence[tuple[str, torch.Tensor]],
    *,
    tp_size: int = 1,
    buffer: torch.Tensor | None = None,
    metadata: MetadataKind = "auto",
    cpu_strategy: str | None = "file_system",
) -> Payloads:
    """One ``load_format="flattened_bucket"`` payload per TP rank.

    When ``buffer`` is given and every tensor is an aligned, contiguous view of it (a
    bucket the Fetch stage already flattened), that buffer is sent as is; otherwise the
    tensors are copied into a new aligned buffer.

    The returned list keeps the sent buffer alive (``Payloads.source``): a caller that may
    resend keeps it (or uses ``prepare_flattened_bucket``) until the engine is done.

    Raises:
        ValueError: if ``tensors`` is empty, ``tp_size < 1`` or devices differ.
        ImportError: ``metadata="sglang"`` without sglang installed.
    """
    return prepare_flattened_bucket(
        tensors, tp_size=tp_size, buffer=buffer, metadata=metadata, cpu_strategy=cpu_strategy
    ).encode()


def prepare_flattened_bucket(
    tensors: Sequence[tuple[str, torch.Tensor]],
    *,
    tp_size: int = 1,
    buffer: torch.Tensor | None = None,
    metadata: MetadataKind = "auto",
    cpu_strategy: str | None = "file_system",
) -> BucketPayload:
    """The ``BucketPayload`` of ``encode_flattened_bucket``: the bucket flattened once (or
    its buffer reused), encoded once per attempt by the caller.

    Raises:
        ValueError: if ``tensors`` is empty, ``tp_size < 1`` or devices differ.
        ImportError: ``metadata="sglang"`` without sglang installed.
    """
    if tp_size < 1:
        raise ValueError(f"tp_size must be >= 1, got {tp_size}")
    if not tensors:
        raise ValueError("cannot flatten an empty bucket (SGLang refuses empty buckets)")
    layout = views_layout(buffer, tensors) if buffer is not None else None
    if buffer is not None and layout is not None:
        flat = buffer
    else:
        flat, layout = flatten(tensors, ALIGN_BYTES)
    payload = {"flattened_tensor": flat, "metadata": metadata_objects(layout, metadata)}
    return BucketPayload(payload, (flat,), tp_size, cpu_strategy)


def b64encode_payloads(payloads: Sequence[bytes]) -> list[str]:
    """The JSON form of ``serialized_named_tensors``: standard base64 text per rank."""
    return [base64.b64encode(p).decode("ascii") for p in payloads]


def distributed_order(
    tensors: Sequence[tuple[str, torch.Tensor]],
) -> list[tuple[str, torch.Tensor]]:
    """The tensors reordered so that SGLang's unpadded receive bucket is aligned.

    ``FlattenedTensorBucket.empty`` packs tensors back to back and refuses a start that is
    not a multiple of the dtype's itemsize. Sorting by itemsize, largest first (stable, so
    equal itemsizes keep source order), makes every start such a multiple: each prefix's
    size is a multiple of every itemsize that follows it.
    """
    return sorted(tensors, key=lambda item: -item[1].element_size())


async def wait_written(bucket: WeightBucket) -> None:
    """Return once every CUDA tensor of ``bucket`` is written, without blocking the loop.

    The one rule for handing a bucket to another process (SGLang's scheduler reads CUDA-IPC
    handles on its own streams, so stream ordering in this process does not protect it):
    wait on the bucket's ready event, or, when the producer recorded none, on an event
    recorded now on the current stream of the bucket's device (the producer's, as Load
    runs on it). Recording is
    asynchronous; the wait itself runs in a worker thread. No-op for a CPU bucket without
    an event.
    """
    event = bucket.ready
    if event is None:
        on_cuda = any(t.is_cuda for _, t in bucket.tensors) or (
            bucket.buffer is not None and bucket.buffer.is_cuda
        )
        if not on_cuda:
            return
        event = torch.cuda.Event()  # type: ignore[no-untyped-call]
        # The bucket's device's current stream, not the current device's (another GPU).
        event.record(torch.cuda.current_stream(bucket.cuda_device()))
    await anyio.to_thread.run_sync(event.synchronize)


def init_group_request(
    master_address: str,
    master_port: int,
    rank_offset: int,
    world_size: int,
    group_name: str,
    backend: str,
) -> dict[str, Any]:
    """The arguments of SGLang's ``init_weights_update_group`` (the in-process Engine's
    keyword arguments and the HTTP endpoint's JSON body are the same fields)."""
    return {
        "master_address": master_address,
        "master_port": master_port,
        "rank_offset": rank_offset,
        "world_size": world_size,
        "group_name": group_name,
        "backend": backend,
    }


def distributed_update_request(
    names: Sequence[str],
    dtypes: Sequence[str],
    shapes: Sequence[Sequence[int]],
    group_name: str,
    load_format: str | None,
) -> dict[str, Any]:
    """The arguments of SGLang's ``update_weights_from_distributed`` for one bucket, with
    ``flush_cache=False`` (the cache is flushed once, at commit)."""
    return {
        "names": list(names),
        "dtypes": list(dtypes),
        "shapes": [list(s) for s in shapes],
        "group_name": group_name,
        "flush_cache": False,
        "load_format": load_format,
    }


def tensor_named_in(message: str, names: Sequence[str]) -> str | None:
    """The longest of ``names`` that an engine's error message mentions as a whole word."""
    hits = [
        name
        for name in names
        if name and re.search(rf"(?<![\w.]){re.escape(name)}(?![\w.])", message)
    ]
    return max(hits, key=len) if hits else None
