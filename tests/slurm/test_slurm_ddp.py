"""Data-parallel runs as SLURM jobs of 2 tasks (gloo on the CPU), against the real test cluster.

A run whose resources ask for several tasks is one submitit job whose tasks are the DDP ranks
(slurm/job.py): rank 0 alone checks DONE, locks the folder and writes the events, and its verdict
is broadcast. The reference is the same config trained by 2 processes spawned here (as
tests/experiments/test_exp_distributed.py does): same world size, same threads, same gloo sums,
so summaries and metrics must agree exactly, wall time aside.

The cluster tests FAIL (never skip) when the cluster is down: `bash slurm/local-cluster.sh start`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import submitit
import torch
import torch.multiprocessing as mp
from rank_process import rank_process
from slurm_helpers import LONG, wait_attempts_ended, wait_until, write_sweep

from experiments import distributed as ddp
from experiments import files
from experiments import run_dir as run_folder
from experiments.config import Config
from experiments.distributed import free_port
from experiments.sweep import expand, load_sweep
from experiments.train import run
from slurm.job import RunJob, tasks_here, try_lock_run_for_job
from slurm.profiles import ProfileError, resolve_resources
from slurm.submit import main as submit_main
from slurm.submit import slurm_executor, submit_sweep

pytestmark = pytest.mark.slurm

WORLD = 2
DDP = {"profile": "ci", "tasks": WORLD}  # ci: cpus 1, so each rank trains on one thread
SMOKE = ["scale=smoke"]
# LONG at 800 steps: a checkpoint every 100 leaves time to interrupt mid-run, yet the two ranks
# (about 50 steps/s together on the 2-core node) finish in about 15 s.
REQUEUE = [*(o for o in LONG if not o.startswith(("schedule.steps=", "schedule.checkpoint_every="))),
           "schedule.steps=800", "schedule.checkpoint_every=100"]
REFERENCE_TIMEOUT_S = 150


def _config(sweep: Path, overrides: list[str] | None = None) -> dict[str, Any]:
    (spec,) = expand(load_sweep(sweep), overrides or [])
    return spec.config.to_dict()


@rank_process
def _reference_worker(rank: int, port: int, out: str, configs: dict[str, dict[str, Any]]) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # as the SLURM job: cpus_per_task=1 -> one torch thread per rank
    with ddp.process_group():
        for name, config in configs.items():
            run(Config.from_dict(config), Path(out) / name)



class Reference:
    """2-process DDP runs spawned in the background, so they train while the SLURM jobs do."""

    def __init__(self, out: Path, configs: dict[str, dict[str, Any]]) -> None:
        self.out = out
        self.context = mp.spawn(_reference_worker, args=(free_port(), str(out), configs), nprocs=WORLD, join=False)

    def folder(self, name: str) -> Path:
        deadline = time.monotonic() + REFERENCE_TIMEOUT_S
        while not self.context.join(timeout=1):
            if time.monotonic() > deadline:
                for process in self.context.processes:
                    process.terminate()
                pytest.fail(f"the {WORLD}-process reference runs did not finish in {REFERENCE_TIMEOUT_S} s")
        return self.out / name

    def close(self) -> None:
        for process in self.context.processes:  # a test failed before waiting for them
            if process.is_alive():
                process.terminate()
            process.join(timeout=10)


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ddp-sweeps")
    return {"smoke": write_sweep(root, "ddp_smoke", resources=DDP),
            "requeue": write_sweep(root, "ddp_requeue", overrides=REQUEUE, resources=DDP)}


@pytest.fixture(scope="module")
def reference(sweeps: dict[str, Path], tmp_path_factory: pytest.TempPathFactory,
              slurm_cluster: None) -> Iterator[Reference]:
    configs = {"smoke": _config(sweeps["smoke"], SMOKE), "requeue": _config(sweeps["requeue"])}
    ref = Reference(tmp_path_factory.mktemp("ddp-reference"), configs)
    yield ref
    ref.close()


def _rows(path: Path) -> list[dict[str, Any]]:
    """A metrics log's rows without the timing columns (they measure the machine, not the run)."""
    from experiments.train import TIMING_KEYS

    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]


def _drop_wall_time(summary: dict[str, Any] | None) -> dict[str, Any]:
    assert summary is not None
    return {k: v for k, v in summary.items() if k != "wall_time_s"}


