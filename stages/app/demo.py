"""``weightpipe demo``: a fully-asynchronous trainer feeding a generating engine.

A trainer (the local engine's Llama architecture, float32 master weights, AdamW on
synthetic token batches) takes real optimizer steps in a worker thread while the engine
keeps generating. Every ``demo.sync_every`` steps the trainer's weights are snapshotted
(bf16, between two steps, so one sync never mixes versions) and streamed
Fetch -> Fp8Quantize -> Load into the engine in the configured mode, while training goes
on. Syncs are serialised: a sync that falls due while the previous one still runs waits
for it, which bounds memory at one snapshot. After each sync on the local engine, every
parameter is checked: quantized ones must dequantize to the snapshot within FP8's error
bound, the others must equal it bit for bit. Metrics are served on
``http://<metrics.addr>:<metrics.port>/metrics`` for the whole run. Any failure exits
non-zero.

Every sync runs with ``sync_weights(trace=...)``. With ``trace`` given (``weightpipe
demo --trace PATH``) each sync's Chrome/Perfetto trace is kept, one file per sync:
``PATH`` with ``-v<version>`` before its suffix (``trace.json`` -> ``trace-v1.json``,
``trace-v2.json``...). Without it the traces go to a temporary folder. Either way the
demo draws the last sync's timeline as a PNG (``timeline``, ``weightpipe demo
--timeline PATH``, ``weightpipe-demo-timeline.png`` in the working folder by default,
beside ``weightpipe bench``'s ``weightpipe-sweep.png``) after its table, and says where;
after a failed sync, the failed sync's timeline.
"""

from __future__ import annotations

import fcntl
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from weightpipe.pipeline import WeightpipeError, leaf_exceptions
from weightpipe.stages.app.config import QuantizeConfig, WeightpipeConfig
from weightpipe.stages.app.factory import (
    build_engine,
    build_fetch,
    build_llama_config,
    build_quantize,
)
from weightpipe.stages.app.timeline import DEFAULT_TIMELINE
from weightpipe.stages.engines.base import Engine
from weightpipe.stages.engines.local import LocalEngine
from weightpipe.stages.fp8 import check_fp8, dequantize_fp8, quantize_fp8, warm_up_cpu_kernel
from weightpipe.stages.load import engine_is_dirty
from weightpipe.stages.metrics import MetricsServer, WeightpipeMetrics, serve_metrics
from weightpipe.stages.sync import SyncReport, sync_weights

__all__ = ["DemoSync", "TracePaths", "run_demo"]


class TracePaths:
    """Where each sync's trace goes: ``<stem>-v<version><suffix>`` beside ``base``.

    ``last`` is the trace of the latest sync that was started (written whether it
    committed or failed), which the timeline is drawn from; ``written`` every one.
    """

    def __init__(self, base: str | os.PathLike[str]) -> None:
        self.base = Path(base)
        self.last: Path | None = None
        self.written: list[Path] = []

    def for_version(self, version: int) -> Path:
        suffix = self.base.suffix or ".json"
        path = self.base.with_name(f"{self.base.stem}-v{version}{suffix}")
        self.last = path
        return path

    def done(self, path: Path | None) -> None:
        """A sync ended and its trace is at ``path`` (``None``: it was not written)."""
        if path is not None:
            self.written.append(path)


@dataclass(frozen=True)
class DemoSync:
    """One row of the demo's final table.

    ``tokens_per_s_idle`` is generation outside syncs so far (the trainer runs then too),
    the fair comparison for ``report.tokens_per_s_during_sync``.
    """

    version: int
    step: int
    report: SyncReport
    tokens_per_s_idle: float | None
    check: str


class Trainer:
    """Real optimizer steps on synthetic data; weights read only between steps."""

    def __init__(self, config: WeightpipeConfig) -> None:
        torch.manual_seed(config.model.seed)
        from transformers import LlamaForCausalLM

        model: Any = LlamaForCausalLM(build_llama_config(config.model))
        self.model: Any = model.float().train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.demo.lr)
        self.batch_size = config.demo.batch_size
        self.seq_len = config.demo.seq_len
        self.vocab = config.model.vocab_size
        self.generator = torch.Generator().manual_seed(config.model.seed + 7)

    def step(self) -> float:
        # A learnable synthetic task: next token = (token + 1) mod vocab.
        start = torch.randint(0, self.vocab, (self.batch_size, 1), generator=self.generator)
        tokens = (start + torch.arange(self.seq_len)) % self.vocab
        loss = self.model(input_ids=tokens, labels=tokens).loss
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    def snapshot(self) -> list[tuple[str, torch.Tensor]]:
        """The weights as the engine should serve them: bf16 copies, in module order."""
        with torch.no_grad():
            return [
                (name, p.detach().to(torch.bfloat16, copy=True))
                for name, p in self.model.named_parameters()
            ]


