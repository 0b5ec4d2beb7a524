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
from analysis.style import series_styles

# pytest.approx's / np.allclose's default tolerances (1e-6 / 1e-5 relative) below: float64 means, ratios and
# standard deviations of a few literal values, ~4e9 float64 eps from any rounding (tests/tolerances.py).


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
    assert len(usage.lines) == len(FRACS) and len(usage.collections) == len(FRACS)  # mean lines, min-max whiskers
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
    assert np.allclose(sums, 1.0)  # float64 count / total over 16 codes
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
    # a thin line per run (8 = 4 grid points x 2 seeds), a bold median per grid point, the uniform 1/K
    thin = [line for line in ax.lines if line.get_label() == "_nolegend_"]
    bold = [line for line in ax.lines[:-1] if line.get_label() != "_nolegend_"]
    assert len(thin) == len(runs) and len(bold) == 4 and len(ax.lines) == len(runs) + 4 + 1
    assert min(b.get_linewidth() for b in bold) > 2 * max(t.get_linewidth() for t in thin)
    assert ax.lines[-1].get_ydata()[0] == pytest.approx(1 / 16)
    assert "rank" in ax.get_xlabel() and "share" in ax.get_ylabel()
    assert "median" in fig.get_suptitle() and "one line per run" in fig.get_suptitle()


def test_rank_frequency_median_is_no_average_of_seeds_with_different_codebooks_used(tmp_path: Path) -> None:
    # one grid point, a seed that used 16 codes and one that used 32 (of 64): their mean is a curve no run has
    write_run(tmp_path, "s0", seed=0, codebook_size=64, final_usage=0.25)
    write_run(tmp_path, "s1", seed=1, codebook_size=64, final_usage=0.5)
    runs = analysis.load_runs(tmp_path)
    fig = _check_figure(analysis.rank_frequency(analysis.load_histograms(runs), runs))
    ax = fig.axes[0]
    thin = sorted((line for line in ax.lines if line.get_label() == "_nolegend_"), key=lambda line: len(line.get_xdata()))
    assert [len(line.get_xdata()) for line in thin] == [16, 32]  # each seed's own curve, to its last code
    (median,) = [line for line in ax.lines[:-1] if line.get_label() != "_nolegend_"]
    assert "codes: 16, 32" in median.get_label()
    # the median stops where half of the runs have run out of codes, and every point is some run's value
    assert len(median.get_xdata()) == 16
    for rank, value in zip(median.get_xdata(), median.get_ydata(), strict=True):
        assert any(value == pytest.approx(line.get_ydata()[rank - 1]) for line in thin)


def test_reconstruction_vs_usage_one_point_per_run(frames) -> None:
    runs, _, _ = frames
    fig = _check_figure(analysis.reconstruction_vs_usage(runs))
    mse, psnr = fig.axes
    assert sum(len(c.get_offsets()) for c in mse.collections) == len(runs)
    assert psnr.get_ylabel() == "final validation PSNR (dB)"
    assert mse.get_xlabel() == "final usage (fraction of codebook)"


def test_reconstruction_vs_usage_spreads_coincident_points_so_each_run_shows(tmp_path: Path) -> None:
    # four runs with the same results (two grid points, two seeds): one marker each, side by side
    for gamma in (0.5, 1.0):
        for seed in (0, 1):
            write_run(tmp_path, f"g{gamma}-s{seed}", gamma=gamma, seed=seed, final_usage=0.5)
    write_run(tmp_path, "apart", gamma=2.0, final_usage=0.9)
    fig = _check_figure(analysis.reconstruction_vs_usage(analysis.load_runs(tmp_path)))
    for ax in fig.axes:
        points = np.concatenate([c.get_offsets() for c in ax.collections])
        assert len(points) == 5
        shown = ax.transData.transform(points)  # in pixels: what a reader sees
        # the points spread around usage 0.5 (offsets of a few pixels, well under 0.05 of the axis)
        together = shown[np.isclose(points[:, 0], 0.5, atol=0.05)]
        assert len(together) == 4 and len({round(x) for x in together[:, 0]}) == 4
        assert np.diff(np.sort(together[:, 0])).min() > 3  # pixels apart: distinct markers
        assert points[np.isclose(points[:, 0], 0.5, atol=0.05), 0].mean() == pytest.approx(0.5)  # centred
        assert 0.9 in points[:, 0]  # a lone point stays where it is
    # two parameters vary: colour is the first, the marker the second (a scatter has no line style)
    runs = analysis.load_runs(tmp_path)
    for frac in (0.25, 1.0):
        write_run(tmp_path, f"f{frac}", gamma=0.5, frac=frac, seed=3, final_usage=0.3 + frac / 10)
    ax = _check_figure(analysis.reconstruction_vs_usage(analysis.load_runs(tmp_path))).axes[0]
    looks = {(tuple(c.get_facecolor()[0]), c.get_paths()[0].vertices.round(3).tobytes()) for c in ax.collections}
    assert len(looks) == len(ax.collections) == len(runs["quantizer.diversity_gamma"].unique()) + 1


