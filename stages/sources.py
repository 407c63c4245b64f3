"""Weight sources: whatever a trainer holds, as a lazy stream of ``(name, tensor)`` pairs.

Every function here returns something ``weightpipe.pipeline.as_async_iter`` accepts, and
yields one tensor at a time, so Fetch bounds memory no matter how large the model is: a
module or a state_dict (DTensor/FSDP2 shards gathered with ``full_tensor()`` one tensor
at a time, a collective every rank must join in the same order), any sync or async
iterable of pairs (a checkpoint engine's ``receive_weights()`` async generator), and a
directory of safetensors shards, memory-mapped a window at a time (headers validated
first), one tensor at a time. For the torch.distributed receiver see ``weightpipe.stages.
distributed``. A source that lends its buffers (it overwrites a tensor it yielded once it
is asked for the next one, as verl's NCCL checkpoint engine does with its double buffer)
is declared with ``borrowed_tensors``, which copies each tensor exactly once before the
source advances; owned tensors are never copied.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import mmap
import os
import struct
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Generator,
    Iterable,
    Iterator,
    Mapping,
)
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, overload

import anyio
import anyio.to_thread
import torch

from weightpipe.pipeline import aclose_iterator
from weightpipe.stages.dtypes import SAFETENSORS_DTYPES

__all__ = [
    "FileSpan",
    "NamedTensor",
    "borrowed_tensors",
    "check_mesh",
    "materialise",
    "named_tensors",
    "safetensors_index",
    "safetensors_source",
]

NamedTensor = tuple[str, torch.Tensor]

INDEX_FILE = "model.safetensors.index.json"

# A safetensors header is a little-endian u64 length and that much JSON; anything larger
# than this is a corrupt file, not a header.
_MAX_HEADER_BYTES = 100 << 20


def materialise(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """The full tensor behind a DTensor (``full_tensor()``, a collective), else ``tensor``.

    Every rank of the DTensor's mesh must call this for the same tensors in the same
    order. Plain tensors are returned as they are. The mesh is checked first
    (``check_mesh``), and the gathered tensor must have the DTensor's global shape.

    Raises:
        RuntimeError: gathering the shards failed (names the tensor).
        ValueError: a mesh this process cannot gather on, or a gather of the wrong shape
            (names the tensor and both meshes or shapes).
    """
    full_tensor = getattr(tensor, "full_tensor", None)
    if not callable(full_tensor):
        return tensor
    check_mesh(name, tensor)
    try:
        gathered = full_tensor()
    except Exception as exc:
        raise RuntimeError(f"tensor {name!r}: gathering its DTensor shards failed: {exc}") from exc
    if not isinstance(gathered, torch.Tensor):
        raise RuntimeError(f"tensor {name!r}: full_tensor() returned {type(gathered).__name__}")
    if tuple(gathered.shape) != tuple(tensor.shape):
        raise ValueError(
            f"tensor {name!r}: full_tensor() gave shape {tuple(gathered.shape)}, but the "
            f"DTensor's global shape is {tuple(tensor.shape)}"
        )
    return gathered


def check_mesh(name: str, tensor: torch.Tensor) -> None:
    """Refuse a DTensor whose device mesh this process cannot gather it on, before any
    collective: its mesh names a rank outside this process's default process group, or
    does not include this process's rank (``full_tensor()`` there returns an empty
    shard, not the weight), or spans several ranks while torch.distributed is not
    initialized here. A tensor without a ``device_mesh`` passes.

    Raises:
        ValueError: names the tensor, its mesh and this process's group.
    """
    mesh = getattr(tensor, "device_mesh", None)
    if mesh is None:
        return
    ranks = [int(r) for r in mesh.mesh.flatten().tolist()]
    theirs = f"DeviceMesh({mesh.device_type!r}, ranks {ranks})"
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        if len(ranks) > 1:
            raise ValueError(
                f"tensor {name!r}: a DTensor on {theirs}, but this process has no default "
                "process group (torch.distributed is not initialized), so its shards "
                "cannot be gathered here"
            )
        return
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    ours = (
        f"this process's default group ({torch.distributed.get_backend()}, rank {rank} of "
        f"world size {world})"
    )
    outside = [r for r in ranks if not 0 <= r < world]
    if outside:
        raise ValueError(
            f"tensor {name!r}: a DTensor on {theirs}, which names ranks {outside} outside "
            f"{ours}: its gather could never complete"
        )
    if mesh.get_coordinate() is None:
        raise ValueError(
            f"tensor {name!r}: a DTensor on {theirs}, which does not include rank {rank} of "
            f"{ours}: its shards live on other ranks, and full_tensor() here would return "
            "an empty shard instead of the weight; gather it on a rank of its mesh"
        )


def named_tensors(
    obj: torch.nn.Module | Mapping[str, Any] | Iterable[Any] | AsyncIterable[Any],
    *,
    include_buffers: bool = False,
) -> Iterator[NamedTensor] | AsyncIterator[NamedTensor]:
    """A lazy stream of ``(name, tensor)`` pairs from a module, state_dict or iterable.

    - ``nn.Module``: its parameters (tied ones once, as ``named_parameters`` gives them),
      then with ``include_buffers`` its persistent buffers (those a state_dict holds).
    - ``Mapping`` (a state_dict): its items in order.
    - a sync iterable or an async iterable/generator of pairs: passed through.

    Tensors are detached, and DTensors (FSDP2, tensor parallel) are gathered with
    ``full_tensor()`` as they are reached (sync sources in ``as_async_iter``'s worker
    thread, async ones in a worker thread of their own). FSDP1's flat parameters are not
    unflattened here: hand over the module's ``state_dict()`` taken under
    ``FSDP.state_dict_type(..., FULL_STATE_DICT)`` instead. Values are not otherwise
    checked: Fetch validates each pair and names the offending tensor.

    Raises:
        TypeError: ``obj`` is none of the above (a str or bytes is refused too).
    """
    if isinstance(obj, torch.nn.Module):
        return _module_tensors(obj, include_buffers)
    if isinstance(obj, Mapping):
        return _pairs(obj.items())
    if isinstance(obj, str | bytes):
        raise TypeError(f"named_tensors: expected tensors, got a {type(obj).__name__}")
    if isinstance(obj, AsyncIterable):
        return _async_pairs(obj)
    if isinstance(obj, Iterable):
        return _pairs(obj)
    raise TypeError(
        "named_tensors: expected an nn.Module, a state_dict, or an (async) iterable of "
        f"(name, tensor) pairs, got {type(obj).__qualname__}"
    )


def _prepare(item: Any) -> Any:
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], torch.Tensor):
        name, tensor = item
        return name, materialise(str(name), tensor).detach()
    return item  # Fetch rejects it with the tensor's name


def _pairs(items: Iterable[Any]) -> Iterator[Any]:
    for item in items:
        yield _prepare(item)


async def _async_pairs(items: AsyncIterable[Any]) -> AsyncIterator[Any]:
    iterator = aiter(items)
    try:
        async for item in iterator:
            if (
                isinstance(item, tuple)
                and len(item) == 2
                and callable(getattr(item[1], "full_tensor", None))
            ):
                yield await anyio.to_thread.run_sync(_prepare, item)
            else:
                yield _prepare(item)
    finally:
        await aclose_iterator(iterator)


def _module_tensors(module: torch.nn.Module, include_buffers: bool) -> Iterator[NamedTensor]:
    for name, parameter in module.named_parameters():
        yield name, materialise(name, parameter).detach()
    if not include_buffers:
        return
    for name, buffer in module.named_buffers():
        owner_path, _, attr = name.rpartition(".")
        owner = module.get_submodule(owner_path) if owner_path else module
        if attr in owner._non_persistent_buffers_set:
            continue  # not part of a checkpoint (e.g. rotary inv_freq)
        yield name, materialise(name, buffer).detach()


# -- safetensors ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _HeaderEntry:
    """One tensor of a validated safetensors header: offsets relative to the data start."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class _Header:
    """A validated safetensors header: its tensors and where their data begins."""

    entries: dict[str, _HeaderEntry]
    data_start: int


