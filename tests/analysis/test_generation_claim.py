"""Issue 33's claim (analysis.generation_claim and ``--study generation``): token priors joined to their
tokenizers by run id, series, the table, the figures, and the command line, on run folders the tests write."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis import column_names as cn
from analysis import generation_claim as g
from analysis.load import load_runs
from analysis.report import main

# pytest.approx's / np.allclose's default tolerances (1e-6 / 1e-5 relative) below: float64 means and standard
# deviations of a few literal values, ~4e9 float64 eps from any rounding (tests/tolerances.py).

TOKENIZERS = {  # sweep: (kind, inverse temperature, gamma, vq init, dead-code threshold, sizes)
    "generation_lfq_images": ("lfq", 10.0, 1.0, "uniform", 0.0, (1024, 16384)),
    "generation_vq_images": ("vq", 100.0, 1.0, "random_sample", 0.5, (1024, 16384)),
    "generation_regime_images": ("lfq", 1.0, 1.0, "uniform", 0.0, (16384,)),
}


def _write(folder: Path, config: dict, summary: dict, done: bool = True) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({**config, "run_id": folder.name}))
    if done:
        (folder / "summary.json").write_text(json.dumps({**summary, "run_id": folder.name, "status": "done",
                                                         "reason": ""}))
        (folder / "DONE").write_text("")
    return folder


def _tokenizer(sweep: Path, run_id: str, kind: str, tau: float, gamma: float, init: str, dead: float, size: int,
               seed: int) -> Path:
    usage = {("lfq", 10.0): 0.8, ("lfq", 1.0): 0.5, ("vq", 100.0): 0.3}[(kind, tau)] + 0.01 * seed
    config = {"name": sweep.name, "task": "images", "seed": seed, "schedule": {"steps": 900},
              "quantizer": {"kind": kind, "codebook_size": size, "inv_temperature": tau, "diversity_gamma": gamma,
                            "entropy_loss_weight": 0.1, "frac_per_sample_entropy": 1.0, "vq_init": init,
                            "vq_dead_code_threshold": dead, "num_codebooks": 1},
              "anneal": {"entropy": "constant"}}
    summary = {"final_val_usage_fraction": usage, "final_val_psnr": 20.0 + 10 * usage + np.log2(size) / 10,
               "final_val_ssim": 0.5, "final_val_perplexity": usage * size, "final_val_codes_used": usage * size,
               "final_val_tokens": 81408, "wall_time_s": 500.0}
    return _write(sweep / run_id, config, summary)


def _prior(sweep: Path, run_id: str, tokenizer: str, bits_per_token: float, done: bool = True) -> Path:
    config = {"name": sweep.name, "task": "prior", "seed": 0, "schedule": {"steps": 400},
              "data": {"tokenizer_run": tokenizer}, "model": {"head": "factorized"},
              "quantizer": {"kind": "lfq", "codebook_size": 256}}  # the prior's own (unused) quantizer defaults
    summary = {"final_val_bits_per_token": bits_per_token, "final_val_bits_per_image": 64 * bits_per_token,
               "final_sample_codes_used": 100, "final_sample_usage_fraction": 0.05 + bits_per_token / 1000,
               "final_sample_kl": 0.2, "final_val_psnr": None, "wall_time_s": 60.0}
    return _write(sweep / run_id, config, summary, done)


def _runs(root: Path) -> dict[str, Path]:
    """Tokenizer sweeps and two prior sweeps (one prior per tokenizer), the priors naming their tokenizers
    by absolute folder (as a prior's config.json holds it) and one by the path relative to the results root."""
    folders = {}
    priors = root / "prior_generation_images"
    regime_priors = root / "prior_regime_images"
    for sweep, (kind, tau, gamma, init, dead, sizes) in TOKENIZERS.items():
        for size, seed in itertools.product(sizes, (0, 1, 2)):
            run_id = f"{sweep.split('_')[1]}{size}s{seed}"
            tok = _tokenizer(root / sweep, run_id, kind, tau, gamma, init, dead, size, seed)
            named = f"{sweep}/{run_id}" if seed == 2 else str(tok)
            into = regime_priors if "regime" in sweep else priors
            _prior(into, f"p{run_id}", named, np.log2(size) * (0.9 if kind == "lfq" else 0.8) + 0.1 * seed)
        folders[sweep] = root / sweep
    return {**folders, "prior_generation_images": priors, "prior_regime_images": regime_priors}


@pytest.fixture
def runs(tmp_path: Path) -> dict[str, Path]:
    return _runs(tmp_path / "runs")


def _loaded(folders: dict[str, Path]) -> pd.DataFrame:
    return pd.concat([load_runs(f, warn=False) for f in folders.values()], ignore_index=True)


def test_priors_join_their_tokenizers_by_run_id_and_keep_the_tokenizers_settings(runs: dict[str, Path]) -> None:
    summary = g.generation_summary(_loaded(runs))
    assert len(summary) == 15 and summary["run_id"].is_unique
    assert (summary["run_id"] == "p" + summary["tokenizer_run_id"]).all()  # each prior on the tokenizer it names
    row = summary.set_index("run_id").loc["pvq16384s1"]
    assert row["tokenizer_sweep"] == "generation_vq_images" and row["sweep"] == "prior_generation_images"
    assert row[cn.KIND] == "vq" and row[cn.SIZE] == 16384  # the tokenizer's quantizer, not the prior's defaults
    assert row["final_val_usage_fraction"] == pytest.approx(0.31) and row["tokenizer_seed"] == 1
    assert row["final_val_bits_per_image"] == pytest.approx(64 * (14 * 0.8 + 0.1))
    assert row["tokens_per_image"] == 64 and row["unigram_bits_per_image"] == pytest.approx(64 * np.log2(0.31 * 16384))
    assert row["sample_usage_ceiling"] == pytest.approx(1 - np.exp(-256 * 64 / 16384))
    # the relative path (seed 2) joins as the absolute one does
    assert set(summary.loc[summary["tokenizer_seed"] == 2, "run_id"]) == {"plfq1024s2", "plfq16384s2", "pvq1024s2",
                                                                           "pvq16384s2", "pregime16384s2"}
    assert list(dict.fromkeys(summary["series"])) == ["LFQ recipe", "VQ fair", "LFQ inv. temp. 1"]


def test_series_say_what_sets_a_tokenizer_apart() -> None:
    base = {cn.KIND: "lfq", cn.TAU: 10.0, cn.GAMMA: 1.0, cn.WEIGHT: 0.1, cn.FRAC: 1.0, cn.SCHEDULE: "constant"}
    names = [g.series_of(pd.Series({**base, **change})) for change in (
        {}, {cn.TAU: 1.0}, {cn.GAMMA: 2.0}, {cn.TAU: 100.0, cn.GAMMA: 2.0}, {cn.WEIGHT: 0.0},
        {cn.KIND: "vq", cn.VQ_INIT: "random_sample", cn.VQ_DEAD: 0.125}, {cn.KIND: "vq", cn.VQ_INIT: "kmeans", cn.VQ_DEAD: 0.5},
        {cn.KIND: "vq"}, {cn.KIND: "vq", cn.VQ_DEAD: 0.5}, {cn.KIND: "fsq"})]
    assert names == ["LFQ recipe", "LFQ inv. temp. 1", "LFQ gamma 2", "LFQ inv. temp. 100, gamma 2",
                     "LFQ entropy weight 0", "VQ fair", "VQ fair (kmeans init)", "VQ plain", "VQ plain + dead-code 0.5",
                     "FSQ"]
    assert g.series_order(pd.Series(["LFQ gamma 2", "VQ fair", "FSQ", "LFQ recipe", "LFQ inv. temp. 1"])) == [
        "LFQ recipe", "VQ fair", "LFQ gamma 2", "LFQ inv. temp. 1", "FSQ"]


def test_table_is_the_mean_std_and_n_over_seeds_of_each_series_and_size(runs: dict[str, Path]) -> None:
    summary = g.generation_summary(_loaded(runs))
    summary.loc[summary["run_id"] == "plfq1024s0", "status"] = "failed"  # left out of the table
    table = g.generation_table(summary).set_index(["series", cn.SIZE])
    done = summary[summary["status"] == "done"]
    direct = done.groupby(["series", cn.SIZE])
    for metric in ("final_val_psnr", "final_val_bits_per_image", "final_sample_usage_fraction"):
        for stat in ("mean", "std"):
            expected = getattr(direct[metric], stat)()
            assert np.allclose(table[f"{metric}_{stat}"].loc[expected.index], expected)
    assert table["n_seeds"].to_dict() == direct.size().to_dict()
    assert table.loc[("LFQ recipe", 1024), "n_seeds"] == 2 and table.loc[("VQ fair", 16384), "n_seeds"] == 3
    assert list(dict.fromkeys(table.index.get_level_values("series"))) == ["LFQ recipe", "VQ fair", "LFQ inv. temp. 1"]


def test_utilization_table_ranks_usage_against_bits_and_psnr(runs: dict[str, Path]) -> None:
    summary = g.generation_summary(_loaded(runs))
    stats = g.utilization_table(summary).set_index("scope")
    at = summary[summary[cn.SIZE] == 16384]
    assert stats.loc["all series", "n_priors"] == 9 and stats.loc["LFQ", "n_priors"] == 6
    for scope, part in (("all series", at), ("LFQ", at[at[cn.KIND] == "lfq"])):
        expected = part["final_val_usage_fraction"].rank().corr(part["final_val_bits_per_image"].rank())
        assert stats.loc[scope, "spearman_usage_bits_per_image"] == pytest.approx(expected)
    assert stats.loc["all series", "spearman_usage_psnr"] == pytest.approx(1.0)  # PSNR rises with usage here
    assert np.isnan(g.spearman(pd.Series([1.0, 2.0]), pd.Series([2.0, 1.0])))  # under 3 points: no number


def test_figures_draw_every_series_and_every_prior(runs: dict[str, Path]) -> None:
    summary = g.generation_summary(_loaded(runs))
    fig = g.generation_figure(summary, strict=True)
    labels = {line.get_label() for ax in fig.axes[:4] for line in ax.get_lines()}
    # Fig. 1 draws the series at two sizes or more: LFQ's recipe and VQ's, not the regime's one size
    assert {"LFQ recipe (n=3)", "VQ fair (n=3)"} <= labels and not any("inv. temp. 1" in s for s in labels)
    assert sum(len(c.get_offsets()) for c in fig.axes[2].collections) == 12  # every seed of both series
    util = g.utilization_figure(summary, strict=True)
    ax = util.axes[0]
    assert sum(len(c.get_offsets()) for c in ax.collections) == 9
    assert {c.get_label() for c in ax.collections} == {"LFQ recipe (n=3)", "VQ fair (n=3)", "LFQ inv. temp. 1 (n=3)"}
    assert "rho(usage, bits per image)" in util._suptitle.get_text()


def test_a_figure_without_its_data_says_so(runs: dict[str, Path]) -> None:
    summary = g.generation_summary(_loaded(runs))
    with pytest.raises(ValueError, match="no finished prior on a tokenizer of 16384 codes"):
        g.utilization_figure(summary[summary[cn.SIZE] == 1024], strict=True)
    with pytest.raises(ValueError, match="two codebook sizes"):
        g.generation_figure(summary[summary[cn.SIZE] == 16384], strict=True)


def generation(argv: list[str]) -> int:
    return main([*argv, "--study", "generation"])


def test_cli_writes_the_csvs_figures_and_command_and_redraws_the_same_bytes(runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "generation"
    assert generation([*map(str, runs.values()), "--out", str(out)]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"summary.csv", "table.csv", "utilization.csv", "command.txt", "generation.png", "generation.svg",
            "utilization.png", "utilization.svg"} == names
    assert len(pd.read_csv(out / "summary.csv")) == 15
    command = (out / "command.txt").read_text().splitlines()
    assert "# the runs (prior_generation_images/_sweep/jobs.jsonl):" in command
    assert command[-1].startswith("python -m analysis.report ") and "--study generation" in command[-1]
    before = {n: (out / n).read_bytes() for n in names}
    for name in ("generation.png", "generation.svg", "utilization.png", "utilization.svg"):
        (out / name).unlink()
    assert main(["--redraw", "--out", str(out)]) == 0  # the study is told by its files
    assert {n: (out / n).read_bytes() for n in names} == before


def test_a_prior_whose_tokenizer_is_not_given_is_named_in_one_line(runs: dict[str, Path], tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    given = [runs["generation_lfq_images"], runs["generation_vq_images"], runs["prior_generation_images"],
             runs["prior_regime_images"]]
    assert generation([*map(str, given), "--out", str(tmp_path / "out")]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if "left out" in line]
    assert len(err) == 1 and err[0].startswith("3 prior(s) left out") and "pregime16384s0 (tokenizer regime16384s0)" in err[0]
    assert "pregime16384s0" not in set(pd.read_csv(tmp_path / "out" / "summary.csv")["run_id"])
    # and the other way round: a tokenizer given without its prior
    given = [runs[s] for s in ("generation_lfq_images", "generation_vq_images", "generation_regime_images",
                               "prior_generation_images")]
    assert generation([*map(str, given), "--out", str(tmp_path / "out2")]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if "have no prior" in line]
    assert len(err) == 1 and err[0].startswith("3 tokenizer(s)") and "regime16384s0" in err[0]


@pytest.mark.parametrize("which, message", [
    (["generation_lfq_images"], "no token prior"),
    (["prior_generation_images"], "no tokenizer run"),
    (["prior_regime_images", "generation_lfq_images"], "no prior's tokenizer"),
])
def test_bad_input_is_one_line_and_exit_2(runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          which: list[str], message: str) -> None:
    assert generation([*(str(runs[w]) for w in which), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_missing_folder_and_redraw_without_csvs_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert generation([str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert generation(["--redraw", "--out", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no summary.csv" in err


def test_merge_keeps_committed_priors_and_refuses_to_drop_them_otherwise(runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "generation"
    assert generation([*map(str, runs.values()), "--out", str(out)]) == 0
    whole = pd.read_csv(out / "summary.csv")
    some = [runs["generation_lfq_images"], runs["prior_generation_images"], runs["generation_vq_images"]]
    assert generation([*map(str, some), "--out", str(out)]) == 2  # would drop the regime priors
    assert generation([*map(str, some), "--out", str(out), "--merge"]) == 0
    merged = pd.read_csv(out / "summary.csv")
    assert list(merged["run_id"]) == list(whole["run_id"])  # the claim's order, every prior kept
    assert len(pd.read_csv(out / "table.csv")) == 5
