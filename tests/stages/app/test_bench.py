"""The sweep's recommendation: the least memory among settings the runs cannot tell apart."""

from __future__ import annotations

from typing import Any

import pytest

from weightpipe.stages.app.bench import MiB, recommend


def row(
    depth: int, mib: int, runs: list[float], *, workers: int = 1, within: bool = True
) -> dict[str, Any]:
    ordered = sorted(runs)
    return {
        "depth": depth,
        "bucket_mib": mib,
        "workers": workers,
        "gbs": ordered[len(ordered) // 2],
        "gbs_min": ordered[0],
        "gbs_max": ordered[-1],
        "peak_rss_growth_bytes": (depth + 4) * mib * MiB,
        "memory_bound_bytes": (depth + 4) * mib * MiB + 256 * MiB,
        "within_bound": within,
    }


def test_a_clear_winner_is_picked_alone() -> None:
    rows = [row(1, 16, [1.0, 1.1, 1.2]), row(2, 64, [2.0, 2.1, 2.2]), row(1, 64, [1.5, 1.6, 1.7])]
    rec = recommend(rows)
    assert (rec["depth"], rec["bucket_mib"]) == (2, 64)
    assert rec["tied"] == ["depth 2/64 MiB/1 workers"]
    assert "no other setting" in rec["why"]


def test_overlapping_runs_are_tied_and_the_least_memory_wins() -> None:
    fastest = row(4, 64, [2.00, 2.10, 2.30])
    close = row(1, 16, [1.90, 2.00, 2.05])  # its best run reaches the fastest's slowest
    slow = row(1, 64, [1.0, 1.1, 1.2])
    rec = recommend([fastest, close, slow])
    assert (rec["depth"], rec["bucket_mib"]) == (1, 16)
    assert rec["best_median"] == pytest.approx(2.10)
    assert sorted(rec["tied"]) == ["depth 1/16 MiB/1 workers", "depth 4/64 MiB/1 workers"]
    assert "tied" in rec["why"] and "least memory" in rec["why"]


def test_the_pick_does_not_move_when_tied_settings_swap_places() -> None:
    # Two runs of the same sweep where noise reorders the medians of tied settings.
    first = [row(2, 64, [2.0, 2.2, 2.3]), row(1, 64, [2.1, 2.15, 2.25], workers=2)]
    second = [row(2, 64, [2.1, 2.15, 2.25]), row(1, 64, [2.0, 2.2, 2.3], workers=2)]
    picks = {(r["depth"], r["bucket_mib"], r["workers"]) for r in map(recommend, [first, second])}
    assert picks == {(1, 64, 2)}  # the smaller bound wins both times


def test_fewer_workers_break_a_memory_tie() -> None:
    rows = [row(2, 16, [2.0, 2.1, 2.2], workers=2), row(2, 16, [2.0, 2.05, 2.15])]
    assert recommend(rows)["workers"] == 1


def test_settings_over_their_bound_are_used_only_when_all_are() -> None:
    rows = [row(1, 16, [3.0, 3.1, 3.2], within=False), row(2, 64, [1.0, 1.1, 1.2])]
    assert recommend(rows)["depth"] == 2
    over = [row(1, 16, [3.0, 3.1, 3.2], within=False)]
    assert recommend(over)["depth"] == 1


def test_no_results_is_an_error() -> None:
    with pytest.raises(ValueError, match="no results"):
        recommend([])
