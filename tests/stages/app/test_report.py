"""The benchmarks' shared helpers: JSON with machine facts, the table, the RSS peak."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

from weightpipe.stages.app.report import PeakRss, median, print_table, write_json


def test_write_json_adds_machine_facts_and_creates_folders(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "out.json"
    write_json(path, {"figure": 1.5})
    data = json.loads(path.read_text())
    assert data["figure"] == 1.5
    assert data["machine"]["torch"] == torch.__version__
    write_json(None, {"figure": 2})  # no path: nothing written, no error


def test_print_table_aligns_columns(capsys: pytest.CaptureFixture[str]) -> None:
    print_table([[1, 0.123456], [22, 3.0]], ["n", "value"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["n", "value"]
    assert lines[2].split() == ["1", "0.1235"]
    assert len({len(line) for line in lines}) == 1


def test_median() -> None:
    assert median([3.0, 1.0, 2.0]) == 2.0


def test_peak_rss_sees_memory_touched_inside_the_block() -> None:
    size = 64 << 20
    with PeakRss(interval_s=10.0) as rss:  # the explicit sample below is the one that counts
        block = torch.ones(size, dtype=torch.uint8)
        rss.sample()
        del block
    assert rss.growth >= size // 2


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_peak_rss_from_the_kernel_sees_a_peak_no_sample_caught() -> None:
    # Touched and freed between two samples of a 10 s sampler: only the kernel's peak
    # mark (VmHWM, reset on entry) can see it, and no sampling thread runs beside it.
    size = 96 << 20
    before = threading.active_count()
    with PeakRss(interval_s=10.0) as rss:
        assert threading.active_count() == before or not rss.kernel_peak
        block = torch.ones(size, dtype=torch.uint8)
        del block
    if not rss.kernel_peak:
        pytest.skip("this kernel does not let a process reset its peak RSS")
    assert rss.growth >= size // 2
    with PeakRss(interval_s=10.0) as quiet:
        pass
    assert quiet.growth < size // 4  # the mark was reset: the earlier peak is not counted
