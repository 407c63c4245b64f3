"""The Fetch stage in a real Pipeline: bucketing, bit-exact flattening, validation, syncs."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch
from safetensors.torch import save_file

from tests.fakes import FakeCuda, FakeCudaEvent, FakeCudaStream, install_fake_cuda
from tests.helpers import DTYPES, as_bytes, random_tensor
from weightpipe.pipeline import Pipeline, StageError
from weightpipe.stages._layout import tensor_alignment
from weightpipe.stages.bucket import WeightBucket
from weightpipe.stages.engines.base import WireSpec
from weightpipe.stages.fetch import Fetch, FetchStats
from weightpipe.stages.sources import named_tensors, safetensors_source


def every_dtype() -> list[tuple[str, torch.Tensor]]:
    pairs = []
    for i, dtype in enumerate(DTYPES):
        for j, shape in enumerate([(17, 9), (), (0,), (300,)]):
            pairs.append((f"m.{i}.{j}", random_tensor(dtype, shape, 100 * i + j)))
    return pairs


async def run_fetch(fetch: Fetch, source: Any, *, depth: int = 2) -> tuple[list[WeightBucket], Any]:
    buckets: list[WeightBucket] = []

    async def sink(bucket: WeightBucket) -> None:
        buckets.append(bucket)

    report = await Pipeline([fetch], depth=depth).run(source, sink=sink)
    return buckets, report


def check_buckets(
    buckets: list[WeightBucket], pairs: list[tuple[str, torch.Tensor]], bucket_bytes: int
) -> None:
    assert [b.index for b in buckets] == list(range(len(buckets)))
    assert [b.is_last for b in buckets] == [False] * (len(buckets) - 1) + [True]
    got = [p for b in buckets for p in b.tensors]
    assert [n for n, _ in got] == [n for n, _ in pairs]
    for (name, a), (_, b) in zip(got, pairs, strict=True):
        assert a.dtype == b.dtype, name
        assert a.shape == b.shape, name
        assert torch.equal(as_bytes(a), as_bytes(b)), name
    sources = dict(pairs)
    for bucket in buckets:
        assert bucket.nbytes <= bucket_bytes or len(bucket) == 1
        if bucket.buffer is None:
            # Unpacked ("auto" on CPU): the source tensors themselves, no copy.
            for name, tensor in bucket.tensors:
                assert tensor.data_ptr() == sources[name].data_ptr(), name
            continue
        base = bucket.buffer.data_ptr()
        for _, tensor in bucket.tensors:
            if tensor.numel():
                offset = tensor.data_ptr() - base
                assert 0 <= offset < bucket.buffer.numel()
                assert offset % tensor_alignment(tensor.dtype, 256) == 0


@pytest.mark.parametrize("bucket_bytes", [1, 700, 4096, 1 << 20])
async def test_every_dtype_round_trips_bit_exact(bucket_bytes: int) -> None:
    pairs = every_dtype()
    fetch = Fetch(bucket_bytes, version=7, flatten=True)
    buckets, report = await run_fetch(fetch, pairs)
    check_buckets(buckets, pairs, bucket_bytes)
    assert {b.version for b in buckets} == {7}
    assert report.stage("fetch").items_out == len(buckets)
    stats = fetch.stats
    assert stats.tensors == len(pairs)
    assert stats.bytes == sum(t.nbytes for _, t in pairs)
    assert stats.buckets == len(buckets)
    assert stats.syncs == 1
    assert stats.made_contiguous == 0


async def test_lone_oversize_tensor_travels_alone() -> None:
    pairs = [
        ("a", torch.ones(10)),
        ("big", torch.arange(1000, dtype=torch.float32)),
        ("b", torch.ones(10)),
        ("c", torch.ones(10)),
    ]
    buckets, _ = await run_fetch(Fetch(1024, flatten=True), pairs)
    assert [b.names for b in buckets] == [["a"], ["big"], ["b", "c"]]
    assert buckets[1].nbytes == 4000
    check_buckets(buckets, pairs, 1024)


async def test_non_contiguous_is_copied_into_place_and_counted() -> None:
    base = torch.arange(48, dtype=torch.float32).view(6, 8)
    pairs = [("t", base.t()), ("s", base[:, ::3]), ("c", torch.ones(4))]
    fetch = Fetch(1 << 20)
    buckets, _ = await run_fetch(fetch, pairs)
    assert buckets[0].meta["made_contiguous"] == 2
    assert fetch.stats.made_contiguous == 2
    for (_, got), (_, want) in zip(buckets[0].tensors, pairs, strict=True):
        assert torch.equal(got, want)
        assert got.is_contiguous()


async def test_sources_of_every_kind() -> None:
    pairs = every_dtype()[:10]

    async def checkpoint_engine() -> AsyncIterator[tuple[str, torch.Tensor]]:
        for pair in pairs:
            yield pair

    for source in (
        pairs,
        iter(pairs),
        checkpoint_engine(),
        named_tensors(dict(pairs)),
        named_tensors(checkpoint_engine()),
    ):
        buckets, _ = await run_fetch(Fetch(2048, flatten=True), source)
        check_buckets(buckets, pairs, 2048)


async def test_versions_per_sync_and_reset() -> None:
    fetch = Fetch(512, version=1)
    pairs = every_dtype()[:6]
    first, _ = await run_fetch(fetch, pairs)
    fetch.version = 2
    second, _ = await run_fetch(fetch, pairs)  # same names again: a new sync
    assert {b.version for b in first} == {1}
    assert {b.version for b in second} == {2}
    assert second[0].index == 0
    fetch.reset(9)
    assert fetch.version == 9
    assert fetch.stats.syncs == 3
    assert isinstance(fetch.stats, FetchStats)


async def test_flatten_false_passes_tensors_through() -> None:
    pairs = every_dtype()[:8]
    buckets, _ = await run_fetch(Fetch(1024, flatten=False), pairs)
    assert all(b.buffer is None for b in buckets)
    got = [p for b in buckets for p in b.tensors]
    for (name, a), (_, b) in zip(got, pairs, strict=True):
        assert torch.equal(as_bytes(a), as_bytes(b)), name


async def test_auto_passes_cpu_tensors_as_they_are_and_counts_no_writes() -> None:
    pairs = [(f"w{i}", random_tensor(torch.bfloat16, (64, 32), i)) for i in range(6)]
    fetch = Fetch(8192)  # flatten="auto"
    buckets, _ = await run_fetch(fetch, pairs)
    assert all(b.buffer is None for b in buckets)
    assert fetch.written_bytes == 0
    check_buckets(buckets, pairs, 8192)
    # A non-contiguous tensor is made contiguous: that copy is a write.
    wide = random_tensor(torch.float32, (16, 8), 9)
    fetch = Fetch(8192)
    buckets, _ = await run_fetch(fetch, [("t", wide.t())])
    assert buckets[0].tensors[0][1].is_contiguous()
    assert fetch.written_bytes == wide.numel() * 4


async def test_auto_packs_file_spans_and_counts_the_read(tmp_path: Path) -> None:
    tensors = {f"w{i}": random_tensor(torch.bfloat16, (32, 16), i) for i in range(4)}
    save_file(tensors, str(tmp_path / "m.safetensors"))
    fetch = Fetch(1 << 20)
    buckets, _ = await run_fetch(fetch, safetensors_source(tmp_path, direct=True))
    assert all(b.buffer is not None for b in buckets)
    assert fetch.written_bytes == sum(t.nbytes for t in tensors.values())
    got = dict(p for b in buckets for p in b.tensors)
    assert all(torch.equal(as_bytes(got[n]), as_bytes(t)) for n, t in tensors.items())


async def test_use_wire_packs_into_shared_memory_at_the_engines_alignment() -> None:
    pairs = [(f"w{i}", random_tensor(torch.float16, (33,), i)) for i in range(5)]
    fetch = Fetch(4096)
    fetch.use_wire(WireSpec(align_bytes=16, shared_memory=True))
    buckets, _ = await run_fetch(fetch, pairs)
    check_buckets(buckets, pairs, 4096)
    for bucket in buckets:
        assert bucket.buffer is not None and bucket.buffer.is_shared()  # type: ignore[no-untyped-call]
    assert fetch.written_bytes == sum(t.nbytes for _, t in pairs)
    fetch.use_wire(None)  # back to views
    buckets, _ = await run_fetch(fetch, pairs)
    assert all(b.buffer is None for b in buckets)
    with pytest.raises(ValueError, match="aligned to 512 bytes"):
        fetch.use_wire(WireSpec(align_bytes=512))


def test_flatten_must_be_a_bool_or_auto() -> None:
    with pytest.raises(ValueError, match="flatten must be True, False or 'auto'"):
        Fetch(flatten="yes")  # type: ignore[arg-type]


async def test_recycled_buffers_never_overwrite_buckets_still_held() -> None:
    pairs = [(f"w{i}", random_tensor(torch.bfloat16, (1000,), i)) for i in range(40)]
    buckets, _ = await run_fetch(
        Fetch(4096, keep_buffers=2, flatten=True), pairs
    )  # every bucket kept
    check_buckets(buckets, pairs, 4096)
    assert len(
        {b.buffer.untyped_storage().data_ptr() for b in buckets if b.buffer is not None}
    ) == len(buckets)


async def test_buffers_are_recycled_once_dropped() -> None:
    pairs = [(f"w{i}", random_tensor(torch.bfloat16, (3 << 20,), i)) for i in range(12)]  # 6 MiB
    seen: list[int] = []
    matches = 0

    async def sink(bucket: WeightBucket) -> None:
        nonlocal matches
        assert bucket.buffer is not None
        seen.append(bucket.buffer.untyped_storage().data_ptr())
        name, tensor = bucket.tensors[0]
        matches += torch.equal(as_bytes(tensor), as_bytes(dict(pairs)[name]))

    await Pipeline([Fetch(13 << 20, keep_buffers=2, flatten=True)], depth=1).run(pairs, sink=sink)
    assert len(seen) == 6
    assert matches == 6
    assert len(set(seen)) <= 2


async def test_pool_is_kept_between_syncs_unless_told_otherwise() -> None:
    pairs = [(f"w{i}", torch.ones(1000)) for i in range(8)]
    seen: list[int] = []

    async def sink(bucket: WeightBucket) -> None:
        assert bucket.buffer is not None
        seen.append(bucket.buffer.untyped_storage().data_ptr())

    fetch = Fetch(8192, flatten=True)
    await Pipeline([fetch]).run(pairs, sink=sink)
    first = set(seen)
    assert fetch.retained_bytes >= 8192
    await Pipeline([fetch]).run(pairs, sink=sink)
    assert set(seen) == first  # the second sync reused the first one's buffers
    fetch.release_buffers()
    assert fetch.retained_bytes == 0
    fetch.reserve(2)
    assert fetch.retained_bytes == 2 * 8192
    with pytest.raises(ValueError, match="reserve 1 to 4 buffers"):
        fetch.reserve(5)
    releasing = Fetch(8192, retain_buffers=False, flatten=True)
    await Pipeline([releasing]).run(pairs, sink=sink)
    assert releasing.retained_bytes == 0


# -- bad input: an error naming the tensor, and nothing of its bucket downstream ---------


def _bad_cases() -> list[tuple[str, Any, type[Exception], str]]:
    return [
        ("non-tensor", ("x", [1.0, 2.0]), TypeError, "tensor 'x': expected a torch.Tensor"),
        ("duplicate", ("w2", torch.ones(4)), ValueError, "tensor 'w2': duplicate name"),
        ("meta", ("x", torch.empty(3, device="meta")), ValueError, "tensor 'x': is on the meta"),
        ("complex", ("x", torch.ones(2, dtype=torch.complex64)), ValueError, "tensor 'x': complex"),
        ("not a pair", 42, TypeError, "expected a (name, tensor) pair, got 42"),
        ("name not a str", (3, torch.ones(1)), TypeError, "expected a (name, tensor) pair"),
    ]


@pytest.mark.parametrize(("case", "bad", "kind", "message"), _bad_cases())
async def test_bad_input_names_the_tensor_and_stops_its_bucket(
    case: str, bad: Any, kind: type[Exception], message: str
) -> None:
    # Buckets of two 16-byte tensors (with 256-byte alignment that is 272 bytes).
    good = [(f"w{i}", torch.full((4,), float(i))) for i in range(5)]
    source = [*good, bad, ("after", torch.ones(4))]
    buckets: list[WeightBucket] = []

    async def sink(bucket: WeightBucket) -> None:
        buckets.append(bucket)

    with pytest.raises(StageError) as caught:
        await Pipeline([Fetch(300, flatten=True)]).run(source, sink=sink)
    error = caught.value
    assert error.stage == "fetch"
    assert error.phase == "process"
    assert isinstance(error.__cause__, kind)
    assert message in str(error.__cause__)
    # w0..w3 left in full buckets; w4 shared a bucket with the bad tensor: never sent.
    assert [b.names for b in buckets] == [["w0", "w1"], ["w2", "w3"]]
    assert not any(b.is_last for b in buckets)


async def test_sparse_tensor_is_refused_by_name() -> None:
    # Called directly: the pipeline's item_nbytes itself trips over sparse tensors.
    fetch = Fetch(1 << 20)
    await fetch.open()
    with pytest.raises(ValueError, match=r"tensor 'x': torch\.sparse_coo tensors"):
        async for _ in fetch.process(("x", torch.eye(3).to_sparse())):
            pass
    await fetch.close()


async def test_allow_list_exact_names_and_patterns() -> None:
    fetch = Fetch(1 << 20, allow=["embed.weight", "layers.*.q.weight"])
    ok = [("embed.weight", torch.ones(2)), ("layers.3.q.weight", torch.ones(2))]
    buckets, _ = await run_fetch(fetch, ok)
    assert buckets[0].names == ["embed.weight", "layers.3.q.weight"]
    with pytest.raises(StageError, match=r"tensor 'layers\.3\.k\.weight': not in the allow-list"):
        await run_fetch(fetch, [*ok, ("layers.3.k.weight", torch.ones(2))])


async def test_empty_source_errors_or_commits_an_empty_sync() -> None:
    with pytest.raises(StageError) as caught:
        await run_fetch(Fetch(version=4), [])
    assert caught.value.phase == "flush"
    assert "no tensors for version 4" in str(caught.value)
    buckets, _ = await run_fetch(Fetch(version=4, empty_source="empty"), [])
    assert len(buckets) == 1
    (only,) = buckets
    assert (only.index, only.is_last, only.version, len(only)) == (0, True, 4, 0)


def test_constructor_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="bucket_bytes"):
        Fetch(0)
    with pytest.raises(ValueError, match="align_bytes"):
        Fetch(align_bytes=3)
    with pytest.raises(ValueError, match="empty_source"):
        Fetch(empty_source="skip")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="keep_buffers"):
        Fetch(keep_buffers=0)


# -- errors at start, mid-stream, at close; cancellation ---------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
async def test_error_at_open_names_the_stage() -> None:
    with pytest.raises(StageError) as caught:
        await run_fetch(Fetch(device="cuda"), every_dtype())
    assert (caught.value.stage, caught.value.phase) == ("fetch", "open")
    assert "CUDA is unavailable" in str(caught.value)


async def test_source_failure_mid_stream_leaves_no_bucket_behind() -> None:
    def broken() -> Any:
        yield ("a", torch.ones(4))
        raise OSError("disk gone")

    fetch = Fetch(1 << 20)
    buckets: list[WeightBucket] = []

    async def sink(bucket: WeightBucket) -> None:
        buckets.append(bucket)

    with pytest.raises(StageError, match="disk gone"):
        await Pipeline([fetch]).run(broken(), sink=sink)
    assert buckets == []
    assert fetch._open_bucket is None  # closed: nothing held between syncs


async def test_downstream_failure_and_cancellation_release_the_open_bucket() -> None:
    pairs = [(f"w{i}", torch.ones(64)) for i in range(20)]
    fetch = Fetch(600)
    entered = anyio.Event()

    async def stuck_sink(bucket: WeightBucket) -> None:
        entered.set()
        await anyio.sleep_forever()

    async with anyio.create_task_group() as group:
        group.start_soon(lambda: Pipeline([fetch]).run(pairs, sink=stuck_sink))
        await entered.wait()
        group.cancel_scope.cancel()
    assert fetch._open_bucket is None

    async def failing_sink(bucket: WeightBucket) -> None:
        raise RuntimeError("engine refused")

    with pytest.raises(StageError):  # which stage it names is the pipeline's business
        await Pipeline([fetch]).run(pairs, sink=failing_sink)
    assert fetch._open_bucket is None
    # The same Fetch serves the next sync normally.
    buckets, _ = await run_fetch(fetch, pairs)
    check_buckets(buckets, pairs, 600)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
async def test_cuda_buckets_are_ready_after_their_event() -> None:  # pragma: no cover
    pairs = every_dtype()
    pairs.append(("on_gpu", torch.arange(100, dtype=torch.float32, device="cuda")))
    buckets, _ = await run_fetch(Fetch(4096, device="cuda"), pairs)
    for bucket in buckets:
        assert bucket.ready is not None
        bucket.wait_ready()
        assert bucket.buffer is not None
        assert bucket.buffer.device.type == "cuda"
    torch.cuda.current_stream().synchronize()
    got = [(n, t.cpu()) for b in buckets for n, t in b.tensors]
    check_buckets_cpu = [(n, t.cpu()) for n, t in pairs]
    for (name, a), (_, b) in zip(got, check_buckets_cpu, strict=True):
        assert torch.equal(as_bytes(a), as_bytes(b)), name


# -- the CUDA path on the fake CUDA layer (tests.fakes.cuda) ------------------------------


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> FakeCuda:
    return install_fake_cuda(monkeypatch, device_count=2)


def _copy_stream(fetch: Fetch) -> FakeCudaStream:
    stream = fetch._stream
    assert isinstance(stream, FakeCudaStream)
    return stream


async def test_unindexed_cuda_is_the_openers_device_in_every_worker_thread(
    fake_cuda: FakeCuda,
) -> None:
    """Under torchrun the loop thread is on cuda:k; Fetch's worker threads start on 0."""
    torch.cuda.set_device(1)
    fetch = Fetch(4096, device="cuda")
    pairs = every_dtype()
    buckets, _ = await run_fetch(fetch, pairs)
    stream = _copy_stream(fetch)
    loop_thread = threading.current_thread().name
    allocs, copies, pins = fake_cuda.ops("alloc"), fake_cuda.ops("copy"), fake_cuda.ops("pin")
    assert len(allocs) == len(copies) == len(buckets) > 1
    for call in allocs + copies:
        # On cuda:1, on the copy stream, from a worker thread that had selected cuda:1.
        assert (call.device, call.thread_device, call.stream) == (1, 1, stream), call
        assert call.thread != loop_thread
    assert fetch.device == stream.device == torch.device("cuda", 1)
    assert pins and all(p.thread_device == 1 and p.thread != loop_thread for p in pins)
    for bucket in buckets:
        assert bucket.buffer is not None and fake_cuda.device_of(bucket.buffer) == 1
        event = bucket.ready
        assert isinstance(event, FakeCudaEvent)
        assert event.recorded_on is stream and event.device == torch.device("cuda", 1)
        assert not event.query()  # still pending: nothing on the fake device finishes
    check_buckets(buckets, pairs, 4096)
    # Host-staged buckets wait for nothing on the device (not the trainer's kernels).
    assert stream.waited == []


