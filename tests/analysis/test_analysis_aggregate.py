"""Statistics over seeds, checked against hand computation."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from analysis_fixtures import FRACS, GAMMAS, grid_usage, write_run

import analysis
from analysis.aggregate import group_label

# pytest.approx's / np.allclose's default tolerances (1e-6 / 1e-5 relative) below: float64 means, ratios and
# standard deviations of a few literal values, ~4e9 float64 eps from any rounding (tests/tolerances.py).


def test_parameters_are_the_varying_config_fields_without_seed(grid_sweep: Path) -> None:
    runs = analysis.load_runs(grid_sweep)
    assert analysis.parameters(runs) == [analysis.GAMMA, analysis.FRAC]


def test_grid_summary_mean_std_over_seeds(grid_sweep: Path) -> None:
    runs = analysis.load_runs(grid_sweep)
    table = analysis.grid_summary(runs, "final_usage_fraction").set_index([analysis.GAMMA, analysis.FRAC])
    assert len(table) == len(GAMMAS) * len(FRACS)
    for gamma in GAMMAS:
        for frac in FRACS:
            a, b = grid_usage(gamma, frac, 0), grid_usage(gamma, frac, 1)
            row = table.loc[(gamma, frac)]
            assert row["mean"] == pytest.approx((a + b) / 2)
            # Sample std of two values: |a - b| / sqrt(2).
            assert row["std"] == pytest.approx(abs(a - b) / math.sqrt(2))
            assert (row["min"], row["max"], row["n"]) == (pytest.approx(min(a, b)), pytest.approx(max(a, b)), 2)


def test_grid_summary_uses_finished_runs_only(grid_sweep: Path) -> None:
    write_run(grid_sweep, "failed", gamma=0.5, frac=0.5, seed=7, status="failed", final_usage=0.99)
    runs = analysis.load_runs(grid_sweep)
    row = analysis.grid_summary(runs, "final_usage_fraction").iloc[0]
    assert row["n"] == 2 and row["max"] < 0.99
    every = analysis.grid_summary(runs, "final_usage_fraction", statuses=None).iloc[0]
    assert every["n"] == 3 and every["max"] == pytest.approx(0.99)


def test_grid_summary_names_the_missing_metric(grid_sweep: Path) -> None:
    with pytest.raises(KeyError, match="final_nonsense"):
        analysis.grid_summary(analysis.load_runs(grid_sweep), "final_nonsense")


def test_curves_mean_over_seeds_per_step(grid_sweep: Path) -> None:
    runs = analysis.load_runs(grid_sweep)
    metrics = analysis.load_metrics(runs)
    stats = analysis.curves(metrics, runs, "usage_fraction")
    assert set(stats["group"]) == {group_label([analysis.GAMMA, analysis.FRAC], [g, f]) for g in GAMMAS for f in FRACS}
    row = stats[(stats[analysis.GAMMA] == 1.0) & (stats[analysis.FRAC] == 0.5) & (stats["step"] == 4)].iloc[0]
    # write_run: usage at the last of 5 steps is the final usage; seeds 0 and 1.
    assert row["mean"] == pytest.approx((grid_usage(1.0, 0.5, 0) + grid_usage(1.0, 0.5, 1)) / 2)
    assert row["n"] == 2 and row["layer"] == "quantizer"


def test_group_label() -> None:
    assert group_label([analysis.GAMMA, analysis.FRAC], [0.5, 1.0]) == "γ=0.5, frac=1"
    assert group_label([], []) == "all runs"
