"""The run folder's writers: atomic, truncation that tolerates a torn last line, status."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from exp_helpers import REPO, SYNTHETIC_YAML, read_rows, run, smoke_config, without_wall_time

from common.run_state import finished
from experiments.config import Config, load_config
from experiments.files import atomic_write_json, read_jsonl, truncate_jsonl
from experiments.run_dir import CorruptRun, RunDir, RunDirError, confine, name_problem, run_status
from experiments.run_lock import RunLocked, read_lock_holder, restart
from experiments.train import main


def test_atomic_write_leaves_no_temp_files_and_keeps_the_old_file_on_error(tmp_path):
    path = tmp_path / "summary.json"
    atomic_write_json(path, {"a": 1, "nan": float("nan")})
    assert json.loads(path.read_text())["a"] == 1
    with pytest.raises(TypeError):
        atomic_write_json(path, {"not json": object()})
    assert json.loads(path.read_text())["a"] == 1  # the failed write changed nothing
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_truncate_keeps_rows_up_to_the_checkpoint_and_drops_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "kind": "train"} for s in (1, 2, 3, 4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5, "ki')
    assert read_jsonl(path) == rows  # the torn line is skipped when reading, too
    assert truncate_jsonl(path, 2) == 3
    assert read_jsonl(path) == rows[:2]
    assert path.read_text().endswith("\n")
    assert truncate_jsonl(path, 2) == 0
    assert truncate_jsonl(tmp_path / "missing.jsonl", 2) == 0


def test_status_from_the_folder_alone(tmp_path):
    rd = RunDir(tmp_path / "run")
    assert run_status(rd.path) == "missing" and rd.read_summary() is None
    rd.write_config({"task": "synthetic"}, "abc")
    assert rd.status() == "started" and rd.read_config()["run_id"] == "abc"
    rd.write_summary({"status": "failed", "reason": "x"})
    assert rd.status() == "failed"
    rd.write_summary({"status": "done"})
    rd.mark_done()
    assert rd.status() == "done" and rd.is_done() and rd.done.read_text() == ""
    rd.summary.write_text("{torn")
    assert rd.read_summary() is None  # unreadable, reported as absent rather than raising


# --- faults injected into run folders: nothing resumes from what it cannot trust -----------------------

def _killed_at(step: int, tmp_path: Path, *overrides: str) -> tuple[Config, Path]:
    """A run folder as a kill at ``step`` leaves it (smoke scale: a checkpoint every 10 steps)."""
    config = smoke_config(*overrides)

    def kill(s: int) -> None:
        if s == step:
            raise KeyboardInterrupt  # like SLURM's requeue: nothing recorded, the folder stays 'started'

    with pytest.raises(KeyboardInterrupt):
        run(config, tmp_path / config.run_id, on_step=kill)
    return config, tmp_path / config.run_id


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name != ".claim"}


def test_a_garbage_checkpoint_is_named_and_restart_keeps_it_aside(tmp_path, capsys):
    config, run_dir = _killed_at(20, tmp_path)
    (run_dir / "checkpoint.pt").write_bytes(b"\x00garbage, not a zip file")
    before = _files(run_dir)
    with pytest.raises(CorruptRun, match=r"checkpoint\.pt is corrupt .*--restart"):
        run(config, run_dir)
    assert _files(run_dir) == before  # nothing written, not even config.json again
    args = [str(SYNTHETIC_YAML), "scale=smoke", "--out", str(tmp_path)]
    capsys.readouterr()  # what the killed run printed (its collapse alarm, lfq.alarms) is not main's
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "checkpoint.pt is corrupt" in err and "--restart" in err
    assert main([*args, "--restart"]) == 0
    assert (run_dir / "DONE").exists()
    (aside,) = (tmp_path / "_sweep" / "trash").iterdir()
    assert aside.name.startswith(config.run_id) and (aside / "checkpoint.pt").read_bytes() == before["checkpoint.pt"]
    assert finished(run_dir) == ("done", "")


class _Planted:
    def __reduce__(self):
        return (os.system, (f"touch {SENTINEL}",))


SENTINEL = Path(tempfile.gettempdir()) / f"lfq-planted-checkpoint-ran-{os.getpid()}"


def test_a_planted_checkpoint_cannot_run_code(tmp_path):
    config, run_dir = _killed_at(20, tmp_path)
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    state["progress"] = _Planted()  # what a hostile checkpoint would carry
    torch.save(state, run_dir / "checkpoint.pt")
    SENTINEL.unlink(missing_ok=True)
    with pytest.raises(CorruptRun, match="checkpoint.pt is corrupt"):
        run(config, run_dir)
    assert not SENTINEL.exists()


def test_metrics_cut_before_the_checkpoint_step_are_refused_naming_the_gap(tmp_path):
    config, run_dir = _killed_at(25, tmp_path)  # checkpoint at step 20, log_every 5 at smoke scale
    lines = (run_dir / "metrics.jsonl").read_text().splitlines(keepends=True)
    keep = [ln for ln in lines if json.loads(ln)["step"] <= 8]  # a truncation mid-file: steps 9-20 lost
    (run_dir / "metrics.jsonl").write_text("".join(keep))
    with pytest.raises(CorruptRun, match=r"before the checkpoint's step 20 are missing: .*'train' rows for steps 10-20"):
        run(config, run_dir)
    assert (run_dir / "metrics.jsonl").read_text() == "".join(keep)  # left as found, for the user to look at


def test_a_bad_line_in_the_middle_of_the_metrics_is_refused(tmp_path):
    config, run_dir = _killed_at(25, tmp_path)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines(keepends=True)
    lines[3] = '{"step": 2, "ki\n'  # a torn write that a later append left mid-file
    (run_dir / "metrics.jsonl").write_text("".join(lines))
    with pytest.raises(CorruptRun, match=r"unparseable line\(s\) 4 in the middle"):
        run(config, run_dir)


def test_histograms_shorter_than_the_checkpoint_saw_are_refused(tmp_path):
    config, run_dir = _killed_at(25, tmp_path)
    (run_dir / "histograms.jsonl").write_text("")
    with pytest.raises(CorruptRun, match=r"histograms.jsonl is corrupt \(0 bytes where the checkpoint of step 20"):
        run(config, run_dir)


def test_a_resume_with_whole_logs_still_ends_byte_identical(tmp_path):
    config, run_dir = _killed_at(25, tmp_path)
    resumed = run(config, run_dir)
    fresh = run(config, tmp_path / "fresh")
    assert without_wall_time(resumed) == without_wall_time(fresh)
    assert (run_dir / "histograms.jsonl").read_bytes() == (tmp_path / "fresh" / "histograms.jsonl").read_bytes()
    # Metrics: identical but for the timing columns, which measure the machine, not the run.
    assert read_rows(run_dir / "metrics.jsonl") == read_rows(tmp_path / "fresh" / "metrics.jsonl")
    import pandas as pd

    from experiments.train import TIMING_KEYS

    frames = [pd.read_parquet(d / "metrics.parquet").drop(columns=list(TIMING_KEYS)) for d in (run_dir, tmp_path / "fresh")]
    pd.testing.assert_frame_equal(*frames)


@pytest.mark.parametrize("damage", ["no summary", "torn summary", "no config", "config without run_id"])
def test_a_done_folder_that_is_not_whole_is_corrupt_not_finished(tmp_path, damage):
    config = smoke_config()
    run_dir = tmp_path / config.run_id
    run(config, run_dir)
    if damage == "no summary":
        (run_dir / "summary.json").unlink()
    elif damage == "torn summary":
        (run_dir / "summary.json").write_text('{"status": "do')
    elif damage == "no config":
        (run_dir / "config.json").unlink()
    else:
        (run_dir / "config.json").write_text(json.dumps({"task": "synthetic"}))
    state, why = finished(run_dir)
    assert state == "corrupt" and why.startswith("DONE but ")
    with pytest.raises(CorruptRun, match="not counted as finished"):
        run(config, run_dir)
    assert main([str(SYNTHETIC_YAML), "scale=smoke", "--out", str(tmp_path), "--restart"]) == 0
    assert finished(run_dir) == ("done", "")


def test_two_trainers_on_one_folder_train_once(tmp_path):
    long = ["schedule.steps=600", "schedule.checkpoint_every=100", "data.batch_size=32", "model.hidden_dim=32",
            "data.val_size=64", "logging.print_every=1000"]
    args = [sys.executable, "-m", "experiments.train", str(SYNTHETIC_YAML), *long, "--out", str(tmp_path)]
    first = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_dir = tmp_path / load_config(SYNTHETIC_YAML, long).run_id
    deadline = time.monotonic() + 60
    while read_lock_holder(run_dir).get("pid") != first.pid:
        assert time.monotonic() < deadline and first.poll() is None, "the first trainer never locked its folder"
        time.sleep(0.05)
    second = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert second.returncode == 2 and f"is being trained by pid {first.pid}" in second.stderr
    assert second.stderr.count("\n") == 1
    assert first.wait(timeout=300) == 0
    train_steps = [r["step"] for r in read_rows(run_dir / "metrics.jsonl") if r["kind"] == "train"]
    assert train_steps == sorted(set(train_steps)) and len(train_steps) == 600 // 50  # log_every 50: each once


def test_a_sweep_jobs_run_lock_stops_a_trainer(tmp_path, capsys):
    config = smoke_config()
    run_dir = tmp_path / config.run_id
    code = ("import sys\nfrom experiments.run_lock import try_lock_run\n"
            "with try_lock_run(sys.argv[1], info={'job_id': '77_3'}):\n    print('held', flush=True)\n    sys.stdin.read()\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], cwd=REPO, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main([str(SYNTHETIC_YAML), "scale=smoke", "--out", str(tmp_path)]) == 2
        assert "(job 77_3)" in capsys.readouterr().err
        assert not (run_dir / "config.json").exists()
        with pytest.raises(RunLocked):
            restart(run_dir)  # --restart never moves a folder out from under a live process
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)


def test_names_are_one_folder_and_run_folders_stay_in_the_root(tmp_path):
    for bad in ("", ".", "..", "a/b", "_sweep", ".hidden", "x" * 101, "a b", "caf\u00e9"):
        assert name_problem(bad), bad
    for good in ("demo", "ablation_vocab_lfq18", "gamma-frac.2", "x" * 100):
        assert name_problem(good) == "", good
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "escape").symlink_to(tmp_path)
    with pytest.raises(RunDirError, match="outside the results root"):
        confine(tmp_path / "results", tmp_path / "results" / "escape")
    assert confine(tmp_path / "results", tmp_path / "results" / "demo") == (tmp_path / "results" / "demo").resolve()


def test_the_compacted_metrics_hold_the_json_rows(tmp_path):
    config = smoke_config()
    run(config, tmp_path)
    rows = read_rows(tmp_path / "metrics.jsonl")
    table = pq.read_table(tmp_path / "metrics.parquet")
    assert table.num_rows == len(rows)
    assert int(table.schema.metadata[b"lfq.source_bytes"]) == (tmp_path / "metrics.jsonl").stat().st_size
    back = table.to_pylist()
    for row, got in zip(rows, back, strict=True):
        for key, value in row.items():
            assert got[key] == value or (value != value and got[key] != got[key]), (key, value, got[key])


class _LockFilesOpenHere(torch.utils.data.Dataset):
    """Each item: how many of this process's descriptors point at ``lock`` (read in the worker)."""

    def __init__(self, lock: Path):
        self.lock = str(lock.resolve())

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> int:
        fds = Path("/proc/self/fd")
        return sum(1 for fd in fds.iterdir() if os.path.realpath(fd) == self.lock)


