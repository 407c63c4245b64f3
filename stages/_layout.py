"""The one bucket layout model: which tensors share a bucket, and where each one sits.

Everything here is deterministic and free of I/O so that the Fetch stage, the
torch.distributed transport and the SGLang wire format all agree on one layout. A bucket
is one contiguous uint8 buffer; each tensor starts at an offset aligned to
``max(align_bytes, element size)`` so that every tensor can be rebuilt as a view of the
buffer without a copy (``view(dtype)`` needs its byte offset to be a multiple of the
element size, which is exactly what SGLang's ``FlattenedTensorBucket`` needs to rebuild
it). A ``TensorLayout`` entry is built once per tensor and carries everything SGLang's
flattened-bucket metadata holds (name, shape, dtype, start, end), so the wire format turns
entries into metadata without measuring the tensors again; ``views_layout`` recovers the
entries of a bucket that is already one flat buffer. Buckets are bounded by
``bucket_bytes`` *including* the alignment padding; the only bucket allowed past the bound
holds a single tensor larger than it.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "BucketPlanner",
    "TensorLayout",
    "align_up",
    "as_bytes",
    "copy_into",
    "flatten",
    "layout_of",
    "plan_buckets",
    "tensor_alignment",
    "unflatten",
    "views_layout",
]


@dataclass(frozen=True)
class TensorLayout:
    """Where one tensor lives in a flattened bucket.

    Attributes:
        name: the tensor's name.
        dtype: its dtype; the bytes at ``offset`` are reinterpreted as this.
        shape: its shape.
        offset: byte offset of its first element in the bucket buffer.
        nbytes: its size in bytes (``numel * element_size``).
    """

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def end(self) -> int:
        """The byte just past the tensor."""
        return self.offset + self.nbytes


def align_up(offset: int, align: int) -> int:
    """The smallest multiple of ``align`` that is >= ``offset``.

    Raises:
        ValueError: ``align`` < 1.
    """
    if align < 1:
        raise ValueError(f"alignment must be >= 1 byte, got {align}")
    return -(-offset // align) * align


def tensor_alignment(dtype: torch.dtype, align_bytes: int) -> int:
    """The alignment a tensor of ``dtype`` gets: ``max(align_bytes, element size)``."""
    return max(align_bytes, dtype.itemsize)


class BucketPlanner:
    """Decides, one tensor at a time, whether it opens a new bucket and at which offset.

    The single rule: a tensor joins the open bucket if its aligned end stays within
    ``bucket_bytes``; otherwise it opens a new bucket at offset 0. A tensor that alone is
    larger than ``bucket_bytes`` therefore always opens a bucket, and the next tensor
    always overflows it, so it travels alone.

    Raises:
        ValueError: ``bucket_bytes`` < 1.
    """

    __slots__ = ("bucket_bytes", "buckets", "used")

    def __init__(self, bucket_bytes: int) -> None:
        if bucket_bytes < 1:
            raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
        self.bucket_bytes = bucket_bytes
        self.buckets = 0  # buckets opened so far
        self.used = 0  # bytes of the open bucket, padding included

    def place(self, nbytes: int, align: int) -> tuple[bool, int]:
        """Place a tensor of ``nbytes``; returns ``(opens_new_bucket, offset)``."""
        if self.buckets:
            offset = align_up(self.used, align)
            if offset + nbytes <= self.bucket_bytes:
                self.used = offset + nbytes
                return False, offset
        self.buckets += 1
        self.used = nbytes
        return True, 0


def plan_buckets(
    sizes: Sequence[int], bucket_bytes: int, *, align: int | Sequence[int] = 1
) -> list[range]:
    """Split tensors of ``sizes`` bytes, in order, into consecutive buckets.

    ``align`` is one alignment for every tensor or one per tensor (see
    ``tensor_alignment``). Returns one ``range`` of tensor indices per bucket; an empty
    input gives no buckets.

    Raises:
        ValueError: ``bucket_bytes`` < 1, a negative size, or ``align`` of the wrong length.
    """
    aligns = [align] * len(sizes) if isinstance(align, int) else list(align)
    if len(aligns) != len(sizes):
        raise ValueError(f"got {len(aligns)} alignments for {len(sizes)} sizes")
    planner = BucketPlanner(bucket_bytes)
    starts: list[int] = []
    for index, (size, one_align) in enumerate(zip(sizes, aligns, strict=True)):
        if size < 0:
            raise ValueError(f"tensor {index} has a negative size {size}")
        opens, _ = planner.place(size, one_align)
        if opens:
            starts.append(index)
    if not starts:
        return []
    ends = [*starts[1:], len(sizes)]
    return [range(start, end) for start, end in zip(starts, ends, strict=True)]


def layout_of(
    named_tensors: Iterable[tuple[str, torch.Tensor]], align_bytes: int = 256
) -> tuple[tuple[TensorLayout, ...], int]:
    """The packed layout of tensors in one buffer and the buffer's size in bytes.

    Ignores ``bucket_bytes``: everything given goes into one buffer.
    """
    layouts: list[TensorLayout] = []
    end = 0
    for name, tensor in named_tensors:
        offset = align_up(end, tensor_alignment(tensor.dtype, align_bytes))
        nbytes = tensor.numel() * tensor.element_size()
        layouts.append(TensorLayout(name, tensor.dtype, tuple(tensor.shape), offset, nbytes))
        end = offset + nbytes
    return tuple(layouts), end


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's storage as a flat uint8 view (no copy); bool and float8 too.

    Raises:
        ValueError: the tensor is not contiguous.
    """
    if not tensor.is_contiguous():
        raise ValueError("as_bytes needs a contiguous tensor")
    flat = tensor.reshape(-1)
    return flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)


