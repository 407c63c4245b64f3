"""The benchmarks run end to end at a tiny size and write what they promise.

Figures are not asserted (timings belong in the JSON, not in tests); the structure and
the invariants that don't depend on timing are.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from weightpipe.benchmarks import overhead, sweep
from weightpipe.stages.app.cli import main as cli


def test_overhead_writes_its_figures(tmp_path: Path) -> None:
    path = tmp_path / "overhead.json"
    result = overhead.main(
        [
            "--json",
            str(path),
            "--items",
            "2000",
            "--repeats",
            "1",
            "--work-items",
            "20",
            "--item-kib",
            "256",
            "--dir",
            str(tmp_path),
        ]
    )
    data = json.loads(path.read_text())
    for key in ("per_hop_us", "efficiency", "pipelined_s", "sequential_s", "speedup", "machine"):
        assert key in data
    assert data["per_hop_us"] > 0
    assert set(data["busy_s"]) == {"fetch", "quantize", "load"}
    assert data["efficiency_item_bytes"] == 256 * 1024
    assert result["bottleneck"] in {"fetch", "quantize", "load"}


def test_sweep_via_weightpipe_bench(tmp_path: Path) -> None:
    json_path, plot_path = tmp_path / "sweep.json", tmp_path / "sweep.png"
    status = cli(
        [
            "bench",
            "--json",
            str(json_path),
            "--plot",
            str(plot_path),
            "sweep.preset=tiny",
            "sweep.depths=[1,2]",
            "sweep.bucket_mib=[1,4]",
            "sweep.workers=[1]",
            "sweep.repeats=2",
        ]
    )
    assert status == 0
    data = json.loads(json_path.read_text())
    assert len(data["results"]) == 4
    assert data["repeats"] == 2
    assert set(data["sequential"]) == set(data["sequential_all_cores"]) == {"1", "4"}
    for row in [*data["results"], *data["sequential"].values()]:
        assert len(row["gbs_runs"]) == 2
        assert row["gbs_min"] <= row["gbs"] <= row["gbs_max"]
    rec = data["recommended"]
    assert rec["depth"] in (1, 2) and rec["bucket_mib"] in (1, 4)
    assert rec["tied"] and rec["why"]
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    shapes = dict(sweep.model_shapes(sweep.PRESETS["llama-8b"]))
    assert shapes["model.layers.31.mlp.down_proj.weight"] == (4096, 14336)
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (1024, 4096)
    tiny = sweep.model_shapes(sweep.PRESETS["tiny"])
    assert data["total_bytes"] == sum(2 * math.prod(shape) for _, shape in tiny)
    assert data["tensors"] == len(tiny)


def test_sweep_script_refuses_a_bad_key_with_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert sweep.main(["--no-progress", "sweep.preest=tiny"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sweep: config key 'sweep.preest'")
    assert "did you mean 'sweep.preset'?" in err


def test_sync_path_writes_each_case_and_meets_the_written_bytes_minimum(tmp_path: Path) -> None:
    from weightpipe.benchmarks import sync_path

    out = tmp_path / "sync_path.json"
    args = ["--preset", "tiny", "--layers", "2", "--repeats", "1", "--bucket-mib", "1"]
    assert sync_path.main([*args, "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    cases = {case["source"]: case for case in data["cases"]}
    assert set(cases) == {"memory", "safetensors", "http"}
    for name, case in cases.items():
        after, before = case["after"], case["before"]
        minimum = case["minimum_written_per_source_byte"]
        # Bytes are counted, not timed: the one-pass path writes exactly the minimum, the
        # old path (Fetch packs, the wire flattens and moves into shared memory) more.
        assert after["written_per_source_byte"] == pytest.approx(minimum), name
        assert before["written_per_source_byte"] > minimum + 0.5, name
        assert after["end_to_end_ratio"] > 0 and case["quantizer_alone_gbs"]["median"] > 0
    # Kept tensors must be copied into the wire buffer only on the HTTP path.
    assert (
        cases["http"]["minimum_written_per_source_byte"]
        > cases["memory"]["minimum_written_per_source_byte"]
    )
