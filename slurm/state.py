"""Where a sweep stands: the records in its folder's ``_sweep/`` and each run's state, from the run
folder first and the scheduler (squeue and sacct, the local pool's lock) second; the sweep folder's
layout is in docs/run_folder.md ("The sweep folder").
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from submitit.core.utils import JobPaths
from submitit.slurm.slurm import read_job_id

from common import run_state
from common.run_state import RUN_STATES
from experiments.files import atomic_write_json, read_json, read_jsonl
from experiments.run_dir import read_summary
from experiments.run_lock import read_lock_holder, run_is_locked
from slurm.job import EVENTS_NAME, SWEEP_META
from slurm.local import pool_alive

# The words only the scheduler (SLURM, the local pool) or a live run lock can say; everything else a
# run's state says comes from its folder (common.run_state.RUN_STATES, common.run_state.finished).
SCHEDULER_STATES = {
    "pending": "queued: SLURM has not started it, it was just submitted, or it waits in the local pool",
    "running": "a live process holds the run's lock, or SLURM says it runs",
    "cancelled": "stopped from outside before it ended: scancel, a stopped local pool, a signal",
}
# The folder's words a sweep shows as they are. corrupt: DONE but its summary or config is missing or
# unreadable; a resubmission sets its folder aside first (slurm.submit), so nothing is lost.
FOLDER_STATES = tuple(s for s in RUN_STATES if s != "started")
# The folder's "started" (a config.json and no end yet) is never shown: the scheduler says which of
# these it is (see _classify).
STARTED_BECOMES = {
    "running": "its lock is held, or SLURM runs it",
    "pending": "SLURM has it queued (or it was submitted under a minute ago), or the local pool is alive",
    "cancelled": "SLURM cancelled it, the local pool ended before it, or a signal killed it",
    "failed": "its job ended (or its scheduler forgot it) without DONE",
    "missing": "this sweep folder never submitted it",
}
_SHOWN_IN = ("pending", "running", "done", "failed", "cancelled", "corrupt", "missing")  # the order of tables
STATES = tuple(sorted((*SCHEDULER_STATES, *FOLDER_STATES), key=_SHOWN_IN.index))
RESUBMITTABLE = ("failed", "cancelled", "corrupt", "missing")
SLURM_PENDING = {"PENDING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "RESIZING", "SUSPENDED", "CONFIGURING"}
SLURM_RUNNING = {"RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING"}
SLURM_CANCELLED = {"CANCELLED", "REVOKED"}
Log = Callable[[str], None]
JUST_SUBMITTED_S = 60  # a job younger than this that no scheduler command lists yet is still in flight


@dataclass(frozen=True)
class SweepFolder:
    root: Path  # results/<sweep>

    @property
    def meta(self) -> Path:
        return self.root / SWEEP_META

    @property
    def runs_json(self) -> Path:
        return self.meta / "runs.json"

    @property
    def jobs_jsonl(self) -> Path:
        return self.meta / "jobs.jsonl"

    @property
    def events_jsonl(self) -> Path:
        return self.meta / EVENTS_NAME

    @property
    def submissions(self) -> Path:
        return self.meta / "submissions"

    def read_runs(self) -> dict[str, dict[str, Any]]:
        return read_json(self.runs_json) or {}

    @property
    def sweep_json(self) -> Path:
        return self.meta / "sweep.json"

    def add_runs(self, runs: dict[str, dict[str, Any]], sweep: dict[str, Any]) -> None:
        """Remember the runs (and the sweep's resources) so status and --resubmit work from the folder alone."""
        # callers serialise submissions per sweep (slurm.submit takes the sweep lock)
        atomic_write_json(self.runs_json, {**self.read_runs(), **runs})
        atomic_write_json(self.sweep_json, sweep)

    def read_sweep(self) -> dict[str, Any]:
        return read_json(self.sweep_json) or {}

    def latest_jobs(self) -> dict[str, dict[str, Any]]:
        """The last submission record of each run."""
        return {r["run_id"]: r for r in read_jsonl(self.jobs_jsonl) if "run_id" in r}

    def events(self) -> list[dict[str, Any]]:
        return read_jsonl(self.events_jsonl)


@dataclass(frozen=True)
class RunState:
    run_id: str
    state: str  # one of STATES
    cluster: str = ""
    job_id: str = ""
    detail: str = ""  # scheduler state, lock holder, step reached, or the last lines of an error


def scheduler_states(job_ids: Iterable[str]) -> dict[str, str]:
    """SLURM state of each job (array task ids like '12_3' included); jobs it does not know are absent.

    sacct knows finished jobs (with accounting on); squeue knows queued and running ones at once.
    """
    ids = sorted({j.split("_")[0] for j in job_ids if j})
    if not ids:
        return {}
    states: dict[str, str] = {}
    commands = (["sacct", "-n", "-P", "-X", "-o", "JobID,State", "-j", ",".join(ids)],
                # not -j: squeue fails outright when one of the ids has already left the queue
                ["squeue", "-h", "-r", "--me", "-o", "%i|%T|%r"])
    # both: slurmdbd learns of a new job a little after slurmctld (squeue) does, and squeue forgets it
    # soon after it ends; for jobs both know, squeue (the controller) is the fresher
    for command in commands:
        try:
            out = subprocess.run(command, capture_output=True, text=True, timeout=30, check=True).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        for line in out.splitlines():
            job, _, state = line.strip().partition("|")
            state, _, reason = state.partition("|")
            if not job or "." in job or job.split("_")[0] not in ids:
                continue
            state = state.split()[0] if state.strip() else "UNKNOWN"  # "CANCELLED by 0" -> CANCELLED
            if reason and reason != "None":  # why it waits, e.g. PartitionConfig: no node can ever run it
                state = f"{state} ({reason})"
            for parts in read_job_id(job):  # expands pending array ranges like 12_[3-5%2]
                if len(parts) == 1:
                    states[parts[0]] = state
                else:
                    first = int(parts[1])
                    last = int(parts[2]) if len(parts) > 2 else first
                    for k in range(first, last + 1):
                        states[f"{parts[0]}_{k}"] = state
    return states


def tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    # submitit's own log lines and traceback carets are not the error; keep the lines that are
    kept = [t for t in text if t.strip(" ^~") and "submitit" not in t.split(" - ")[0]]
    return "\n".join(kept[-lines:])


def _error_tail(record: dict[str, Any], exit_event: dict[str, Any] | None) -> str:
    if exit_event and exit_event.get("log"):
        return tail(Path(exit_event["log"]))
    folder = record.get("folder")
    if folder and record.get("job_id"):
        return tail(JobPaths(folder, job_id=record["job_id"], task_id=0).stderr)
    return ""


def latest_rate(run_dir: Path, tail_bytes: int = 65536, max_bytes: int = 16 * 2**20) -> str:
    """'step 400, 3.2 steps/s; ' from the last training row that carries a step time; '' when
    there is none yet. Read from the end in windows that double from ``tail_bytes`` up to
    ``max_bytes`` (a long run's metrics.jsonl can be large, and the monitor's rows between two
    training rows can fill more than one window: 50 steps of 17 bits' diagnostics are ~70 KB)."""
    path = run_dir / run_state.METRICS
    window = tail_bytes
    try:
        with path.open("rb") as f:
            size = path.stat().st_size
            while True:
                f.seek(max(0, size - window))
                lines = f.read(window).decode("utf-8", errors="replace").splitlines()
                for line in reversed(lines):
                    if '"kind": "train"' not in line or "step_time_s" not in line:
                        continue
                    try:
                        row = json.loads(line)
                        return f"step {row['step']}, {1 / row['step_time_s']:.3g} steps/s; "
                    except (ValueError, KeyError, TypeError, ZeroDivisionError):
                        continue
                if window >= size or window >= max_bytes:
                    return ""
                window *= 2
    except OSError:
        return ""


def _progress(run_dir: Path) -> str:
    config = read_json(run_dir / run_state.CONFIG)
    if config is None:
        return ""
    return "started; resumes from its checkpoint" if (run_dir / run_state.CHECKPOINT).exists() else "started"


def run_states(folder: SweepFolder, run_ids: Iterable[str] | None = None) -> list[RunState]:
    """The state of each run (of ``run_ids``, or every run the sweep folder knows)."""
    runs = folder.read_runs()
    ids = list(run_ids) if run_ids is not None else list(runs)
    jobs = folder.latest_jobs()
    exits = {e["run_id"]: e for e in folder.events() if e.get("event") == "exit"}
    slurm_ids = [jobs[r]["job_id"] for r in ids if r in jobs and jobs[r].get("cluster") == "slurm"]
    sched = scheduler_states(slurm_ids)
    out: list[RunState] = []
    for run_id in ids:
        run_dir = folder.root / run_id
        summary = read_summary(run_dir) or {}
        rec = jobs.get(run_id, {})
        job_id = str(rec.get("job_id", ""))
        name, detail = _classify(run_dir, summary, rec, sched.get(job_id, ""), exits.get(run_id))
        out.append(RunState(run_id, name, rec.get("cluster", ""), job_id, detail))
    return out


def _classify(run_dir: Path, summary: dict[str, Any], rec: dict[str, Any], sched: str,
              exit_event: dict[str, Any] | None) -> tuple[str, str]:
    """(state, detail) of one run; the folder first, the scheduler second (``sched``: 'PENDING (Reason)')."""
    code = sched.split(" ")[0]
    failed_reason = ""
    if summary.get("status") == "failed":  # the trainer's reason, then its traceback's last lines
        failed_reason = "\n".join(x for x in (str(summary.get("reason", "")).strip(),
                                               str(summary.get("error", "")).strip()) if x)
    folder_state, why = run_state.finished(run_dir)
    if folder_state == "done":
        alarms = summary.get("alarms") or []  # the monitor's collapse alarms (lfq.alarms)
        more = f"; {summary.get('alarm_count', len(alarms))} alarm(s), first: {alarms[0]}" if alarms else ""
        return ("done", f"step {summary.get('step', '?')}{more}")
    if run_is_locked(run_dir):
        holder = read_lock_holder(run_dir)
        return ("running", f"{latest_rate(run_dir)}pid {holder.get('pid')} on {holder.get('host')}")
    cluster = rec.get("cluster", "")
    # a resubmitted run waits in the queue with its old failed summary: the queue wins
    if cluster == "slurm" and code in SLURM_PENDING | SLURM_RUNNING:
        return ("pending" if code in SLURM_PENDING else "running", sched)
    if cluster == "slurm" and not code and time.time() - rec.get("time", 0) < JUST_SUBMITTED_S:
        return ("pending", "just submitted")
    local_exited = bool(exit_event) and exit_event.get("time", 0) >= rec.get("time", 0)
    if cluster == "local" and not local_exited and (
            pool_alive(Path(rec.get("pool_lock", "/nonexistent")))
            or _controller_alive(rec.get("job_id", ""), rec.get("time", 0))):
        return ("pending", f"waiting in the local pool (pid {_read_pid(rec.get('pool_lock', ''))})")
    if folder_state == "corrupt":
        return ("corrupt", why)
    if failed_reason:
        return ("failed", failed_reason)
    # What is left is a folder that says "started" (or "missing", or "failed" without a reason) and a job
    # that is neither queued nor running: its record says which of STARTED_BECOMES it is.
    if not rec:
        return ("missing", _progress(run_dir) or "never submitted")
    if cluster == "slurm":
        if code in SLURM_CANCELLED:
            return ("cancelled", sched)
        why = f"job {sched}" if sched else "job unknown to the scheduler"
        err = _error_tail(rec, None)
        return ("failed", f"{why}, run not done" + (f"\n{err}" if err else ""))
    if cluster == "local":
        if not local_exited:
            return ("cancelled", "local pool ended before the run started")
        exitcode = exit_event.get("exitcode") if exit_event else None
        if isinstance(exitcode, int) and exitcode < 0:
            return ("cancelled", f"killed by signal {-exitcode}")
        err = _error_tail(rec, exit_event)
        return ("failed", f"exit code {exitcode}" + (f"\n{err}" if err else ""))
    return ("failed", "in-process run ended without DONE")  # debug: what it left is all there is


def _read_pid(path: str) -> str:
    try:
        return Path(path).read_text().strip() or "?"
    except OSError:
        return "?"


def _controller_alive(pid: str, submitted_at: float) -> bool:
    """submitit's local controller, in the second before its pool takes the pool lock.

    Alive = the pid exists, is not a zombie, and started when the job was submitted (so a reused
    pid does not count). Not the command line: it reads empty for a moment right after exec.
    """
    try:
        stat = Path(f"/proc/{int(pid)}/stat").read_text()
        btime = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                     if line.startswith("btime "))
    except (OSError, ValueError, StopIteration):
        return False
    fields = stat.rsplit(")", 1)[1].split()  # after "(comm)", which may hold spaces
    state, start_ticks = fields[0], int(fields[19])
    started = btime + start_ticks / os.sysconf("SC_CLK_TCK")
    return state not in ("Z", "X") and abs(started - submitted_at) < 120