def fp8_weight_names(loaded: Iterable[str]) -> set[str]:
    """The weights that arrived as FP8: those sent with a scale tensor beside them."""
    names: set[str] = set()
    for name in loaded:
        for suffix in ("_scale_inv", "_scale"):
            if name.endswith(".weight" + suffix):
                names.add(name.removesuffix(suffix))
    return names


def verify_engine(
    engine: LocalEngine,
    snapshot: list[tuple[str, torch.Tensor]],
    quantized: set[str],
    quantize: QuantizeConfig,
) -> str:
    """Check the engine against the snapshot it was sent; returns a one-line verdict.

    Raises:
        AssertionError: a parameter differs (names it).
    """
    worst = 0.0
    block = quantize.block_shape
    for name, source in snapshot:
        served = engine.parameter(name).cpu()
        if name in quantized:
            q = quantize_fp8(
                source, method=quantize.method, block=block, scale_fmt=quantize.scale_fmt, name=name
            )
            worst = max(worst, check_fp8(source, q, block=block, name=name))
            expected = dequantize_fp8(q.qweight, q.scale, block=block, dtype=served.dtype)
            if not torch.equal(served, expected):
                raise AssertionError(f"tensor {name!r}: the engine serves other FP8 values")
        elif not torch.equal(served, source.to(served.dtype)):
            raise AssertionError(f"tensor {name!r}: the engine's copy differs from the trainer's")
    return f"ok: {len(quantized)} FP8, worst {worst:.2f}x bound"


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None or not math.isfinite(value) else format(value, spec)


def print_table(console: Console, rows: list[DemoSync]) -> None:
    table = Table(title="weightpipe demo: one row per sync")
    columns = (
        "v",
        "step",
        "mode",
        "MB",
        "sync s",
        "GB/s",
        "pause ms",
        "tok/s idle",
        "tok/s sync",
        "gap ms",
        "FP8 check",
    )
    for column in columns:
        table.add_column(column, justify="left" if column == "FP8 check" else "right")
    for row in rows:
        report = row.report
        gap = report.longest_gap_s
        table.add_row(
            str(row.version),
            str(row.step),
            report.mode,
            f"{report.bytes / 1e6:.2f}",
            f"{report.seconds:.3f}",
            f"{report.bytes / report.seconds / 1e9:.3f}",
            f"{report.hard_pause_s * 1e3:.1f}",
            _fmt(row.tokens_per_s_idle, ".0f"),
            _fmt(report.tokens_per_s_during_sync, ".0f"),
            _fmt(None if gap is None else gap * 1e3, ".1f"),
            row.check,
        )
    console.print(table)


