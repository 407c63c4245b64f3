"""Our SGLang payload encoding, decoded by SGLang's own code (the installed sglang package).

Proves: both payload shapes survive SGLang's safe unpickler and FlattenedTensorBucket bit for
bit (bf16, FP8 and fp32 scales in one bucket); the alignment catch that breaks SGLang's own
unpadded bucket does not break ours; the distributed order matches the buffer SGLang's
receiver allocates; a payload decodes in an unrelated process on the same node (the
file_system sharing strategy); the test double's request schemas match SGLang's
request structs as written in the installed io_struct.py; CUDA payloads name their GPU by
UUID, which SGLang's own decoding maps to the server's index (on the fake CUDA layer); and
a payload owns the memory its handles point into.
"""

from __future__ import annotations

import ast
import base64
import gc
import importlib.util
import io
import subprocess
import sys
import weakref
from multiprocessing.reduction import ForkingPickler
from pathlib import Path

import pytest
import torch
from sglang.srt.utils import MultiprocessingSerializer
from sglang.srt.utils.common import normalize_serialized_named_tensor_payloads
from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket, FlattenedTensorMetadata

from tests.fakes import FakeCuda, install_fake_cuda
from tests.fakes.sglang_http import FIELDS_0523
from tests.fakes.sglang_model import reconstruct_flattened
from weightpipe.stages._layout import flatten, unflatten
from weightpipe.stages.dtypes import dtype_name
from weightpipe.stages.engines.sglang import wire as wire


def _awkward() -> list[tuple[str, torch.Tensor]]:
    """bf16(13), int64, fp8(5), fp32: every start after the first is misaligned unpadded."""
    g = torch.Generator().manual_seed(1)
    return [
        ("a.weight", torch.randn(13, generator=g).to(torch.bfloat16)),
        ("b.index", torch.arange(3, dtype=torch.int64)),
        ("c.weight", (torch.randn(5, generator=g) * 100).to(torch.float8_e4m3fn)),
        ("c.weight_scale_inv", torch.rand(1, 1, generator=g)),
        ("d.weight", torch.randn(3, 4, generator=g).to(torch.bfloat16)),
    ]


def _same(a: list[tuple[str, torch.Tensor]], b: list[tuple[str, torch.Tensor]]) -> None:
    assert [n for n, _ in a] == [n for n, _ in b]
    for (name, x), (_, y) in zip(a, b, strict=True):
        assert x.dtype == y.dtype, name
        assert x.shape == y.shape, name
        assert torch.equal(x.contiguous().view(torch.uint8), y.contiguous().view(torch.uint8))


def _decode(text: str) -> object:
    (raw,) = normalize_serialized_named_tensor_payloads([text])
    return MultiprocessingSerializer.deserialize(raw)


def test_sglangs_own_unpadded_bucket_fails_on_this_order() -> None:
    # The catch REFERENCE.md records, reproduced with SGLang's own class: why we align.
    bucket = FlattenedTensorBucket(named_tensors=_awkward())
    with pytest.raises(RuntimeError, match=r"storage_offset|divisible|offset"):
        bucket.reconstruct_tensors()


@pytest.mark.parametrize("metadata", ["sglang", "namespace", "auto"])
@pytest.mark.parametrize("tp_size", [1, 3])
def test_flattened_bucket_decodes_with_sglang(metadata: str, tp_size: int) -> None:
    tensors = _awkward()
    payloads = wire.b64encode_payloads(
        wire.encode_flattened_bucket(tensors, tp_size=tp_size, metadata=metadata)  # type: ignore[arg-type]
    )
    assert len(payloads) == tp_size
    for text in payloads:
        data = _decode(text)
        assert isinstance(data, dict)
        assert set(data) == {"flattened_tensor", "metadata"}
        if metadata != "namespace":
            assert all(isinstance(m, FlattenedTensorMetadata) for m in data["metadata"])
        assert all(m.start_idx % 16 == 0 for m in data["metadata"])
        _same(reconstruct_flattened(data), tensors)


def test_named_tensors_decode_with_sglang() -> None:
    tensors = _awkward()
    (text,) = wire.b64encode_payloads(wire.encode_named_tensors(tensors))
    data = _decode(text)
    assert isinstance(data, list)
    _same([(n, t) for n, t in data], tensors)


def test_sglangs_safe_unpickler_refuses_foreign_classes() -> None:
    # Why the metadata must be SGLang's class or a SimpleNamespace, never our own type.
    _, ours = flatten(_awkward(), wire.ALIGN_BYTES)
    buf = io.BytesIO()
    ForkingPickler(buf).dump({"metadata": [ours]})
    with pytest.raises(RuntimeError, match="Blocked unsafe global"):
        MultiprocessingSerializer.deserialize(buf.getvalue())


