"""Weight sources: modules, state_dicts, (async) iterables, safetensors, DTensor shards."""

from __future__ import annotations

import json
import struct
import traceback
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch
from safetensors.torch import save_file

from tests.helpers import free_port, run_ranks
from weightpipe.pipeline import Pipeline, as_async_iter
from weightpipe.stages.bucket import WeightBucket
from weightpipe.stages.fetch import Fetch
from weightpipe.stages.sources import (
    FileSpan,
    materialise,
    named_tensors,
    safetensors_index,
    safetensors_source,
)


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.proj = torch.nn.Linear(4, 10, bias=False)
        self.proj.weight = self.embed.weight  # tied: must come out once
        self.norm = torch.nn.LayerNorm(4)
        self.register_buffer("steps", torch.tensor(3))
        self.register_buffer("inv_freq", torch.ones(2), persistent=False)


async def _collect(source: Any) -> list[tuple[str, torch.Tensor]]:
    return [pair async for pair in as_async_iter(source)]


async def test_module_parameters_then_persistent_buffers() -> None:
    module = Tiny()
    names = [n for n, _ in await _collect(named_tensors(module))]
    assert names == ["embed.weight", "norm.weight", "norm.bias"]
    pairs = await _collect(named_tensors(module, include_buffers=True))
    assert [n for n, _ in pairs] == [*names, "steps"]  # inv_freq is not in a checkpoint
    assert not any(t.requires_grad for _, t in pairs)
    assert pairs[0][1].data_ptr() == module.embed.weight.data_ptr()  # no copy


async def test_state_dict_iterables_and_async_generators() -> None:
    state = {"a": torch.ones(2), "b": torch.zeros(3)}
    assert [n for n, _ in await _collect(named_tensors(state))] == ["a", "b"]
    assert [n for n, _ in await _collect(named_tensors(list(state.items())))] == ["a", "b"]
    closed = anyio.Event()

    async def receive_weights() -> AsyncIterator[tuple[str, torch.Tensor]]:
        try:
            for pair in state.items():
                yield pair
        finally:
            closed.set()

    source = named_tensors(receive_weights())
    iterator = as_async_iter(source)
    assert (await iterator.__anext__())[0] == "a"
    await iterator.aclose()  # early stop reaches the checkpoint engine's generator
    assert closed.is_set()


def test_named_tensors_refuses_what_is_not_tensors() -> None:
    with pytest.raises(TypeError, match="got a str"):
        named_tensors("model.safetensors")
    with pytest.raises(TypeError, match="got int"):
        named_tensors(3)  # type: ignore[arg-type]


def test_materialise_leaves_plain_tensors_and_names_failures() -> None:
    plain = torch.ones(2)
    assert materialise("w", plain) is plain

    class Broken(torch.Tensor):
        def full_tensor(self) -> torch.Tensor:
            raise RuntimeError("peer gone")

    with pytest.raises(RuntimeError, match="tensor 'w': gathering its DTensor shards failed"):
        materialise("w", torch.ones(2).as_subclass(Broken))


# -- safetensors ---------------------------------------------------------------------------