def _events(sweep_folder: Path) -> list[tuple[Any, ...]]:
    rows = files.read_jsonl(sweep_folder / "_sweep" / "events.jsonl")
    return [(e["event"], e.get("status"), e.get("restart"), e.get("world_size")) for e in rows]


# ---------------------------------------------------------------- fast: no job is submitted

def test_tasks_reach_sbatch_as_tasks_per_node_with_cpus_per_task(tmp_path: Path) -> None:
    name, params = resolve_resources({"profile": "ci"}, overrides={"tasks": 2})
    assert name == "ci" and (params["tasks_per_node"], params["cpus_per_task"]) == (2, 1)
    executor = slurm_executor(tmp_path, params, name="t", array_parallelism=1)
    assert executor._executor._num_tasks() == 2  # submitit waits for (and returns) one result per task
    lines = executor._executor._make_submission_file_text("true", "uid").splitlines()
    for line in ("#SBATCH --ntasks-per-node=2", "#SBATCH --cpus-per-task=1", "#SBATCH --nodes=1"):
        assert line in lines, (line, lines)

    # one rank per GPU: tasks follow gpus unless given, and must then equal it
    _, gpu = resolve_resources({"profile": "gpu-example", "gpus": 4})
    assert (gpu["tasks_per_node"], gpu["gpus_per_node"], gpu["cpus_per_task"]) == (4, 4, 8)
    lines = slurm_executor(tmp_path, gpu, name="g", array_parallelism=1)._executor._make_submission_file_text(
        "true", "uid").splitlines()
    assert "#SBATCH --ntasks-per-node=4" in lines and "#SBATCH --gpus-per-node=4" in lines
    assert "tasks_per_node" not in resolve_resources({"profile": "gpu-example"})[1]  # 1 GPU: one process
    with pytest.raises(ProfileError, match="tasks=2 with gpus=4: .* tasks must equal gpus"):
        resolve_resources({"profile": "gpu-example", "gpus": 4, "tasks": 2})
    with pytest.raises(ProfileError, match="tasks=0: must be >= 1"):
        resolve_resources({"profile": "ci", "tasks": 0})
    assert tasks_here() == 1  # outside a submitit job: one process, no process group


@pytest.mark.parametrize(("cluster", "flags"), [("local", ["--tasks", "2"]), ("debug", ["--tasks", "2"]),
                                                ("local", ["--gpus", "2"])])
def test_local_and_debug_refuse_a_multi_task_run_before_writing_anything(
        tmp_path: Path, capsys: pytest.CaptureFixture, cluster: str, flags: list[str]) -> None:
    sweep = write_sweep(tmp_path, "refused")
    results = tmp_path / "results"
    assert submit_main([str(sweep), "--cluster", cluster, "--results", str(results), *flags, *SMOKE]) == 2
    err = capsys.readouterr().err
    assert f"--cluster {cluster}: each run asks for 2 processes" in err and "Use --cluster slurm" in err
    assert not results.exists()


# ---------------------------------------------------------------- the real cluster

@pytest.mark.usefixtures("slurm_cluster")
def test_a_2_task_smoke_run_through_the_cli_equals_a_2_process_ddp_run(
        tmp_path: Path, capsys: pytest.CaptureFixture, sweeps: dict[str, Path], reference: Reference,
        cancel_leftovers: list[str]) -> None:
    results = tmp_path / "results"
    # the sweep asks for ci + tasks 2; --tasks 2 on the command line is what a user would type
    code = submit_main([str(sweeps["smoke"]), "--cluster", "slurm", "--tasks", "2", "--results", str(results),
                        *SMOKE])
    records = files.read_jsonl(results / "ddp_smoke" / "_sweep" / "jobs.jsonl")
    cancel_leftovers += [r["job_id"] for r in records]
    assert code == 0, capsys.readouterr()
    assert "'tasks_per_node': 2" in capsys.readouterr().out
    (record,) = records
    run_dir = results / "ddp_smoke" / record["run_id"]
    # a deadline rather than --wait: a rank stuck in a collective would otherwise hold the test until the time limit
    wait_until(lambda: run_folder.is_done(run_dir), 120, "the 2-task smoke run DONE")
    got = run_folder.read_summary(run_dir)
    assert got is not None and got["status"] == "done" and got["step"] == 30

    # both tasks ran and returned rank 0's summary (the broadcast); one start/end pair: rank 0's
    job = submitit.SlurmJob(folder=record["folder"], job_id=record["job_id"], tasks=list(range(WORLD)))
    wait_until(job.done, 60, "both tasks' result files")
    assert job.results() == [got, got]
    assert _events(results / "ddp_smoke") == [("start", None, 0, WORLD), ("end", "done", None, None)]
    assert "rank 1/2: start" in job.task(1).stdout() and "step 30/30" in job.task(0).stdout()
    assert "step 30/30" not in job.task(1).stdout()  # rank 1 prints no progress: one writer

    want = reference.folder("smoke")
    assert _drop_wall_time(got) == _drop_wall_time(run_folder.read_summary(want))
    assert _rows(run_dir / "metrics.jsonl") == _rows(want / "metrics.jsonl")
    assert (run_dir / "histograms.jsonl").read_text() == (want / "histograms.jsonl").read_text()