def _read_header(file: Path) -> _Header:
    """Read and validate ``file``'s header before any tensor is read (every path uses it).

    Checked: the length prefix is there and is neither absurd nor past the end of the file,
    the header is a JSON object, each entry has a known dtype, a shape of non-negative
    ints and two int ``data_offsets`` in order and inside the file, its size is dtype x
    shape, and no two tensors overlap.

    Raises:
        ValueError: the first problem found, naming the file and (where one is at fault)
            the tensor.
    """
    file_bytes = file.stat().st_size
    with file.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) != 8:
            raise ValueError(f"{file}: too short to be a safetensors file")
        (length,) = struct.unpack("<Q", prefix)
        if length > _MAX_HEADER_BYTES:
            raise ValueError(f"{file}: header of {length} bytes; not a safetensors file")
        if 8 + length > file_bytes:
            raise ValueError(
                f"{file}: header of {length} bytes but the file has {file_bytes}: truncated "
                "or not a safetensors file"
            )
        raw = handle.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{file}: corrupt safetensors header (not JSON: {exc})") from exc
    if not isinstance(header, dict):
        raise ValueError(f"{file}: safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    data_start = 8 + length
    data_bytes = file_bytes - data_start
    entries: dict[str, _HeaderEntry] = {}
    for name, info in header.items():
        entries[name] = _check_entry(file, name, info, data_bytes)
    previous: tuple[str, _HeaderEntry] | None = None
    for name, entry in sorted(entries.items(), key=lambda item: (item[1].start, item[1].end)):
        if entry.start == entry.end:
            continue  # an empty tensor occupies no bytes
        if previous is not None and entry.start < previous[1].end:
            raise ValueError(
                f"tensor {name!r}: data_offsets [{entry.start}, {entry.end}) in {file} "
                f"overlap tensor {previous[0]!r} [{previous[1].start}, {previous[1].end})"
            )
        previous = (name, entry)
    return _Header(entries, data_start)


def _check_entry(file: Path, name: str, info: object, data_bytes: int) -> _HeaderEntry:
    where = f"tensor {name!r} in {file}"
    if not isinstance(info, dict):
        raise ValueError(f"{where}: malformed header entry {info!r}")
    try:
        dtype = SAFETENSORS_DTYPES[info["dtype"]]
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{where}: dtype {info.get('dtype')!r} is not supported") from exc
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise ValueError(f"{where}: shape {shape!r} is not a list of non-negative ints")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        raise ValueError(f"{where}: data_offsets {offsets!r} is not a pair of ints")
    start, end = offsets
    if not 0 <= start <= end:
        raise ValueError(f"{where}: data_offsets [{start}, {end}) are not in order")
    if end > data_bytes:
        raise ValueError(
            f"{where}: data_offsets [{start}, {end}) run past the end of the file's "
            f"{data_bytes} data bytes (a truncated file)"
        )
    expected = math.prod(shape) * dtype.itemsize
    if end - start != expected:
        raise ValueError(
            f"{where}: data_offsets hold {end - start} bytes but dtype x shape "
            f"({info['dtype']} x {shape}) is {expected}"
        )
    return _HeaderEntry(dtype, tuple(shape), start, end)


def safetensors_index(path: str | Path) -> list[tuple[Path, list[tuple[str, int]]]]:
    """The read plan for a checkpoint: ``[(file, [(name, nbytes), ...]), ...]``.

    ``path`` is one ``.safetensors`` file or a directory. A directory with
    ``model.safetensors.index.json`` is read as the index says: its files in the order
    they first appear in ``weight_map``, each one's listed tensors in on-disk order
    (sequential reads). Without an index, every ``*.safetensors`` file, sorted by name.

    Every file's header is validated first (``_read_header``): a corrupt or absurd
    header, offsets out of the file (a truncated file), overlapping tensors or a size
    that is not dtype x shape are refused before any tensor is read, on both paths of
    ``safetensors_source``.

    Raises:
        FileNotFoundError: no such path, no shards, or a shard the index names is missing.
        ValueError: a malformed header or index, or a tensor the index lists is not in
            its shard (names the tensor and the file).
    """
    root = Path(path)
    if root.is_file():
        files: list[tuple[Path, set[str] | None]] = [(root, None)]
    elif root.is_dir():
        index_file = root / INDEX_FILE
        if index_file.exists():
            try:
                weight_map = json.loads(index_file.read_text())["weight_map"]
            except (KeyError, TypeError, json.JSONDecodeError) as exc:
                raise ValueError(f"{index_file}: no valid weight_map ({exc})") from exc
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index_file}: weight_map is not an object")
            by_file: dict[str, set[str]] = {}
            for name, shard in weight_map.items():
                by_file.setdefault(str(shard), set()).add(str(name))
            files = []
            for shard, names in by_file.items():
                shard_path = root / shard
                if not shard_path.is_file():
                    raise FileNotFoundError(
                        f"{index_file}: shard {shard!r} (holding e.g. {min(names)!r}) is missing"
                    )
                files.append((shard_path, names))
        else:
            files = [(file, None) for file in sorted(root.glob("*.safetensors"))]
            if not files:
                raise FileNotFoundError(f"{root}: no *.safetensors files and no {INDEX_FILE}")
    else:
        raise FileNotFoundError(f"{root}: no such file or directory")
    plan: list[tuple[Path, list[tuple[str, int]]]] = []
    for file, wanted in files:
        header = _read_header(file)
        if wanted is not None:
            missing = sorted(wanted - header.entries.keys())
            if missing:
                raise ValueError(f"tensor {missing[0]!r}: listed in the index but not in {file}")
        entries: list[tuple[int, str, int]] = []
        for name, entry in header.entries.items():
            if wanted is not None and name not in wanted:
                continue
            entries.append((entry.start, name, entry.end - entry.start))
        entries.sort()
        plan.append((file, [(name, nbytes) for _, name, nbytes in entries]))
    return plan