def _write_sharded(root: Path) -> dict[str, torch.Tensor]:
    tensors = {
        "model.embed.weight": torch.randn(8, 4).to(torch.bfloat16),
        "model.layers.0.q.weight": torch.randn(4, 4),
        "model.layers.0.k.weight": torch.arange(6, dtype=torch.int64),
        "model.norm.weight": torch.ones(4, dtype=torch.float16),
        "lm_head.weight": torch.randn(8, 4).to(torch.float8_e4m3fn),
    }
    shard1 = {k: tensors[k] for k in ("model.norm.weight", "lm_head.weight")}
    shard2 = {k: v for k, v in tensors.items() if k not in shard1}
    save_file(shard1, str(root / "model-00002-of-00002.safetensors"))
    save_file(shard2, str(root / "model-00001-of-00002.safetensors"))
    save_file({"stray": torch.ones(1)}, str(root / "unlisted.safetensors"))
    # The index lists shard 2 first: files are read in the index's order.
    weight_map = {k: "model-00002-of-00002.safetensors" for k in shard1}
    weight_map.update({k: "model-00001-of-00002.safetensors" for k in shard2})
    (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return tensors


def test_safetensors_honours_the_index_and_reads_lazily(tmp_path: Path) -> None:
    tensors = _write_sharded(tmp_path)
    plan = safetensors_index(tmp_path)
    assert [f.name for f, _ in plan] == [
        "model-00002-of-00002.safetensors",
        "model-00001-of-00002.safetensors",
    ]
    got = list(safetensors_source(tmp_path, window_bytes=64))
    assert sorted(n for n, _ in got) == sorted(tensors)  # the unlisted shard is not read
    assert [n for n, _ in got][:2] == [n for n, _ in plan[0][1]]
    for name, tensor in got:
        assert tensor.dtype == tensors[name].dtype
        assert torch.equal(tensor.view(torch.uint8), tensors[name].view(torch.uint8))


def test_safetensors_without_index_and_single_file(tmp_path: Path) -> None:
    save_file({"b": torch.ones(2), "a": torch.zeros(3)}, str(tmp_path / "x.safetensors"))
    save_file({"c": torch.ones(1)}, str(tmp_path / "y.safetensors"))
    names = [n for n, _ in safetensors_source(tmp_path)]
    assert sorted(names[:2]) == ["a", "b"]
    assert names[2] == "c"
    assert [n for n, _ in safetensors_source(tmp_path / "y.safetensors")] == ["c"]


def test_safetensors_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such file"):
        list(safetensors_source(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors"):
        list(safetensors_source(tmp_path))
    save_file({"a": torch.ones(2)}, str(tmp_path / "s.safetensors"))
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "s.safetensors", "b": "s.safetensors"}}))
    with pytest.raises(ValueError, match="tensor 'b': listed in the index but not in"):
        list(safetensors_source(tmp_path))
    index.write_text(json.dumps({"weight_map": {"a": "gone.safetensors"}}))
    with pytest.raises(FileNotFoundError, match=r"shard 'gone\.safetensors'"):
        list(safetensors_source(tmp_path))
    with pytest.raises(ValueError, match="window_bytes"):
        safetensors_source(tmp_path, window_bytes=0)


def test_safetensors_early_stop_closes(tmp_path: Path) -> None:
    save_file({f"t{i}": torch.ones(4) for i in range(5)}, str(tmp_path / "m.safetensors"))
    stream = safetensors_source(tmp_path)
    next(stream)
    stream.close()  # runs the generator's finally: the open file is closed
    assert getattr(stream, "gi_frame", None) is None


def _rss_bytes() -> int:
    fields = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            fields[key] = value
    # File-backed pages of the mapped shards count as well as anonymous memory.
    return sum(int(fields[k].split()[0]) * 1024 for k in ("RssAnon", "RssFile"))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
async def test_safetensors_streaming_memory_is_bounded_by_buckets_not_files(
    tmp_path: Path,
) -> None:
    tensor_bytes = 2 << 20
    count = 48  # a 96 MiB file, read through 4 MiB buckets
    save_file(
        {f"layers.{i}.w": torch.full((tensor_bytes // 2,), i, dtype=torch.bfloat16)
         for i in range(count)},
        str(tmp_path / "model.safetensors"),
    )  # fmt: skip
    file_bytes = (tmp_path / "model.safetensors").stat().st_size
    bucket_bytes, window_bytes, depth = 4 << 20, 8 << 20, 2
    before = _rss_bytes()
    peak = before
    checked = 0

    async def sink(bucket: WeightBucket) -> None:
        nonlocal peak, checked
        peak = max(peak, _rss_bytes())
        for name, tensor in bucket.tensors:
            checked += int(tensor[0].item() == int(name.split(".")[1]))

    source = safetensors_source(tmp_path, window_bytes=window_bytes)
    await Pipeline([Fetch(bucket_bytes)], depth=depth).run(source, sink=sink)
    growth = peak - before
    bound = (depth + 2) * bucket_bytes + window_bytes
    assert checked == count
    assert file_bytes > 2 * (bound + (16 << 20))  # a whole-file read could not pass
    assert growth <= bound + (16 << 20), f"RSS grew {growth / 2**20:.1f} MiB"


# -- DTensor shards gathered with full_tensor() (2 processes, gloo) ------------------------


def _dtensor_worker(rank: int, port: int, results: Any) -> None:
    import torch.distributed as dist

    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=2,
            timeout=timedelta(seconds=30),
        )
        mesh = init_device_mesh("cpu", (2,))
        full = {
            "w": torch.arange(24, dtype=torch.float32).view(6, 4),
            "b": torch.arange(8, dtype=torch.bfloat16),
        }
        state = {k: distribute_tensor(v, mesh, [Shard(0)]) for k, v in full.items()}
        assert state["w"].to_local().shape == (3, 4)  # really sharded

        async def run() -> list[tuple[str, torch.Tensor]]:
            buckets: list[WeightBucket] = []

            async def sink(bucket: WeightBucket) -> None:
                buckets.append(bucket)

            await Pipeline([Fetch(1 << 20)]).run(named_tensors(state), sink=sink)
            return [(n, t.clone()) for b in buckets for n, t in b.tensors]

        got = anyio.run(run)
        assert [n for n, _ in got] == ["w", "b"]
        for name, tensor in got:
            assert type(tensor) is torch.Tensor
            assert torch.equal(tensor, full[name]), name
        results.put((rank, "ok", None))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))