def test_existing_aligned_buffer_is_reused() -> None:
    tensors = _awkward()
    buffer, layout = flatten(tensors, wire.ALIGN_BYTES)
    views = unflatten(buffer, layout)  # what Fetch hands on: views of one flat buffer
    (payload,) = wire.encode_flattened_bucket(views, buffer=buffer, cpu_strategy=None)
    data = MultiprocessingSerializer.deserialize(payload)
    assert isinstance(data, dict)
    # the caller's buffer itself, not a copy: the metadata points into it unchanged
    assert data["flattened_tensor"].numel() == buffer.numel()
    assert [m.start_idx for m in data["metadata"]] == [e.offset for e in layout]
    _same(reconstruct_flattened(data), tensors)


def test_views_of_a_buffer_keep_fetchs_alignment() -> None:
    # Fetch's default alignment (256) differs from ours (16): its buffer is still sent as is.
    tensors = _awkward()
    buffer, layout = flatten(tensors)
    (payload,) = wire.encode_flattened_bucket(
        unflatten(buffer, layout), buffer=buffer, cpu_strategy=None
    )
    data = MultiprocessingSerializer.deserialize(payload)
    assert isinstance(data, dict)
    assert data["flattened_tensor"].numel() == buffer.numel()
    assert [m.start_idx for m in data["metadata"]] == [e.offset for e in layout]
    _same(reconstruct_flattened(data), tensors)


def test_non_view_tensors_with_a_buffer_are_copied() -> None:
    tensors = _awkward()
    unrelated = torch.zeros(8, dtype=torch.uint8)
    (payload,) = wire.encode_flattened_bucket(tensors, buffer=unrelated, cpu_strategy=None)
    data = MultiprocessingSerializer.deserialize(payload)
    assert isinstance(data, dict)
    _same(reconstruct_flattened(data), tensors)


def test_distributed_order_matches_sglangs_receive_bucket() -> None:
    ordered = wire.distributed_order(_awkward())
    assert [t.element_size() for _, t in ordered] == sorted(
        (t.element_size() for _, t in ordered), reverse=True
    )
    buffer, packed = flatten(ordered, 1)  # what SGLangDistributedEngine broadcasts
    # What SGLang's receiver allocates from the announced names/dtypes/shapes.
    receive = FlattenedTensorBucket.empty(
        [n for n, _ in ordered],
        [dtype_name(t.dtype) for _, t in ordered],
        [list(t.shape) for _, t in ordered],
        "cpu",
    )
    assert [m.start_idx for m in receive.get_metadata()] == [e.offset for e in packed]
    receive.get_flattened_tensor().copy_(buffer)
    _same(receive.reconstruct_tensors(), ordered)


