"""``--cluster local``: one submitit local job per submission, running a throttled pool of runs
(:class:`LocalPool`) that shares the machine's CPUs with other pools through machine-wide slot
locks; docs/slurm.md ("The local pool") gives the limits and how to stop it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

import submitit

from experiments.files import append_jsonl
from experiments.run_lock import lock_is_held
from slurm.job import EVENTS_NAME, SWEEP_META


def machine_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def slots_dir() -> Path:
    return Path(os.environ.get("LFQ_LOCAL_SLOTS", f"/tmp/lfq-suite-cpu-slots-{os.getuid()}"))


def machine_mem_gb() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def pool_size(n_runs: int, cpus_per_run: int, array_parallelism: int | None, mem_gb: float | None = None) -> int:
    """How many runs one local submission runs at once: as many as the CPUs (and memory) take."""
    fit = max(1, machine_cpus() // max(1, cpus_per_run))
    if mem_gb:
        fit = max(1, min(fit, int(machine_mem_gb() // mem_gb)))
    return max(1, min(n_runs, fit, array_parallelism or fit))


@contextlib.contextmanager
def cpu_slots(n: int, poll_s: float = 0.5) -> Iterator[list[int]]:
    """Hold ``n`` of the machine's CPU slots (blocking until they are free); yields their indices."""
    total = machine_cpus()
    n = min(n, total)  # submit refuses larger requests; this only guards direct use
    folder = slots_dir()
    folder.mkdir(parents=True, exist_ok=True)
    while True:
        held: list[tuple[int, IO[str]]] = []
        for i in random.sample(range(total), total):  # random order: fewer collisions between pools
            handle = open(folder / f"cpu-{i}.lock", "a+")  # noqa: SIM115 - kept open while held
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            held.append((i, handle))
            if len(held) == n:
                break
        if len(held) == n:
            try:
                yield sorted(i for i, _ in held)
            finally:
                for _, handle in held:
                    handle.close()
            return
        for _, handle in held:  # all or nothing: never sit on a partial set
            handle.close()
        time.sleep(poll_s * (0.5 + random.random()))


class LocalPool(submitit.helpers.Checkpointable):
    """Runs the given runs, ``workers`` at a time, each in a subprocess holding its CPU slots."""

    def __init__(self, runs: Sequence[tuple[dict[str, Any], str]], workers: int, cpus_per_run: int,
                 log_dir: str, pool_lock: str) -> None:
        self.runs = list(runs)
        self.workers = workers
        self.cpus_per_run = cpus_per_run
        self.log_dir = str(log_dir)
        self.pool_lock = str(pool_lock)

    def _run_one(self, index: int, config: dict[str, Any], run_dir: str) -> int:
        run_id = Path(run_dir).name
        log_path = Path(self.log_dir) / f"{run_id}.log"
        code = -signal.SIGTERM  # what a run reports that never started because the pool was stopped
        with cpu_slots(self.cpus_per_run) as slots:
            proc = self._start(index, config, run_dir, log_path, slots)
            if proc is not None:
                code = proc.wait()
                with self._lock:
                    self._live.discard(proc)
        # a negative code is a signal: the run was killed from outside (status shows it as cancelled)
        append_jsonl(Path(run_dir).parent / SWEEP_META / EVENTS_NAME,
                     [{"run_id": run_id, "event": "exit", "exitcode": code, "time": time.time(), "log": str(log_path)}],
                     sort_keys=True)
        print(f"[pool] end {run_id}: exit code {code} (log {log_path})", flush=True)
        return code

    def _start(self, index: int, config: dict[str, Any], run_dir: str, log_path: Path,
               slots: list[int]) -> subprocess.Popen[bytes] | None:
        with self._lock:  # under the lock, so that _stop never misses a run that is just starting
            if self._stopping:
                return None
            print(f"[pool] start {Path(run_dir).name} ({index + 1}/{len(self.runs)}) on cpu slots {slots}", flush=True)
            with open(log_path, "ab") as log:  # the child keeps its own descriptor
                proc = subprocess.Popen([sys.executable, "-u", "-m", "slurm.job"], stdin=subprocess.PIPE,
                                        stdout=log, stderr=subprocess.STDOUT)
            assert proc.stdin is not None
            proc.stdin.write(json.dumps({"config": config, "run_dir": run_dir, "threads": self.cpus_per_run}).encode())
            proc.stdin.close()
            self._live.add(proc)
            return proc

    def _stop(self, signum: int, frame: Any) -> None:
        """SIGTERM (``kill <pool pid>``): stop the runs in progress and start no more."""
        with self._lock:
            self._stopping = True
            for proc in self._live:
                proc.terminate()
        print(f"[pool] got signal {signum}: stopping {len(self._live)} run(s); resubmit to resume", flush=True)

    def _watch_job(self, pid: int, poll_s: float = 0.5) -> None:
        """Stop the pool (as SIGTERM does) once the submitit job's process ``pid`` has ended.

        ``kill <job pid>`` kills submitit's ``sh`` wrapper, which passes no signal on to its children."""
        born = process_start(pid)
        while born is not None and not self._stopping:
            time.sleep(poll_s)
            if process_start(pid) != born:  # gone, a zombie, or the pid reused by another process
                print(f"[pool] job process {pid} ended (killed?)", flush=True)
                self._stop(signal.SIGTERM, None)
                return

    def __call__(self) -> dict[str, int]:
        Path(self.log_dir).mkdir(parents=True, exist_ok=True)
        # held for the pool's lifetime: slurm.status reads "pool alive" from it, without pids
        with open(self.pool_lock, "a+") as alive:
            fcntl.flock(alive, fcntl.LOCK_EX)
            alive.truncate(0)
            alive.write(str(os.getpid()))  # `kill <this pid>` stops the sweep cleanly (see _stop)
            alive.flush()
            print(f"[pool] pid {os.getpid()}: {len(self.runs)} runs, {self.workers} at a time, "
                  f"{self.cpus_per_run} cpu(s) each; stop them with: kill {os.getpid()}", flush=True)
            self._lock: threading.Lock = threading.Lock()
            self._live: set[subprocess.Popen[bytes]] = set()
            self._stopping = False
            signal.signal(signal.SIGTERM, self._stop)
            job_pid = os.environ.get("SUBMITIT_LOCAL_JOB_ID", "")
            if job_pid.isdigit() and int(job_pid) != os.getpid():
                threading.Thread(target=self._watch_job, args=(int(job_pid),), daemon=True).start()
            with ThreadPoolExecutor(self.workers) as pool:
                futures = {Path(d).name: pool.submit(self._run_one, i, c, d) for i, (c, d) in enumerate(self.runs)}
                codes = {run_id: f.result() for run_id, f in futures.items()}
            print(f"[pool] finished: {sum(c == 0 for c in codes.values())}/{len(codes)} exited 0", flush=True)
            return codes

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        # runs already DONE return at once when the pool starts again
        return submitit.helpers.DelayedSubmission(
            LocalPool(self.runs, self.workers, self.cpus_per_run, self.log_dir, self.pool_lock))


def process_start(pid: int) -> float | None:
    """When process ``pid`` started (seconds since boot), or None if there is none or it is a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()  # after "(comm)"
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else int(fields[19]) / os.sysconf("SC_CLK_TCK")


def pool_alive(pool_lock: Path) -> bool:
    """Whether the pool that holds this lock file is still running."""
    return lock_is_held(pool_lock)