@overload
def safetensors_source(
    path: str | Path, *, window_bytes: int = ..., direct: Literal[False] = ...
) -> Generator[tuple[str, torch.Tensor], None, None]: ...


@overload
def safetensors_source(
    path: str | Path, *, window_bytes: int = ..., direct: Literal[True]
) -> list[tuple[str, FileSpan]]: ...


@overload
def safetensors_source(
    path: str | Path, *, window_bytes: int = ..., direct: bool
) -> Iterable[tuple[str, torch.Tensor | FileSpan]]: ...


def safetensors_source(
    path: str | Path, *, window_bytes: int = 64 << 20, direct: bool = False
) -> Iterable[tuple[str, torch.Tensor | FileSpan]]:
    """Stream a safetensors checkpoint one tensor at a time (see ``safetensors_index``).

    By default tensors are zero-copy views of a private (copy-on-write) memory mapping of
    the file, whose pages are read only when a consumer touches them. Each mapping covers
    one window of consecutive tensors (about ``window_bytes``; a larger tensor gets a
    window of its own) and lives as long as any tensor from it does, so resident file
    pages are bounded by the tensors still alive downstream plus one window, never by the
    file's size; the header is parsed and validated once per file, not per window. Files
    are closed when the generator finishes or is closed early.

    With ``direct=True`` it returns a list of ``FileSpan``s instead (offsets from the same
    headers, no file opened yet): Fetch reads each one straight into its bucket buffer
    with ``preadv``, one kernel copy and no page faults, which is what a plain sequential
    read costs. Use it only where the stream feeds Fetch (or a consumer that calls
    ``FileSpan.load()``).

    Raises:
        FileNotFoundError, ValueError: see ``safetensors_index`` (raised on first use;
            with ``direct``, by this call).
        ValueError: ``window_bytes`` < 1.
    """
    if window_bytes < 1:
        raise ValueError(f"window_bytes must be >= 1, got {window_bytes}")
    if direct:
        # Spans are a few dozen bytes each, so the whole plan is built at once: a list is
        # iterated on the event loop, saving a thread round trip per tensor.
        return list(_stream_spans(Path(path)))
    return _stream_safetensors(Path(path), window_bytes)


