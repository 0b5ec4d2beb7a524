"""The job callable: one run of a sweep (one or several DDP tasks), resumable through submitit's
requeue, and locked with the run folder's lock so that it never runs twice at once; docs/slurm.md
("The job") gives the requeue, rank and signal rules.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import submitit

from common import run_state
from experiments.files import append_jsonl
from experiments.run_dir import read_summary
from experiments.run_lock import read_lock_holder, try_lock_run

SWEEP_META = "_sweep"  # the sweep's own folder, next to its run folders
EVENTS_NAME = "events.jsonl"


def job_id_here() -> str:
    """The scheduler's id of the job this process belongs to ('' outside submitit)."""
    with contextlib.suppress(RuntimeError, KeyError):
        return str(submitit.JobEnvironment().job_id)
    return ""


@contextlib.contextmanager
def try_lock_run_for_job(run_dir: Path) -> Iterator[bool]:
    """The run's lock (``experiments.run_lock.try_lock_run``, which the trainer takes too), naming this job as its holder."""
    with try_lock_run(run_dir, info={"job_id": job_id_here()}) as held:
        yield held


def tasks_here() -> int:
    """How many tasks (DDP ranks) the submitit job of this process has (1 outside submitit)."""
    with contextlib.suppress(RuntimeError, KeyError, ValueError):
        return int(submitit.JobEnvironment().num_tasks)
    return 1


def watch_requeue_signal() -> threading.Event:
    """An event set when submitit's requeue signal (USR2) reaches this task; submitit's handler still runs.

    Must be called after submitit installed its handler (i.e. from inside the job) and in the main thread.
    """
    seen = threading.Event()
    with contextlib.suppress(RuntimeError, ValueError):  # not a submitit job / not the main thread
        sig = submitit.JobEnvironment._usr_sig()  # USR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise
        previous = signal.getsignal(sig)

        def note(signum: int, frame: Any) -> None:
            seen.set()
            if callable(previous):
                previous(signum, frame)

        signal.signal(sig, note)
    return seen


def _set_threads(threads: int | None) -> None:
    # torch uses every core of the node by default; several runs sharing a node would oversubscribe it
    if not threads:
        threads = int(os.environ.get("SLURM_CPUS_PER_TASK", "0") or 0) or None
    if threads:
        import torch

        torch.set_num_threads(threads)


def _rank_logger(run_id: str, rank: int, world: int) -> Callable[[str], None]:
    prefix = f"[job] {run_id}:" if world == 1 else f"[job] {run_id} rank {rank}/{world}:"
    return lambda message: print(f"{prefix} {message}", flush=True)


class RunJob(submitit.helpers.Checkpointable):
    """Trains one config in its run folder; the only state is the config dict and the folder."""

    def __init__(self, config: dict[str, Any], run_dir: str, threads: int | None = None) -> None:
        self.config = config
        self.run_dir = str(run_dir)
        self.threads = threads

    def __call__(self) -> dict[str, Any]:
        _set_threads(self.threads)  # per task: each DDP rank gets its own cpus_per_task
        if tasks_here() > 1:
            from experiments.distributed import init_from_submitit, process_group

            with process_group(init_from_submitit):
                return self._run()
        return self._run()

    def _verdict(self, run_dir: Path, stack: contextlib.ExitStack) -> dict[str, Any] | None:
        """On rank 0: None to train (the run lock then stays held in ``stack``), else the result to return."""
        run_id = run_dir.name

        def finished() -> dict[str, Any] | None:
            state, why = run_state.finished(run_dir)
            if state == "done":
                return read_summary(run_dir) or {"run_id": run_id, "status": "done"}
            if state == "corrupt":  # never trained over: slurm.submit sets such a folder aside first
                print(f"[job] {run_id}: run folder is corrupt ({why}); not touching it", flush=True)
                return {"run_id": run_id, "status": "corrupt", "reason": why}
            return None

        verdict = finished()
        if verdict is not None:
            return verdict
        if not stack.enter_context(try_lock_run_for_job(run_dir)):
            owner = read_lock_holder(run_dir)
            print(f"[job] {run_id}: already running elsewhere ({owner}); not starting it twice", flush=True)
            return {"run_id": run_id, "status": "skipped", "reason": f"locked by {owner}"}
        return finished()  # finished while this job waited in the queue

    def _run(self) -> dict[str, Any]:
        from experiments import distributed as ddp  # lazily: the job pickle stays small and import-free
        from experiments.config import Config
        from experiments.loop import end_line
        from experiments.train import run

        run_dir = Path(self.run_dir)
        run_id = run_dir.name
        events = run_dir.parent / SWEEP_META / EVENTS_NAME
        main, world = ddp.is_main(), ddp.world_size()
        signalled = watch_requeue_signal() if not main else None
        with contextlib.ExitStack() as stack:
            # Rank 0 decides for all: a rank that returned alone would leave the others in a collective,
            # and a second attempt to lock the same folder (rank 1 on the same node) would fail.
            verdict = self._verdict(run_dir, stack) if main else None
            if world > 1:
                verdict = ddp.broadcast(("return", verdict) if verdict is not None else ("train", None))[1]
            if verdict is not None:
                return verdict
            restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
            base = {"run_id": run_id, "job_id": job_id_here(), "pid": os.getpid(), "host": socket.gethostname()}
            log = _rank_logger(run_id, ddp.rank(), world)
            if main:
                append_jsonl(events, [{**base, "event": "start", "time": time.time(), "restart": restarts,
                                       "world_size": world}], sort_keys=True)
            log(f"start in {run_dir} (job {base['job_id'] or '-'}, restart {restarts})")
            status = "error"
            try:
                summary = run(Config.from_dict(self.config), run_dir)
                status = str(summary.get("status"))
                if main:
                    log(end_line(summary))  # the line python -m experiments.train ends with
                return summary
            except (SystemExit, KeyboardInterrupt):
                status = "interrupted"  # submitit's requeue handler exits from inside the training step
                raise
            except Exception:
                if signalled is not None and signalled.is_set():
                    # rank 0 checkpointed, requeued and left, so this rank's collective broke: not a failure
                    status = "interrupted"
                    log("rank 0 left to requeue the job after the signal; leaving too, to resume on restart")
                    sys.exit(-1)  # as submitit does on rank 0: no result pickle, the requeued job writes it
                raise
            finally:
                if main:  # every attempt leaves a start/end pair: status and tests read requeues from them
                    append_jsonl(events, [{**base, "event": "end", "time": time.time(), "status": status}],
                                 sort_keys=True)
                log(f"end ({status})")

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        # a fresh copy: the requeued job resumes from the run folder's checkpoint, not from pickled state
        return submitit.helpers.DelayedSubmission(RunJob(self.config, self.run_dir, self.threads))

    def __repr__(self) -> str:
        return f"RunJob({self.run_dir!r})"


def main() -> None:
    """``python -m slurm.job`` reads {"config", "run_dir", "threads"} as JSON on stdin: the local pool's worker."""
    spec = json.load(sys.stdin)
    summary = RunJob(spec["config"], spec["run_dir"], spec.get("threads"))()
    sys.exit(0 if summary.get("status") in ("done", "skipped") else 1)


if __name__ == "__main__":
    main()