def _decode_in_another_process(text: str, *, cuda: bool, timeout_s: int) -> list[str]:
    """Decode one base64 payload with SGLang's code in a fresh interpreter; one line
    ``name [bytes...]`` per tensor. Asserts the process succeeded (and, with ``cuda``,
    that the payload arrived as a CUDA tensor)."""
    script = (
        "import sys, torch\n"
        "from sglang.srt.utils import MultiprocessingSerializer\n"
        "from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket\n"
        "d = MultiprocessingSerializer.deserialize(sys.stdin.read().strip())\n"
        + ("assert d['flattened_tensor'].is_cuda\n" if cuda else "")
        + "b = FlattenedTensorBucket(flattened_tensor=d['flattened_tensor'], "
        "metadata=d['metadata'])\n"
        "for n, t in b.reconstruct_tensors():\n"
        f"    print(n, t.contiguous().view(torch.uint8){'.cpu()' if cuda else ''}.tolist())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        input=text,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()


def _byte_lines(tensors: list[tuple[str, torch.Tensor]]) -> list[str]:
    return [f"{n} {t.contiguous().view(torch.uint8).cpu().tolist()}" for n, t in tensors]


def test_payload_decodes_in_an_unrelated_process() -> None:
    tensors = _awkward()
    payloads = wire.encode_flattened_bucket(tensors, cpu_strategy="file_system")
    text = wire.b64encode_payloads(payloads)[0]
    lines = _decode_in_another_process(text, cuda=False, timeout_s=120)
    assert lines == _byte_lines(tensors)


def test_encode_errors() -> None:
    with pytest.raises(ValueError, match="empty bucket"):
        wire.encode_flattened_bucket([])
    with pytest.raises(ValueError, match="tp_size"):
        wire.encode_named_tensors(_awkward(), tp_size=0)
    assert base64.b64decode(wire.b64encode_payloads([b"\x80\x04"])[0]) == b"\x80\x04"


def _struct_fields(source: str) -> dict[str, set[str]]:
    fields: dict[str, set[str]] = {}
    base: set[str] = set()
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        names = {
            stmt.target.id
            for stmt in node.body
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
        }
        if node.name == "BaseReq":
            base = names
        fields[node.name] = names
    return {name: names | base for name, names in fields.items()}


def test_double_schemas_match_sglangs_request_structs() -> None:
    # Read, not imported: io_struct pulls in vision deps (torchvision) this env leaves out.
    spec = importlib.util.find_spec("sglang.srt.managers.io_struct")
    assert spec is not None
    assert spec.origin is not None
    source = Path(spec.origin).read_text()
    real = _struct_fields(source)
    for struct, ours in FIELDS_0523.items():
        assert ours == real[struct], struct


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_payload_decodes_in_another_process_via_cuda_ipc() -> None:
    # On GPUs the payload carries CUDA-IPC handles: another process on the same GPU maps
    # the sender's memory, so the sender's tensors must stay alive until it has read them.
    tensors = [(n, t.cuda()) for n, t in _awkward()]
    torch.cuda.synchronize()
    text = wire.b64encode_payloads(wire.encode_flattened_bucket(tensors))[0]
    lines = _decode_in_another_process(text, cuda=True, timeout_s=300)
    assert lines == _byte_lines(tensors)


# -- CUDA tensors on the fake CUDA layer (tests.fakes.cuda) ------------------------------


def _on_fake_gpu(fake: FakeCuda, index: int) -> tuple[list[tuple[str, torch.Tensor]], torch.Tensor]:
    """``_awkward()`` as views of one flat stand-in buffer living on fake device ``index``."""
    buffer, layouts = flatten(_awkward(), wire.ALIGN_BYTES)
    fake.mark(buffer, index)
    return unflatten(buffer, layouts), buffer


def _patch_like_sglangs_server(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Run SGLang's own ``monkey_patch_torch_reductions`` (what its TP worker does before
    every decode), undone after the test; torch's real rebuild, which would open the IPC
    handle, is replaced by one recording the device it was asked for."""
    from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions
    from torch.multiprocessing import reductions

    for name in ("reduce_tensor", "rebuild_cuda_tensor"):
        monkeypatch.setattr(reductions, name, getattr(reductions, name))
    for name in ("_reduce_tensor_original", "_rebuild_cuda_tensor_original"):
        monkeypatch.setattr(reductions, name, None, raising=False)
        monkeypatch.delattr(reductions, name)
    reducers = dict(ForkingPickler._extra_reducers)  # type: ignore[attr-defined]
    monkeypatch.setattr(ForkingPickler, "_extra_reducers", reducers)
    monkey_patch_torch_reductions()
    opened: list[object] = []

    def rebuild(*args: object) -> torch.Tensor:
        opened.append(args[6])
        nbytes = args[8]
        assert isinstance(nbytes, int)
        return torch.zeros(nbytes, dtype=torch.uint8)

    monkeypatch.setattr(reductions, "_rebuild_cuda_tensor_original", rebuild)
    return opened


def test_cuda_payloads_name_the_gpu_by_uuid_and_sglang_maps_it_to_its_own_index(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = install_fake_cuda(monkeypatch, device_count=2)
    trainer_view = list(fake.uuids)
    tensors, buffer = _on_fake_gpu(fake, 1)  # the trainer's cuda:1
    payloads = wire.encode_flattened_bucket(tensors, buffer=buffer, tp_size=2)
    assert payloads.source.on_cuda and len(payloads) == 2
    # Each rank's pickle shares the buffer once, under its device (this thread is on 0).
    shares = fake.ops("ipc_share")
    assert [(c.device, c.thread_device) for c in shares] == [(1, 1), (1, 1)]
    opened = _patch_like_sglangs_server(monkeypatch)
    # The server was started with the two GPUs listed the other way round
    # (CUDA_VISIBLE_DEVICES=1,0): the trainer's cuda:1 is the server's cuda:0.
    fake.visible([trainer_view[1], trainer_view[0]])
    decoded = _decode(wire.b64encode_payloads(payloads)[0])
    assert opened == [0]
    assert isinstance(decoded, dict) and decoded["flattened_tensor"].numel() == buffer.numel()
    # The same payload on a server that sees the GPUs as the trainer does opens cuda:1.
    fake.visible(trainer_view)
    _decode(wire.b64encode_payloads(payloads)[1])
    assert opened == [0, 1]


def test_a_payload_keeps_the_buffer_its_handles_point_into_alive() -> None:
    # Not views of one buffer: encoding flattens them into a new one, which only the
    # pickles point into. The payload list owns it, so a resend never maps freed memory.
    tensors = _awkward()
    payloads = wire.encode_flattened_bucket(tensors)
    (flat,) = payloads.source.holds
    alive = weakref.ref(flat)
    del flat
    gc.collect()
    assert alive() is not None
    # Each attempt encodes afresh (its own IPC references) from the same owned buffer.
    again = payloads.source.encode()
    assert again.source is payloads.source
    data = _decode(wire.b64encode_payloads(again)[0])
    assert isinstance(data, dict)
    _same(reconstruct_flattened(data), tensors)
    del payloads, again, data
    gc.collect()
    assert alive() is None


def test_named_tensor_payloads_keep_their_tensors_alive() -> None:
    payload = wire.prepare_named_tensors([("w", torch.ones(3))], tp_size=3)
    assert not payload.on_cuda
    (held,) = payload.holds
    assert len(payload.encode()) == 3 and torch.equal(held, torch.ones(3))