async def test_a_pinned_buffer_waits_for_its_copy_before_the_next_bucket(
    fake_cuda: FakeCuda,
) -> None:
    fetch = Fetch(4096, device="cuda:1", keep_buffers=64)
    pairs = every_dtype()
    first, _ = await run_fetch(fetch, pairs)
    # Each bucket's copy out of its staging buffer is still pending: none is reused.
    pins = fake_cuda.ops("pin")
    assert len(pins) == len(first) > 1
    # Pinned through cuda:1's context, not cuda:0's (a worker thread's default device).
    assert all(p.thread_device == 1 for p in pins)
    events = [b.ready for b in first]
    del first
    fake_cuda.calls.clear()
    second, _ = await run_fetch(fetch, pairs)
    # Downstream dropped the first sync's buckets, but their copies have not finished.
    assert len(fake_cuda.ops("pin")) == len(second)
    for event in [*events, *(b.ready for b in second)]:
        event.complete()
    del second
    fake_cuda.calls.clear()
    third, _ = await run_fetch(fetch, pairs)
    assert fake_cuda.ops("pin") == []  # every staging buffer is reused once its copy is done
    check_buckets(third, pairs, 4096)


async def test_unpacked_buckets_move_on_the_copy_stream_of_their_device(
    fake_cuda: FakeCuda,
) -> None:
    fetch = Fetch(4096, device="cuda:1", flatten=False)
    pairs = every_dtype()
    buckets, _ = await run_fetch(fetch, pairs)
    stream = _copy_stream(fetch)
    assert len(fake_cuda.ops("copy")) == len(pairs)
    assert stream.waited == []  # host sources: the copy waits for no device work
    for call in fake_cuda.ops("alloc", "copy"):
        assert (call.device, call.thread_device, call.stream) == (1, 1, stream), call
    for bucket in buckets:
        assert isinstance(bucket.ready, FakeCudaEvent)
        assert bucket.ready.recorded_on is stream and not bucket.ready.query()
        assert all(fake_cuda.device_of(t) == 1 for _, t in bucket.tensors)
    got = [p for b in buckets for p in b.tensors]
    for (name, a), (_, b) in zip(got, pairs, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(as_bytes(a), as_bytes(b)), name


async def test_an_empty_packed_sync_allocates_on_the_stages_device(fake_cuda: FakeCuda) -> None:
    torch.cuda.set_device(1)
    fetch = Fetch(device="cuda", empty_source="empty", flatten=True)
    buckets, _ = await run_fetch(fetch, [])
    assert buckets[0].buffer is not None and fake_cuda.device_of(buckets[0].buffer) == 1


@pytest.mark.parametrize("flatten", ["auto", False])
async def test_a_cpu_fetch_copies_cuda_sources_into_pinned_memory_on_their_stream(
    fake_cuda: FakeCuda, flatten: Any
) -> None:
    # The trainer's weights live on cuda:1 and were written on its side stream, current
    # on the loop thread; a CPU Fetch (host-side quantization) pulls them.
    pairs = every_dtype()
    for _, tensor in pairs:
        fake_cuda.mark(tensor, 1)
    trainer = FakeCudaStream(1, label="trainer")
    torch.cuda.set_stream(trainer)  # type: ignore[arg-type]
    fetch = Fetch(4096, flatten=flatten)
    buckets, _ = await run_fetch(fetch, pairs)
    # Every target is pinned (an asynchronous DMA; pageable memory would stage each copy
    # through the driver synchronously) ...
    pins = fake_cuda.ops("pin")
    assert pins and all(p.thread != threading.current_thread().name for p in pins)
    # ... each bucket's copies ran on the producer's stream and were waited for once.
    records = fake_cuda.ops("record_event")
    assert len(records) == len(buckets) > 1
    for call in records:
        assert call.stream is trainer and call.device == 1
        assert call.event is not None and call.event.host_waits == 1
    assert fake_cuda.default_streams[1].waited == [] and trainer.waited == []
    for bucket in buckets:
        assert bucket.ready is None  # already on the host when emitted
    got = [p for b in buckets for p in b.tensors]
    for (name, a), (_, b) in zip(got, pairs, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(as_bytes(a), as_bytes(b)), name


async def test_the_copy_stream_waits_for_the_sources_producer_only(fake_cuda: FakeCuda) -> None:
    # GPU-resident sources written on the trainer's side stream: the copy stream orders
    # itself after that stream, never after the default stream (all the trainer's kernels).
    pairs = every_dtype()
    for _, tensor in pairs:
        fake_cuda.mark(tensor, 1)
    trainer = FakeCudaStream(1, label="trainer")
    torch.cuda.set_stream(trainer)  # type: ignore[arg-type]
    fetch = Fetch(4096, device="cuda:1", flatten=True)
    buckets, _ = await run_fetch(fetch, pairs)
    stream = _copy_stream(fetch)
    assert stream.waited == [trainer] * len(buckets)
    waits = fake_cuda.ops("wait_stream")
    assert all(w.other is trainer and w.thread_device == 1 for w in waits)
    recorded = {c.stream for c in fake_cuda.ops("record_stream")}
    assert recorded == {stream}  # the sources are read on the copy stream
    check_buckets(buckets, pairs, 4096)
