"""Each plot: a 1280 px Figure with the expected cells, lines, labels and scales; missing data skips."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from analysis_fixtures import FRACS, GAMMAS, grid_usage, write_run
from matplotlib.figure import Figure

import analysis


@pytest.fixture
def frames(grid_sweep: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    runs = analysis.load_runs(grid_sweep)
    return runs, analysis.load_metrics(runs), analysis.load_histograms(runs)


def _check_figure(fig: Figure | None) -> Figure:
    assert isinstance(fig, Figure)
    assert round(fig.get_size_inches()[0] * fig.dpi) == 1280
    fig.savefig(io.BytesIO(), format="png")  # draws without a display
    return fig


def test_usage_heatmap_cells_hold_the_seed_means(frames) -> None:
    runs, _, _ = frames
    fig = _check_figure(analysis.usage_heatmap(runs))
    ax, colorbar = fig.axes
    data = ax.images[0].get_array()
    assert data.shape == (len(FRACS), len(GAMMAS))
    # Rows run from the largest frac at the top; columns by increasing gamma.
    for i, frac in enumerate(sorted(FRACS, reverse=True)):
        for j, gamma in enumerate(sorted(GAMMAS)):
            assert data[i, j] == pytest.approx((grid_usage(gamma, frac, 0) + grid_usage(gamma, frac, 1)) / 2)
    annotations = [t.get_text() for t in ax.texts]
    assert len(annotations) == 4 and all("±" in t and "n=2" in t for t in annotations)
    assert "diversity_gamma" in ax.get_xlabel() and "frac_per_sample_entropy" in ax.get_ylabel()
    assert "fraction of codebook" in colorbar.get_ylabel()


def test_usage_vs_gamma_one_line_per_frac_with_bands(frames) -> None:
    runs, _, _ = frames
    fig = _check_figure(analysis.usage_vs_gamma(runs))
    usage, perplexity = fig.axes
    assert len(usage.lines) == len(FRACS) and len(usage.collections) == len(FRACS)
    assert len(perplexity.lines) == len(FRACS) + 1  # + the codebook size K
    assert perplexity.get_yscale() == "log"
    assert usage.get_ylabel() == "final usage (fraction of codebook)"
    assert usage.get_xlabel() == "diversity_gamma"
    assert "min-max" in fig.get_suptitle()


@pytest.mark.parametrize(("gammas", "scale"), [
    ((0.0, 0.1, 1.0, 10.0), "symlog"),  # 0 next to values spanning decades
    ((0.5, 1.0, 2.0, 4.0), "log"),  # a doubling grid: evenly spaced on a log axis
    ((0.5, 1.0, 1.5), "linear"),
])
def test_gamma_axis_scale(tmp_path: Path, gammas: tuple[float, ...], scale: str) -> None:
    for i, gamma in enumerate(gammas):
        write_run(tmp_path, f"r{i}", gamma=gamma, final_usage=0.1 + i / 10)
    fig = _check_figure(analysis.usage_vs_gamma(analysis.load_runs(tmp_path)))
    assert fig.axes[0].get_xscale() == scale
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == [f"{g:g}" for g in gammas]


def test_training_curves_four_panels_one_line_per_grid_point(frames) -> None:
    runs, metrics, _ = frames
    fig = _check_figure(analysis.training_curves(metrics, runs))
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_ylabel() for ax in axes] == [
        "per-sample entropy (nats)", "batch entropy (nats)", "commitment loss (mean sq. distance)",
        "usage (fraction of codebook)",
    ]
    usage = axes[3]
    assert len(usage.lines) == 4 and len(usage.collections) == 4  # mean lines and min-max bands
    assert axes[3].get_xlabel() == "training step"
    per_run = analysis.training_curves(metrics, runs, per_run=True)
    assert len(per_run.axes[3].lines) == 8 and not per_run.axes[3].collections
    assert len(fig.legends[0].get_texts()) == 4


def test_training_curves_with_several_layers_need_a_layer(tmp_path: Path) -> None:
    write_run(tmp_path, "r", layers=("encoder.q", "decoder.q"))
    runs = analysis.load_runs(tmp_path)
    metrics = analysis.load_metrics(runs)
    assert analysis.layers(metrics) == ["encoder.q", "decoder.q"]
    with pytest.raises(ValueError, match="pass layer="):
        analysis.training_curves(metrics, runs)
    assert "decoder.q" in _check_figure(analysis.training_curves(metrics, runs, layer="decoder.q")).get_suptitle()
    with pytest.warns(analysis.NoDataWarning, match="no quantizer rows for layer 'nope'"):
        assert analysis.training_curves(metrics, runs, layer="nope") is None


def test_rank_frequencies_are_sorted_shares(frames) -> None:
    _, _, hist = frames
    freq = analysis.rank_frequencies(hist)
    sums = freq.groupby(["run_id", "layer", "codebook"], observed=True)["frequency"].sum()
    assert np.allclose(sums, 1.0)
    for _, part in freq.groupby("run_id", observed=True):
        assert part["rank"].tolist() == list(range(1, len(part) + 1))
        assert part["frequency"].is_monotonic_decreasing
    # write_run's last snapshot: counts 2**(n - i); the top code's share is 2**n / sum.
    top = freq[(freq["rank"] == 1)].iloc[0]
    assert top["frequency"] > 0.5


def test_rank_frequency_log_log_with_uniform_reference(frames) -> None:
    runs, _, hist = frames
    fig = _check_figure(analysis.rank_frequency(hist, runs))
    ax = fig.axes[0]
    assert (ax.get_xscale(), ax.get_yscale()) == ("log", "log")
    assert len(ax.lines) == 4 + 1
    assert ax.lines[-1].get_ydata()[0] == pytest.approx(1 / 16)
    assert "rank" in ax.get_xlabel() and "share" in ax.get_ylabel()


def test_reconstruction_vs_usage_one_point_per_run(frames) -> None:
    runs, _, _ = frames
    fig = _check_figure(analysis.reconstruction_vs_usage(runs))
    mse, psnr = fig.axes
    assert sum(len(c.get_offsets()) for c in mse.collections) == len(runs)
    assert psnr.get_ylabel() == "final validation PSNR (dB)"
    assert mse.get_xlabel() == "final usage (fraction of codebook)"


def test_missing_data_skips_with_a_reason(tmp_path: Path) -> None:
    write_run(tmp_path, "running", status=None, histograms=False)
    runs = analysis.load_runs(tmp_path)
    with pytest.warns(analysis.NoDataWarning, match="usage_heatmap skipped: no 'final_usage_fraction'"):
        assert analysis.usage_heatmap(runs) is None
    with pytest.raises(analysis.NoData):
        analysis.reconstruction_vs_usage(runs, strict=True)
    with pytest.warns(analysis.NoDataWarning, match="no histogram snapshots"):
        assert analysis.rank_frequency(analysis.load_histograms(runs), runs) is None
    # The running run's curves are there so far.
    assert _check_figure(analysis.training_curves(analysis.load_metrics(runs), runs)) is not None


def test_grid_plots_refuse_to_average_over_other_parameters(grid_sweep: Path) -> None:
    write_run(grid_sweep, "bigger", codebook_size=64)
    runs = analysis.load_runs(grid_sweep)
    with pytest.warns(analysis.NoDataWarning, match=r"other parameters vary too \(quantizer.codebook_size\)"):
        assert analysis.usage_heatmap(runs) is None