# Reads go in pieces of this size: large enough to amortise the syscall, small enough
# that the kernel's copy streams through cache the way a plain sequential read does.
_READ_CHUNK_BYTES = 16 << 20


@dataclass(frozen=True)
class FileSpan:
    """A tensor still on disk: ``nbytes`` bytes at byte ``offset`` of the file ``path``.

    Stands in for a tensor where the consumer can read it into place itself (Fetch does):
    it has the ``dtype``, ``shape`` and ``nbytes`` a tensor has, ``read_into`` and
    ``load``.
    """

    path: str
    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def read_into(self, out: torch.Tensor) -> None:
        """Read the bytes into ``out``, a contiguous CPU uint8 tensor of ``nbytes``.

        Raises:
            ValueError: ``out`` is not such a tensor.
            OSError: the read failed or the file is shorter than the span (names it).
        """
        nbytes = self.nbytes
        if out.dtype != torch.uint8 or out.device.type != "cpu" or not out.is_contiguous():
            raise ValueError("FileSpan.read_into needs a contiguous CPU uint8 tensor")
        if out.numel() != nbytes:
            raise ValueError(f"FileSpan.read_into: {out.numel()} bytes given for {nbytes}")
        if nbytes == 0:
            return
        # A writable view of the tensor's memory without numpy (not a dependency).
        view = memoryview((ctypes.c_char * nbytes).from_address(out.data_ptr())).cast("B")
        done = 0
        descriptor = os.open(self.path, os.O_RDONLY)
        try:
            while done < nbytes:
                chunk = view[done : done + _READ_CHUNK_BYTES]
                count = os.preadv(descriptor, [chunk], self.offset + done)
                if count <= 0:
                    raise OSError(
                        f"{self.path}: file ends {nbytes - done} bytes short of the tensor "
                        f"at offset {self.offset}"
                    )
                done += count
        finally:
            os.close(descriptor)

    def load(self) -> torch.Tensor:
        """The tensor, read into new memory."""
        raw = torch.empty(self.nbytes, dtype=torch.uint8)
        self.read_into(raw)
        typed = raw if self.dtype == torch.uint8 else raw.view(self.dtype)
        return typed.view(self.shape)