def views_layout(
    buffer: torch.Tensor, named_tensors: Sequence[tuple[str, torch.Tensor]]
) -> tuple[TensorLayout, ...] | None:
    """The layout of tensors that already are contiguous views of ``buffer``, or ``None``.

    Each tensor must share ``buffer``'s storage, lie inside it and start at a multiple of
    its element size (what ``unflatten`` and SGLang's rebuild need). ``None`` as soon as
    one tensor is not such a view: the caller then flattens a copy.
    """
    if buffer.dtype != torch.uint8 or buffer.dim() != 1 or not buffer.is_contiguous():
        return None
    base = buffer.data_ptr()
    storage = buffer.untyped_storage().data_ptr()
    size = buffer.numel()
    layouts: list[TensorLayout] = []
    for name, tensor in named_tensors:
        offset = tensor.data_ptr() - base
        nbytes = tensor.numel() * tensor.element_size()
        if (
            tensor.untyped_storage().data_ptr() != storage
            or not tensor.is_contiguous()
            or offset < 0
            or offset + nbytes > size
            or offset % tensor.element_size()
        ):
            return None
        layouts.append(TensorLayout(name, tensor.dtype, tuple(tensor.shape), offset, nbytes))
    return tuple(layouts)


def flatten(
    named_tensors: Sequence[tuple[str, torch.Tensor]],
    align_bytes: int = 256,
    *,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, tuple[TensorLayout, ...]]:
    """Copy tensors into one new uint8 buffer; returns ``(buffer, layout)``.

    The buffer lives on ``device`` (default: the first tensor's device, else CPU), so a
    host tensor is copied straight into a device buffer with no intermediate copy; padding
    bytes are zero, so equal inputs give equal buffers. Non-contiguous tensors are copied
    element-wise into place. ``align_bytes=1`` packs tensors back to back wherever their
    element sizes allow (what SGLang's distributed receiver allocates).
    """
    layouts, total = layout_of(named_tensors, align_bytes)
    if device is None:
        device = named_tensors[0][1].device if named_tensors else torch.device("cpu")
    buffer = torch.zeros(total, dtype=torch.uint8, device=device)
    for layout, (_, tensor) in zip(layouts, named_tensors, strict=True):
        copy_into(buffer, layout, tensor)
    return buffer, layouts


def copy_into(buffer: torch.Tensor, layout: TensorLayout, tensor: torch.Tensor) -> None:
    """Copy ``tensor`` into its place in ``buffer`` (bytes for contiguous, typed otherwise)."""
    if layout.nbytes == 0:
        return
    target = buffer[layout.offset : layout.end]
    if tensor.is_contiguous() and tensor.device.type == "cpu" and buffer.device.type == "cpu":
        # A plain memmove (GIL released by ctypes) beats copy_ on CPU when the source is a
        # memory-mapped file: no threads contending on the page faults, no kernel dispatch.
        ctypes.memmove(target.data_ptr(), tensor.data_ptr(), layout.nbytes)
    elif tensor.is_contiguous():
        target.copy_(as_bytes(tensor), non_blocking=True)
    else:
        # A same-dtype copy_ moves elements without arithmetic, so it is bit-exact.
        target.view(layout.dtype).view(layout.shape).copy_(tensor, non_blocking=True)


def unflatten(
    buffer: torch.Tensor, layout: Iterable[TensorLayout]
) -> list[tuple[str, torch.Tensor]]:
    """Rebuild ``(name, tensor)`` pairs as views of ``buffer`` (no copy).

    Raises:
        ValueError: a layout entry reaches past the buffer, or its offset is not a multiple
            of its element size (names the tensor).
    """
    size = buffer.numel()
    pairs: list[tuple[str, torch.Tensor]] = []
    for entry in layout:
        if entry.end > size:
            raise ValueError(
                f"tensor {entry.name!r}: bytes [{entry.offset}, {entry.end}) reach past the "
                f"{size}-byte bucket buffer"
            )
        element = entry.dtype.itemsize
        if entry.offset % element:
            raise ValueError(
                f"tensor {entry.name!r}: offset {entry.offset} is not a multiple of its "
                f"{element}-byte element size"
            )
        raw = buffer[entry.offset : entry.end]
        typed = raw if entry.dtype == torch.uint8 else raw.view(entry.dtype)
        pairs.append((entry.name, typed.view(entry.shape)))
    return pairs
