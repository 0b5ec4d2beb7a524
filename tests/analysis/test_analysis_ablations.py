"""python -m analysis.report --study ablations on fake run folders of the four issue-8 sweeps: CSVs, claim plots, the notebook.

Final metrics are simple functions of the grid point and seed (``_usage``, ``_psnr``), so every
mean over seeds below is computed by hand from them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import matplotlib as mpl
import nbformat
import numpy as np
import pandas as pd
import pytest
from analysis_fixtures import write_run
from nbclient import NotebookClient

import analysis
from analysis import claims as cl
from analysis import column_names as cn
from analysis import studies
from analysis.figures import ABLATIONS, planned
from analysis.merge import merge_summaries
from analysis.report import main
from experiments import clamp_probe


def ablations(argv: list[str]) -> int:
    """``python -m analysis.report ARGV --study ablations``."""
    return main([*argv, "--study", "ablations"])


# pytest.approx's / np.allclose's default tolerances (1e-6 / 1e-5 relative) below: float64 means, ratios and
# standard deviations of a few literal values, ~4e9 float64 eps from any rounding (tests/tolerances.py).

REPO = Path(__file__).resolve().parents[2]
NOTEBOOK = REPO / "notebooks" / "ablations.ipynb"
SIZES = (16, 256)


def _usage(q: dict[str, Any], seed: int) -> float:
    return round(0.1 * math.log2(q["codebook_size"]) / 18 + 0.01 * seed + q["entropy_loss_weight"]
                 + 0.01 * q["diversity_gamma"] * q["frac_per_sample_entropy"], 6)


def _psnr(q: dict[str, Any], seed: int) -> float:
    return 20.0 + {"lfq": 1.0, "vq": -1.0, "fsq": 0.0}[q["kind"]] * math.log2(q["codebook_size"]) + seed


def _entropy(q: dict[str, Any], seed: int) -> float:
    ceiling = math.log(q["codebook_size"])
    return (min(ceiling, cl.CLAMP_NATS) if q["entropy_mode"] in ("reference", "clamped") else ceiling) - 0.1 * seed


def write_ablation_run(sweeps: Path, sweep: str, seed: int, status: str | None = "done", **quantizer: Any) -> Path:
    """A fake run folder (fixture ``write_run``) with the quantizer fields the ablation sweeps vary."""
    q = {"kind": "lfq", "codebook_size": 1024, "entropy_mode": "exact", "entropy_loss_weight": 0.1,
         "diversity_gamma": 1.0, "frac_per_sample_entropy": 1.0, **quantizer}
    run_id = f"{sweep}-" + "-".join(f"{v}" for v in q.values()) + f"-s{seed}"
    run_dir = write_run(sweeps / sweep, run_id, seed=seed, steps=2, status=status, histograms=False,
                        final_usage=_usage(q, seed), codebook_size=q["codebook_size"])
    config = json.loads((run_dir / "config.json").read_text())
    config["name"] = sweep
    config["quantizer"].update(q)
    (run_dir / "config.json").write_text(json.dumps(config))
    if status is not None:
        summary = json.loads((run_dir / "summary.json").read_text())
        summary.update(final_val_psnr=_psnr(q, seed), final_usage_fraction=_usage(q, seed),
                       final_batch_entropy=_entropy(q, seed))
        (run_dir / "summary.json").write_text(json.dumps(summary))
    # what slurm.submit records with each run it submits (the ablation_vocab_lfq18 runs record none,
    # as runs submitted before the command was recorded)
    record = {"run_id": run_id, "cluster": "local", "job_id": "1", "time": 0.0}
    if sweep != "ablation_vocab_lfq18":
        record["command"] = f"python -m slurm.submit experiments/sweeps/{sweep}.yaml --wait"
    with (sweeps / sweep / "_sweep" / "jobs.jsonl").open("a") if (sweeps / sweep / "_sweep").is_dir() else \
            _new_jobs_file(sweeps / sweep) as f:
        f.write(json.dumps(record) + "\n")
    return run_dir


def _new_jobs_file(sweep_folder: Path) -> Any:
    (sweep_folder / "_sweep").mkdir(parents=True)
    return (sweep_folder / "_sweep" / "jobs.jsonl").open("a")


@pytest.fixture
def sweeps(tmp_path: Path) -> Path:
    """All five ablation sweeps, small; entropy_weight is partial (a failed and a running run, a
    point with no run finished)."""
    root = tmp_path / "runs"
    for seed in (0, 1):
        for kind in ("lfq", "vq", "fsq"):
            for size in SIZES:
                write_ablation_run(root, "ablation_vocab", seed, kind=kind, codebook_size=size)
        write_ablation_run(root, "ablation_vocab_lfq18", seed, codebook_size=2**18)
        for gamma in (0.5, 2.0):
            for frac in (0.25, 1.0):
                write_ablation_run(root, "ablation_gamma_frac", seed, diversity_gamma=gamma, frac_per_sample_entropy=frac)
        for mode in ("exact", "reference"):
            for size in (2**14, 2**18):
                write_ablation_run(root, "ablation_clamp", seed, entropy_mode=mode, codebook_size=size)
        for mode in ("exact", "clamped"):
            for size in (2**17, 2**18):
                write_ablation_run(root, "clamp_train", seed, entropy_mode=mode, codebook_size=size)
            write_ablation_run(root, "clamp_train_images", seed, entropy_mode=mode, codebook_size=2**18)
    for seed in (0, 1, 2):
        write_ablation_run(root, "ablation_entropy_weight", seed, entropy_loss_weight=0.0)
        # 0.1: seed 2 failed -> n = 2 of 3 runs; 0.3: only a running run -> n = 0.
        write_ablation_run(root, "ablation_entropy_weight", seed, entropy_loss_weight=0.1,
                           status="failed" if seed == 2 else "done")
    write_ablation_run(root, "ablation_entropy_weight", 0, entropy_loss_weight=0.3, status=None)
    return root


@pytest.fixture
def written(sweeps: Path, tmp_path: Path) -> Path:
    out = tmp_path / "results" / "ablations"
    assert ablations([str(sweeps), "--out", str(out)]) == 0
    return out


def test_cli_writes_every_sweep(written: Path) -> None:
    expected = {"ablation_vocab": ["claim1_vocab"], "ablation_vocab_lfq18": [],
                "ablation_entropy_weight": ["claim2_entropy_weight"],
                "ablation_gamma_frac": ["claim3_usage_heatmap", "claim3_usage_vs_gamma"], "ablation_clamp": ["claim4_clamp"],
                "clamp_train": ["claim4_train"], "clamp_train_images": ["claim4_train_images"]}
    assert {p.name for p in written.iterdir()} == set(expected)
    for sweep, stems in expected.items():
        names = {p.name for p in (written / sweep).iterdir()}
        assert names == {"summary.csv", "grid.csv", "command.txt", *(f"{s}.{e}" for s in stems for e in ("png", "svg"))}
        command = (written / sweep / "command.txt").read_text()
        if sweep == "ablation_vocab_lfq18":
            assert "recorded no command" in command and "experiments/sweeps/ablation_vocab_lfq18.yaml" in command
        else:  # once per sweep, however many runs it submitted
            assert command.count(f"\npython -m slurm.submit experiments/sweeps/{sweep}.yaml --wait\n") == 1
        assert "python -m analysis.report" in command and "--study ablations" in command and str(written) in command


def test_summary_has_one_row_per_run_with_parameters_and_metrics(written: Path) -> None:
    summary = pd.read_csv(written / "ablation_vocab" / "summary.csv")
    assert len(summary) == 3 * len(SIZES) * 2 and set(summary["status"]) == {"done"}
    for column in ("run_id", "seed", cn.KIND, cn.SIZE, cn.MODE, "final_usage_fraction", "final_val_psnr",
                   "final_batch_entropy", "wall_time_s"):
        assert column in summary, column
    weights = pd.read_csv(written / "ablation_entropy_weight" / "summary.csv")
    assert len(weights) == 7
    assert weights["status"].value_counts().to_dict() == {"done": 5, "failed": 1, "started": 1}


def test_grid_means_and_n_by_hand(written: Path) -> None:
    grid = pd.read_csv(written / "ablation_vocab" / "grid.csv")
    row = grid[(grid[cn.KIND] == "vq") & (grid[cn.SIZE] == 256) & (grid["metric"] == "final_val_psnr")]
    assert len(row) == 1 and row["n"].item() == 2 and row["runs"].item() == 2
    assert row["mean"].item() == pytest.approx((20 - 8 + 0 + 20 - 8 + 1) / 2)
    assert row["std"].item() == pytest.approx(np.std([12, 13], ddof=1))
    assert (row["min"].item(), row["max"].item()) == (12, 13)
    # The partial sweep: 0.1 has 3 runs of which 2 finished; 0.3 has one running run and n = 0.
    grid = pd.read_csv(written / "ablation_entropy_weight" / "grid.csv")
    usage = grid[grid["metric"] == "final_usage_fraction"].set_index(cn.WEIGHT)
    assert usage.loc[0.1, ["runs", "done", "n"]].tolist() == [3, 2, 2]
    assert usage.loc[0.3, ["runs", "done", "n"]].tolist() == [1, 0, 0] and np.isnan(usage.loc[0.3, "mean"])
    q = {"codebook_size": 1024, "entropy_loss_weight": 0.1, "diversity_gamma": 1.0, "frac_per_sample_entropy": 1.0}
    assert usage.loc[0.1, "mean"] == pytest.approx((_usage(q, 0) + _usage(q, 1)) / 2)


def test_tables_from_the_csvs_alone(written: Path) -> None:
    tables = analysis.ablation_tables(written)
    assert list(tables) == ["vocab", "entropy_weight", "gamma_frac", "clamp", "clamp_train", "clamp_train_images"]
    vocab = tables["vocab"].set_index(["quantizer", "K"])
    # ablation_vocab_lfq18 joins ablation_vocab in claim 1.
    assert vocab.loc[("lfq", 2**18), "n"] == 2 and len(vocab) == 3 * len(SIZES) + 1
    assert vocab.loc[("lfq", 16), "final validation PSNR (dB)"] == f"{24.5:.4g} ± {np.std([24, 25], ddof=1):.2g}"
    weights = tables["entropy_weight"].set_index("w_ent")
    assert weights["n"].to_dict() == {0.0: 3, 0.1: 2, 0.3: 0}
    assert weights.loc[0.3, "final usage (fraction of codebook)"] == ""


def test_claim_of_a_renamed_sweep_by_what_varies(written: Path) -> None:
    summary = pd.read_csv(written / "ablation_clamp" / "summary.csv")
    assert cl.claim_of("my_clamp_study", summary) is cl.BY_NAME["clamp"]
    assert cl.claim_of("ablation_vocab_lfq18", summary.iloc[:1]) is cl.BY_NAME["vocab"]
    assert cl.claim_of("other", summary[summary[cn.MODE] == "exact"].iloc[:1]) is None


def _lines(ax: mpl.axes.Axes) -> dict[str, mpl.lines.Line2D]:
    return {line.get_label(): line for line in ax.get_lines()}


def test_claim_plots_have_the_expected_lines(written: Path) -> None:
    claims = analysis.claim_summaries(analysis.read_summaries(written))
    fig = analysis.vocab_figure(claims["vocab"])
    usage, psnr = fig.axes[:2]
    assert set(_lines(usage)) == {"lfq", "vq", "fsq"} and usage.get_xscale() == "log"
    # at the swept sizes, each kind a little aside (within 10 %) so that equal results stay visible
    assert list(_lines(psnr)["lfq"].get_xdata()) == pytest.approx([16, 256, 2**18], rel=0.1)
    assert len({tuple(line.get_xdata()[:2]) for line in _lines(psnr).values()}) == 3
    assert len({(line.get_linestyle(), line.get_marker()) for line in _lines(psnr).values()}) == 3
    assert list(_lines(psnr)["vq"].get_ydata()) == pytest.approx([20 - 4 + 0.5, 20 - 8 + 0.5])
    assert "PSNR" in psnr.get_ylabel() and "log2" in psnr.get_xlabel()

    fig = analysis.entropy_weight_figure(claims["entropy_weight"])
    line = _lines(fig.axes[0])["mean over seeds"]
    assert list(line.get_xdata()) == [0.0, 0.1]  # 0.3 has no finished run
    assert fig.axes[0].get_xscale() in ("linear", "symlog")

    fig = analysis.clamp_figure(claims["clamp"])
    entropy = _lines(fig.axes[1])
    assert {"exact", "reference", "ceiling ln K"} <= set(entropy)
    assert list(entropy["ceiling ln K"].get_ydata()) == pytest.approx([math.log(2**14), math.log(2**18)])
    assert list(entropy["reference"].get_ydata()) == pytest.approx([math.log(2**14) - 0.05, cl.CLAMP_NATS - 0.05])
    assert "nats" in fig.axes[1].get_ylabel()
    cap = next(v for k, v in entropy.items() if k.startswith("reference clamp cap"))
    assert list(cap.get_ydata()) == pytest.approx([cl.CLAMP_NATS] * 2) and "11.51" in cap.get_label()

    heatmap = analysis.usage_heatmap(claims["gamma_frac"])
    assert [t.get_text() for t in heatmap.axes[0].get_xticklabels()] == ["0.5", "2"]


def test_partial_points_are_annotated_with_n(sweeps: Path, tmp_path: Path) -> None:
    summary = analysis.summaries_from_runs(sweeps)["ablation_entropy_weight"]
    fig = analysis.entropy_weight_figure(summary)
    assert "n=2" in [t.get_text() for t in fig.axes[0].texts]


def test_missing_inputs_are_clear_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(FileNotFoundError, match="summary.csv"):
        analysis.read_summaries(tmp_path)
    (tmp_path / "empty").mkdir()
    assert ablations([str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 2
    assert "no run folders" in capsys.readouterr().err
    assert ablations([str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]) == 2


def _execute(results: Path, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    monkeypatch.setenv("LFQ_ABLATIONS_DIR", str(results))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()  # raises on an error cell
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    return outputs


@pytest.mark.slow
def test_notebook_rebuilds_tables_and_plots_from_csvs(written: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    probe = pd.DataFrame(clamp_probe.run_grid([6, 8], [100.0, 1.0], [64, 256], log=lambda _: None))
    (written / "clamp_probe").mkdir()
    probe.to_csv(written / "clamp_probe" / "probe.csv", index=False)
    outputs = _execute(written, monkeypatch)
    figures = [o for o in outputs if "image/png" in o.get("data", {})]
    tables = [o for o in outputs if "text/html" in o.get("data", {})]
    # claims 1, 2, 4 (its three sweeps) and the clamp probe: one figure each; claim 3: two
    assert len(figures) == 8 and len(tables) == 7
    assert not [o for o in outputs if o.output_type == "stream" and ("skipped" in o["text"] or "no " in o["text"])]


@pytest.mark.slow
def test_notebook_on_the_committed_results(monkeypatch: pytest.MonkeyPatch) -> None:
    committed = sorted((REPO / "results" / "ablations").glob("*/summary.csv"))
    assert committed, "results/ablations/*/summary.csv are committed: python -m analysis.report RUNS --study ablations"
    assert (REPO / "results" / "ablations" / "clamp_probe" / "probe.csv").is_file()
    outputs = _execute(REPO / "results" / "ablations", monkeypatch)
    present = cl.claim_summaries(cl.read_summaries(REPO / "results" / "ablations"))
    probe = cl.load_clamp_probe(REPO / "results" / "ablations")
    drawn = len(planned(ABLATIONS, {**present, "probe": probe}))  # the registry's entries with data, the probe's too
    assert len([o for o in outputs if "image/png" in o.get("data", {})]) == drawn >= 6  # every claim there


def test_committed_notebook_reads_the_committed_csvs_by_default() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and "LFQ_ABLATIONS_DIR" in params[0].source and "../results/ablations" in params[0].source


def test_a_sweep_with_no_finished_run_yet(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root, out = tmp_path / "runs", tmp_path / "out"
    write_ablation_run(root, "ablation_vocab", 0, status=None, kind="vq", codebook_size=16)
    write_ablation_run(root, "ablation_clamp", 0, status="failed", codebook_size=2**14)
    # A figure from an earlier, fuller run of the CLI would now misrepresent the data.
    (out / "ablation_vocab").mkdir(parents=True)
    (out / "ablation_vocab" / "claim1_vocab.png").write_bytes(b"old")
    assert ablations([str(root), "--out", str(out)]) == 0
    assert "claim1_vocab: not drawn: no finished run" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "ablation_vocab").iterdir()) == ["command.txt", "grid.csv", "summary.csv"]
    grid = pd.read_csv(out / "ablation_vocab" / "grid.csv")
    assert len(grid) and grid[["runs", "done", "n"]].drop_duplicates().values.tolist() == [[1, 0, 0]]
    assert pd.read_csv(out / "ablation_clamp" / "grid.csv")["n"].eq(0).all()
    assert analysis.ablation_tables(out)["vocab"]["n"].tolist() == [0]


def _clamp_runs(root: Path, seeds: tuple[int, ...], **overrides: Any) -> None:
    for seed in seeds:
        write_ablation_run(root, "ablation_clamp", seed, codebook_size=2**14, **overrides)


def _csv_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_rerunning_part_of_a_sweep_refuses_to_drop_committed_runs(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    _clamp_runs(tmp_path / "first", (0, 1, 2))
    assert ablations([str(tmp_path / "first"), "--out", str(out)]) == 0
    before = _csv_bytes(out)
    _clamp_runs(tmp_path / "rerun", (2,))  # the raw runs of seeds 0 and 1 are gone
    assert ablations([str(tmp_path / "rerun"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "2 run(s) that are not under the runs root" in err and "--merge" in err and "--replace" in err
    assert _csv_bytes(out) == before  # nothing written, figures included
    assert ablations([str(tmp_path / "rerun"), "--out", str(out), "--replace"]) == 0
    assert pd.read_csv(out / "ablation_clamp" / "summary.csv")["seed"].tolist() == [2]


def test_merge_folds_new_runs_into_committed_summary_by_run_id(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    _clamp_runs(tmp_path / "first", (0,))
    _clamp_runs(tmp_path / "first", (1,), entropy_mode="reference")
    write_ablation_run(tmp_path / "first", "ablation_clamp", 2, status=None, codebook_size=2**14)  # running
    assert ablations([str(tmp_path / "first"), "--out", str(out)]) == 0
    # Later, elsewhere: seed 2 finished, seed 3 is new, seed 0 was restarted (--force) and is running.
    _clamp_runs(tmp_path / "later", (2, 3))
    write_ablation_run(tmp_path / "later", "ablation_clamp", 0, status=None, codebook_size=2**14)
    assert ablations([str(tmp_path / "later"), "--out", str(out), "--merge"]) == 0
    assert "kept the finished row; its run folder is now started" in capsys.readouterr().err
    merged = pd.read_csv(out / "ablation_clamp" / "summary.csv")

    # The same as a summary of every run in its final state, written in one go.
    _clamp_runs(tmp_path / "all", (0, 2, 3))
    _clamp_runs(tmp_path / "all", (1,), entropy_mode="reference")
    assert ablations([str(tmp_path / "all"), "--out", str(tmp_path / "direct")]) == 0
    direct = pd.read_csv(tmp_path / "direct" / "ablation_clamp" / "summary.csv")
    # Values, not dtypes: both merged tables held an unfinished row, so the CSVs only saw floats.
    pd.testing.assert_frame_equal(merged, direct, check_dtype=False)
    assert merged["status"].tolist() == ["done"] * 4 and sorted(merged["seed"]) == [0, 1, 2, 3]
    grid = pd.read_csv(out / "ablation_clamp" / "grid.csv")
    assert grid.groupby("quantizer.entropy_mode")["n"].max().to_dict() == {"exact": 3, "reference": 1}
    command = (out / "ablation_clamp" / "command.txt").read_text()
    assert str(tmp_path / "first") in command and f"{tmp_path / 'later'} --out" in command  # both analyses


def _environment(run_dir: Path, **fields: Any) -> None:
    row = {"step": 0, "cpu": "Xeon", "cpu_capability": "AVX512", "threads": 1, "device": "cpu", "gpu": None,
           "torch": "2.13.0+cpu", "commit": "abc", "dirty": False, **fields}
    (run_dir / "environment.jsonl").write_text(json.dumps(row) + "\n")


def test_merge_names_the_reruns_that_did_not_reproduce_and_where_they_ran(tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    for seed in (0, 1, 2):
        _environment(write_ablation_run(tmp_path / "first", "ablation_clamp", seed, codebook_size=2**14))
    assert ablations([str(tmp_path / "first"), "--out", str(out)]) == 0
    committed = pd.read_csv(out / "ablation_clamp" / "summary.csv")
    assert committed["env_cpu_capability"].tolist() == ["AVX512"] * 3 and committed["env_commit"].tolist() == ["abc"] * 3
    capsys.readouterr()
    # Re-run elsewhere: seed 0 reproduces on the same machine, seed 1 differs on an AVX2 node,
    # seed 2 differs on the same machine and code.
    for seed, capability in ((0, "AVX512"), (1, "AVX2"), (2, "AVX512")):
        run_dir = write_ablation_run(tmp_path / "later", "ablation_clamp", seed, codebook_size=2**14)
        _environment(run_dir, cpu_capability=capability)
        if seed:
            summary = json.loads((run_dir / "summary.json").read_text())
            summary["final_val_psnr"] += 0.5
            (run_dir / "summary.json").write_text(json.dumps(summary))
    assert ablations([str(tmp_path / "later"), "--out", str(out), "--merge"]) == 0
    err = capsys.readouterr().err
    assert "3 finished run(s) are both committed and in the run folders read; 1 match the committed final numbers" in err
    lines = [line for line in err.splitlines() if "did not reproduce" in line]
    assert len(lines) == 2 and "-s1: re-run" in lines[0] and "-s2: re-run" in lines[1]
    assert "final_val_psnr" in lines[0] and "it ran elsewhere: env_cpu_capability AVX512 -> AVX2" in lines[0]
    assert "same recorded environment" in lines[1]
    merged = pd.read_csv(out / "ablation_clamp" / "summary.csv")
    assert merged["env_cpu_capability"].tolist() == ["AVX512", "AVX2", "AVX512"]  # the re-runs' rows


def test_merging_one_sweep_of_a_claim_keeps_the_others_in_its_plot(written: Path, sweeps: Path, tmp_path: Path) -> None:
    rerun = tmp_path / "rerun"
    write_ablation_run(rerun, "ablation_vocab", 2, kind="vq", codebook_size=16)  # ablation_vocab only
    (written / "ablation_vocab" / "claim1_vocab.png").unlink()
    assert ablations([str(rerun), "--out", str(written), "--merge"]) == 0
    assert (written / "ablation_vocab" / "claim1_vocab.png").is_file()
    claims = analysis.claim_summaries(analysis.read_summaries(written))
    psnr = analysis.vocab_figure(claims["vocab"]).axes[1]
    assert list(_lines(psnr)["lfq"].get_xdata()) == [16, 256, 2**18]  # 2^18 lives in ablation_vocab_lfq18
    assert len(pd.read_csv(written / "ablation_vocab" / "summary.csv")) == 2 * 3 * len(SIZES) + 1


def test_redraw_draws_the_claim_plots_from_the_csvs_alone(written: Path, capsys: pytest.CaptureFixture[str]) -> None:
    csvs = {p: p.read_bytes() for p in written.rglob("*.csv")}
    (written / "ablation_vocab" / "claim1_vocab.png").unlink()
    old = (written / "ablation_clamp" / "claim4_clamp.svg").stat().st_mtime_ns
    assert ablations(["--redraw", "--out", str(written)]) == 0
    printed = capsys.readouterr().out
    assert (written / "ablation_vocab" / "claim1_vocab.png").stat().st_size > 10_000
    assert (written / "ablation_clamp" / "claim4_clamp.svg").stat().st_mtime_ns > old
    assert "claim3_usage_vs_gamma.png" in printed and "ablation_vocab_lfq18" not in printed
    assert {p: p.read_bytes() for p in written.rglob("*.csv")} == csvs  # the tables are left as they were
    assert not list(written.rglob(".*.tmp"))  # written atomically: no temp file left
    # bad input: one line, exit 2
    assert ablations(["--redraw", "--out", str(written / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a folder of a study's committed CSVs" in err
    with pytest.raises(SystemExit) as stop:
        ablations([str(written), "--redraw"])
    assert stop.value.code == 2 and "--out DIR alone" in capsys.readouterr().err


def test_merge_needs_run_ids(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="without a run_id"):
        merge_summaries(pd.DataFrame({"seed": [0]}), pd.DataFrame({"run_id": ["a"], "seed": [0]}))
    with pytest.raises(ValueError, match="'refuse', 'merge', 'replace'"):
        studies.write_ablations(tmp_path, tmp_path / "out", command="x", mode="append")


def test_clamp_probe_table_and_loader(tmp_path: Path) -> None:
    rows = [dict(bits=b, inv_temperature=t, tokens=n, seed=s, clamped_mass=0.1 * b + s, grad_cosine=1 - 0.01 * n,
                 grad_norm_ratio=t / 100) for b in (8, 10) for t in (1.0, 100.0) for n in (16, 64) for s in (0, 1)]
    probe = pd.DataFrame(rows)
    table = analysis.clamp_probe_table(probe)
    assert table.index.tolist() == [(100.0, 8), (100.0, 10), (1.0, 8), (1.0, 10)]  # default temperature first
    assert table.loc[(1.0, 10), ("clamped_mass", 64)] == "1.5 ± 0.71"  # seeds 0 and 1: 1.0 and 2.0
    assert table.loc[(100.0, 8), ("grad_cosine", 64)] == "0.36 ± 0"
    one_seed = analysis.clamp_probe_table(probe[probe["seed"] == 1])
    assert one_seed.loc[(1.0, 10), ("clamped_mass", 16)] == "2"
    fig = analysis.clamp_probe_figure(probe)
    mass = fig.axes[0]
    means = [list(line.get_ydata()) for line in mass.get_lines()[:2]]  # 2^8, 2^10 codes: 0.1 bits + mean seed
    assert means == [pytest.approx([1.3, 1.3]), pytest.approx([1.5, 1.5])]
    assert len(mass.collections) == 2 and "mean of 2 seeds" in fig._suptitle.get_text()  # min-max bands
    assert analysis.load_clamp_probe(tmp_path) is None
    (tmp_path / "clamp_probe").mkdir()
    probe.to_csv(tmp_path / "clamp_probe" / "probe.csv", index=False)
    pd.testing.assert_frame_equal(analysis.load_clamp_probe(tmp_path), probe)
    pd.testing.assert_frame_equal(analysis.load_clamp_probe(tmp_path / "clamp_probe" / "probe.csv"), probe)
    probe.drop(columns="grad_cosine").to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(analysis.NoData, match=r"bad.csv is not a clamp probe table: no \['grad_cosine'\]"):
        analysis.load_clamp_probe(tmp_path / "bad.csv")


def test_a_sweep_folder_that_tests_no_claim_is_summarised_not_a_crash(tmp_path: Path, capsys) -> None:
    write_run(tmp_path / "runs" / "mine", "a", seed=0)
    write_run(tmp_path / "runs" / "mine", "b", seed=1)
    broken = write_run(tmp_path / "runs" / "mine", "c", seed=2)
    (broken / "config.json").unlink()
    (broken / "DONE").unlink()
    assert ablations([str(tmp_path / "runs"), "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "mine: tests no claim" in err
    assert f"skipped {broken}: no config.json" in err  # a dropped folder is named, never silent
    assert len(pd.read_csv(tmp_path / "out" / "mine" / "summary.csv")) == 2


def test_a_merge_keeps_numbers_numeric_where_new_runs_have_none(tmp_path: Path) -> None:
    # committed LFQ rows with an entropy, new VQ rows whose loader gave None there (an object column)
    old = pd.DataFrame({"run_id": ["a", "b"], "status": ["done"] * 2, "final_batch_entropy": [1.1269999742507935, 2.5]})
    new = pd.DataFrame({"run_id": ["c", "d"], "status": ["done"] * 2, "final_batch_entropy": [None, None]})
    assert new["final_batch_entropy"].dtype == object
    merged, _ = merge_summaries(old, new)
    assert pd.api.types.is_float_dtype(merged["final_batch_entropy"])
    merged.to_csv(tmp_path / "s.csv", index=False, float_format="%.6g")
    assert "a,done,1.127\n" in (tmp_path / "s.csv").read_text()  # the table's float format, not a repr
    # a text column that only looks numeric in none of the frames stays text
    text, _ = merge_summaries(old.assign(env_cpu="x"), new.assign(env_cpu=[None, "y"]))
    assert text["env_cpu"].fillna("-").tolist() == ["x", "x", "-", "y"]
    # nor does a flag: True/False, not 1/0
    flags, _ = merge_summaries(old.assign(env_dirty=False), new.assign(env_dirty=[None, True]))
    assert flags["env_dirty"].tolist()[:2] == [False, False] and flags["env_dirty"].tolist()[3] is True


def test_a_rerun_is_compared_with_its_committed_row_at_the_csvs_six_digits() -> None:
    from analysis.merge import reruns

    committed = pd.DataFrame({"run_id": ["a", "b"], "status": ["done", "done"],
                              "final_val_psnr": [21.4324, 21.4324]})  # as summary.csv holds them (%.6g)
    fresh = pd.DataFrame({"run_id": ["a", "b"], "status": ["done", "done"],
                          "final_val_psnr": [21.432449, 21.43262]})  # a: the same run; b: moved in the 6th digit
    notes = reruns(committed, fresh, ("final_val_psnr",))
    assert notes[0].endswith("1 match the committed final numbers")
    assert len(notes) == 2 and notes[1].startswith("b: re-run did not reproduce")