def in_flight(states: Iterable[RunState]) -> set[str]:
    return {s.run_id for s in states if s.state in ("pending", "running")}


def summarise(states: Iterable[RunState]) -> dict[str, int]:
    counts = dict.fromkeys(STATES, 0)
    for s in states:
        counts[s.state] += 1
    return counts


def wait_for(folder: SweepFolder, run_ids: Sequence[str], poll_s: float = 5.0, timeout_s: float | None = None,
             log: Log = print) -> dict[str, int]:
    """Poll until none of ``run_ids`` is pending or running; returns the final state counts."""
    start, last = time.monotonic(), ""
    try:
        return _wait(folder, run_ids, poll_s, timeout_s, log, start, last)
    except KeyboardInterrupt:
        # local pools ignore Ctrl-C and SLURM jobs never see it: only the waiting stops
        log(f"[wait] stopped waiting; the runs go on. Follow: python -m slurm.status {folder.root}  "
            f"(a local sweep stops with the `kill <pid>` that submit printed)")
        raise SystemExit(130) from None


def _wait(folder: SweepFolder, run_ids: Sequence[str], poll_s: float, timeout_s: float | None, log: Log,
          start: float, last: str) -> dict[str, int]:
    while True:
        counts = summarise(run_states(folder, run_ids))
        line = ", ".join(f"{counts[k]} {k}" for k in STATES if counts[k])
        if line != last:
            log(f"[wait] {time.strftime('%H:%M:%S')} {folder.root.name}: {line}")
            last = line
        if counts["pending"] + counts["running"] == 0:
            return counts
        if timeout_s is not None and time.monotonic() - start > timeout_s:
            raise TimeoutError(f"sweep {folder.root} still has {counts['pending']} pending and "
                               f"{counts['running']} running runs after {timeout_s:.0f} s")
        time.sleep(poll_s)
