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
from multiprocessing.reduction import ForkingPickler
from typing import Any, Literal

import anyio.to_thread
import torch
import torch.multiprocessing  # registers torch's tensor/storage reducers on ForkingPickler

from weightpipe.stages._layout import TensorLayout, flatten, views_layout
from weightpipe.stages.bucket import WeightBucket

__all__ = [
    "ALIGN_BYTES",
    "MetadataKind",
    "b64encode_payloads",
    "distributed_order",
    "distributed_update_request",
    "encode_flattened_bucket",
    "encode_named_tensors",
    "init_group_request",
    "metadata_objects",
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


def _pickle(obj: object, cpu_strategy: str | None) -> bytes:
    buf = io.BytesIO()
    with _sharing_strategy(cpu_strategy):
        ForkingPickler(buf).dump(obj)
    return buf.getvalue()


def encode_named_tensors(
    tensors: Sequence[tuple[str, torch.Tensor]],
    *,
    tp_size: int = 1,
    cpu_strategy: str | None = "file_system",
) -> list[bytes]:
    """One payload per TP rank of plain ``[(name, tensor), ...]`` (``load_format=None``).

    Each rank gets its own pickle so that each holds its own CUDA-IPC reference (SGLang
    decodes only its own entry). CPU tensors are moved to shared memory by the pickler;
    ``cpu_strategy="file_system"`` makes that memory openable by an unrelated process on
    the same node (the default strategy only works for child processes).

    Raises:
        ValueError: if ``tp_size < 1``.
    """
    if tp_size < 1:
        raise ValueError(f"tp_size must be >= 1, got {tp_size}")
    items = [(name, t.detach()) for name, t in tensors]
    return [_pickle(items, cpu_strategy) for _ in range(tp_size)]


def encode_flattened_bucket(
    tensors: Sequence[tuple[str, torch.Tensor]],
    *,
    tp_size: int = 1,
    buffer: torch.Tensor | None = None,
    metadata: MetadataKind = "auto",
    cpu_strategy: str | None = "file_system",
) -> list[bytes]:
    """One ``load_format="flattened_bucket"`` payload per TP rank.

    When ``buffer`` is given and every tensor is an aligned, contiguous view of it (a
    bucket the Fetch stage already flattened), that buffer is sent as is; otherwise the
    tensors are copied into a new aligned buffer.

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
    return [_pickle(payload, cpu_strategy) for _ in range(tp_size)]


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
    recorded now on the current stream (the producer's, as Load runs on it). Recording is
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
        event.record(torch.cuda.current_stream())
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