@pytest.mark.usefixtures("slurm_cluster")
def test_a_2_task_run_requeued_mid_run_ends_as_an_uninterrupted_2_process_run(
        tmp_path: Path, sweeps: dict[str, Path], reference: Reference, cancel_leftovers: list[str]) -> None:
    r = submit_sweep(sweeps["requeue"], cluster="slurm", results=tmp_path / "results")
    cancel_leftovers += r.job_ids.values()
    (run_id,) = r.submitted
    run_dir = r.folder / run_id
    wait_until(lambda: (run_dir / "checkpoint.pt").exists(), 120, "the first checkpoint")
    assert not run_folder.is_done(run_dir), "the run ended before it could be interrupted: make REQUEUE longer"
    job = r.jobs[0]
    job._interrupt(timeout=True)  # USR2 to both tasks, as SLURM sends before the time limit
    wait_until(lambda: run_folder.is_done(run_dir), 180, "the requeued run DONE")

    # rank 0 requeued under the same job id; rank 1 left when its collective broke, without a failure
    wait_attempts_ended(r.folder)
    assert _events(r.folder) == [("start", None, 0, WORLD), ("end", "interrupted", None, None),
                                 ("start", None, 1, WORLD), ("end", "done", None, None)]
    assert len({e["job_id"] for e in files.read_jsonl(r.folder / "_sweep" / "events.jsonl")}) == 1
    wait_until(job.done, 60, "both tasks' result files")
    got = run_folder.read_summary(run_dir)
    assert got is not None and got["status"] == "done" and got["step"] == 800
    assert job.results() == [got, got]
    rank0, rank1 = job.task(0).stdout() or "", job.task(1).stdout() or ""
    assert "Requeued job" in rank0 and "resuming from the checkpoint of step" in rank0
    assert "rank 0 left to requeue the job after the signal; leaving too" in rank1
    assert "Traceback" not in (job.task(1).stderr() or "")

    # as if never interrupted: summary (wall time aside), metrics rows re-written from the checkpoint on
    want = reference.folder("requeue")
    assert _drop_wall_time(got) == _drop_wall_time(run_folder.read_summary(want))
    assert _rows(run_dir / "metrics.jsonl") == _rows(want / "metrics.jsonl")


@pytest.mark.usefixtures("slurm_cluster")
def test_a_2_task_job_of_a_run_locked_elsewhere_returns_skipped_on_both_ranks(
        tmp_path: Path, sweeps: dict[str, Path], cancel_leftovers: list[str]) -> None:
    (spec,) = expand(load_sweep(sweeps["smoke"]), SMOKE)
    run_dir = tmp_path / "ddp_smoke" / spec.run_id
    _, params = resolve_resources({"profile": "ci", "tasks": WORLD})
    executor = slurm_executor(tmp_path / "submitit", params, name="locked")
    # slurm.submit would not submit a locked run (it shows as running): the job is submitted directly
    with try_lock_run_for_job(run_dir) as held:
        assert held
        job = executor.submit(RunJob(spec.config.to_dict(), str(run_dir), 1))
        cancel_leftovers.append(job.job_id)
        # rank 0's verdict is broadcast: without it rank 1 would train alone and wait in DDP forever
        wait_until(job.done, 90, "both tasks to return")
    results = job.results()
    assert [r["status"] for r in results] == ["skipped", "skipped"] and results[0] == results[1]
    assert f"'pid': {os.getpid()}" in results[0]["reason"]  # the holder: this test process
    assert not (run_dir / "config.json").exists() and not (tmp_path / "_sweep" / "events.jsonl").exists()
