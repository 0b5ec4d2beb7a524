"""Issue 28, items 4, 8 and 9 on the analysis side: the usage ceiling 1 - exp(-N/K) in the runs frame,
every usage figure and the report; n=1 marked; a report of no runs refused; every figure readable
for every run (entropy axes that show the data, seeds told apart, distinct panel titles, short titles
in words)."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from analysis_fixtures import DEMO_TAUS, DEMO_VAL_TOKENS, make_demo_sweep, write_run
from matplotlib.figure import Figure

import analysis
from analysis.plots import with_window_ceiling
from analysis.report import main, write_report

CEILING_LABEL = "ceiling 1-exp(-N/K)"  # the legend label issue 28 asks for
K = 64
CEILING = 1 - math.exp(-DEMO_VAL_TOKENS / K)  # 0.374


@pytest.fixture
def demo(tmp_path: Path):
    sweep = make_demo_sweep(tmp_path)
    runs = analysis.load_runs(sweep)
    return sweep, runs, analysis.load_metrics(runs), analysis.load_histograms(runs)


def _visible(fig: Figure) -> list:
    return [ax for ax in fig.axes if ax.get_visible() and ax.get_label() != "<colorbar>"]


def _ceiling_lines(ax) -> list:
    return [line for line in ax.lines if line.get_label().startswith(CEILING_LABEL)]


# --- item 4: the loaders' columns --------------------------------------------------------------------


def test_runs_frame_derives_tokens_per_code_and_ceiling_for_runs_without_them(demo) -> None:
    _, runs, _, _ = demo
    assert "final_val_tokens_per_code" in runs and "final_val_usage_ceiling" in runs
    # final_val_tokens counts one codebook's tokens (experiments.evaluation: total[0]), so N/K is over K alone
    assert np.allclose(runs["final_val_tokens_per_code"], DEMO_VAL_TOKENS / K, rtol=0, atol=1e-15)
    assert np.allclose(runs["final_val_usage_ceiling"], CEILING, rtol=1e-15, atol=0)  # one expm1 of a double


def test_runs_frame_keeps_the_summary_values_where_the_trainer_wrote_them(tmp_path: Path) -> None:
    sweep = make_demo_sweep(tmp_path, summary_ceiling=True)
    one = sorted(sweep.iterdir())[0]
    summary = json.loads((one / "summary.json").read_text())
    summary.update(final_val_tokens_per_code=0.5, final_val_usage_ceiling=0.25)  # not what tokens / K derives
    (one / "summary.json").write_text(json.dumps(summary))
    runs = analysis.load_runs(sweep).set_index("run_id")
    assert runs.loc[one.name, "final_val_usage_ceiling"] == 0.25
    assert runs.loc[one.name, "final_val_tokens_per_code"] == 0.5


def test_fsq_levels_give_the_codebook_size(tmp_path: Path) -> None:
    run = write_run(tmp_path, "fsq", codebook_size=1000)
    config = json.loads((run / "config.json").read_text())
    config["quantizer"].update(kind="fsq", fsq_levels=[8, 5, 5, 5])
    (run / "config.json").write_text(json.dumps(config))
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "final_val_tokens": 2000}))
    runs = analysis.load_runs(tmp_path)
    assert runs["final_val_tokens_per_code"].iloc[0] == 2.0


# --- item 4: figures and the report draw the ceiling, and say n=1 ------------------------------------


def test_usage_figure_draws_the_ceiling_and_marks_one_seed_points(demo) -> None:
    _, runs, _, _ = demo
    fig = analysis.usage_vs_gamma(runs, metrics=("final_val_usage_fraction",))
    axes = _visible(fig)
    assert len(axes) == len(DEMO_TAUS)  # one panel per temperature
    for ax in axes:
        (line,) = _ceiling_lines(ax)
        assert line.get_ydata()[0] == pytest.approx(CEILING)
        assert line.get_linestyle() not in ("-", "solid")  # dashed, unlike a data line
        assert ax.get_ylim()[1] >= CEILING  # the ceiling is inside the panel
    notes = [t.get_text() for ax in axes for t in ax.texts]
    assert notes == ["n=1"]  # the one grid point with one seed (tau = 100 panel), and only it
    assert "n=1" in _visible(fig)[1].texts[0].get_text()


def test_heatmap_cells_say_the_ceiling_and_n(demo) -> None:
    _, runs, _, _ = demo
    fig = analysis.usage_heatmap(runs, metric="final_val_usage_fraction")
    cells = [t.get_text() for ax in _visible(fig) for t in ax.texts]
    assert len(cells) == 8 and all(f"ceiling {CEILING:.2g}" in c for c in cells)
    assert sum("n=1" in c for c in cells) == 1


def test_reconstruction_vs_usage_draws_the_ceiling_on_the_usage_axis(demo) -> None:
    _, runs, _, _ = demo
    fig = analysis.reconstruction_vs_usage(runs, x="final_val_usage_fraction")
    for ax in _visible(fig):
        (line,) = _ceiling_lines(ax)
        assert line.get_xdata()[0] == pytest.approx(CEILING)


def test_training_usage_panel_draws_the_window_ceiling(demo) -> None:
    _, runs, metrics, _ = demo
    usage = _visible(analysis.training_curves(metrics, runs))[3]
    (line,) = _ceiling_lines(usage)
    # 8 tokens a step, a 4-step window, K = 64: N = 8 min(step + 1, 4)
    want = [1 - math.exp(-8 * min(s + 1, 4) / K) for s in line.get_xdata()]
    assert np.allclose(line.get_ydata(), want, rtol=1e-12, atol=0)


def test_training_usage_against_gamma_draws_the_window_ceiling(demo) -> None:
    _, runs, metrics, _ = demo
    runs = with_window_ceiling(runs, metrics)
    # the last logged step (7) of 8 tokens a step, a 4-step window: N = 32 of K = 64 codes
    assert np.allclose(runs["final_usage_ceiling"], 1 - math.exp(-32 / K), rtol=1e-15, atol=0)
    fig = analysis.usage_vs_gamma(runs, metrics=("final_usage_fraction",))
    for ax in _visible(fig):
        (line,) = _ceiling_lines(ax)
        assert line.get_ydata()[0] == pytest.approx(1 - math.exp(-0.5))


def test_report_says_usage_is_capped_and_marks_n1(demo) -> None:
    sweep, _, _, _ = demo
    text = (write_report(sweep) / "report.md").read_text()
    assert f"Usage capped at {CEILING:.3g}** in 15 of 15 finished runs" in text
    assert "(n=1)" in text
    assert "`final_val_usage_ceiling`:" in text and "`final_val_tokens_per_code`:" in text  # defined


def test_report_says_nothing_of_a_cap_when_tokens_outnumber_codes(tmp_path: Path) -> None:
    sweep = make_demo_sweep(tmp_path)
    for run in sweep.iterdir():
        summary = json.loads((run / "summary.json").read_text())
        (run / "summary.json").write_text(json.dumps({**summary, "final_val_tokens": 4 * K}))
    assert "Usage capped at" not in (write_report(sweep) / "report.md").read_text()


# --- item 8: a folder with no runs --------------------------------------------------------------------


def test_report_of_a_folder_without_runs_is_one_line_and_exit_2(tmp_path: Path, capsys) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(empty)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1
    assert "holds no run folders" in captured.err
    assert list(empty.iterdir()) == []  # no report folder, no temp folder
    assert [p.name for p in tmp_path.iterdir()] == ["empty"]  # nothing beside it either


# --- item 9: figures readable for every run -----------------------------------------------------------


def test_first_report_figure_is_usage_against_both_parameters_with_the_ceiling(demo) -> None:
    sweep, _, _, _ = demo
    out = write_report(sweep)
    text = (out / "report.md").read_text()
    figures = [line for line in text.splitlines() if line.startswith("![")]
    assert figures[0].endswith("(usage.png)")
    assert "one panel per quantizer.inv_temperature" in text and "ceiling 1 - exp(-N/K)" in text


def test_per_sample_entropy_at_1e_40_keeps_an_axis_that_shows_the_data(tmp_path: Path) -> None:
    # every run confident: the per-sample entropy falls from 1 to 1e-40
    sweep = make_demo_sweep(tmp_path)
    runs = analysis.where(analysis.load_runs(sweep), {"quantizer.inv_temperature": 100.0})
    metrics = analysis.load_metrics(runs)
    ax = _visible(analysis.training_curves(metrics, runs))[0]
    low, high = ax.get_ylim()
    if ax.get_yscale() == "log":
        assert low >= 1e-4 * high, (low, high)  # not stretched over 40 decades
    else:
        assert low >= 0
    if ax.get_yscale() == "symlog":
        linthresh = ax.yaxis.get_transform().linthresh
        assert linthresh >= 1e-4 * max(line.get_ydata().max() for line in ax.lines) * (1 - 1e-12)
        assert f"linear below {linthresh:.2g}" in ax.get_title()
        # log decades from the threshold to the data's top: at most 4, where a log axis would show 40
        top = max(line.get_ydata().max() for line in ax.lines)
        assert math.log10(top / linthresh) <= 4 + 1e-9


def test_rank_frequency_tells_the_seeds_of_a_grid_point_apart(demo) -> None:
    _, runs, _, hist = demo
    fig = analysis.rank_frequency(hist, runs)
    ax = fig.axes[0]
    thin = [line for line in ax.lines if line.get_label() == "_nolegend_"]
    by_color: dict[object, list] = {}
    for line in thin:
        by_color.setdefault(line.get_color(), []).append((line.get_linestyle(), line.get_marker()))
    two = [styles for styles in by_color.values() if len(styles) == 2]
    assert two and all(len(set(styles)) == 2 for styles in two)  # the two seeds of a point differ
    seed_legend = [t.get_text() for legend in fig.legends for t in legend.get_texts() if t.get_text().startswith("seed")]
    assert seed_legend == ["seed 0", "seed 1"]


def test_panel_titles_are_distinct_and_figure_titles_short_words(demo) -> None:
    _, runs, metrics, hist = demo
    figures = {
        "usage": analysis.usage_vs_gamma(runs, metrics=("final_val_usage_fraction",)),
        "both": analysis.usage_vs_gamma(runs, metrics=("final_usage_fraction", "final_val_perplexity")),
        "heatmap": analysis.usage_heatmap(runs, metric="final_val_usage_fraction"),
        "curves": analysis.training_curves(metrics, runs),
        # the per-sample entropy on a symlog axis, its title saying so
        "confident curves": analysis.training_curves(metrics, analysis.where(
            runs, {"quantizer.inv_temperature": 100.0})),
        "ranks": analysis.rank_frequency(hist, runs),
        "reconstruction": analysis.reconstruction_vs_usage(runs, x="final_val_usage_fraction"),
    }
    for name, fig in figures.items():
        titles = [ax.get_title() for ax in _visible(fig)]
        assert len(set(titles)) == len(titles), (name, titles)
        fig.savefig(io.BytesIO(), format="png")  # lays the figure out
        boxes = [ax.title.get_window_extent() for ax in _visible(fig) if ax.get_title()]
        for i, a in enumerate(boxes):  # no title runs into another panel's
            assert not any(a.overlaps(b) for b in boxes[i + 1:]), (name, titles)
        first = fig.get_suptitle().splitlines()[0]
        assert len(first) <= 100, (name, first)
        assert " and final " not in first, first
    assert figures["usage"].get_suptitle().startswith(
        "Validation usage against diversity gamma, by frac and inverse temperature")
    assert [ax.get_title() for ax in _visible(figures["usage"])] == [
        "inverse temperature 10", "inverse temperature 100"]
    assert figures["both"].get_suptitle().startswith("Training usage and validation perplexity against")
