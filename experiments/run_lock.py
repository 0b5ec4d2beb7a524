"""The run lock: one process per run folder, an exclusive ``flock`` the kernel drops with its holder.

``<run_dir>/.lock`` carries the lock, ``<run_dir>/.claim`` says who holds it (``{host, pid,
job_id, since}``; the file keeps its name on disk). The trainer (``experiments.train.run``) and a
sweep job (``slurm.job``) take the same lock; ``slurm.state`` probes it; :func:`restart` sets a
folder aside only while no one holds it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from experiments.files import atomic_write_json, read_json
from experiments.run_dir import RunDirError, set_aside


class RunLocked(RunDirError):
    """Another live process holds the run's lock."""


LOCK_NAME = ".lock"
HOLDER_NAME = ".claim"  # who holds the lock; written by the holder, read by slurm.status
LOCK_TRIES = 10
_HELD: dict[str, int] = {}  # resolved run folder -> depth of the run locks this process holds on it
_HANDLES: dict[str, IO[str]] = {}  # resolved run folder -> the open .lock file that carries the flock


@contextlib.contextmanager
def try_lock_run(run_dir: Path | str, tries: int = LOCK_TRIES, info: dict[str, Any] | None = None) -> Iterator[bool]:
    """Yields True while this process holds the run's lock, False if another process holds it.

    The lock is an exclusive ``fcntl.flock`` on ``<run_dir>/.lock``; the kernel drops it when the
    process dies, however it dies, so a stale lock never blocks anyone. ``<run_dir>/.claim`` says
    who holds it. Re-entrant within one process (a sweep job locks the run, then the trainer does).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    key = str(run_dir.resolve())
    if _HELD.get(key):
        _HELD[key] += 1
        try:
            yield True
        finally:
            _HELD[key] -= 1
        return
    handle: IO[str] = open(run_dir / LOCK_NAME, "a+")  # noqa: SIM115 - held for the whole block
    try:
        # a few tries: slurm.status probes the lock by taking it for a few microseconds, while a real
        # holder keeps it for the whole run
        for attempt in range(tries):
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if attempt == tries - 1:
                    yield False
                    return
                time.sleep(0.1)
        atomic_write_json(run_dir / HOLDER_NAME, {"host": socket.gethostname(), "pid": os.getpid(), "job_id": "",
                                                  "since": time.time(), **(info or {})})
        _HELD[key], _HANDLES[key] = 1, handle
        try:
            yield True
        finally:
            _HELD.pop(key, None)
            _HANDLES.pop(key, None)
    finally:
        handle.close()  # releases the flock


def let_go_in_forked_child() -> None:
    """In a process forked from a lock holder (a DataLoader worker): drop this process's share of
    the run locks. A flock belongs to the open file, which a fork shares, so a worker outliving
    its trainer (SIGKILLed by scancel) would hold the run's lock, and the run read "running",
    until the worker ends. The inherited descriptors are pointed at /dev/null; the parent's stay."""
    if not _HANDLES:
        return
    devnull = os.open(os.devnull, os.O_RDONLY)
    try:
        for handle in _HANDLES.values():
            os.dup2(devnull, handle.fileno())  # closes this process's copy of the lock's file
    finally:
        os.close(devnull)
    _HANDLES.clear()
    _HELD.clear()


def lock_is_held(path: Path | str) -> bool:
    """Whether a live process holds an exclusive flock on ``path``.

    Probes with a shared lock, so two probes at once never mistake each other for a holder;
    the kernel drops a dead holder's lock, so a crashed process never looks alive.
    """
    path = Path(path)
    if not path.exists():
        return False
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


def run_is_locked(run_dir: Path | str) -> bool:
    """Whether a live process (this one included) holds the run's lock."""
    return bool(_HELD.get(str(Path(run_dir).resolve()))) or lock_is_held(Path(run_dir) / LOCK_NAME)


def read_lock_holder(run_dir: Path | str) -> dict[str, Any]:
    """``<run_dir>/.claim``: the host, pid, job id and start time of the lock's holder ({} if none)."""
    data = read_json(Path(run_dir) / HOLDER_NAME)
    return data if isinstance(data, dict) else {}


def describe_lock_holder(run_dir: Path | str) -> str:
    holder = read_lock_holder(run_dir)
    who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}"
    if holder.get("job_id"):
        who += f" (job {holder['job_id']})"
    return who


@contextlib.contextmanager
def hold_run_lock(run_dir: Path | str, main: bool = True,
                  broadcast: Callable[[Any], Any] = lambda x: x) -> Iterator[None]:
    """Hold the run's lock for the block, or raise RunLocked saying who holds it.

    Under data parallel only rank 0 (``main``) takes it; ``broadcast`` hands its verdict to every
    rank, so that all of them train or all raise.
    """
    with contextlib.ExitStack() as stack:
        held = stack.enter_context(try_lock_run(run_dir)) if main else None
        verdict = broadcast(("locked", "") if held or not main else ("busy", describe_lock_holder(run_dir)))
        if verdict[0] == "busy":
            raise RunLocked(f"{run_dir} is being trained by {verdict[1]}: not starting it twice; wait for it, "
                            f"or stop that process first")
        yield


def restart(run_dir: Path | str) -> Path | None:
    """Set the run folder aside so the run starts over; None if there was none. RunLocked if it is in use."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        return None
    with try_lock_run(run_dir, tries=1) as held:
        if not held:
            raise RunLocked(f"{run_dir} is being trained by {describe_lock_holder(run_dir)}: not restarting it under "
                            f"a live process; stop that process first")
        return set_aside(run_dir)
