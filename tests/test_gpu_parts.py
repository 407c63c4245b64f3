"""``benchmarks/gpu_parts.py`` (the device parts of ``gpu_check.sh``) in ``--dry-run``: each
part's code path runs at a tiny size on the CPU, so the script works before a GPU lease.

The figures of a dry run mean nothing and are not checked; what is checked is what a part
proves on the device too: the IPC part's bytes decoded by SGLang's own code in a second
process equal what was sent, and the local engine never read two versions in one step.
``gpu_multi_check.py`` (the first multi-GPU machine's script) skips cleanly below 2 GPUs.
"""

from __future__ import annotations

import pytest
import torch

from weightpipe.benchmarks import gpu_multi_check, gpu_parts


@pytest.mark.slow
@pytest.mark.parametrize("part", ["fetch_h2d", "end_to_end"])
def test_bandwidth_parts_run_dry(part: str) -> None:
    result = gpu_parts.main([part, "--dry-run"])
    assert result["dry_run"] is True and result["device"] == "cpu"
    assert all(v > 0 for k, v in result.items() if k.endswith("_gbps"))


@pytest.mark.slow
def test_ipc_part_decodes_with_sglang_in_a_second_process() -> None:
    result = gpu_parts.main(["cuda_ipc_sglang", "--dry-run"])
    assert result["bytes_match"] is True
    assert result["fp8_tensors"] > 0 and result["decoder_device"] == "cpu"


@pytest.mark.slow
def test_local_engine_part_syncs_in_every_mode_without_mixed_steps() -> None:
    result = gpu_parts.main(["local_engine_cuda", "--dry-run"])
    assert set(result["modes"]) == {"pause", "prefetch", "prefetch_lookahead", "in_flight"}
    assert result["mixed_steps_total"] == 0
    assert result["final_version"] == 4


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="runs its checks on 2+ GPUs")
def test_multi_gpu_check_skips_every_check_below_two_gpus() -> None:
    result = gpu_multi_check.main([])
    assert result["failed"] == []
    assert {c["status"] for c in result["checks"].values()} == {"skipped"}
    assert set(result["checks"]) == set(gpu_multi_check.CHECKS)
