"""Claim 1 on the images task (analysis.quantizer_comparison): series names, one row per run, the figure."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest

from analysis import column_names as cn
from analysis import quantizer_comparison as q

# pytest.approx's / np.allclose's default tolerances (1e-6 / 1e-5 relative) below: float64 means, ratios and
# standard deviations of a few literal values, ~4e9 float64 eps from any rounding (tests/tolerances.py).


def _runs() -> pd.DataFrame:
    rows = []
    kinds = [("lfq", 100.0, "uniform", 0.0), ("lfq", 10.0, "uniform", 0.0), ("bsq", 10.0, "uniform", 0.0),
             ("fsq", 10.0, "uniform", 0.0), ("vq", 10.0, "uniform", 0.0), ("vq", 10.0, "kmeans", 0.5)]
    for (kind, tau, init, dead), size, seed in itertools.product(kinds, (1024, 16384), (0, 1, 2)):
        rows.append({"run_id": f"{kind}{tau}{init}{dead}{size}{seed}", "sweep": "s", "status": "done",
                     cn.KIND: kind, cn.SIZE: size, cn.TAU: tau, cn.SCHEDULE: "constant", cn.GAMMA: 1.0,
                     cn.VQ_INIT: init, cn.VQ_DEAD: dead, "seed": seed,
                     "final_val_usage_fraction": 0.9 if kind != "vq" else 0.1, "final_val_psnr": 20.0 + seed,
                     "final_val_ssim": 0.5, "final_val_perplexity": 10.0, "final_val_tokens": 81408})
    # a regime run away from the comparison's settings, and one run listed by two sweeps
    rows.append({**rows[0], "run_id": "annealed", cn.SCHEDULE: "linear"})
    rows.append({**rows[0], "run_id": "weight0.3", cn.WEIGHT: 0.3})  # claim 2's and 3's runs
    rows.append({**rows[0], "run_id": "frac0.25", cn.FRAC: 0.25})
    rows.append({**rows[1], "sweep": "other"})
    return pd.DataFrame(rows)


def test_series_names_say_what_distinguishes_the_runs() -> None:
    runs = _runs()
    names = {q.series_of(r) for _, r in runs.iterrows()}
    assert names == {"LFQ inv. temp. 100 (reference)", "LFQ inv. temp. 10", "BSQ inv. temp. 10", "FSQ", "VQ",
                     "VQ kmeans init + dead-code 0.5", None}


def test_summary_has_one_row_per_run_and_leaves_out_other_settings() -> None:
    summary = q.quantizers_summary(_runs())
    assert summary["run_id"].is_unique and not {"annealed", "weight0.3", "frac0.25"} & set(summary["run_id"])
    assert len(summary) == 6 * 2 * 3
    assert list(dict.fromkeys(summary[cn.KIND])) == ["lfq", "bsq", "fsq", "vq"]
    table = q.quantizers_table(summary)
    assert set(table["n_seeds"]) == {3} and len(table) == 12
    vq = table[table["series"] == "VQ"]
    assert np.allclose(vq["final_val_usage_fraction_mean"], 0.1) and np.allclose(vq["final_val_psnr_mean"], 21.0)


def test_figure_draws_every_series_in_its_own_style_and_every_seed() -> None:
    fig = q.quantizers_figure(q.quantizers_summary(_runs()), held_fixed="resolution=32", strict=True)
    ax = fig.axes[0]
    lines = ax.get_lines()
    assert len(lines) == 6
    assert len({(line.get_linestyle(), line.get_marker(), line.get_color()) for line in lines}) == 6
    # equal usage for five series: dodged, so no two lines share their x positions
    assert len({tuple(np.round(line.get_xdata(), 3)) for line in lines}) == 6
    assert sum(len(c.get_offsets()) for c in ax.collections) == 36
    assert "held fixed: resolution=32" in fig._suptitle.get_text() and "81,408" in fig._suptitle.get_text()


def test_figure_without_finished_runs_says_so() -> None:
    summary = q.quantizers_summary(_runs()).assign(status="failed")
    with pytest.raises(ValueError, match="no finished runs"):
        q.quantizers_figure(summary, strict=True)
