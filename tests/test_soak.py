"""The soak benchmark runs a short version end to end and writes what it promises.

Timings are not asserted (they belong in the JSON); the invariants are: no sync leaves a
half-applied or mislabelled model, the local engine (which rolls back) is never left
paused, every sync is counted once, and threads and file descriptors come back.
"""

from __future__ import annotations

import json
from pathlib import Path

from weightpipe.benchmarks import soak


def test_short_soak_keeps_its_invariants(tmp_path: Path) -> None:
    path = tmp_path / "soak.json"
    result = soak.main(["--syncs", "30", "--fault-every", "3", "--json", str(path), "--quiet"])
    data = json.loads(path.read_text())
    assert data["syncs"] == 30
    for key in (
        "syncs_committed",
        "syncs_failed",
        "half_applied",
        "rss_drift_bytes",
        "threads_start",
        "threads_end",
        "fds_start",
        "fds_end",
        "sync_s_p50",
        "sync_s_p99",
        "hard_pause_s_p50",
        "hard_pause_s_p99",
    ):
        assert key in data, key
    assert data["half_applied"] == 0, data["first_problem"]
    assert data["left_paused"] == 0, data["first_problem"]
    assert data["syncs_committed"] + data["syncs_failed"] == 30
    assert sum(data["faults_injected"].values()) == 10
    # every fault but the resume one (which fails after its commit) fails its sync
    assert data["syncs_failed"] >= 8
    assert data["threads_start"] == data["threads_end"]
    assert data["fds_start"] == data["fds_end"]
    assert all(result["targets_met"].values()), result["targets_met"]
