"""A fake CUDA layer that follows torch's contract, so CUDA paths run and are checked on CPU.

``FakeCudaStream`` and ``FakeCudaEvent`` stand in for ``torch.cuda.Stream`` and
``torch.cuda.Event``. Used alone (monkeypatched in by a test) they record what was waited
on and recorded, and an event is complete unless a test sets ``done = False``.

``FakeCuda`` is the whole layer, installed by ``install_fake_cuda`` (the ``fake_cuda``
fixture of the tests that need it). It follows these real behaviours:

- The current device is per thread (the CUDA runtime's ``cudaSetDevice`` is per host
  thread): every thread starts on device 0, whatever another thread chose.
- Each device has its default stream; the current stream is per thread and per device
  and starts as that device's default stream. ``torch.cuda.stream(s)`` makes ``s`` the
  current stream of ``s``'s device *and* makes that device current for the block
  (``torch.cuda.set_stream`` switches the device), restoring both on exit.
- ``current_stream(None)`` and an unindexed ``"cuda"`` mean the calling thread's current
  device; ``Event.record()`` without a stream records on the current stream of the
  current device; a recorded event has a ``device`` (the stream's).
- An event recorded while the layer is installed stays pending (``query()`` is False)
  until the test calls ``complete()``: nothing on the fake device ever finishes by
  itself, so a test sees exactly what would run before the copy is done.
- ``Tensor.record_stream`` is bookkept (the caching allocator's cross-stream use), and
  ``Tensor.to("cuda:k")`` copies on the current stream of cuda:k (its device guard).
- Small pinned host buffers come from torch's ``CachingHostAllocator``, which rounds
  every request up to a power of two; large ones are registered (``cudaHostRegister``
  locks exactly the range given) and unregistered when freed. Both pin through the
  calling thread's current device.
- Each device has a UUID (``get_device_properties(k).uuid``, whose ``str`` is
  ``GPU-...``); a device index is a position in the process's visible-device list, so
  two processes with different ``CUDA_VISIBLE_DEVICES`` give one GPU different indices:
  ``FakeCuda(uuids=...)`` is one process's view, ``visible(...)`` switches it.
- A CUDA tensor pickled for another process (``reductions.reduce_tensor``) becomes
  ``(rebuild_cuda_tensor, args)`` with the storage's device index at ``args[6]`` and an
  opaque IPC handle (``reduce_tensor`` here builds that tuple for a stand-in).

Device memory cannot be faked for real tensors, so CPU tensors stand in for device
tensors: the layer replaces the few seams a stage keeps for that (``Fetch._device_empty``,
``Fetch._copy_to_device``, ``Fetch._to_device``, ``Fetch._source_device``,
``SGLangDistributedEngine._flatten``; the SGLang wire's ``_cuda_index`` and
``_reduce_cuda``) and remembers which fake device each stand-in storage lives on (a
stand-in's own ``device`` still says ``cpu``). Every allocation, copy, wait, record and
pin is appended to ``FakeCuda.calls`` with the calling thread's current device and the
stream it ran on.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch

__all__ = ["CudaCall", "FakeCuda", "FakeCudaEvent", "FakeCudaStream", "install_fake_cuda"]

_ACTIVE: FakeCuda | None = None  # the installed layer, if any


@dataclass(frozen=True)
class CudaCall:
    """One call on the fake device.

    Attributes:
        op: ``alloc``, ``copy``, ``wait_stream``, ``wait_event``, ``record_event``,
            ``record_stream``, ``pin``, ``unpin``, ``host_wait``, ``ipc_share``.
        thread_device: the calling thread's current device at the call.
        device: the device acted on (the allocation's, the copy's destination, the
            stream's), or None for host-only calls.
        stream: the stream the work ran on, or was told to wait or record.
        event: the event waited on or recorded, if any.
        other: the stream waited on (``wait_stream``), if any.
        nbytes: bytes allocated, copied or pinned (``pin``: the bytes asked for).
        reserved: for ``pin``, the bytes the allocator really pinned.
        thread: the calling thread's name.
    """

    op: str
    thread_device: int
    device: int | None
    stream: FakeCudaStream | None = None
    event: FakeCudaEvent | None = None
    other: FakeCudaStream | None = None
    nbytes: int = 0
    reserved: int = 0
    thread: str = ""


def _index_or_none(device: Any) -> int | None:
    if device is None:
        return None
    if isinstance(device, int):
        return device
    if isinstance(device, FakeCudaStream):
        return device.device.index
    parsed = torch.device(device)
    if parsed.type != "cuda":
        raise ValueError(f"fake cuda: expected a CUDA device, got {parsed}")
    return parsed.index


class FakeCudaStream:
    """A fake of ``torch.cuda.Stream(device=None, priority=0)``: a stream of one device.

    ``device=None`` is the calling thread's current device, as in torch (device 0 when
    no layer is installed). Records the streams and events it was told to wait on.
    """

    def __init__(self, device: Any = None, priority: int = 0, **kwargs: Any) -> None:
        index = _index_or_none(device)
        if index is None:
            index = _ACTIVE.current_device() if _ACTIVE is not None else 0
        self.device = torch.device("cuda", index)
        self.priority = priority
        self.label = str(kwargs.get("label", "stream"))
        self.waited: list[Any] = []
        self.host_waits = 0

    def __repr__(self) -> str:
        return f"<FakeCudaStream {self.label} on {self.device}>"

    def wait_stream(self, other: Any) -> None:
        self.waited.append(other)
        if _ACTIVE is not None:
            _ACTIVE.log("wait_stream", self.device.index, stream=self, other=other)

    def wait_event(self, event: Any) -> None:
        self.waited.append(event)
        if _ACTIVE is not None:
            _ACTIVE.log("wait_event", self.device.index, stream=self, event=event)

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        self.host_waits += 1
        if _ACTIVE is not None:
            _ACTIVE.log("host_wait", self.device.index, stream=self)


class FakeCudaEvent:
    """A fake of ``torch.cuda.Event``: remembers the stream it was recorded on.

    ``query()`` answers ``done`` and, like the real one, never blocks; ``synchronize()``
    is the real host wait for the recorded work, so it counts the wait in ``host_waits``
    and leaves the event complete. ``device`` is None until recorded, then the stream's
    device (torch's ``Event.device``). Recording with the layer installed makes the
    event pending until ``complete()``; without it ``done`` is whatever the test set.
    """

    def __init__(self, enable_timing: bool = False, blocking: bool = False, **kwargs: Any) -> None:
        self.recorded_on: Any = None
        self.device: torch.device | None = None
        self.done = True
        self.host_waits = 0

    def __repr__(self) -> str:
        state = "done" if self.done else "pending"
        return f"<FakeCudaEvent {state} on {self.recorded_on!r}>"

    def record(self, stream: Any = None) -> None:
        if stream is None and _ACTIVE is not None:
            stream = _ACTIVE.current_stream()
        self.recorded_on = stream
        self.device = getattr(stream, "device", None)
        if _ACTIVE is not None:
            self.done = False
            index = self.device.index if self.device is not None else None
            _ACTIVE.log("record_event", index, stream=stream, event=self)

    def complete(self) -> None:
        """The recorded work finished (the test says so)."""
        self.done = True

    def query(self) -> bool:
        return self.done

    def wait(self, stream: Any = None) -> None:
        target: Any = stream if stream is not None else torch.cuda.current_stream()
        target.wait_event(self)

    def synchronize(self) -> None:
        self.host_waits += 1
        self.done = True


@dataclass(frozen=True)
class _Properties:
    uuid: str


class _ThreadState(threading.local):
    def __init__(self) -> None:
        self.device = 0  # a new host thread's current CUDA device is 0
        self.streams: dict[int, FakeCudaStream] = {}


class FakeCuda:
    """``device_count`` fake devices with torch's per-thread device and stream rules."""

    def __init__(self, device_count: int = 2, uuids: list[str] | None = None) -> None:
        self.device_count = device_count
        self.uuids = uuids or [f"GPU-{k:08x}-fake-0000-0000-{k:012x}" for k in range(device_count)]
        self.calls: list[CudaCall] = []
        self._lock = threading.Lock()
        self._thread = _ThreadState()
        self.default_streams = [FakeCudaStream(k, label=f"default{k}") for k in range(device_count)]
        # stand-in storage (its StorageImpl's address) -> (fake device, the storage): the
        # layer keeps every stand-in's storage alive, so a freed one's address never names
        # a new host tensor (empty storages all have data_ptr 0, hence not data_ptr).
        self._where: dict[int, tuple[int, Any]] = {}

    # -- torch.cuda's functions ---------------------------------------------------------

    def index(self, device: Any = None) -> int:
        """Resolve a device as torch does: None or unindexed is the current device."""
        index = _index_or_none(device)
        if index is None:
            return self.current_device()
        if not 0 <= index < self.device_count:
            raise RuntimeError(f"fake cuda: invalid device ordinal {index}")
        return index

    def current_device(self) -> int:
        return self._thread.device

    def set_device(self, device: Any) -> None:
        index = _index_or_none(device)
        if index is not None and index >= 0:
            self._thread.device = self.index(index)

    @contextlib.contextmanager
    def device(self, device: Any) -> Iterator[None]:
        """``torch.cuda.device``: select ``device`` for the block (None or < 0: no-op)."""
        index = _index_or_none(device)
        if index is None or index < 0:
            yield
            return
        previous = self._thread.device
        self._thread.device = self.index(index)
        try:
            yield
        finally:
            self._thread.device = previous

    def current_stream(self, device: Any = None) -> FakeCudaStream:
        index = self.index(device)
        return self._thread.streams.get(index, self.default_streams[index])

    def default_stream(self, device: Any = None) -> FakeCudaStream:
        return self.default_streams[self.index(device)]

    def set_stream(self, stream: FakeCudaStream) -> None:
        index = self.index(stream.device)
        self._thread.device = index
        self._thread.streams[index] = stream

    @contextlib.contextmanager
    def stream(self, stream: FakeCudaStream | None) -> Iterator[None]:
        """``torch.cuda.stream``: ``stream`` current on its device, and that device current."""
        if stream is None:
            yield
            return
        index = self.index(stream.device)
        previous_device = self._thread.device
        previous_stream = self._thread.streams.get(index)
        self.set_stream(stream)
        try:
            yield
        finally:
            if previous_stream is None:
                self._thread.streams.pop(index, None)
            else:
                self._thread.streams[index] = previous_stream
            self._thread.device = previous_device

    def synchronize(self, device: Any = None) -> None:
        self.log("host_wait", self.index(device))

    def get_device_properties(self, device: Any = None) -> Any:
        """``torch.cuda.get_device_properties``: here only the ``uuid`` (``str`` is GPU-...)."""
        return _Properties(self.uuids[self.index(device)])

    def visible(self, uuids: list[str]) -> None:
        """Become another process's view: device k is now the GPU ``uuids[k]``."""
        self.uuids = list(uuids)
        self.device_count = len(uuids)

    # -- bookkeeping --------------------------------------------------------------------

    def log(self, op: str, device: int | None, **fields: Any) -> None:
        call = CudaCall(
            op,
            self.current_device(),
            device,
            thread=threading.current_thread().name,
            **fields,
        )
        with self._lock:
            self.calls.append(call)

    def ops(self, *names: str) -> list[CudaCall]:
        """The calls named ``names``, in order."""
        return [c for c in self.calls if c.op in names]

    def device_of(self, tensor: torch.Tensor) -> int | None:
        """The fake device a stand-in tensor lives on (None: host memory)."""
        entry = self._where.get(tensor.untyped_storage()._cdata)
        return None if entry is None else entry[0]

    def empty(self, nbytes: int, device: Any) -> torch.Tensor:
        """A uint8 stand-in for ``torch.empty(nbytes, device=device)``: the caching
        allocator gives the block to the current stream of the tensor's device."""
        index = self.index(device)
        tensor = torch.empty(nbytes, dtype=torch.uint8)
        self._place(tensor, index)
        self.log("alloc", index, stream=self.current_stream(index), nbytes=nbytes)
        return tensor

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """``dst.copy_(src, non_blocking=True)``: the kernel runs on the current stream of
        the destination's device (the copy's device guard is the CUDA side's)."""
        index = self.device_of(dst)
        if index is None:
            raise AssertionError("fake cuda: a host-to-device copy into host memory")
        dst.copy_(src)
        nbytes = src.numel() * src.element_size()
        self.log("copy", index, stream=self.current_stream(index), nbytes=nbytes)

    def to(self, tensor: torch.Tensor, device: Any) -> torch.Tensor:
        """``tensor.to(device, non_blocking=True)`` for a host tensor."""
        out = self.empty(tensor.numel() * tensor.element_size(), device)
        self.copy(out, tensor.contiguous().view(-1).view(torch.uint8))
        return out.view(tensor.dtype).view(tensor.shape)

    def record_stream(self, tensor: torch.Tensor, stream: Any) -> None:
        index = stream.device.index if stream is not None else None
        self.log("record_stream", index, stream=stream, nbytes=int(tensor.nbytes))

    def _place(self, tensor: torch.Tensor, index: int) -> None:
        storage = tensor.untyped_storage()
        self._where[storage._cdata] = (index, storage)

    def mark(self, tensor: torch.Tensor, device: Any) -> torch.Tensor:
        """Say that stand-in ``tensor`` lives on fake ``device`` (returns it)."""
        self._place(tensor, self.index(device))
        return tensor

    def reduce_tensor(self, tensor: torch.Tensor) -> tuple[Any, tuple[Any, ...]]:
        """torch's CUDA-IPC ``reduce_tensor`` for a stand-in: the same 15 arguments, the
        storage's device index at position 6, a fake handle that names the storage."""
        from torch.multiprocessing import reductions

        index = self.device_of(tensor)
        if index is None:
            raise AssertionError("fake cuda: reduce_tensor of a host tensor")
        storage = tensor._typed_storage()  # type: ignore[no-untyped-call]
        handle = f"ipc:{tensor.untyped_storage().data_ptr():x}".encode()
        self.log("ipc_share", index, nbytes=int(tensor.untyped_storage().nbytes()))
        return (
            reductions.rebuild_cuda_tensor,
            (
                type(tensor),
                tensor.size(),
                tensor.stride(),
                tensor.storage_offset(),
                type(storage),
                tensor.dtype,
                index,
                handle,
                tensor.untyped_storage().nbytes(),
                0,
                tensor.requires_grad,
                b"ref-counter",
                0,
                b"event",
                True,
            ),
        )

    def register_host(self, address: int, nbytes: int) -> None:
        """``cudaHostRegister``: locks exactly ``nbytes`` at ``address``, through the
        calling thread's current device."""
        self.log("pin", None, nbytes=nbytes, reserved=nbytes)

    def unregister_host(self, address: int) -> None:
        """``cudaHostUnregister``."""
        self.log("unpin", None)

    def pin(self, nbytes: int) -> torch.Tensor:
        """A pinned host buffer as ``CachingHostAllocator`` gives one: the request is
        rounded up to a power of two, pinned through the current device's context."""
        reserved = 1 << max(nbytes - 1, 0).bit_length() if nbytes else 0
        self.log("pin", None, nbytes=nbytes, reserved=reserved)
        return torch.empty(nbytes, dtype=torch.uint8)


def install_fake_cuda(monkeypatch: pytest.MonkeyPatch, device_count: int = 2) -> FakeCuda:
    """Install a ``FakeCuda`` into ``torch.cuda`` and the stage seams for this test."""
    from weightpipe.stages import _memory
    from weightpipe.stages._layout import flatten
    from weightpipe.stages.engines.sglang import wire
    from weightpipe.stages.engines.sglang.distributed import SGLangDistributedEngine
    from weightpipe.stages.fetch import Fetch

    fake = FakeCuda(device_count)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: fake.device_count)
    monkeypatch.setattr(wire, "_cuda_index", fake.device_of)
    monkeypatch.setattr(wire, "_reduce_cuda", fake.reduce_tensor)
    for name in (
        "current_device",
        "set_device",
        "device",
        "current_stream",
        "default_stream",
        "set_stream",
        "stream",
        "synchronize",
        "get_device_properties",
    ):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
    monkeypatch.setattr(torch.cuda, "Stream", FakeCudaStream)
    monkeypatch.setattr(torch.cuda, "Event", FakeCudaEvent)
    monkeypatch.setattr(
        torch.Tensor, "record_stream", lambda tensor, stream: fake.record_stream(tensor, stream)
    )
    monkeypatch.setattr(
        Fetch, "_device_empty", lambda self, nbytes: fake.empty(nbytes, self.device)
    )
    monkeypatch.setattr(Fetch, "_copy_to_device", lambda self, dst, src: fake.copy(dst, src))
    monkeypatch.setattr(Fetch, "_to_device", lambda self, tensor: fake.to(tensor, self.device))

    def source_device(tensor: torch.Tensor) -> torch.device:
        index = fake.device_of(tensor)
        return tensor.device if index is None else torch.device("cuda", index)

    monkeypatch.setattr(Fetch, "_source_device", staticmethod(source_device))

    def flatten_on_device(engine: Any, tensors: list[tuple[str, torch.Tensor]]) -> torch.Tensor:
        packed, _ = flatten(tensors, 1)
        buffer = fake.empty(packed.numel(), engine.device)
        fake.copy(buffer, packed)
        return buffer

    monkeypatch.setattr(SGLangDistributedEngine, "_flatten", flatten_on_device)
    real_to = torch.Tensor.to

    def to(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        # Tensor.to(device, ...) with a CUDA device: a stand-in on that fake device.
        target = kwargs.get("device", args[0] if args else None)
        if isinstance(target, str | torch.device) and torch.device(target).type == "cuda":
            if kwargs.get("dtype") is not None or any(isinstance(a, torch.dtype) for a in args):
                raise NotImplementedError("fake cuda: Tensor.to with a device and a dtype")
            return fake.to(tensor, target)
        return real_to(tensor, *args, **kwargs)  # type: ignore[no-any-return]

    monkeypatch.setattr(torch.Tensor, "to", to)
    monkeypatch.setattr(_memory, "_pin_small", fake.pin)
    monkeypatch.setattr(_memory, "_register_host", fake.register_host)
    monkeypatch.setattr(_memory, "_unregister_host", fake.unregister_host)
    monkeypatch.setattr(sys.modules[__name__], "_ACTIVE", fake)  # None again at teardown
    return fake
