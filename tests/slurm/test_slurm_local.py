"""--cluster local (a throttled pool on this machine) and --cluster debug (in-process), on real smoke runs."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from slurm_helpers import held_by_another_process, wait_attempts_ended, wait_until, write_sweep

from common import run_state
from experiments import files
from experiments import run_dir as run_folder
from experiments.config import load_config
from experiments.run_lock import run_is_locked, try_lock_run
from slurm.job import RunJob
from slurm.local import machine_cpus, machine_mem_gb, pool_size
from slurm.state import SweepFolder, run_states
from slurm.status import main as status_main
from slurm.submit import main as submit_main
from slurm.submit import submit_sweep

pytestmark = pytest.mark.slow


def _intervals(events: list[dict[str, Any]]) -> list[tuple[float, float, str]]:
    """(start, end, run) of every attempt in these job events."""
    starts = {(e["run_id"], e["pid"]): e["time"] for e in events if e["event"] == "start"}
    return sorted((starts[(e["run_id"], e["pid"])], e["time"], e["run_id"]) for e in events if e["event"] == "end")


def test_pool_size_fits_the_machine() -> None:
    cpus = machine_cpus()
    assert pool_size(100, 1, None) == cpus
    assert pool_size(100, cpus, None) == 1
    assert pool_size(100, 1, 1) == 1
    assert pool_size(2, 1, 64) == min(2, cpus)
    assert pool_size(100, 1, None, mem_gb=machine_mem_gb() / 1.5) == 1  # memory caps it too


def test_local_runs_no_more_at_once_than_the_machine_takes(tmp_path: Path) -> None:
    # each run asks for every CPU: the pool runs them one at a time, and a second sweep submitted
    # alongside waits for the machine-wide CPU slots instead of doubling the load
    cpus = machine_cpus()
    a = write_sweep(tmp_path, "local_a", grid={"quantizer.diversity_gamma": [0.5, 2.0]},
                    resources={"profile": "default", "cpus": cpus})
    b = write_sweep(tmp_path, "local_b", seeds=[3], resources={"profile": "default", "cpus": cpus})
    results = tmp_path / "results"
    ra = submit_sweep(a, results=results, overrides=["scale=smoke"])
    again = submit_sweep(a, results=results, overrides=["scale=smoke"])  # while A is in flight
    rb = submit_sweep(b, results=results, overrides=["scale=smoke"])
    assert len(ra.submitted) == 2 and len(rb.submitted) == 1
    assert again.submitted == [] and sorted(again.in_flight) == sorted(ra.submitted)
    fa, fb = SweepFolder(ra.folder), SweepFolder(rb.folder)
    ids_a, ids_b = ra.submitted, rb.submitted
    wait_until(lambda: all(s.state == "done" for s in run_states(fa, ids_a) + run_states(fb, ids_b)), 240,
               "3 local smoke runs DONE")
    spans = _intervals(wait_attempts_ended(ra.folder, rb.folder))
    assert len(spans) == 3, spans
    for (_, end, run), (start, _, nxt) in zip(spans, spans[1:], strict=False):
        assert start >= end, f"{nxt} started at {start:.2f} before {run} ended at {end:.2f}: throttle broken"
    assert "1 at a time" in (ra.submission_dir / f"{ra.jobs[0].job_id}_0_log.out").read_text()
    for folder, run_id in [(ra.folder, r) for r in ids_a] + [(rb.folder, r) for r in ids_b]:
        summary = run_folder.read_summary(folder / run_id)
        assert summary is not None and summary["status"] == "done" and summary["step"] == 30


def test_debug_runs_in_process_and_status_shows_the_failure(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    # lr=1e12 makes the loss non-finite at once: a real, deterministic failure of the trainer
    sweep = write_sweep(tmp_path, "dbg", zip={"optim.lr": [1e-3, 1e12], "optim.grad_clip": [1.0, 0.0]},
                        overrides=["optim.min_lr=0"])
    results = tmp_path / "results"
    r = submit_sweep(sweep, cluster="debug", results=results, overrides=["scale=smoke"])
    assert len(r.submitted) == 2  # returns after both ran, in this process
    good, bad = r.submitted
    assert run_folder.is_done(r.folder / good) and not run_folder.is_done(r.folder / bad)
    states = {s.run_id: s for s in run_states(SweepFolder(r.folder), r.submitted)}
    assert states[good].state == "done"
    assert states[bad].state == "failed" and "non-finite loss" in states[bad].detail
    capsys.readouterr()
    assert status_main([str(r.folder)]) == 0
    out = capsys.readouterr().out
    assert "1 done, 1 failed (of 2)" in out and "non-finite loss" in out
    # --resubmit takes exactly the failed run (which fails again: the config is the cause)
    jobs_before = len(files.read_jsonl(r.folder / "_sweep" / "jobs.jsonl"))
    assert status_main([str(r.folder), "--resubmit", "--cluster", "debug"]) == 0
    records = files.read_jsonl(r.folder / "_sweep" / "jobs.jsonl")
    assert [rec["run_id"] for rec in records[jobs_before:]] == [bad]
    assert "command" not in records[0]  # submitted through the API: no command line to record
    assert records[-1]["command"] == shlex.join(["python", "-m", "slurm.status", str(r.folder), "--resubmit",
                                                 "--cluster", "debug"])
    assert json.loads((r.folder / bad / "summary.json").read_text())["status"] == "failed"


def test_submit_records_its_command_line_with_each_run(tmp_path: Path) -> None:
    sweep = write_sweep(tmp_path, "recorded", seeds=[0, 1])
    argv = [str(sweep), "--cluster", "debug", "--results", str(tmp_path / "results"), "scale=smoke"]
    assert submit_main(argv) == 0
    records = files.read_jsonl(tmp_path / "results" / "recorded" / "_sweep" / "jobs.jsonl")
    assert len(records) == 2
    assert {rec["command"] for rec in records} == {shlex.join(["python", "-m", "slurm.submit", *argv])}


@pytest.mark.parametrize("which", ["printed by submit", "of the pool"])
def test_killing_the_local_pool_cancels_its_runs_and_resubmit_finishes_them(tmp_path: Path, which: str,
                                                                           capsys: pytest.CaptureFixture) -> None:
    sweep = write_sweep(tmp_path, "killed", seeds=[0, 1], resources={"profile": "default", "cpus": machine_cpus()})
    capsys.readouterr()
    r = submit_sweep(sweep, results=tmp_path / "results", overrides=["scale=smoke"])
    folder = SweepFolder(r.folder)
    first = r.submitted[0]
    wait_until(lambda: run_states(folder, [first])[0].state == "running", 120, "the first run to start")
    if which == "printed by submit":  # `kill <pid>` as submit says: submitit's sh wrapper, not the pool itself
        pid = int(re.search(r"stop them with: kill (\d+)", capsys.readouterr().out).group(1))
    else:  # the pool's own pid, which slurm.status shows for a queued run
        pid = int((r.submission_dir / "pool.lock").read_text())
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: {s.state for s in run_states(folder, r.submitted)} == {"cancelled"}, 60,
               "both runs cancelled (the running one killed, the queued one never started)")
    assert not any(run_folder.is_done(r.folder / run_id) for run_id in r.submitted)
    capsys.readouterr()
    assert status_main([str(r.folder), "--resubmit", "--wait"]) == 0
    out = capsys.readouterr().out
    assert "2 cancelled (of 2)" in out and "2 to submit" in out and "2 done" in out
    assert all(run_folder.is_done(r.folder / run_id) for run_id in r.submitted)


def test_a_locked_run_is_not_started_twice(tmp_path: Path) -> None:
    config = load_config({"task": "synthetic"}, ["scale=smoke"])
    run_dir = tmp_path / "sweep" / config.run_id
    job = RunJob(config.to_dict(), str(run_dir), threads=1)
    with held_by_another_process(run_dir) as pid:  # as a job running this run elsewhere would hold it
        assert run_is_locked(run_dir)
        skipped = job()
        assert skipped["status"] == "skipped" and f"'pid': {pid}" in skipped["reason"]
        assert not (run_dir / "config.json").exists()  # the trainer never started
        with try_lock_run(run_dir) as held:
            assert not held  # the same lock the trainer takes
    assert not run_is_locked(run_dir)  # released with the holder
    assert job()["status"] == "done" and run_folder.is_done(run_dir)
    # checkpoint() hands back a fresh job holding only the config and the folder
    again = job.checkpoint()
    assert again.function is not job and vars(again.function) == vars(job)


def test_force_reruns_a_done_run_from_scratch_and_keeps_the_old_folder(tmp_path: Path) -> None:
    sweep = write_sweep(tmp_path, "forced")
    results = tmp_path / "results"
    first = submit_sweep(sweep, cluster="debug", results=results, overrides=["scale=smoke"])
    (run_id,) = first.submitted
    assert submit_sweep(sweep, cluster="debug", results=results, overrides=["scale=smoke"]).submitted == []
    again = submit_sweep(sweep, cluster="debug", results=results, overrides=["scale=smoke"], force=True,
                         only=[run_id])
    assert again.submitted == [run_id] and run_folder.is_done(first.folder / run_id)
    (old,) = (first.folder / "_sweep" / "trash").iterdir()
    assert old.name.startswith(run_id) and run_folder.is_done(old)
    same = ("final_val_mse", "final_usage_fraction", "step")  # the rerun is the same pure function of its config
    assert [run_folder.read_summary(old)[k] for k in same] == [run_folder.read_summary(first.folder / run_id)[k]
                                                                 for k in same]


@pytest.mark.parametrize("damage", ["summary.json", "config.json"])
def test_a_done_run_with_a_missing_file_is_corrupt_and_resubmit_restarts_it(tmp_path: Path, damage: str,
                                                                              capsys: pytest.CaptureFixture) -> None:
    sweep = write_sweep(tmp_path, "corrupt")
    results = tmp_path / "results"
    (run_id,) = submit_sweep(sweep, cluster="debug", results=results, overrides=["scale=smoke"]).submitted
    folder = results / "corrupt"
    (folder / run_id / damage).unlink()  # DONE stays: the marker alone used to count as done
    (state,) = run_states(SweepFolder(folder), [run_id])
    assert state.state == "corrupt" and state.detail == f"DONE but no {damage}"
    capsys.readouterr()
    assert status_main([str(folder), "--resubmit", "--cluster", "debug"]) == 0
    out = capsys.readouterr().out
    assert "1 corrupt (of 1)" in out and f"{run_id} is corrupt (DONE but no {damage})" in out
    assert run_state.finished(folder / run_id) == ("done", "")
    (aside,) = (folder / "_sweep" / "trash").iterdir()  # the old folder is kept, not deleted
    assert aside.name.startswith(run_id) and (aside / "DONE").exists() and not (aside / damage).exists()


def test_a_job_never_trains_over_a_corrupt_folder(tmp_path: Path) -> None:
    config = load_config({"task": "synthetic"}, ["scale=smoke"])
    run_dir = tmp_path / "sweep" / config.run_id
    job = RunJob(config.to_dict(), str(run_dir), threads=1)
    assert job()["status"] == "done"
    (run_dir / "summary.json").write_text("{torn")
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    result = job()
    assert result["status"] == "corrupt" and "summary.json is unreadable" in result["reason"]
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before


def test_dry_run_writes_nothing_and_status_ends_quietly_in_a_pipe(tmp_path: Path) -> None:
    sweep = write_sweep(tmp_path, "piped", grid={"quantizer.diversity_gamma": [0.5, 1.0, 2.0]})
    results = tmp_path / "results"
    submit_sweep(sweep, results=results, overrides=["scale=smoke"], dry_run=True)
    assert not results.exists()  # no sweep folder, no _sweep/submit.lock
    submit_sweep(sweep, cluster="debug", results=results, overrides=["scale=smoke"])
    repo = Path(__file__).resolve().parents[2]
    out = subprocess.run(f"{shlex.quote(sys.executable)} -m slurm.status {shlex.quote(str(results / 'piped'))} | head -1",
                         shell=True, cwd=repo, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("run") and out.stderr == ""
    # a reader that has gone before the first write (| head on a long table): no BrokenPipeError
    proc = subprocess.Popen([sys.executable, "-m", "slurm.status", str(results / "piped")], cwd=repo,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    assert proc.wait(timeout=120) == 141 and b"Error" not in proc.stderr.read()
