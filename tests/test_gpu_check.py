"""``benchmarks/gpu_check.sh`` in its no-device mode: exit 0 and one JSON saying so.

Runs the real script (CI's machine has no GPU), so the kernel report inside it runs too
when Triton is importable. On a machine with a CUDA device this test is skipped: there
the script runs its device parts, which is the device check's job, not CI's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the device mode is gpu_check's own")
def test_gpu_check_without_a_device_skips_the_device_parts(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path), "PY": sys.executable}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "no CUDA device present" in proc.stdout
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert data["device"] is None and data["failed"] == []
    device_parts = {
        "cuda_tests",
        "fp8_vs_copy_bandwidth",
        "fetch_h2d",
        "local_engine_cuda",
        "cuda_ipc_sglang",
    }
    assert device_parts <= set(data["skipped"])
    report = data["parts"]["kernel_report"]
    try:
        import triton.backends.nvidia  # noqa: F401
    except ImportError:
        assert report["status"] == "skipped"
    else:
        assert report["status"] == "passed"
        assert report["figures"]["meets_target"] is True
