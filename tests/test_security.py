"""Security checks: loopback metrics, no API key in any text, no redirects, deadlines, no
unpickling.

The HTTP engine is pointed at ``_Server``, a bare ``http.server`` on 127.0.0.1 that answers
every request the same scripted way (a status, a body, a redirect): none of SGLang's
behaviour is needed to see what the client does with a hostile or broken answer.
"""

from __future__ import annotations

import ast
import http.server
import json
import logging
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import pytest
import torch
from prometheus_client import CollectorRegistry

from tests.fakes import FakeEngine, fake_buckets
from weightpipe.pipeline import Pipeline, StageError
from weightpipe.stages.app.config import MetricsConfig
from weightpipe.stages.engines.base import PauseMode
from weightpipe.stages.engines.sglang.http import SGLangHTTPEngine
from weightpipe.stages.load import Load
from weightpipe.stages.metrics import serve_metrics
from weightpipe.stages.sync import sync_weights

API_KEY = "sk-weightpipe-s3cret-0123456789"


@dataclass
class _Script:
    status: int = 500
    body: str = '{"success": false, "message": "no"}'
    location: str | None = None
    echo_headers: bool = False
    paths: list[str] = field(default_factory=list)


class _Server:
    """A bare HTTP server on 127.0.0.1 answering every request by ``script``."""

    def __init__(self, script: _Script) -> None:
        self.script = script
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                outer.script.paths.append(self.path)
                body = outer.script.body
                if outer.script.echo_headers:  # a broken proxy that reflects the request
                    body = json.dumps({"success": False, "message": str(dict(self.headers))})
                raw = body.encode()
                self.send_response(outer.script.status)
                if outer.script.location is not None:
                    self.send_header("Location", outer.script.location)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            do_GET = do_POST = _answer

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def server() -> Iterator[_Server]:
    srv = _Server(_Script())
    try:
        yield srv
    finally:
        srv.close()


def _buckets(version: int = 1) -> list[object]:
    return list(fake_buckets({"w": torch.ones(4)}, per_bucket=1, version=version))


# -- metrics endpoint --------------------------------------------------------------------


def test_metrics_bind_loopback_unless_told_otherwise() -> None:
    metrics_server = serve_metrics(CollectorRegistry())
    try:
        assert metrics_server.addr == "127.0.0.1"
        assert metrics_server._server.server_address[0] == "127.0.0.1"
    finally:
        metrics_server.close()
    assert MetricsConfig().addr == "127.0.0.1"


# -- the API key ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "script",
    [
        _Script(status=401, body='{"message": "bad key"}'),
        _Script(status=500),
        _Script(status=400),
        _Script(status=200, body="not json"),
    ],
    ids=["401", "500", "400", "non-json"],
)
async def test_the_api_key_appears_in_no_error_log_report_or_repr(
    server: _Server, script: _Script, caplog: pytest.LogCaptureFixture
) -> None:
    server.script = script
    caplog.set_level(logging.DEBUG)
    async with SGLangHTTPEngine(server.url, api_key=API_KEY, backoff_s=0) as engine:
        load = Load(engine, mode="pause", timeout_s=2.0)
        with pytest.raises(StageError) as info:
            await Pipeline([load], depth=1).run(_buckets())
        texts = [repr(engine), str(engine.__dict__), repr(load), repr(load.report)]
    error: BaseException | None = info.value
    while error is not None:
        texts += [str(error), repr(error)]
        error = error.__cause__ or error.__context__
    texts += [record.getMessage() for record in caplog.records]
    assert server.script.paths, "the engine never reached the server"
    for text in texts:
        assert API_KEY not in text


async def test_a_server_reflecting_the_headers_does_not_leak_the_key(server: _Server) -> None:
    server.script = _Script(status=400, echo_headers=True)
    async with SGLangHTTPEngine(server.url, api_key=API_KEY, backoff_s=0) as engine:
        with pytest.raises(StageError) as info:
            await Pipeline([Load(engine, mode="pause", timeout_s=2.0)], depth=1).run(_buckets())
    assert "Authorization" in str(info.value)  # the reflection did reach the error
    assert API_KEY not in str(info.value)


# -- redirects -----------------------------------------------------------------------------


