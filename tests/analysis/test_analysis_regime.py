"""The regime sweep's tables and figures (analysis.regime), on hand-made frames."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from analysis_fixtures import write_regime_sweep, write_run

from analysis import regime
from analysis.column_names import GAMMA, SCHEDULE, SIZE, TAU
from analysis.report import main


def recipe(argv: list[str]) -> int:
    """``python -m analysis.report ARGV --study recipe``."""
    return main([*argv, "--study", "recipe"])


# pytest.approx's / np.allclose's default tolerances (1e-6 / 1e-5 relative) below: float64 means, ratios and
# standard deviations of a few literal values, ~4e9 float64 eps from any rounding (tests/tolerances.py).


def _summary() -> pd.DataFrame:
    rows = []
    for size, tau, schedule, gamma, seed in itertools.product((1024, 16384), (1.0, 10.0, 100.0),
                                                              ("constant", "linear"), (1.0, 2.0), (0, 1, 2)):
        # every series lands on the same usage at tau >= 10: the figure must still show them apart
        usage = 1.0 if tau >= 10 else 0.5 + 0.1 * seed
        rows.append({"run_id": f"{size}-{tau}-{schedule}-{gamma}-{seed}", "sweep": "recipe_regime", "status": "done",
                     SIZE: size, TAU: tau, SCHEDULE: schedule, GAMMA: gamma, "seed": seed,
                     "data.resolution": 32, "schedule.steps": 900,
                     "final_val_usage_fraction": usage, "final_val_psnr": 20.0 + np.log10(tau) + 0.1 * seed,
                     "final_val_ssim": 0.5, "final_val_perplexity": 100.0, "final_val_tokens": 81408})
    return pd.DataFrame(rows)


def test_table_means_over_seeds_and_marks_the_reference() -> None:
    table = regime.regime_table(_summary())
    assert len(table) == 2 * 3 * 2 * 2 and set(table["n_seeds"]) == {3}
    low = table[(table[TAU] == 1.0)]
    assert np.allclose(low["final_val_usage_fraction_mean"], 0.6) and np.allclose(low["final_val_usage_fraction_min"], 0.5)
    ref = table[table["reference_defaults"]]
    assert len(ref) == 2 and set(ref[TAU]) == {100.0} and set(ref[SCHEDULE]) == {"constant"} and set(ref[GAMMA]) == {1.0}


def test_failed_runs_are_left_out_of_the_table() -> None:
    summary = _summary()
    summary.loc[0, "status"] = "failed"
    table = regime.regime_table(summary)
    assert table["n_seeds"].min() == 2


def test_regime_figure_keeps_coincident_series_apart() -> None:
    fig = regime.regime_figure(_summary(), strict=True)
    ax = fig.axes[0]  # usage at 2^10: all four series at 100 % for tau 10 and 100
    lines = [line for line in ax.get_lines() if len(line.get_xdata()) == 3]
    assert len(lines) == 4
    styles = {(line.get_linestyle(), line.get_marker(), line.get_color()) for line in lines}
    assert len(styles) == 4, "each series needs its own line style, marker and colour"
    xs_at_10 = [float(np.asarray(line.get_xdata())[1]) for line in lines]
    assert len(set(np.round(xs_at_10, 6))) == 4, "series at the same temperature must be offset"
    assert all(7 < x < 14 for x in xs_at_10)
    assert "held fixed" in fig._suptitle.get_text() and "resolution=32" in fig._suptitle.get_text()
    # every seed is a marker: 3 temperatures x 3 seeds per series and panel
    assert sum(len(c.get_offsets()) for c in ax.collections) == 4 * 3 * 3


def test_regime_figure_draws_the_targets() -> None:
    fig = regime.regime_figure(_summary(), strict=True)
    targets = {round(float(line.get_ydata()[0]), 3) for ax in fig.axes for line in ax.get_lines()
               if line.get_color() == "0.4"}  # the target lines' grey
    assert {95.0, 80.0} <= targets


def _curves() -> pd.DataFrame:
    rows = []
    for tau, seed in itertools.product((1.0, 10.0, 100.0), (0, 1, 2)):
        for step in range(50, 901, 50):
            rows.append({"run_id": f"{tau}-{seed}", SIZE: 16384, TAU: tau, SCHEDULE: "constant", GAMMA: 1.0,
                         "seed": seed, "step": step, "usage_fraction": min(1.0, step / 900 + 0.01 * seed),
                         "saturated_fraction": 0.97 if tau == 100 else 0.0})
    return pd.DataFrame(rows)


def test_collapse_figure_draws_each_seed_thin_and_the_median_bold() -> None:
    fig = regime.collapse_figure(_curves(), strict=True)
    ax = fig.axes[0]
    thin = [line for line in ax.get_lines() if line.get_linewidth() < 1]
    bold = [line for line in ax.get_lines() if line.get_linewidth() > 2]
    assert len(thin) == 9 and len(bold) == 3
    assert len({(line.get_linestyle(), line.get_marker()) for line in bold}) == 3
    median_10 = [line for line in bold if "inverse temperature 10 " in str(line.get_label())][0]
    assert np.allclose(median_10.get_ydata(), np.minimum(1.0, np.arange(50, 901, 50) / 900 + 0.01))


def test_collapse_figure_names_what_is_missing() -> None:
    with pytest.raises(ValueError, match="no curves with entropy schedule 'cosine'"):
        regime.collapse_figure(_curves(), schedule="cosine", strict=True)


def test_curves_from_metrics_keep_diagnostic_steps_only_and_refuse_ambiguous_layers() -> None:
    runs = pd.DataFrame([{"run_id": "a", "sweep": "s", SIZE: 1024, TAU: 10.0, SCHEDULE: "constant", GAMMA: 1.0,
                          "seed": 0}])
    metrics = pd.DataFrame([
        {"run_id": "a", "kind": "quantizer", "layer": "q", "mode": "train", "step": s,
         "usage_fraction": 0.5, "saturated_fraction": 0.2 if s % 50 == 0 else np.nan} for s in range(1, 101)]
        + [{"run_id": "a", "kind": "train", "layer": None, "mode": None, "step": 50, "usage_fraction": np.nan,
            "saturated_fraction": np.nan}])
    curves = regime.regime_curves(metrics, runs)
    assert curves["step"].tolist() == [50, 100] and (curves[TAU] == 10.0).all()
    two = pd.concat([metrics, metrics.assign(layer="other")])
    with pytest.raises(ValueError, match="2 quantizer layers"):
        regime.regime_curves(two, runs)
    assert len(regime.regime_curves(two, runs, layer="other")) == 2


def test_cli_writes_tables_curves_figures_and_command(tmp_path: Path) -> None:
    sweep = write_regime_sweep(tmp_path / "runs")
    out = tmp_path / "recipe"
    assert recipe([str(sweep), "--out", str(out)]) == 0
    summary = pd.read_csv(out / "summary.csv")
    assert sorted(summary["run_id"]) == ["t100s0", "t100s1", "t10s0", "t10s1"]
    table = pd.read_csv(out / "table.csv")
    assert table.set_index(TAU)["final_val_usage_fraction_mean"].to_dict() == {10.0: 0.9, 100.0: 0.7}
    curves = pd.read_csv(out / "curves.csv")
    assert sorted(set(curves["step"])) == [0, 2, 4] and len(curves) == 4 * 3
    assert {"regime.png", "collapse.png", "regime.svg", "collapse.svg"} <= {p.name for p in out.iterdir()}
    command = (out / "command.txt").read_text().splitlines()
    assert command[-1].startswith("python -m analysis.report ") and str(sweep) in command[-1]
    assert command[0] == "# the runs (recipe_regime/_sweep/jobs.jsonl):" and "recorded no command" in command[1]
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "temporary files left behind"


def test_cli_refuses_a_missing_folder_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert recipe([str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "does not exist" in err


def test_read_regime_gives_the_same_tables_from_csvs_and_from_run_folders(tmp_path: Path) -> None:
    sweep = write_regime_sweep(tmp_path / "runs")
    assert recipe([str(sweep), "--out", str(tmp_path / "recipe")]) == 0
    from_csv, curves_csv = regime.read_regime(tmp_path / "recipe")
    from_runs, curves_runs = regime.read_regime(sweep)
    assert sorted(from_csv["run_id"]) == sorted(from_runs["run_id"])
    pd.testing.assert_frame_equal(regime.regime_table(from_csv), regime.regime_table(from_runs), check_dtype=False)
    assert len(curves_csv) == len(curves_runs) == 12


def test_cli_compares_quantizers_when_given_their_sweeps(tmp_path: Path) -> None:
    regime_sweep = write_regime_sweep(tmp_path / "runs")
    other = _fsq_sweep(tmp_path / "runs")
    out = tmp_path / "recipe"
    assert recipe([str(regime_sweep), str(other), "--out", str(out)]) == 0
    assert sorted(pd.read_csv(out / "summary.csv")["run_id"]) == ["t100s0", "t100s1", "t10s0", "t10s1"]
    compared = pd.read_csv(out / "quantizers_table.csv")
    assert set(compared["series"]) == {"LFQ inv. temp. 100 (reference)", "LFQ inv. temp. 10", "FSQ"}
    assert (out / "quantizers.png").is_file()
    assert "# the runs (quantizers_images/_sweep/jobs.jsonl):" in (out / "command.txt").read_text()


def _fsq_sweep(root: Path) -> Path:
    other = root / "quantizers_images"
    for seed in (0, 1):
        run_dir = write_run(other, f"fsq{seed}", seed=seed, steps=6)
        config = json.loads((run_dir / "config.json").read_text())
        config["quantizer"].update(kind="fsq", inv_temperature=10.0)
        (run_dir / "config.json").write_text(json.dumps(config))
        summary = json.loads((run_dir / "summary.json").read_text())
        summary.update(final_val_usage_fraction=0.5, final_val_tokens=4096)
        (run_dir / "summary.json").write_text(json.dumps(summary))
    return other


def _split(sweep: Path, into: Path, run_ids: list[str]) -> Path:
    """A copy of ``sweep`` holding only ``run_ids`` (as if the others' folders were gone)."""
    import shutil

    target = into / sweep.name
    for run_id in run_ids:
        shutil.copytree(sweep / run_id, target / run_id)
    return target


def test_merge_folds_new_runs_into_committed_results_as_if_all_were_there(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    sweep = write_regime_sweep(tmp_path / "runs")
    other = _fsq_sweep(tmp_path / "runs")
    full = tmp_path / "full"
    assert recipe([str(sweep), str(other), "--out", str(full)]) == 0
    first = _split(sweep, tmp_path / "first", ["t10s0", "t10s1", "t100s0"])
    later = _split(sweep, tmp_path / "later", ["t100s1", "t10s0"])  # t10s0: a re-run of a committed run
    out = tmp_path / "recipe"
    assert recipe([str(first), str(other), "--out", str(out)]) == 0
    assert recipe([str(later), "--out", str(out), "--merge"]) == 0
    err = capsys.readouterr().err
    assert "1 finished run(s) are both committed and in the run folders read; 1 match" in err
    assert "4 committed run(s) kept, 2 from RUNS" in err
    for name in ("summary.csv", "table.csv", "curves.csv", "quantizers_summary.csv", "quantizers_table.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(out / name), pd.read_csv(full / name), check_dtype=False,
                                      obj=name)
    command = (out / "command.txt").read_text().splitlines()
    assert command.count("# the runs (recipe_regime/_sweep/jobs.jsonl):") == 1  # one block per sweep
    marker = command.index("# these tables and figures:")
    assert [line.split(" --out")[0] for line in command[marker + 1:]] == [
        f"python -m analysis.report {first} {other}", f"python -m analysis.report {later}"]


def test_writing_over_committed_runs_refuses_unless_told_to_merge_or_replace(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sweep = write_regime_sweep(tmp_path / "runs")
    out = tmp_path / "recipe"
    assert recipe([str(sweep), "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    later = _split(sweep, tmp_path / "later", ["t100s1"])
    assert recipe([str(later), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "holds 3 run(s) that are not under RUNS" in err and "--merge" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before, "a refusal wrote something"
    assert recipe([str(later), "--out", str(out), "--replace"]) == 0
    assert pd.read_csv(out / "summary.csv")["run_id"].tolist() == ["t100s1"]
    assert set(pd.read_csv(out / "curves.csv")["run_id"]) == {"t100s1"}


def test_merge_keeps_a_finished_committed_run_over_an_unfinished_rerun_and_names_a_changed_one(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sweep = write_regime_sweep(tmp_path / "runs")
    out = tmp_path / "recipe"
    assert recipe([str(sweep), "--out", str(out)]) == 0
    committed = pd.read_csv(out / "curves.csv")
    later = _split(sweep, tmp_path / "later", ["t100s1", "t10s1"])
    for name in ("DONE", "summary.json"):
        (later / "t100s1" / name).unlink()  # restarted, not finished yet
    summary = json.loads((later / "t10s1" / "summary.json").read_text())
    summary["final_val_usage_fraction"] = 0.8  # a re-run that came out differently
    (later / "t10s1" / "summary.json").write_text(json.dumps(summary))
    assert recipe([str(later), "--out", str(out), "--merge"]) == 0
    err = capsys.readouterr().err
    assert "t100s1: kept the finished row" in err
    assert ("t10s1: re-run did not reproduce the committed numbers (final_val_usage_fraction 0.9 -> 0.8; "
            "the committed run recorded no environment)") in err
    merged = pd.read_csv(out / "summary.csv").set_index("run_id")
    assert merged.at["t100s1", "status"] == "done" and merged.at["t10s1", "final_val_usage_fraction"] == 0.8
    pd.testing.assert_frame_equal(pd.read_csv(out / "curves.csv"), committed)  # every run's curves still there


def test_collapse_legend_counts_the_runs_of_each_size_where_they_differ() -> None:
    curves = _curves()
    small = curves[curves["seed"] < 2].assign(**{SIZE: 1024}, run_id=lambda f: "small-" + f["run_id"])
    fig = regime.collapse_figure(pd.concat([curves, small]), strict=True)
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "inverse temperature 10 (median of 2 at 2^10, 3 at 2^14)" in labels
    single = [t.get_text() for t in regime.collapse_figure(curves, strict=True).legends[0].get_texts()]
    assert "inverse temperature 10 (median of 3)" in single