def test_a_dataloader_worker_holds_no_share_of_the_run_lock(tmp_path):
    # A flock belongs to the open file, which fork shares: a worker that outlives a SIGKILLed trainer
    # (scancel) would keep the run "running" until it ends. The trainer's workers let go of it.
    from experiments.data import loader_kwargs
    from experiments.run_lock import LOCK_NAME, try_lock_run

    config = load_config(SYNTHETIC_YAML, ["runtime.num_workers=1"])
    with try_lock_run(tmp_path) as locked:
        assert locked
        here = _LockFilesOpenHere(tmp_path / LOCK_NAME)[0]
        loader = torch.utils.data.DataLoader(_LockFilesOpenHere(tmp_path / LOCK_NAME), batch_size=1,
                                             **loader_kwargs(config, torch.device("cpu")))
        in_worker = [int(n) for n in loader]
    assert here == 1, "the test reads the lock's descriptors"
    assert in_worker == [0, 0], "a worker still shares the trainer's lock"


def test_atomic_write_csv_writes_the_header_fills_missing_values_and_leaves_no_temp_file(tmp_path):
    """The benchmarks' one CSV writer: header from the first row (or given), a missing value empty,
    unknown keys refused unless told to ignore them, readable like any file written here."""
    import csv

    from experiments.files import atomic_write_csv

    path = tmp_path / "sub" / "table.csv"
    atomic_write_csv(path, [{"a": 1, "b": 2.5}, {"a": 3, "b": "x"}])
    assert list(csv.DictReader(path.open())) == [{"a": "1", "b": "2.5"}, {"a": "3", "b": "x"}]
    atomic_write_csv(path, [{"a": 1, "extra": 9}, {"b": 2}], fieldnames=["a", "b"], extrasaction="ignore")
    assert path.read_bytes() == b"a,b\n1,\n,2\n"
    with pytest.raises(ValueError, match="extra"):
        atomic_write_csv(path, [{"a": 1, "extra": 9}], fieldnames=["a", "b"])
    assert path.read_text().splitlines() == ["a,b", "1,", ",2"]  # the old table, untouched
    assert sorted(p.name for p in path.parent.iterdir()) == ["table.csv"]
