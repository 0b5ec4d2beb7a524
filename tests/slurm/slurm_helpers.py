"""Helpers of the slurm tests: small sweep files, waiting with a deadline, the cluster check."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

START_HINT = "run `bash slurm/local-cluster.sh install && bash slurm/local-cluster.sh start` (as root) first"

# A synthetic run long enough (thousands of steps, checkpoints every 200) to be interrupted mid-way,
# yet small: about 10-25 s on one busy CPU core. scale=smoke would cap it at 30 steps.
LONG = ["schedule.steps=2000", "schedule.checkpoint_every=200", "schedule.val_every=500", "data.batch_size=64",
        "model.hidden_dim=64", "data.val_size=256", "logging.print_every=500"]


def write_sweep(tmp_path: Path, name: str, /, *, grid: dict[str, list[Any]] | None = None,
                seeds: Sequence[int] = (0,), overrides: Sequence[str] = (), resources: dict[str, Any] | None = None,
                **extra: Any) -> Path:
    spec: dict[str, Any] = {"name": name, "base": {"task": "synthetic"}, "seeds": list(seeds),
                            "resources": resources or {"profile": "ci"}, **extra}
    if grid:
        spec["grid"] = grid
    if overrides:
        spec["overrides"] = list(overrides)
    path = tmp_path / f"{name.replace('/', '_')}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.5) -> float:
    """Seconds it took; fails the test with ``what`` after ``timeout_s``."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for: {what}")
        time.sleep(poll_s)
    return time.monotonic() - start


def wait_attempts_ended(*sweep_folders: Path, timeout_s: float = 60) -> list[dict[str, Any]]:
    """The sweeps' job events once every recorded start has its end; fails the test after ``timeout_s``.

    A job writes a run's DONE marker and only then, on its way out, the attempt's ``end`` event: a test
    that sees DONE and reads events.jsonl at once can find the last attempt unfinished.
    """
    from experiments import files

    events: list[dict[str, Any]] = []

    def ended() -> bool:
        events[:] = [e for f in sweep_folders for e in files.read_jsonl(Path(f) / "_sweep" / "events.jsonl")]
        starts = {(e["run_id"], e["pid"]) for e in events if e["event"] == "start"}
        ends = {(e["run_id"], e["pid"]) for e in events if e["event"] == "end"}
        return bool(starts) and starts <= ends

    wait_until(ended, timeout_s, "an end event for every attempt's start in events.jsonl")
    return events


def cluster_problem() -> str | None:
    """Why the SLURM test cluster cannot be used, or None when it is up with accounting."""
    if shutil.which("sbatch") is None or shutil.which("srun") is None:
        return "SLURM is not installed (no sbatch/srun on PATH)"
    try:
        node = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
        acct = subprocess.run(["sacct", "-n", "-X", "-S", "now"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as e:
        return f"the SLURM cluster does not answer ({e})"
    states = node.stdout.split()
    if node.returncode != 0 or not states or not any(s.rstrip("*") in ("idle", "mixed", "allocated", "completing")
                                                     for s in states):
        return f"the SLURM cluster is not up (sinfo: {node.stdout.strip() or node.stderr.strip()!r})"
    if acct.returncode != 0:
        return f"SLURM accounting (slurmdbd) is off: {acct.stderr.strip()!r}"
    return None


def scancel(job_ids: Sequence[str]) -> None:
    if job_ids:
        subprocess.run(["scancel", *job_ids], capture_output=True, timeout=30)


def sacct_state(job_id: str) -> str:
    out = subprocess.run(["sacct", "-n", "-P", "-X", "-o", "State", "-j", job_id],
                         capture_output=True, text=True, timeout=30).stdout.split()
    return out[-1] if out else ""


@contextlib.contextmanager
def held_by_another_process(run_dir: Path) -> Iterator[int]:
    """The run's lock held by a child process (the lock is re-entrant within one process); yields its pid."""
    code = ("import sys\nfrom experiments.run_lock import try_lock_run\n"
            "with try_lock_run(sys.argv[1]) as held:\n    print(held, flush=True)\n    sys.stdin.read()\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2])
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "True"
        yield proc.pid
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=30)
