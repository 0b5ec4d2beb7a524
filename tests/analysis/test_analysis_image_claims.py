"""Claims 2 and 3 on the images task (analysis.image_claims): which runs, series, tables, figures."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from analysis_fixtures import write_regime_sweep, write_run

from analysis import column_names as cn
from analysis import image_claims as ic
from analysis import regime
from analysis.report import main


def recipe(argv: list[str]) -> int:
    """``python -m analysis.report ARGV --study recipe``."""
    return main([*argv, "--study", "recipe"])


# pytest.approx's / np.allclose's default tolerances (1e-6 / 1e-5 relative) below: float64 means, ratios and
# standard deviations of a few literal values, ~4e9 float64 eps from any rounding (tests/tolerances.py).


def _runs() -> pd.DataFrame:
    rows = []
    for weight, tau, gamma, frac, seed in itertools.product((0.0, 0.1, 0.3), (10.0, 100.0), (1.0, 2.0), (0.25, 1.0),
                                                             (0, 1, 2)):
        rows.append({"run_id": f"w{weight}t{tau}g{gamma}f{frac}s{seed}", "sweep": "s", "status": "done",
                     cn.KIND: "lfq", cn.SIZE: 16384, cn.TAU: tau, cn.SCHEDULE: "constant", cn.GAMMA: gamma,
                     cn.FRAC: frac, cn.WEIGHT: weight, "seed": seed,
                     "final_val_usage_fraction": 0.5 + weight + (0.1 if tau == 10 else 0.0),
                     "final_val_psnr": 20.0 - 10 * weight + seed, "final_val_ssim": 0.5,
                     "final_val_perplexity": 100.0, "final_val_tokens": 81408})
    rows.append({**rows[0], "run_id": "annealed", cn.SCHEDULE: "linear"})  # a regime run outside both claims
    rows.append({**rows[0], "run_id": "small", cn.SIZE: 1024})
    rows.append({**rows[0], "run_id": "tau1", cn.TAU: 1.0})
    rows.append({**rows[1], "sweep": "other"})  # one run listed by two sweeps
    return pd.DataFrame(rows)


def test_each_claim_picks_its_runs_by_their_settings_once_each() -> None:
    runs = _runs()
    weight = ic.claim_summary(runs, "entropy_weight")
    assert weight["run_id"].is_unique and len(weight) == 3 * 2 * 3  # gamma 1, frac 1 only
    assert set(weight["series"]) == {"inv. temp. 10 (recipe)", "inv. temp. 100 (reference)"}
    gamma = ic.claim_summary(runs, "gamma_frac")
    assert gamma["run_id"].is_unique and len(gamma) == 2 * 2 * 2 * 3  # weight 0.1 only
    assert set(gamma["series"]) == {"inv. temp. 10 (recipe), frac 0.25", "inv. temp. 10 (recipe), frac 1",
                                    "inv. temp. 100 (reference), frac 0.25", "inv. temp. 100 (reference), frac 1"}
    assert not {"annealed", "small", "tau1"} & (set(weight["run_id"]) | set(gamma["run_id"]))


def test_missing_settings_read_as_the_config_defaults() -> None:
    runs = _runs().drop(columns=[cn.FRAC, cn.SCHEDULE])  # runs from before those keys were recorded
    summary = ic.claim_summary(runs, "entropy_weight")
    # the frac 0.25 runs now read as frac 1, the annealed run as constant; the duplicate id counts once
    assert len(summary) == 3 * 2 * 3 * 2 + 1
    assert (summary[cn.FRAC] == 1.0).all()


def test_table_is_over_seeds_of_finished_runs() -> None:
    runs = _runs()
    runs.loc[runs["run_id"] == "w0.3t10.0g1.0f1.0s2", "status"] = "failed"
    table = ic.claim_table(ic.claim_summary(runs, "entropy_weight"), "entropy_weight").set_index(["series", cn.WEIGHT])
    assert table.loc[("inv. temp. 10 (recipe)", 0.3), "n_seeds"] == 2
    assert table.loc[("inv. temp. 10 (recipe)", 0.3), "final_val_psnr_mean"] == pytest.approx(17.5)
    assert table.loc[("inv. temp. 100 (reference)", 0.0), "final_val_usage_fraction_mean"] == pytest.approx(0.5)


def test_claim_with_no_runs_says_which_settings_it_needs() -> None:
    with pytest.raises(ValueError, match="no runs with the settings of claim 'gamma_frac'.*codebook_size in"):
        ic.claim_summary(_runs().assign(**{cn.SIZE: 1024}), "gamma_frac")


def test_figure_draws_every_series_in_its_own_style_and_every_seed() -> None:
    summary = ic.claim_summary(_runs(), "gamma_frac")
    fig = ic.claim_figure(summary, "gamma_frac", held_fixed="resolution=32", strict=True)
    ax = fig.axes[0]
    lines = ax.get_lines()
    assert len(lines) == 4
    assert len({(line.get_linestyle(), line.get_marker(), line.get_color()) for line in lines}) == 4
    # two series have equal usage at every gamma: dodged, so no two lines share their x positions
    assert len({tuple(np.round(line.get_xdata(), 3)) for line in lines}) == 4
    assert sum(len(c.get_offsets()) for c in ax.collections) == len(summary)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2"]
    title = fig._suptitle.get_text()
    assert "held fixed: resolution=32" in title and "81,408" in title and "2^14 codes" in title


def test_figure_without_finished_runs_says_so() -> None:
    summary = ic.claim_summary(_runs(), "entropy_weight").assign(status="failed")
    with pytest.raises(ValueError, match="no finished runs of claim 'entropy_weight'"):
        ic.claim_figure(summary, "entropy_weight", strict=True)


def _write_lfq_run(sweep: Path, run_id: str, seed: int, usage: float, **quantizer: float) -> None:
    """A run folder of an LFQ run at 2^14 codes with these quantizer settings and val usage."""
    run_dir = write_run(sweep, run_id, seed=seed, steps=6)
    config = json.loads((run_dir / "config.json").read_text())
    config["quantizer"].update(kind="lfq", codebook_size=16384, **quantizer)
    (run_dir / "config.json").write_text(json.dumps(config))
    summary = json.loads((run_dir / "summary.json").read_text())
    summary.update(final_val_usage_fraction=usage, final_val_tokens=4096)
    (run_dir / "summary.json").write_text(json.dumps(summary))


def test_regime_cli_writes_a_claim_only_where_its_setting_varies(tmp_path: Path) -> None:
    sweep = tmp_path / "runs" / "entropy_weight_images"
    for weight, seed in itertools.product((0.0, 0.3), (0, 1)):
        _write_lfq_run(sweep, f"w{weight}s{seed}", seed, 0.2 + weight, inv_temperature=10.0,
                       entropy_loss_weight=weight, diversity_gamma=1.0, frac_per_sample_entropy=1.0)
    out = tmp_path / "recipe"
    assert recipe([str(write_regime_sweep(tmp_path / "runs")), str(sweep), "--out", str(out)]) == 0
    table = pd.read_csv(out / "entropy_weight_table.csv")
    assert table.set_index(cn.WEIGHT)["final_val_usage_fraction_mean"].to_dict() == pytest.approx({0.0: 0.2, 0.3: 0.5})
    assert (out / "entropy_weight.png").is_file() and (out / "entropy_weight.svg").is_file()
    assert not (out / "gamma_frac_table.csv").exists()  # gamma never varies here


def test_comparisons_read_back_the_same_from_csvs_and_from_run_folders(tmp_path: Path) -> None:
    runs_root = tmp_path / "runs"
    regime_sweep = write_regime_sweep(runs_root)
    sweep = runs_root / "gamma_frac_images"
    for gamma, seed in itertools.product((1.0, 2.0), (0, 1)):
        _write_lfq_run(sweep, f"g{gamma}s{seed}", seed, 0.1 * gamma + 0.01 * seed, inv_temperature=100.0,
                       diversity_gamma=gamma, entropy_loss_weight=0.1, frac_per_sample_entropy=0.25)
    out = tmp_path / "recipe"
    assert recipe([str(regime_sweep), str(sweep), "--out", str(out)]) == 0
    from_csv = regime.read_comparisons(out)
    assert list(from_csv) == ["gamma_frac"]
    from_runs = regime.read_comparisons(sweep)
    columns = ["series", cn.GAMMA, "final_val_usage_fraction_mean", "final_val_usage_fraction_min", "n_seeds"]
    table = regime.comparison_table("gamma_frac", from_csv["gamma_frac"])[columns]
    pd.testing.assert_frame_equal(table, regime.comparison_table("gamma_frac", from_runs["gamma_frac"])[columns],
                                  check_dtype=False)
    assert table["final_val_usage_fraction_mean"].tolist() == pytest.approx([0.105, 0.205])
    assert regime.comparison_figure("gamma_frac", from_csv["gamma_frac"], strict=True) is not None
    with pytest.raises(ValueError, match="no comparison 'vocab'; there are quantizers, entropy_weight, gamma_frac, adversarial"):
        regime.comparison_table("vocab", from_csv["gamma_frac"])


def _with_adversarial(run_dir: Path, weight: float) -> None:
    """Mark a run as trained against a discriminator, and give its quantizer rows diagnostics."""
    config = json.loads((run_dir / "config.json").read_text())
    config["loss"] = {"adversarial_weight": weight}
    (run_dir / "config.json").write_text(json.dumps(config))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        if row["kind"] == "quantizer" and row["step"] % 2 == 0:
            row["saturated_fraction"], row["dead_bits"] = 0.4 if weight else 0.5, 0.0
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_claim_5_compares_runs_with_and_without_the_discriminator_and_keeps_them_out_of_the_others(
        tmp_path: Path) -> None:
    sweep = tmp_path / "runs" / "adversarial_images"
    for weight, seed in itertools.product((0.0, 0.1), (0, 1)):
        _write_lfq_run(sweep, f"a{weight}s{seed}", seed, 0.6 + weight, inv_temperature=10.0, entropy_loss_weight=0.1,
                       diversity_gamma=1.0, frac_per_sample_entropy=1.0)
        _with_adversarial(sweep / f"a{weight}s{seed}", weight)
    sweep2 = tmp_path / "runs" / "entropy_weight_images"
    for weight, seed in itertools.product((0.0, 0.3), (0, 1)):
        _write_lfq_run(sweep2, f"w{weight}s{seed}", seed, 0.2 + weight, inv_temperature=10.0,
                       entropy_loss_weight=weight, diversity_gamma=1.0, frac_per_sample_entropy=1.0)
    out = tmp_path / "recipe"
    assert recipe([str(write_regime_sweep(tmp_path / "runs")), str(sweep), str(sweep2), "--out", str(out)]) == 0
    table = pd.read_csv(out / "adversarial_table.csv")
    assert table.set_index(cn.ADVERSARIAL)["final_val_usage_fraction_mean"].to_dict() == pytest.approx({0.0: 0.6, 0.1: 0.7})
    assert (table["n_seeds"] == 2).all()
    # claim 2 takes the run without a discriminator at its weight 0.1, never the one with it
    weight = pd.read_csv(out / "entropy_weight_summary.csv")
    assert not weight["run_id"].str.startswith("a0.1").any() and weight["run_id"].str.startswith("a0.0").any()
    curves = pd.read_csv(out / "adversarial_curves.csv")
    assert set(curves["run_id"]) == {"a0.0s0", "a0.0s1", "a0.1s0", "a0.1s1"}
    assert curves.groupby(cn.ADVERSARIAL)["saturated_fraction"].mean().to_dict() == pytest.approx({0.0: 0.5, 0.1: 0.4})
    for stem in ("adversarial", "adversarial_curves"):
        assert (out / f"{stem}.png").is_file() and (out / f"{stem}.svg").is_file()
    # the committed CSVs alone redraw both figures byte for byte
    before = {stem: (out / f"{stem}.svg").read_bytes() for stem in ("adversarial", "adversarial_curves")}
    for stem in before:
        (out / f"{stem}.svg").unlink()
    assert main(["--redraw", "--out", str(out)]) == 0
    assert {stem: (out / f"{stem}.svg").read_bytes() for stem in before} == before
