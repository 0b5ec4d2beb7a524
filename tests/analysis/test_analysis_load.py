"""Run folders -> DataFrames: row counts, columns, and damaged folders reported, never fatal."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest
from analysis_fixtures import FRACS, GAMMAS, SEEDS, write_run

import analysis
from analysis import columnar
from analysis.claims import summarize
from analysis.jsonl_reader import parse_jsonl, read_jsonl_arrow
from analysis.load import STATUS_MEANINGS, STATUSES

STEPS = 5  # write_run's default: per step 1 quantizer row per layer + 1 train row, val on even steps
ROWS_PER_RUN = STEPS * 2 + 3


def test_load_runs_one_row_per_run_with_flattened_config_and_summary(grid_sweep: Path) -> None:
    runs = analysis.load_runs(grid_sweep)
    assert len(runs) == len(GAMMAS) * len(FRACS) * len(SEEDS)
    assert set(runs["status"]) == {"done"}
    assert set(runs["sweep"]) == {"gamma_frac"}
    assert sorted(runs["quantizer.diversity_gamma"].unique()) == list(GAMMAS)
    assert runs["model.hidden"].iloc[0] == (32, 32)  # lists become tuples, so they can be grouped on
    assert "final_usage_fraction" in runs and runs["final_usage_fraction"].notna().all()
    assert "quantizer.diversity_gamma" in runs.attrs["config_columns"]
    assert "final_usage_fraction" not in runs.attrs["config_columns"]
    assert runs.attrs["problems"] == ()
    # Loading the parent of the sweep names the sweep by its folder.
    assert set(analysis.load_runs(grid_sweep.parent)["sweep"]) == {"gamma_frac"}


def test_statuses_are_the_run_folder_words_and_the_age_of_the_last_write_is_a_column(tmp_path: Path) -> None:
    write_run(tmp_path, "done")
    write_run(tmp_path, "failed", status="failed")
    write_run(tmp_path, "running", status=None, steps=4)
    stale = write_run(tmp_path, "stale", status=None)
    old = time.time() - 3 * 3600
    for f in stale.iterdir():
        os.utime(f, (old, old))
    no_marker = write_run(tmp_path, "no_marker")
    (no_marker / "DONE").unlink()

    runs = analysis.load_runs(tmp_path).set_index("run_id")
    assert set(runs["status"]) <= set(STATUSES)
    assert runs.loc["done", "status"] == "done"
    assert runs.loc["failed", "status"] == "failed"
    assert runs.loc["failed", "reason"] == "loss is nan"
    # The files cannot tell a live process from a killed one: both are "started", told apart by age.
    assert runs.loc["running", "status"] == runs.loc["stale", "status"] == "started"
    assert runs.loc["running", "step"] == 3  # read from the last row of metrics.jsonl
    assert runs.loc["running", "last_write_age_s"] < 600 and pd.isna(runs.loc["running", "reason"])
    # wall-clock seconds, not rounding: 10 minutes for the test to get from utime to load_runs
    assert runs.loc["stale", "last_write_age_s"] == pytest.approx(3 * 3600, abs=600)
    assert "no write for 3.0 h" in runs.loc["stale", "reason"]
    assert runs.loc["no_marker", "status"] == "started"
    assert runs.loc["no_marker", "reason"] == "summary.json says done but there is no DONE marker"
    assert set(STATUS_MEANINGS) == set(STATUSES)


def test_damaged_folders_are_reported_as_corrupt_or_skipped(grid_sweep: Path) -> None:
    bad_config = write_run(grid_sweep, "bad_config")
    (bad_config / "config.json").write_text('{"name": "synthetic", "quant')
    bad_summary = write_run(grid_sweep, "bad_summary")
    (bad_summary / "summary.json").write_text("[1, 2]")
    no_config = write_run(grid_sweep, "no_config")
    (no_config / "config.json").unlink()
    unfinished = write_run(grid_sweep, "unfinished_bad_config", status=None)
    (unfinished / "config.json").write_bytes(b"\xff\xfe not utf-8")

    with pytest.warns(analysis.LoadWarning, match="skipped 1 run folder"):
        runs = analysis.load_runs(grid_sweep)
    # DONE but not whole: a row with status corrupt and the reason, never silently dropped
    assert len(runs) == 8 + 3
    corrupt = runs[runs["status"] == "corrupt"].set_index("run_id")["reason"]
    assert set(corrupt.index) == {"bad_config", "bad_summary", "no_config"}
    assert corrupt["bad_config"].startswith("DONE but config.json is unreadable (JSONDecodeError")
    assert corrupt["bad_summary"] == "DONE but summary.json holds a JSON list, not an object"
    assert corrupt["no_config"] == "DONE but no config.json"
    # no DONE and no readable config: nothing to report it by, so skipped and listed
    (problem,) = runs.attrs["problems"]
    assert Path(problem.run_dir).name == "unfinished_bad_config" and problem.skipped
    assert "config.json is unreadable (UnicodeDecodeError" in problem.reason


def test_bookkeeping_folders_are_not_searched(grid_sweep: Path) -> None:
    # slurm.submit --force moves superseded run folders to _sweep/trash/.
    write_run(grid_sweep / "_sweep" / "trash", "g0.5-f0.5-s0-20260101", final_usage=0.99)
    write_run(grid_sweep / ".cache", "hidden")
    runs = analysis.load_runs(grid_sweep)
    assert len(runs) == 8 and runs["final_usage_fraction"].max() < 0.99


def test_duplicate_run_id_kept_once_within_a_sweep(tmp_path: Path) -> None:
    write_run(tmp_path / "a", "same")
    shutil.copytree(tmp_path / "a" / "same", tmp_path / "a" / "same-copy")  # a stray copy
    with pytest.warns(analysis.LoadWarning):
        runs = analysis.load_runs(tmp_path)
    assert len(runs) == 1 and runs["run_dir"].iloc[0].endswith("same")
    assert "duplicate run_id" in runs.attrs["problems"][0].reason


def test_the_same_run_in_two_sweeps_is_two_runs(tmp_path: Path) -> None:
    # e.g. the default grid point of two ablations: each sweep's table needs it
    write_run(tmp_path / "a", "same")
    write_run(tmp_path / "b", "same")
    runs = analysis.load_runs(tmp_path)
    assert sorted(runs["sweep"]) == ["a", "b"] and not runs.attrs["problems"]


def test_what_each_attempt_computed_on_becomes_env_columns(tmp_path: Path) -> None:
    resumed = write_run(tmp_path / "s", "resumed")
    rows = [{"step": 0, "cpu": "Xeon", "cpu_capability": "AVX512", "threads": 1, "device": "cpu", "gpu": None,
             "torch": "2.13.0+cpu", "commit": "abc", "dirty": False},
            {"step": 50, "cpu": "EPYC", "cpu_capability": "AVX2", "threads": 1, "device": "cuda:0", "gpu": "H200",
             "torch": "2.13.0+cpu", "commit": "abc", "dirty": False}]
    (resumed / "environment.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 9')  # cut short
    write_run(tmp_path / "s", "older")  # written before environment.jsonl existed
    runs = analysis.load_runs(tmp_path).set_index("run_id")
    assert runs.at["resumed", "env_attempts"] == 2 and runs.at["resumed", "env_torch"] == "2.13.0+cpu"
    assert runs.at["resumed", "env_cpu_capability"] == "AVX512 | AVX2"  # resumed on another node
    assert runs.at["resumed", "env_device"] == "cpu | cuda:0" and runs.at["resumed", "env_gpu"] == "H200"
    assert not bool(runs.at["resumed", "env_dirty"])
    assert pd.isna(runs.at["older", "env_attempts"]) and pd.isna(runs.at["older", "env_commit"])
    assert not any(c.startswith("env") for c in runs.attrs["config_columns"])  # never a swept parameter
    summary = summarize(runs.reset_index()).set_index("run_id")  # summary.csv keeps them
    assert summary.at["resumed", "env_cpu_capability"] == "AVX512 | AVX2" and pd.isna(summary.at["older", "env_cpu"])


def test_load_one_run_folder(grid_sweep: Path) -> None:
    runs = analysis.load_runs(grid_sweep / "g0.5-f1.0-s1")
    assert runs["run_id"].tolist() == ["g0.5-f1.0-s1"] and runs["sweep"].tolist() == ["gamma_frac"]
    assert len(analysis.load_metrics(grid_sweep / "g0.5-f1.0-s1")) == ROWS_PER_RUN


def test_empty_and_missing_folders(tmp_path: Path) -> None:
    assert len(analysis.load_runs(tmp_path)) == 0
    assert len(analysis.load_metrics(tmp_path)) == 0
    assert len(analysis.load_histograms(tmp_path)) == 0
    with pytest.raises(FileNotFoundError, match="does not exist"):
        analysis.load_runs(tmp_path / "nowhere")


def test_load_metrics_is_tidy(grid_sweep: Path) -> None:
    metrics = analysis.load_metrics(grid_sweep)
    assert len(metrics) == 8 * ROWS_PER_RUN
    assert list(metrics.columns[:6]) == ["run_id", "step", "kind", "layer", "codebook", "mode"]
    assert isinstance(metrics["run_id"].dtype, pd.CategoricalDtype)
    assert metrics.groupby("run_id", observed=True).size().eq(ROWS_PER_RUN).all()
    assert set(metrics["kind"].astype(str)) == {"quantizer", "train", "val"}
    quantizer = metrics[metrics["kind"] == "quantizer"]
    assert quantizer["usage_fraction"].notna().all() and quantizer["val_mse"].isna().all()
    only = analysis.load_metrics(grid_sweep, kinds=["val"])
    assert len(only) == 8 * 3 and set(only["kind"].astype(str)) == {"val"}


def test_load_metrics_of_a_runs_subset(grid_sweep: Path) -> None:
    runs = analysis.load_runs(grid_sweep)
    subset = runs[runs["seed"] == 0]
    metrics = analysis.load_metrics(subset)
    assert set(metrics["run_id"].astype(str)) == set(subset["run_id"])


def test_truncated_last_line_dropped_and_reported(tmp_path: Path) -> None:
    run = write_run(tmp_path, "killed", status=None)
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "kind": "train", "lo')
    with pytest.warns(analysis.LoadWarning, match="repaired 1"):
        metrics = analysis.load_metrics(tmp_path)
    assert len(metrics) == ROWS_PER_RUN
    (problem,) = metrics.attrs["problems"]
    assert not problem.skipped and "truncated last line" in problem.reason


def test_bad_middle_line_dropped(tmp_path: Path) -> None:
    # A resume appends after a killed writer's fragment, which leaves it mid-file.
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 0}\n{"step": 1, "ki{"step": 1}\n{"step": 2}\n')
    rows, notes = parse_jsonl(path)
    assert [r["step"] for r in rows] == [0, 2]
    assert notes == ["dropped 1 unparseable line(s): 2"]


def test_nan_values_are_read_as_nan(tmp_path: Path) -> None:
    write_run(tmp_path, "r")
    metrics = analysis.load_metrics(tmp_path, kinds=["quantizer"])
    assert metrics["bit_balance_mad"].isna().all()


def test_cache_is_used_and_invalidated_by_a_change(tmp_path: Path) -> None:
    run = write_run(tmp_path / "results", "r")
    cache = tmp_path / "my-cache"
    first = analysis.load_metrics(tmp_path / "results", cache=cache)
    entries = per_run_entries(cache)
    assert len(entries) == 1 and not list(cache.glob("*.pkl"))
    assert len(list(cache.glob("set-*.arrow"))) == 1  # the whole load, for the next identical one
    for entry in cache.glob("set-*.arrow"):  # without it the next load reads the per-run entries
        entry.unlink()
    # A cache hit does not parse: change the entry's columns and see the change come back.
    table = feather.read_table(entries[0])
    i = table.column_names.index("loss")
    table = table.set_column(i, "loss", pa.array(np.full(len(table), -1.0))).replace_schema_metadata(
        table.schema.metadata)
    feather.write_feather(table, str(entries[0]), compression="uncompressed")
    assert (analysis.load_metrics(tmp_path / "results", cache=cache)["loss"] == -1.0).all()
    # Appending changes size and mtime: parsed again, the stale entry replaced.
    with (run / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 99, "kind": "val", "val_mse": 0.5}) + "\n")
    again = analysis.load_metrics(tmp_path / "results", cache=cache)
    assert len(again) == len(first) + 1 and again["step"].max() == 99
    assert len(per_run_entries(cache)) == 1 and len(list(cache.glob("set-*.arrow"))) == 1


def per_run_entries(cache: Path) -> list[Path]:
    return [p for p in cache.glob("*.arrow") if not p.name.startswith("set-")]


@pytest.mark.parametrize("which", ["per-run", "set"])
@pytest.mark.parametrize("planted", [b"not an arrow file", pickle.dumps(RuntimeError("boom"))])
def test_damaged_or_planted_cache_entry_is_rebuilt_never_executed(tmp_path: Path, planted: bytes, which: str) -> None:
    write_run(tmp_path / "results", "r")
    cache = tmp_path / "cache2"
    first = analysis.load_metrics(tmp_path / "results", cache=cache)
    (entry,) = per_run_entries(cache) if which == "per-run" else cache.glob("set-*.arrow")
    entry.write_bytes(planted)
    if which == "per-run":  # else the whole-load entry answers and the planted file is never opened
        for whole in cache.glob("set-*.arrow"):
            whole.unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = analysis.load_metrics(tmp_path / "results", cache=cache)
    pd.testing.assert_frame_equal(first, again)


def test_no_module_of_analysis_reads_pickles() -> None:
    for path in Path(analysis.__file__).parent.glob("*.py"):
        text = path.read_text()
        assert "import pickle" not in text and "read_pickle" not in text, path


def test_the_arrow_reader_and_the_repairing_parser_give_the_same_frame(tmp_path: Path) -> None:
    run = write_run(tmp_path / "a", "r", steps=7)
    fast = analysis.load_metrics(tmp_path / "a", cache=False)
    # a torn last line sends the same file through the stdlib parser, which drops that line
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 7, "ki')
    slow = analysis.load_metrics(tmp_path / "a", cache=False, warn=False)
    pd.testing.assert_frame_equal(fast, slow)


def test_runs_converted_together_give_the_frame_of_runs_converted_alone(tmp_path: Path) -> None:
    # Runs of one schema are converted as one table; categories must come out in the order the
    # per-run conversion gives (each run's sorted categories, first-seen), and numbers in a column
    # that another run has strings in are written as each run alone has them (2, not 2.0).
    logs = {
        "a": [{"step": 0, "kind": "zeta", "layer": "l9", "tag": 1, "v": 0.5},
              {"step": 1, "kind": "zeta", "layer": "l1", "tag": 2, "v": 1.5}],
        "b": [{"step": 0, "kind": "alpha", "layer": "l9", "tag": 3, "v": 0.5},
              {"step": 1, "kind": "mid", "layer": "l1", "tag": None, "v": None}],
        "c": [{"step": 0, "kind": "alpha", "layer": "l0", "tag": None, "v": 2.5}],
        "d": [{"step": 0, "kind": "beta", "layer": "l9", "tag": "text", "v": 0.25}],
    }
    tables = []
    for name, rows in logs.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tables.append(read_jsonl_arrow(path))
    assert tables[0].schema.equals(tables[1].schema)  # a and b go together, c and d alone
    together = columnar.concat(tables, list(logs), ["step", "kind"])
    alone = columnar.concat([columnar.from_arrow(t) for t in tables], list(logs), ["step", "kind"])
    pd.testing.assert_frame_equal(together, alone, check_exact=True)
    assert list(together["kind"].cat.categories) == ["zeta", "alpha", "mid", "beta"]
    assert list(together["tag"].cat.categories) == ["text", "1", "2", "3.0", "nan"]


def test_a_compacted_log_in_step_with_its_json_is_read_instead(tmp_path: Path) -> None:
    run = write_run(tmp_path / "a", "r", steps=7)
    frame = analysis.load_metrics(tmp_path / "a", cache=False)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    keys = list(dict.fromkeys(k for r in rows for k in r))
    table = pa.table({k: [r.get(k) for r in rows] for k in keys})
    size = (run / "metrics.jsonl").stat().st_size
    pq.write_table(table.replace_schema_metadata({b"lfq.source_bytes": str(size).encode()}), run / "metrics.parquet")
    (run / "metrics.jsonl").write_text((run / "metrics.jsonl").read_text().replace('"train"', '"TRAIN"'))
    # the same size: the Parquet file is taken (the JSON was altered behind its back, as a test of which is read)
    pd.testing.assert_frame_equal(analysis.load_metrics(tmp_path / "a", cache=False), frame)
    with (run / "metrics.jsonl").open("a") as f:  # out of step: the JSON is read
        f.write(json.dumps({"step": 99, "kind": "val", "val_mse": 0.5}) + "\n")
    assert analysis.load_metrics(tmp_path / "a", cache=False)["step"].max() == 99


def test_load_histograms_one_row_per_code(grid_sweep: Path) -> None:
    hist = analysis.load_histograms(grid_sweep)
    runs = analysis.load_runs(grid_sweep)
    # write_run: two snapshots per run, each with round(usage * 16) codes (at least 1).
    expected = sum(2 * max(1, round(u * 16)) for u in runs["final_usage_fraction"])
    assert len(hist) == expected
    assert list(hist.columns) == ["run_id", "step", "layer", "codebook", "mode", "codebook_size", "code", "count"]
    assert (hist["codebook_size"] == 16).all()


def test_process_pool_gives_the_same_frame(grid_sweep: Path, tmp_path: Path) -> None:
    serial = analysis.load_metrics(grid_sweep, cache=False, workers=1)
    pooled = analysis.load_metrics(grid_sweep, cache=tmp_path / "pool-cache", workers=2)
    pd.testing.assert_frame_equal(serial, pooled)
    assert len(per_run_entries(tmp_path / "pool-cache")) == 8  # the workers filled the cache


def test_a_metric_no_run_has_is_a_numeric_column(tmp_path: Path) -> None:
    # VQ runs have no entropies: null in every summary.json. The column must still be numeric, so
    # that joined with runs that have them it is written in the tables' float format, not as reprs.
    for run_id in ("vq-a", "vq-b"):
        run_dir = write_run(tmp_path, run_id)
        summary = json.loads((run_dir / "summary.json").read_text())
        (run_dir / "summary.json").write_text(json.dumps({**summary, "final_batch_entropy": None,
                                                          "best_val_psnr": None}))
    runs = analysis.load_runs(tmp_path, warn=False)
    assert runs["final_batch_entropy"].isna().all() and pd.api.types.is_float_dtype(runs["final_batch_entropy"])
    assert pd.api.types.is_float_dtype(runs["best_val_psnr"])
    joined = pd.concat([runs, pd.DataFrame({"run_id": ["lfq"], "final_batch_entropy": [1.1269999742507935]})])
    assert "1.127\n" in joined[["final_batch_entropy"]].to_csv(index=False, float_format="%.6g")
