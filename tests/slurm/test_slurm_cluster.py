"""The SLURM path against a real slurmctld (slurm/local-cluster.sh), with real smoke training runs.

These FAIL (never skip) when the cluster is down: start it with `bash slurm/local-cluster.sh start`.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
from slurm_helpers import LONG, sacct_state, wait_attempts_ended, wait_until, write_sweep

from experiments import files
from experiments import run_dir as run_folder
from experiments.sweep import expand, load_sweep
from slurm import submit as submit_module
from slurm.state import SweepFolder, run_states
from slurm.status import main as status_main
from slurm.submit import main as submit_main
from slurm.submit import max_array_size, submit_sweep

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]


def _states(result: submit_module.SubmitResult) -> dict[str, str]:
    return {s.run_id: s.state for s in run_states(SweepFolder(result.folder), result.submitted)}


def test_smoke_sweep_completes_and_a_second_submit_submits_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cancel_leftovers: list[str]) -> None:
    assert max_array_size() == 1001  # read from `scontrol show config`
    # pretend MaxArraySize is 3, so the 4 runs must go out as two arrays (3 + 1) sharing the cap of 2
    monkeypatch.setattr(submit_module, "max_array_size", lambda: 3)
    sweep = write_sweep(tmp_path, "grid2x2", grid={"quantizer.diversity_gamma": [0.5, 2.0]}, seeds=[0, 1])
    results = tmp_path / "results"
    first = submit_sweep(sweep, cluster="slurm", results=results, overrides=["scale=smoke"])
    cancel_leftovers += first.job_ids.values()
    assert len(first.submitted) == 4 and len({j.split("_")[0] for j in first.job_ids.values()}) == 2
    in_flight = submit_sweep(sweep, cluster="slurm", results=results, overrides=["scale=smoke"])
    assert in_flight.submitted == [] and sorted(in_flight.in_flight) == sorted(first.submitted)
    wait_until(lambda: set(_states(first).values()) == {"done"}, 150, "4 smoke runs DONE on SLURM")
    for run_id in first.submitted:
        assert run_folder.is_done(first.folder / run_id)
        assert run_folder.read_summary(first.folder / run_id)["status"] == "done"
        job_id = first.job_ids[run_id]  # DONE is written a moment before the job itself ends
        wait_until(lambda job_id=job_id: sacct_state(job_id) == "COMPLETED", 60, f"job {job_id} COMPLETED")
    again = submit_sweep(sweep, cluster="slurm", results=results, overrides=["scale=smoke"])
    assert again.submitted == [] and sorted(again.done) == sorted(first.submitted)
    records = files.read_jsonl(first.folder / "_sweep" / "jobs.jsonl")
    assert len(records) == 4 and {r["run_id"] for r in records} == set(first.submitted)


def test_a_timeout_signal_requeues_and_the_run_ends_as_if_never_interrupted(
        tmp_path: Path, cancel_leftovers: list[str]) -> None:
    sweep = write_sweep(tmp_path, "requeue", overrides=LONG)
    interrupted = submit_sweep(sweep, cluster="slurm", results=tmp_path / "interrupted")
    reference = submit_sweep(sweep, cluster="slurm", results=tmp_path / "reference")  # runs alongside, untouched
    cancel_leftovers += [*interrupted.job_ids.values(), *reference.job_ids.values()]
    (run_id,) = interrupted.submitted
    run_dir = interrupted.folder / run_id
    wait_until(lambda: (run_dir / "checkpoint.pt").exists(), 120, "the first checkpoint")
    assert not run_folder.is_done(run_dir), "the run ended before it could be interrupted: make LONG longer"
    interrupted.jobs[0]._interrupt(timeout=True)  # USR2, as SLURM sends before the time limit
    wait_until(lambda: run_folder.is_done(run_dir) and run_folder.is_done(reference.folder / run_id), 240,
               "both runs DONE")
    events = wait_attempts_ended(interrupted.folder)
    assert [(e["event"], e.get("status"), e.get("restart")) for e in events] == [
        ("start", None, 0), ("end", "interrupted", None), ("start", None, 1), ("end", "done", None)]
    assert len({e["job_id"] for e in events}) == 1  # requeued under the same job id
    log = next(interrupted.submission_dir.rglob("*_log.out")).read_text()
    assert "Requeued job" in log and "timed-out" in log
    got = run_folder.read_summary(run_dir)
    want = run_folder.read_summary(reference.folder / run_id)
    assert got is not None and want is not None and got["status"] == "done" and got["step"] == 2000
    drop = ("wall_time_s",)
    assert {k: v for k, v in got.items() if k not in drop} == {k: v for k, v in want.items() if k not in drop}


def test_a_cancelled_run_shows_as_cancelled_and_resubmit_completes_it(
        tmp_path: Path, capsys: pytest.CaptureFixture, cancel_leftovers: list[str]) -> None:
    sweep = write_sweep(tmp_path, "cancel", overrides=LONG, seeds=[1])
    r = submit_sweep(sweep, cluster="slurm", results=tmp_path / "results")
    cancel_leftovers += r.job_ids.values()
    (run_id,) = r.submitted
    wait_until(lambda: _states(r)[run_id] == "running", 120, "the run to start")
    subprocess.run(["scancel", r.job_ids[run_id]], check=True)
    wait_until(lambda: _states(r)[run_id] == "cancelled", 60, "status 'cancelled' after scancel")
    capsys.readouterr()
    assert status_main([str(r.folder)]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith(run_id))
    assert row.split()[1] == "cancelled" and "CANCELLED" in row
    assert status_main([str(r.folder), "--resubmit", "--cluster", "slurm"]) == 0
    out = capsys.readouterr().out
    assert "1 to submit" in out
    records = files.read_jsonl(r.folder / "_sweep" / "jobs.jsonl")
    assert len(records) == 2 and records[1]["job_id"] != records[0]["job_id"]
    cancel_leftovers.append(records[1]["job_id"])
    wait_until(lambda: run_folder.is_done(r.folder / run_id), 180, "the resubmitted run DONE")
    assert run_folder.read_summary(r.folder / run_id)["step"] == 2000
    assert status_main([str(r.folder), "--resubmit", "--cluster", "slurm"]) == 0
    assert "nothing to resubmit" in capsys.readouterr().out


def test_a_crashed_job_shows_as_failed_with_the_end_of_its_error(
        tmp_path: Path, capsys: pytest.CaptureFixture, cancel_leftovers: list[str]) -> None:
    sweep = write_sweep(tmp_path, "crash")
    results = tmp_path / "results"
    (run_id,) = [r.run_id for r in expand(load_sweep(sweep), ["scale=smoke"])]
    # a folder that holds another run: the trainer refuses it and raises, so the job itself fails
    (results / "crash" / run_id).mkdir(parents=True)
    (results / "crash" / run_id / "config.json").write_text('{"run_id": "someone-else"}')
    r = submit_sweep(sweep, cluster="slurm", results=results, overrides=["scale=smoke"])
    cancel_leftovers += r.job_ids.values()
    wait_until(lambda: _states(r)[run_id] == "failed", 120, "the crashed run to show as failed")
    capsys.readouterr()
    assert status_main([str(r.folder)]) == 0
    out = capsys.readouterr().out
    assert "job FAILED, run not done" in out
    assert "ConfigError" in out and "holds run 'someone-else'" in out  # from the job's stderr log


@pytest.mark.parametrize(("flag", "value", "message", "asked"), [
    ("--mem", "100000", "Requested node configuration is not available", "'mem_gb': 100000.0"),
    # refused at submit because local-cluster.sh sets EnforcePartLimits=ALL; without it SLURM would
    # queue the job forever and slurm.status would show it PENDING (PartitionConfig)
    ("--cpus", "512", "More processors requested than permitted", "'cpus_per_task': 512"),
])
def test_a_request_larger_than_the_node_fails_at_submit(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                        flag: str, value: str, message: str, asked: str) -> None:
    sweep = write_sweep(tmp_path, "huge")
    results = tmp_path / "results"
    assert submit_main([str(sweep), "--cluster", "slurm", "--results", str(results), flag, value,
                        "scale=smoke"]) == 2
    err = capsys.readouterr().err
    assert message in err and asked in err and "lower the request" in err
    assert not (results / "huge" / "_sweep" / "jobs.jsonl").exists()


def test_images_runs_with_dataloader_workers_read_cancelled_after_scancel_and_requeue_after_the_signal(
        tmp_path: Path, cancel_leftovers: list[str]) -> None:
    # scancel and SLURM's requeue signal reach every process of the job, DataLoader workers (forked,
    # with submitit's handlers) included: a worker must neither die of SIGTERM (the run would read
    # "failed") nor run submitit's USR2 handler itself. Seed 0 is cancelled, seed 1 interrupted.
    from PIL import Image

    data = tmp_path / "images"
    data.mkdir()
    for i in range(16):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(data / f"{i}.png")
    sweep = write_sweep(tmp_path, "workers", seeds=[0, 1], base={"task": "images"}, overrides=[
        f"data.root={data}", "data.resolution=32", "data.batch_size=4", "data.val_fraction=0.25",
        "runtime.num_workers=2", "runtime.device=cpu", "schedule.steps=1500", "schedule.checkpoint_every=50",
        "schedule.val_every=1500", "logging.print_every=500", "logging.histogram_every=1500"])
    r = submit_sweep(sweep, cluster="slurm", results=tmp_path / "results")
    cancel_leftovers += r.job_ids.values()
    cancelled, interrupted = r.submitted
    wait_until(lambda: all((r.folder / run_id / "checkpoint.pt").exists() for run_id in r.submitted), 120,
               "both runs' first checkpoint")
    assert not any(run_folder.is_done(r.folder / run_id) for run_id in r.submitted), "make the runs longer"
    subprocess.run(["scancel", r.job_ids[cancelled]], check=True)
    r.jobs[1]._interrupt(timeout=True)  # USR2, as SLURM sends before the time limit
    try:
        wait_until(lambda: _states(r)[cancelled] == "cancelled", 90, "status 'cancelled' after scancel")
    except AssertionError as e:  # say what status saw instead, and which processes were left
        (state,) = [s for s in run_states(SweepFolder(r.folder), [cancelled])]
        left = subprocess.run(["ps", "-eo", "pid,ppid,stat,etime,args"], capture_output=True, text=True).stdout
        raise AssertionError(f"{e}; status: {state.state} ({state.detail}); processes:\n"
                             + "\n".join(line for line in left.splitlines() if "python" in line)) from None
    summary = run_folder.read_summary(r.folder / cancelled)
    assert summary is None or summary.get("status") != "failed", summary
    wait_until(lambda: run_folder.is_done(r.folder / interrupted), 240, "the interrupted run DONE after its requeue")

    def attempts() -> list[tuple[str, str | None, int | None]]:  # the cancelled run's last attempt has no end
        return [(e["event"], e.get("status"), e.get("restart")) for e in SweepFolder(r.folder).events()
                if e["run_id"] == interrupted]

    wait_until(lambda: len(attempts()) == 4, 60, "the end event of the requeued attempt")
    assert attempts() == [
        ("start", None, 0), ("end", "interrupted", None), ("start", None, 1), ("end", "done", None)]
    assert run_folder.read_summary(r.folder / interrupted)["step"] == 1500