def test_usage_vs_gamma_keeps_equal_lines_visible(tmp_path: Path) -> None:
    # frac 0.25 and frac 1 with the same results: the line hidden exactly under another
    for frac in (0.25, 1.0):
        for i, gamma in enumerate((0.5, 1.0, 2.0)):
            write_run(tmp_path, f"g{gamma}-f{frac}", gamma=gamma, frac=frac, final_usage=0.2 + i / 10)
    fig = _check_figure(analysis.usage_vs_gamma(analysis.load_runs(tmp_path)))
    for ax in fig.axes:
        lines = [line for line in ax.lines if line.get_label() in ("0.25", "1")]
        assert len(lines) == 2
        assert len({(line.get_linestyle(), line.get_marker()) for line in lines}) == 2
        assert list(lines[0].get_ydata()) == list(lines[1].get_ydata())
        pixels = [ax.transData.transform(np.c_[line.get_xdata(), line.get_ydata()])[:, 0] for line in lines]
        assert (np.abs(pixels[0] - pixels[1]) > 3).all()  # offset sideways at every gamma
        assert lines[0].get_linewidth() > lines[1].get_linewidth()  # the one below shows its edges
        assert not [c for c in ax.collections if type(c).__name__ == "PolyCollection"]  # no blending bands


def test_every_series_has_its_own_line_style_and_marker(frames) -> None:
    runs, metrics, hist = frames
    for fig in (analysis.training_curves(metrics, runs), analysis.rank_frequency(hist, runs),
                analysis.usage_vs_gamma(runs)):
        ax = fig.axes[0]
        series = [line for line in ax.lines if not line.get_label().startswith(("_", "uniform", "K ="))]
        assert len(series) >= 2
        assert len({(line.get_linestyle(), line.get_marker()) for line in series}) == len(series), fig.get_suptitle()
    assert len(set(series_styles(32))) == 32


def test_training_curves_put_a_series_that_sits_at_zero_on_a_symlog_axis(frames) -> None:
    runs, metrics, _ = frames
    flat = metrics.copy()
    quantizer = flat["kind"] == "quantizer"
    flat.loc[quantizer & (flat["step"] > 0), "per_sample_entropy"] = 0.0  # confident from step 1 on
    flat.loc[quantizer & (flat["step"] == 4), "per_sample_entropy"] = 1e-3
    fig = _check_figure(analysis.training_curves(flat, runs))
    per_sample, batch = fig.axes[:2]
    assert per_sample.get_yscale() == "symlog" and "symlog" in per_sample.get_title()
    assert batch.get_yscale() == "linear"  # spread over its range: left linear
    # and without zeros, a series that spends most of its time near 0 is on a log axis
    flat.loc[quantizer & (flat["step"] > 0), "per_sample_entropy"] = 1e-4
    assert _check_figure(analysis.training_curves(flat, runs)).axes[0].get_yscale() == "log"


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


def test_saved_figures_are_the_same_bytes_each_time(tmp_path: Path) -> None:
    from analysis.style import new_figure, save_figure

    def draw() -> Figure:
        fig, axes = new_figure(1, 1)
        axes[0, 0].scatter([1, 2, 3], [3, 1, 2], label="runs")
        axes[0, 0].legend()
        return fig

    for folder in ("a", "b"):
        assert save_figure(draw(), tmp_path / folder, "figure") == ["figure.png", "figure.svg"]
    for name in ("figure.png", "figure.svg"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert b"<dc:date>" not in (tmp_path / "a" / "figure.svg").read_bytes()