@pytest.mark.parametrize("status", [301, 302, 307, 308])
async def test_the_http_client_follows_no_redirect(server: _Server, status: int) -> None:
    target = _Server(_Script(status=200, body='{"success": true}'))
    try:
        server.script = _Script(status=status, body="", location=target.url + "/elsewhere")
        async with SGLangHTTPEngine(server.url, api_key=API_KEY, backoff_s=0) as engine:
            with pytest.raises(StageError):
                await Pipeline([Load(engine, mode="pause", timeout_s=2.0)], depth=1).run(_buckets())
        assert server.script.paths  # the engine asked the server...
        assert target.script.paths == []  # ...and never went where it was sent
    finally:
        target.close()


# -- deadlines -----------------------------------------------------------------------------


class _DeadlineRecordingEngine(FakeEngine):
    """``FakeEngine`` (the Engine protocol) that records the deadline each call runs under."""

    def __init__(self) -> None:
        super().__init__()
        self.deadlines: dict[str, float] = {}

    def _note(self, call: str) -> None:
        self.deadlines[call] = anyio.current_effective_deadline()

    async def begin(self, version: int) -> None:
        self._note("begin")
        await super().begin(version)

    async def load(self, bucket: object) -> None:  # type: ignore[override]
        self._note("load")
        await super().load(bucket)  # type: ignore[arg-type]

    async def commit(self, version: int) -> None:
        self._note("commit")
        await super().commit(version)

    async def abort(self, version: int) -> None:
        self._note("abort")
        await super().abort(version)

    async def version(self) -> int | None:
        self._note("version")
        return await super().version()

    async def pause(self, mode: PauseMode) -> None:
        self._note("pause")
        await super().pause(mode)

    async def resume(self) -> None:
        self._note("resume")
        await super().resume()


async def test_every_engine_call_of_a_sync_has_a_deadline() -> None:
    engine = _DeadlineRecordingEngine()
    await sync_weights(_buckets(), engine, version=1, mode="pause")
    assert set(engine.deadlines) >= {"version", "pause", "begin", "load", "commit", "resume"}
    assert all(math.isfinite(deadline) for deadline in engine.deadlines.values())


async def test_abort_of_a_failed_sync_has_a_deadline_too() -> None:
    engine = _DeadlineRecordingEngine()
    engine.rolls_back = True  # type: ignore[attr-defined]
    engine.fail_at = {"commit": "error"}
    with pytest.raises(StageError):
        await sync_weights(_buckets(), engine, version=1, mode="pause")
    assert math.isfinite(engine.deadlines["abort"])
    assert math.isfinite(engine.deadlines["resume"])


# What turns bytes into objects by running their code: pickle and every wrapper of it.
_UNPICKLERS = {
    ("pickle", "load"),
    ("pickle", "loads"),
    ("pickle", "Unpickler"),
    ("cPickle", "loads"),
    ("dill", "loads"),
    ("ForkingPickler", "loads"),
    ("torch", "load"),
    ("MultiprocessingSerializer", "deserialize"),
    ("np", "load"),
    ("numpy", "load"),
}


def _unpickling_calls(source: str) -> list[str]:
    """``module.function`` calls (or imports) of an unpickler in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if (node.value.id, node.attr) in _UNPICKLERS:
                found.append(f"{node.value.id}.{node.attr} (line {node.lineno})")
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute):
            if (node.value.attr, node.attr) in _UNPICKLERS:
                found.append(f"...{node.value.attr}.{node.attr} (line {node.lineno})")
        elif isinstance(node, ast.ImportFrom) and node.module in ("pickle", "dill", "cPickle"):
            found.append(f"from {node.module} import ... (line {node.lineno})")
    return found


def test_the_library_never_unpickles() -> None:
    # Weights arrive as tensors, safetensors files (a JSON header and raw bytes) or
    # torch.distributed broadcasts into buffers weightpipe allocated; the only pickles are
    # the ones it writes for SGLang's server to read. So no module of the installed
    # library may call an unpickler (the benchmarks' child processes that play SGLang's
    # server decode our own payloads with SGLang's code, and are not the library).
    root = Path(__file__).resolve().parent.parent
    offenders = {
        str(path.relative_to(root)): calls
        for folder in ("pipeline", "stages")
        for path in sorted((root / folder).rglob("*.py"))
        if (calls := _unpickling_calls(path.read_text(encoding="utf-8")))
    }
    assert offenders == {}


def test_the_unpickler_scan_finds_what_it_looks_for() -> None:
    source = (
        "import pickle\nimport torch\nfrom pickle import loads\n"
        "pickle.loads(b'')\ntorch.load('x')\nmultiprocessing.reduction.ForkingPickler.loads(b'')\n"
    )
    assert len(_unpickling_calls(source)) == 4
