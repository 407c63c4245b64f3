"""The demo end to end: exit 0 with every sync verified; the StageError and exit 1 on a
failure; no process left holding the caller's pipes once it exits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.fakes import FakeEngine
from tests.helpers import free_port
from tests.trace_check import check_trace
from weightpipe.stages.app import demo
from weightpipe.stages.app.config import WeightpipeConfig, load_weightpipe_config
from weightpipe.stages.app.demo import fp8_weight_names, run_demo
from weightpipe.stages.engines.base import Engine, EngineError

REPO = Path(__file__).resolve().parents[3]
SMALL = ["demo.progress=false", "metrics.enabled=false", "model.num_layers=1"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path) -> None:
    """A PNG file was written at ``path`` (its pixels are not the test's business)."""
    data = path.read_bytes()
    assert len(data) > len(PNG_MAGIC)
    assert data.startswith(PNG_MAGIC), data[:8]


def test_demo_runs_and_verifies_every_sync(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    config = load_weightpipe_config(
        overrides=[
            "demo.steps=4",
            "demo.sync_every=2",
            "demo.progress=false",
            "metrics.port=0",
            "model.num_layers=2",
            "engine.mode=in_flight",
        ]
    )
    timeline = tmp_path / "timeline.png"
    assert run_demo(config, trace=tmp_path / "trace.json", timeline=timeline) == 0
    out = capsys.readouterr().out
    assert "metrics: http://127.0.0.1:" in out
    assert out.count("ok: ") == 2  # one verified row per sync
    assert "in_flight" in out
    # One trace per sync, each valid; the PNG of the last one, and the demo says where.
    assert sorted(p.name for p in tmp_path.glob("trace*")) == ["trace-v1.json", "trace-v2.json"]
    for version in (1, 2):
        checked = check_trace(json.loads((tmp_path / f"trace-v{version}.json").read_text()))
        assert checked.process == f"weightpipe sync v{version}"
        assert checked.tracks[-2:] == ["engine local", "generation"]
    assert_png(timeline)
    assert f"timeline of the last sync (trace-v2): {timeline}" in out.replace("\n", "")
    assert "trace-v1.json" in out


def test_demo_exits_non_zero_when_the_engine_is_unreachable(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    port = free_port()  # a port nothing listens on
    config = load_weightpipe_config(
        overrides=[
            *SMALL,
            "demo.steps=2",
            "engine.kind=sglang_http",
            f"engine.url=http://127.0.0.1:{port}",
            "engine.timeout_s=2",
            "engine.retries=0",
            "engine.mode=pause",
        ]
    )
    assert run_demo(config, timeline=tmp_path / "timeline.png") == 1
    out = capsys.readouterr().out
    assert "demo failed" in out
    assert "TaskGroup" not in out
    # The engine failed before any sync began: no sync, no timeline.
    assert not (tmp_path / "timeline.png").exists()


def test_a_stage_failing_inside_the_task_group_prints_its_stage_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # Fetch refuses every tensor outside its allow-list: a StageError raised inside the
    # demo's task group, which anyio wraps in an exception group.
    config = load_weightpipe_config(
        overrides=[*SMALL, "demo.steps=2", "fetch.allow=[model.embed_tokens.weight]"]
    )
    trace = tmp_path / "trace.json"
    assert run_demo(config, trace=trace, timeline=tmp_path / "timeline.png") == 1
    out = capsys.readouterr().out
    assert "demo failed: StageError: stage 'fetch'" in out
    assert "'model.layers.0." in out  # the tensor the allow-list refused
    assert "TaskGroup" not in out
    # The failed sync's trace holds its error, and its timeline was drawn.
    checked = check_trace(json.loads((tmp_path / "trace-v1.json").read_text()))
    (error,) = checked.instants["sync"]
    assert error["args"]["stage"] == "fetch"
    assert_png(tmp_path / "timeline.png")


class _GoesDown(FakeEngine):
    """A FakeEngine whose server dies at the first load: every call from then on fails,
    ``version()`` included (what an unreachable HTTP engine does)."""

    down = False

    async def load(self, bucket: object) -> None:
        self.down = True
        raise EngineError(
            self.name, "connection refused (fake)", tensor="model.embed_tokens.weight"
        )

    async def version(self) -> int | None:
        if self.down:
            raise EngineError(self.name, "version: connection refused (fake)")
        return await super().version()


def test_an_engine_going_down_reports_the_stage_error_not_the_version_query(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    engine = _GoesDown()

    def build(*args: object, **kwargs: object) -> Engine:
        return engine

    monkeypatch.setattr(demo, "build_engine", build)
    config = load_weightpipe_config(overrides=[*SMALL, "demo.steps=2", "engine.mode=pause"])
    assert run_demo(config, timeline=tmp_path / "timeline.png") == 1
    out = capsys.readouterr().out
    assert "demo failed: StageError: stage 'load'" in out
    assert "bucket 0" in out
    assert "model.embed_tokens.weight" in out
    assert "version: connection refused" not in out


def test_fp8_names_come_from_scale_tensors() -> None:
    names = ["a.weight", "a.weight_scale_inv", "b.weight", "c.weight", "c.weight_scale"]
    assert fp8_weight_names(names) == {"a.weight", "c.weight"}


def _sglang_spec(base: WeightpipeConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Names, shapes and dtypes the demo sends: what the SGLang double's model holds."""
    from transformers import LlamaForCausalLM

    from weightpipe.stages.app.factory import build_llama_config
    from weightpipe.stages.bucket import WeightBucket
    from weightpipe.stages.quantize import Fp8Quantize

    model = LlamaForCausalLM(build_llama_config(base.model))
    sample = WeightBucket(
        tuple((n, p.detach().bfloat16()) for n, p in model.named_parameters()),
        index=0,
        is_last=True,
        version=1,
    )
    sent = Fp8Quantize().quantize_bucket(sample)
    return {name: (tuple(t.shape), t.dtype) for name, t in sent.tensors}


def test_demo_against_sglangs_http_surface(tmp_path: Path) -> None:
    # `weightpipe demo --engine sglang --url URL`, pointed at the test double of SGLang's
    # weight endpoints (which decodes every payload with SGLang's own code).
    from tests.fakes.sglang_http import SGLangHTTPDouble

    overrides = [*SMALL, "demo.steps=2", "demo.sync_every=2"]
    spec = _sglang_spec(load_weightpipe_config(overrides=overrides))
    with SGLangHTTPDouble(spec) as server:
        config = load_weightpipe_config(overrides=[*overrides, "engine.kind=sglang_http"])
        config.engine.url = server.url
        assert run_demo(config, timeline=tmp_path / "timeline.png") == 0
        assert server.weight_version == "1"
        assert set(server.weights) == set(spec)
        fp8 = [n for n, (_, dtype) in spec.items() if dtype == torch.float8_e4m3fn]
        assert fp8
        assert all(server.weights[n].dtype == torch.float8_e4m3fn for n in fp8)
    assert_png(tmp_path / "timeline.png")  # no generation row: still a timeline


def _holders(pipe_fd: int) -> list[str]:
    """Every process but this one with an fd on the pipe ``pipe_fd`` belongs to."""
    target = f"pipe:[{os.fstat(pipe_fd).st_ino}]"
    found: list[str] = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if int(pid) == os.getpid():
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in fds]
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:  # gone, or not ours to read
            continue
        if target in links:
            found.append(f"{pid} ({comm})")
    return found


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs Linux /proc")
def test_demo_leaves_no_process_holding_the_callers_pipes(tmp_path: Path) -> None:
    # `weightpipe demo --engine sglang | tail` must end when the demo does: torch's
    # shared-memory manager (started for the payloads' memory handles) must not inherit
    # the demo's stdin, stdout or stderr. The double in this process still holds the
    # received weights, so the manager is alive when the pipes are checked.
    from tests.fakes.sglang_http import SGLangHTTPDouble

    overrides = [*SMALL, "demo.steps=2", "demo.sync_every=2"]
    spec = _sglang_spec(load_weightpipe_config(overrides=overrides))
    pipes = [os.pipe() for _ in range(3)]  # stdin, stdout, stderr of the demo
    ours = [pipes[0][1], pipes[1][0], pipes[2][0]]
    theirs = [pipes[0][0], pipes[1][1], pipes[2][1]]
    with SGLangHTTPDouble(spec) as server:
        command = [
            sys.executable,
            "-m",
            "weightpipe.stages.app.cli",
            "demo",
            "--engine",
            "sglang",
            "--url",
            server.url,
            "--timeline",
            str(tmp_path / "timeline.png"),
            *overrides,
        ]
        try:
            # Output stays far below a pipe's buffer, so the demo never blocks writing.
            process = subprocess.Popen(
                command, stdin=theirs[0], stdout=theirs[1], stderr=theirs[2], cwd=REPO
            )
            for fd in theirs:
                os.close(fd)
            status = process.wait(timeout=600)
            names = ("stdin", "stdout", "stderr")
            holders = {name: _holders(fd) for name, fd in zip(names, ours, strict=True)}
            for fd in ours[1:]:
                os.set_blocking(fd, False)
            output = b"".join(_read_available(fd) for fd in ours[1:]).decode(errors="replace")
            assert status == 0, output
            assert server.weight_version == "1"
            assert_png(tmp_path / "timeline.png")
            assert holders == {"stdin": [], "stdout": [], "stderr": []}
        finally:
            for fd in ours:
                os.close(fd)


def _read_available(fd: int) -> bytes:
    chunks: list[bytes] = []
    while True:
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)