async def _demo(config: WeightpipeConfig, console: Console, traces: TracePaths) -> list[DemoSync]:
    block = config.quantize.block_shape
    trainer = await anyio.to_thread.run_sync(Trainer, config)
    # Compile the fused CPU FP8 kernel now (a few seconds, once per process), not inside
    # the first sync, where it would show up as a stall of generation.
    await anyio.to_thread.run_sync(warm_up_cpu_kernel)
    engine: Engine = build_engine(config.engine, config.model, block=block)
    local = engine if isinstance(engine, LocalEngine) else None
    fetch = build_fetch(config.fetch)
    quantize = build_quantize(config.quantize) if config.quantize.enabled else None
    stages: list[Any] = [fetch] + ([quantize] if quantize is not None else [])
    metrics = WeightpipeMetrics(engine=engine.name)
    server: MetricsServer | None = None
    if config.metrics.enabled:
        server = serve_metrics(metrics, port=config.metrics.port, addr=config.metrics.addr)
        console.print(f"metrics: {server.url}")
    if quantize is not None:
        console.print(f"engine quantization_config: {quantize.quantization_config()}")
    rows: list[DemoSync] = []
    idle_tokens, idle_s = 0, 0.0
    sync_done = anyio.Event()
    sync_done.set()
    try:
        if local is not None:
            await local.start()
            await local.wait_for_tokens(config.model.batch_size)
        version = (await engine.version()) or 0
        # The last version a sync committed: what a failed sync leaves the engine serving
        # (the transaction guarantees it), so the failure path never asks an engine that
        # may be down, which would replace the sync's StageError by its own error.
        committed = version
        window = local.open_window() if local is not None else None
        progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(),
            TextColumn("{task.fields[status]}"),
            console=console,
            disable=not config.demo.progress,
        )
        with progress:
            steps = progress.add_task("training", total=config.demo.steps, status="")
            async with anyio.create_task_group() as group:

                async def run_sync(
                    version: int, step: int, snapshot: list[tuple[str, torch.Tensor]]
                ) -> None:
                    nonlocal window, idle_tokens, idle_s, committed
                    idle: float | None = None
                    if window is not None:
                        # Generation outside syncs so far (training runs in both): a
                        # cumulative rate, so a short gap between two syncs can't read 0.
                        stats = window.close()
                        idle_tokens += stats.tokens
                        idle_s += stats.elapsed_s
                        idle = idle_tokens / idle_s if idle_s > 0 else None
                    started = time.perf_counter()
                    trace = traces.for_version(version)
                    try:
                        report = await sync_weights(
                            snapshot,
                            engine,
                            version=version,
                            stages=stages,
                            depth=config.depth,
                            mode=config.engine.mode,
                            pause_mode=config.engine.pause_mode,
                            timeout_s=config.engine.timeout_s,
                            prefetch_bytes=config.engine.prefetch_bytes,
                            observer=metrics,
                            on_partial_failure=config.engine.on_partial_failure,
                            trace=trace,
                        )
                    except Exception:
                        traces.done(trace if trace.exists() else None)
                        # Raising cancels the task group; run_demo unwraps the group.
                        metrics.record_sync(
                            seconds=time.perf_counter() - started,
                            nbytes=0,
                            ok=False,
                            version=committed,
                            engine_dirty=engine_is_dirty(engine),
                        )
                        raise
                    traces.done(report.trace_path)
                    if report.trace_error is not None:
                        console.print(f"[yellow]trace of v{version}:[/yellow] {report.trace_error}")
                    committed = report.version
                    metrics.record_sync(
                        seconds=report.seconds,
                        nbytes=report.bytes,
                        ok=True,
                        version=report.version,
                        hard_pause_s=report.hard_pause_s,
                        engine_dirty=False,
                    )
                    if local is not None:
                        check = await anyio.to_thread.run_sync(
                            verify_engine,
                            local,
                            snapshot,
                            fp8_weight_names(report.load.names),
                            config.quantize,
                        )
                        window = local.open_window()
                    else:
                        check = "n/a (remote engine)"
                    rows.append(DemoSync(version, step, report, idle, check))
                    progress.update(
                        steps,
                        status=f"synced v{version} in {report.seconds:.2f} s, "
                        f"pause {report.hard_pause_s * 1e3:.0f} ms",
                    )
                    sync_done.set()

                for step in range(1, config.demo.steps + 1):
                    loss = await anyio.to_thread.run_sync(trainer.step)
                    progress.update(steps, advance=1, description=f"training (loss {loss:.3f})")
                    if step % config.demo.sync_every == 0 or step == config.demo.steps:
                        await sync_done.wait()  # one sync at a time: one snapshot in memory
                        sync_done = anyio.Event()
                        snapshot = await anyio.to_thread.run_sync(trainer.snapshot)
                        version += 1
                        group.start_soon(run_sync, version, step, snapshot)
        served = await engine.version()
        if served != version:
            raise AssertionError(f"the engine serves v{served}, the trainer sent v{version}")
    finally:
        if local is not None:
            await local.stop()
        aclose = getattr(engine, "aclose", None)
        if aclose is not None:  # an HTTP engine owns a connection pool
            with anyio.CancelScope(shield=True):
                await aclose()
        if server is not None:
            server.close()
    return rows


def _by_importance(leaves: list[BaseException]) -> list[BaseException]:
    """weightpipe's own errors first (the StageError of a failed sync), then other errors,
    then whatever is not an ``Exception`` (a cancellation)."""

    def rank(exc: BaseException) -> int:
        if isinstance(exc, WeightpipeError):
            return 0
        return 1 if isinstance(exc, Exception) else 2

    return sorted(leaves, key=rank)