@pytest.mark.slow
def test_dtensor_shards_are_gathered_in_order_on_every_rank() -> None:
    reports = run_ranks(_dtensor_worker, 2, free_port())
    failed = {r: d for r, (s, d) in reports.items() if s != "ok"}
    assert not failed, "\n".join(f"rank {r}:\n{d}" for r, d in sorted(failed.items()))


# -- direct reads: FileSpans that Fetch reads straight into its buffers ---------------------


def test_direct_spans_match_the_memory_mapped_tensors(tmp_path: Path) -> None:
    tensors = _write_sharded(tmp_path)
    spans = safetensors_source(tmp_path, direct=True)
    assert isinstance(spans, list)  # iterated on the event loop, no thread per tensor
    mapped = list(safetensors_source(tmp_path))
    assert [n for n, _ in spans] == [n for n, _ in mapped]
    for name, span in spans:
        assert isinstance(span, FileSpan)
        loaded = span.load()
        assert loaded.dtype == tensors[name].dtype
        assert loaded.shape == tensors[name].shape
        assert torch.equal(loaded.view(torch.uint8), tensors[name].view(torch.uint8))


async def test_direct_spans_through_fetch_are_bit_exact(tmp_path: Path) -> None:
    tensors = _write_sharded(tmp_path)
    for flatten in (True, False):
        buckets: list[WeightBucket] = []

        async def sink(bucket: WeightBucket, into: list[WeightBucket] = buckets) -> None:
            into.append(bucket)

        await Pipeline([Fetch(200, flatten=flatten)]).run(
            safetensors_source(tmp_path, direct=True), sink=sink
        )
        got = {n: t for b in buckets for n, t in b.tensors}
        assert sorted(got) == sorted(tensors)
        spans = dict(safetensors_source(tmp_path, direct=True))
        for bucket in buckets if flatten else []:
            assert bucket.buffer is not None
            for name, tensor in bucket.tensors:
                offset = tensor.data_ptr() - bucket.buffer.data_ptr()
                assert offset % tensor.element_size() == 0
                span = spans[name]
                assert isinstance(span, FileSpan)
                if span.offset % 64 % tensor.element_size() == 0:
                    assert offset % 64 == span.offset % 64  # same phase as in the file
        for name, tensor in got.items():
            assert isinstance(tensor, torch.Tensor)
            assert torch.equal(tensor.view(torch.uint8), tensors[name].view(torch.uint8))


def test_file_span_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "short.bin"
    path.write_bytes(b"\x00" * 10)
    span = FileSpan(str(path), 4, torch.float32, (4,))
    assert span.nbytes == 16
    with pytest.raises(OSError, match=r"short\.bin: file ends 10 bytes short"):
        span.load()
    with pytest.raises(ValueError, match="contiguous CPU uint8"):
        span.read_into(torch.empty(4))
    with pytest.raises(ValueError, match="8 bytes given for 16"):
        span.read_into(torch.empty(8, dtype=torch.uint8))


# -- safetensors header validation (both paths) ----------------------------------------------


