"""Shared plumbing of benchmarks and `weightpipe bench`: machine facts, JSON output, a table.

Every benchmark writes one JSON file with its figures, the baseline measured in the same
run, and the machine it ran on, so numbers from different machines are never compared by
accident. Ratios are the figures to quote; absolute times on shared machines are noisy.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["PeakRss", "machine", "median", "print_table", "rss_bytes", "write_json"]


def machine() -> dict[str, Any]:
    """Facts about the machine and software a figure came from."""
    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def write_json(path: str | Path | None, data: dict[str, Any]) -> None:
    """Write ``data`` (plus machine facts) as JSON to ``path`` if given."""
    payload = {**data, "machine": machine()}
    if path is None:
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")


def print_table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> None:
    """Print rows as an aligned plain-text table."""
    cells = [[str(h) for h in header]] + [
        [f"{c:.4g}" if isinstance(c, float) else str(c) for c in row] for row in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for index, row in enumerate(cells):
        print("  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)))
        if index == 0:
            print("  ".join("-" * width for width in widths))


def rss_bytes() -> int:
    try:
        with open("/proc/self/status") as status:
            fields = dict(line.split(":", 1) for line in status if ":" in line)
        return sum(int(fields[k].split()[0]) * 1024 for k in ("RssAnon", "RssFile"))
    except (OSError, KeyError):  # not Linux: psutil's RSS
        import psutil

        return int(psutil.Process().memory_info().rss)


def _status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                key, _, value = line.partition(":")
                if key == field:
                    return int(value.split()[0]) * 1024
    except (OSError, ValueError):
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (``VmHWM``) to the current RSS; whether it could
    (Linux >= 4.0 lets a process do so by writing 5 to its ``clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return _status_bytes("VmHWM") is not None


class PeakRss:
    """The peak RSS of the measured run, as growth above the RSS at construction.

    Where Linux lets a process reset its peak-RSS mark, the kernel's own ``VmHWM`` is read
    at the end: exact, and nothing runs beside the measured work. Elsewhere a thread
    samples RSS every ``interval_s`` (and on demand, ``sample()``) and keeps the peak; on a
    small machine that thread's wake-ups cost the run measurable time, so a benchmark's
    baseline should be measured under the same context manager.

    Use as a context manager around the measured run.
    """

    def __init__(self, interval_s: float = 0.002) -> None:
        self.interval_s = interval_s
        self.base = rss_bytes()
        self.peak = self.base
        self.kernel_peak = False
        self._enter_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        self.peak = max(self.peak, rss_bytes())

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> PeakRss:
        if _reset_peak_rss():
            self.kernel_peak = True
            self._enter_rss = _status_bytes("VmRSS") or 0
        else:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.kernel_peak:
            high = _status_bytes("VmHWM")
            if high is not None:
                self.peak = max(self.peak, self.base + high - self._enter_rss)
        else:
            self._stop.set()
            self._thread.join()
        self.sample()

    @property
    def growth(self) -> int:
        return self.peak - self.base