def _start_shm_manager_detached() -> None:
    """Start torch's shared-memory manager now, with ``/dev/null`` as its stdio.

    CPU payloads to an SGLang server are shared-memory handles (the ``file_system``
    strategy), and the first one makes libshm fork ``torch_shm_manager``, which replaces
    only its stdout and inherits every other descriptor. It outlives this process while a
    receiver holds the memory, so it would keep the caller's terminal or pipe open
    (``weightpipe demo --engine sglang | tail`` would wait for it). One manager serves the
    whole process, so starting it here, while our stdio points at ``/dev/null``, is enough.
    """
    import torch.multiprocessing  # initialises libshm (the manager's path)

    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: _copy_above_stdio(fd) for fd in (0, 1, 2)}
    opened = os.open(os.devnull, os.O_RDWR)  # may take a closed stdio slot: move it up
    devnull = fcntl.fcntl(opened, fcntl.F_DUPFD_CLOEXEC, 3)
    os.close(opened)
    try:
        for fd in saved:
            os.dup2(devnull, fd)
        storage = torch.UntypedStorage(1)  # type: ignore[no-untyped-call]
        storage._share_filename_cpu_()  # forks the manager on the first call only
    finally:
        for fd, copy in saved.items():
            if copy is None:  # it was closed: leave it closed
                os.close(fd)
            else:
                os.dup2(copy, fd)
                os.close(copy)
        os.close(devnull)


def _copy_above_stdio(fd: int) -> int | None:
    """A close-on-exec copy of ``fd`` numbered 3 or more, or None if ``fd`` is closed."""
    try:
        return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
    except OSError:
        return None


def run_demo(
    config: WeightpipeConfig,
    *,
    trace: str | os.PathLike[str] | None = None,
    timeline: str | os.PathLike[str] = DEFAULT_TIMELINE,
) -> int:
    """Run the demo; returns the process exit status (0 only if every sync checked out).

    ``trace``: keep each sync's trace, one file per sync (see the module's docstring);
    ``timeline``: where to draw the last sync's timeline (PNG). A timeline that cannot
    be drawn is reported and never changes the exit status.
    """
    console = Console()
    if not console.is_terminal:
        console = Console(width=132)  # a log or pipe: keep the table on one line per row
    started = time.perf_counter()
    if config.engine.kind == "sglang_http":
        _start_shm_manager_detached()
    with tempfile.TemporaryDirectory(prefix="weightpipe-demo-") as scratch:
        traces = TracePaths(trace if trace is not None else Path(scratch) / "trace.json")
        status = _run_and_report(config, console, traces, started)
        if status != 130:  # an interrupted demo exits at once
            _draw_timeline(console, traces, Path(timeline), failed=status != 0)
        if trace is not None and traces.written:
            shown = ", ".join(str(p) for p in traces.written)
            console.print(f"traces (open in https://ui.perfetto.dev): {shown}", highlight=False)
    return status


def _run_and_report(
    config: WeightpipeConfig, console: Console, traces: TracePaths, started: float
) -> int:
    try:
        rows = anyio.run(_demo, config, console, traces)
    except BaseException as exc:  # a CLI reports, then exits non-zero
        # A failure inside the task group arrives wrapped in an exception group: report
        # the errors themselves (a StageError names stage, bucket and tensor).
        leaves = leaf_exceptions(exc)
        if any(isinstance(leaf, KeyboardInterrupt) for leaf in leaves):
            console.print("[red]interrupted[/red]")
            return 130
        for index, leaf in enumerate(_by_importance(leaves)):
            label = "demo failed:" if index == 0 else "  and:"
            console.print(f"[red]{label}[/red] {type(leaf).__name__}: {leaf}", highlight=False)
            cause = leaf.__cause__
            while cause is not None:
                console.print(f"  caused by {type(cause).__name__}: {cause}", highlight=False)
                cause = cause.__cause__
        return 1
    print_table(console, rows)
    console.print(
        f"{len(rows)} syncs in {time.perf_counter() - started:.1f} s "
        f"(mode {config.engine.mode}, depth {config.depth}, "
        f"bucket {config.fetch.bucket_bytes / (1 << 20):.0f} MiB)"
    )
    return 0


def _draw_timeline(console: Console, traces: TracePaths, target: Path, *, failed: bool) -> None:
    """Draw the last sync's timeline at ``target``; say where, or why not."""
    source = traces.last
    if source is None or not source.exists():
        if source is not None:
            console.print("[yellow]no timeline: the last sync wrote no trace[/yellow]")
        return
    from weightpipe.stages.app.timeline import write_timeline

    try:
        written = write_timeline(source, target)
    except Exception as exc:  # the demo's outcome is the syncs', not the drawing's
        console.print(f"[yellow]no timeline:[/yellow] {type(exc).__name__}: {exc}", highlight=False)
        return
    which = "the failed sync" if failed else "the last sync"
    console.print(f"timeline of {which} ({source.stem}): {written}", highlight=False)


if __name__ == "__main__":
    from weightpipe.stages.app.config import load_weightpipe_config

    sys.exit(run_demo(load_weightpipe_config(overrides=sys.argv[1:])))