def _raw_safetensors(path: Path, header: object, data: bytes, *, length: int | None = None) -> Path:
    """A safetensors file written by hand (``save_file`` refuses to write a bad one)."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def _entry(start: int, end: int, shape: list[int], dtype: str = "F32") -> dict[str, object]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}


BAD_HEADERS: dict[str, tuple[object, int, int | None, str]] = {
    # kind: (header, data bytes, length prefix override, words the error must have)
    "overlapping offsets": (
        {"a": _entry(0, 16, [4]), "b": _entry(8, 24, [4])},
        24,
        None,
        r"tensor 'b'.*overlap tensor 'a'",
    ),
    "offsets past the end (truncated)": (
        {"a": _entry(0, 16, [4]), "b": _entry(16, 32, [4])},
        20,
        None,
        r"tensor 'b'.*past the end.*truncated",
    ),
    "size disagrees with dtype x shape": (
        {"a": _entry(0, 16, [8])},
        16,
        None,
        r"tensor 'a'.*16 bytes but dtype x shape.*32",
    ),
    "offsets out of order": ({"a": _entry(16, 0, [4])}, 16, None, r"tensor 'a'.*not in order"),
    "negative shape": ({"a": _entry(0, 0, [-1])}, 0, None, r"tensor 'a'.*shape"),
    "unknown dtype": ({"a": _entry(0, 4, [1], "Q9")}, 4, None, r"tensor 'a'.*dtype 'Q9'"),
    "offsets not ints": (
        {"a": {"dtype": "F32", "shape": [1], "data_offsets": ["0", 4]}},
        4,
        None,
        r"tensor 'a'.*data_offsets",
    ),
    "corrupt JSON": (b"{not json", 0, None, r"corrupt safetensors header"),
    "not an object": ([1, 2], 0, None, r"not a JSON object"),
    "absurd header length": ({}, 0, 1 << 60, r"header of \d+ bytes"),
    "header longer than the file": ({}, 0, 4096, r"truncated"),
}


@pytest.mark.parametrize("direct", [False, True])
@pytest.mark.parametrize("kind", sorted(BAD_HEADERS))
def test_a_bad_safetensors_header_is_refused_naming_file_and_tensor(
    tmp_path: Path, kind: str, direct: bool
) -> None:
    header, data_bytes, length, words = BAD_HEADERS[kind]
    file = _raw_safetensors(tmp_path / "bad.safetensors", header, bytes(data_bytes), length=length)
    with pytest.raises(ValueError, match=words) as info:
        list(safetensors_source(file, direct=direct))
    assert str(file) in str(info.value)


def test_a_file_cut_inside_its_prefix_is_refused(tmp_path: Path) -> None:
    file = tmp_path / "cut.safetensors"
    file.write_bytes(b"\x10\x00")
    for direct in (False, True):
        with pytest.raises(ValueError, match="too short"):
            list(safetensors_source(file, direct=direct))


def test_a_valid_hand_written_file_reads_on_both_paths(tmp_path: Path) -> None:
    values = torch.arange(6, dtype=torch.float32)
    header = {"a": _entry(0, 16, [4]), "e": _entry(16, 16, [0]), "b": _entry(16, 24, [2])}
    file = _raw_safetensors(
        tmp_path / "ok.safetensors", header, struct.pack("<6f", *values.tolist())
    )
    mapped = dict(safetensors_source(file))
    spans = dict(safetensors_source(file, direct=True))
    for name, expected in {"a": values[:4], "b": values[4:], "e": values[:0]}.items():
        assert torch.equal(mapped[name], expected)
        assert torch.equal(spans[name].load(), expected)


def test_a_tensor_at_an_unaligned_offset_reads_intact(tmp_path: Path) -> None:
    # A 1-byte tensor first puts the float32 one at an odd offset: legal in safetensors,
    # and a view there would be misaligned, so the mapped path copies that one tensor.
    values = torch.tensor([1.5, -2.25, 3e-3], dtype=torch.float32)
    header = {"flag": _entry(0, 1, [1], "U8"), "w": _entry(1, 13, [3])}
    raw = json.dumps(header).encode()
    raw += b" " * (-(8 + len(raw)) % 8)  # data starts 8-aligned, so "w" sits at +1
    file = _raw_safetensors(
        tmp_path / "odd.safetensors", raw, b"\x07" + struct.pack("<3f", *values.tolist())
    )
    mapped = dict(safetensors_source(file))
    assert mapped["flag"].tolist() == [7]
    assert torch.equal(mapped["w"], values)
    assert mapped["w"].data_ptr() % 4 == 0


def test_writing_a_mapped_tensor_never_reaches_the_file(tmp_path: Path) -> None:
    file = tmp_path / "m.safetensors"
    save_file({"a": torch.ones(1024), "b": torch.full((1024,), 2.0)}, str(file))
    before = file.read_bytes()
    tensors = dict(safetensors_source(file))
    tensors["a"].mul_(-3)  # a private, copy-on-write mapping
    assert torch.equal(tensors["a"], torch.full((1024,), -3.0))
    assert file.read_bytes() == before
    again = dict(safetensors_source(file))
    assert torch.equal(again["a"], torch.ones(1024)) and torch.equal(again["b"], tensors["b"])


def test_many_windows_of_one_file_read_every_tensor_in_disk_order(tmp_path: Path) -> None:
    # Windows far smaller than a mapping's granularity: every window still maps from
    # the page before its first byte, and tensors outlive the generator's later windows.
    tensors = {f"t{i:02d}": torch.full((1000 + i,), float(i)) for i in range(40)}
    save_file(tensors, str(tmp_path / "m.safetensors"))
    got = list(safetensors_source(tmp_path, window_bytes=5000))
    assert [name for name, _ in got] == [n for n, _ in safetensors_index(tmp_path)[0][1]]
    for name, tensor in got:
        assert torch.equal(tensor, tensors[name]), name
