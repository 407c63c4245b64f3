"""``benchmarks.kernel_report`` compiles the FP8 kernel for sm_90a here and reports it.

Needs Triton with its NVIDIA backend (no GPU): the compile and ``ptxas -v`` run on CPU.
The figures it checks are the issue's targets (no spills, 16-byte loads when aligned), so
a kernel change that makes the kernel spill fails here, not on a GPU machine.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("triton")
pytest.importorskip("triton.backends.nvidia")

from weightpipe.benchmarks import kernel_report


def test_access_widths_read_vectors_and_scalars() -> None:
    ptx = "ld.global.v4.b32 {%r1}, [%rd1];\n ld.global.b16 %rs1, [%rd2];\n st.global.b8 [%rd3];"
    assert kernel_report.access_widths(ptx, "ld.global") == [2, 16]
    assert kernel_report.access_widths(ptx, "st.global") == [1]


@pytest.mark.slow
def test_report_covers_every_dtype_and_scale_format(tmp_path: Path) -> None:
    path = tmp_path / "kernel.json"
    kernel_report.main(["--json", str(path)])
    data = json.loads(path.read_text())
    assert data["triton"] and data["ptxas"] and data["target"] == "sm_90a"
    kernels = data["kernels"]
    combos = {(k["dtype"], k["arithmetic"], k["scale_fmt"], k["path"]) for k in kernels}
    assert combos == {
        (d, a, f, p)
        for d in ("bfloat16", "float16", "float32")
        for a, f in (("sglang", "float32"), ("sglang", "ue8m0"), ("verl", "float32"))
        for p in ("aligned", "unaligned")
    }
    for k in kernels:
        assert 0 < k["registers"] <= 255
        assert k["spill_bytes"] == 0, k
        if k["path"] == "aligned":
            assert k["load_width_bytes"] == 16 and k["store_width_bytes"] == 16, k
        assert k["meets_target"] is True
    assert data["meets_target"] is True