def _stream_spans(path: Path) -> Iterator[tuple[str, FileSpan]]:
    for file, entries in safetensors_index(path):
        header = _read_header(file)  # validated: offsets in bounds, no overlaps, sizes
        for name, _ in entries:
            entry = header.entries[name]
            yield (
                name,
                FileSpan(str(file), header.data_start + entry.start, entry.dtype, entry.shape),
            )


def _stream_safetensors(
    path: Path, window_bytes: int
) -> Generator[tuple[str, torch.Tensor], None, None]:
    for file, entries in safetensors_index(path):
        header = _read_header(file)  # validated: offsets in bounds, no overlaps, sizes
        windows: list[list[str]] = [[]]
        filled = 0
        for name, nbytes in entries:  # on-disk order
            if windows[-1] and filled + nbytes > window_bytes:
                windows.append([])
                filled = 0
            windows[-1].append(name)
            filled += nbytes
        with file.open("rb") as handle:
            for window in windows:
                if window:
                    yield from _window_tensors(handle.fileno(), file, header, window)


def _window_tensors(
    descriptor: int, file: Path, header: _Header, names: list[str]
) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors ``names`` (consecutive on disk) as views of one private mapping.

    The mapping covers just this window (from the page before its first byte to its last)
    and lives as long as any of its tensors does, so the pages a consumer touched are
    returned when the window's last tensor is dropped. Copy-on-write: writing a tensor
    never reaches the file. A tensor whose start is not a multiple of its element size
    (legal, if unusual, in safetensors) is copied into aligned memory instead.
    """
    entries = [header.entries[name] for name in names]
    first = header.data_start + min(e.start for e in entries)
    last = header.data_start + max(e.end for e in entries)
    base = first - first % mmap.ALLOCATIONGRANULARITY
    mapping = None
    if last > first:
        mapping = mmap.mmap(descriptor, last - base, offset=base, access=mmap.ACCESS_COPY)
        # Ask for read-ahead of the whole window now: a cold file then streams from disk
        # while the consumer works on the window before.
        with contextlib.suppress(OSError, AttributeError):
            mapping.madvise(mmap.MADV_WILLNEED)
    for name, entry in zip(names, entries, strict=True):
        nbytes = entry.end - entry.start
        if nbytes == 0 or mapping is None:
            yield name, torch.empty(entry.shape, dtype=entry.dtype)
            continue
        at = header.data_start + entry.start - base
        raw = torch.frombuffer(mapping, dtype=torch.uint8, count=nbytes, offset=at)
        if at % entry.dtype.itemsize:
            raw = raw.clone()  # the mapping is page-aligned: realign this one by a copy
        typed = raw if entry.dtype == torch.uint8 else raw.view(entry.dtype)
        yield name, typed.view(entry.shape)


# -- borrowed buffers -----------------------------------------------------------------------

# Copies at least this large run in a worker thread; smaller ones are cheaper inline than
# a thread round trip (an MoE has thousands of small tensors).
_INLINE_COPY_BYTES = 1 << 20


def _own(item: Any) -> Any:
    """The pair with its tensor copied into fresh memory (finished before returning)."""
    item = _prepare(item)
    if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], torch.Tensor)):
        return item  # Fetch rejects it with the tensor's name
    name, tensor = item
    copy = tensor.clone(memory_format=torch.contiguous_format)
    if copy.is_cuda:
        # The lender may overwrite its buffer from another stream as soon as it advances.
        torch.cuda.current_stream(copy.device).synchronize()
    return name, copy


def borrowed_tensors(
    source: Iterable[Any] | AsyncIterable[Any],
) -> Iterator[NamedTensor] | AsyncIterator[NamedTensor]:
    """Declare that ``source`` lends its buffers: copy each tensor once, before it advances.

    A lending source (verl's NCCL checkpoint engine yields views into a double buffer that
    the next broadcast overwrites) is only safe for a consumer that is done with a tensor
    before asking for the next one; a pipeline, whose channels hold items, is not. Each
    tensor is therefore cloned (contiguous; on CUDA the copy is finished before the source
    is asked for the next item), and the clone is the one copy the sync makes: pair this
    with ``Fetch(flatten=False)``, which passes owned tensors on without copying them
    again. Sync sources are advanced, and copied, in ``as_async_iter``'s worker thread;
    async ones copy large tensors in a worker thread of their own. Sources that give
    owned tensors need no declaration and are never copied.

    Raises:
        TypeError: ``source`` is not iterable (a str or bytes is refused too).
    """
    if isinstance(source, str | bytes):
        raise TypeError(f"borrowed_tensors: expected tensors, got a {type(source).__name__}")
    if isinstance(source, AsyncIterable):
        return _async_owned(source)
    if isinstance(source, Iterable):
        return _sync_owned(source)
    raise TypeError(
        "borrowed_tensors: expected an (async) iterable of (name, tensor) pairs, got "
        f"{type(source).__qualname__}"
    )


def _sync_owned(items: Iterable[Any]) -> Iterator[Any]:
    iterator = iter(items)
    try:
        for item in iterator:
            yield _own(item)
    finally:
        close = getattr(iterator, "close", None)
        if callable(close):
            close()  # a generator's finally (an open file, a collective) runs now


async def _async_owned(items: AsyncIterable[Any]) -> AsyncIterator[Any]:
    iterator = aiter(items)
    try:
        async for item in iterator:
            tensor = item[1] if isinstance(item, tuple) and len(item) == 2 else None
            big = isinstance(tensor, torch.Tensor) and tensor.nbytes >= _INLINE_COPY_BYTES
            if big or callable(getattr(tensor, "full_tensor", None)):
                yield await anyio.to_thread.run_sync(_own, item)
            else:
                yield _own(item)
    finally:
        await aclose_iterator(iterator)
