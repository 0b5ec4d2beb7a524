"""Where and with what each attempt at a run computed: one line of ``environment.jsonl`` per attempt
(host, CPU and its ISA, threads, device, versions, commit), so that a re-run that does not reproduce
can be told apart from a bug; none of it enters the run id. The fields are in docs/run_folder.md,
why the CPU's ISA matters in docs/ARCHITECTURE.md ("Runtime and the run id").
"""

from __future__ import annotations

import functools
import os
import platform
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
CODE = ("lfq", "experiments", "slurm", "pyproject.toml")  # what a run imports; `dirty` looks at these only


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` says."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10,
                              env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"}, check=False)
    except (OSError, subprocess.SubprocessError):  # no git, or it hung
        return None
    return done.stdout.strip() if done.returncode == 0 else None


@functools.lru_cache(maxsize=1)
def code_version() -> dict[str, Any]:
    """The checkout this process imported: ``commit`` (None outside git) and ``dirty`` (the code
    that trains, :data:`CODE`, differs from that commit; None when unknown: edits to results or
    docs do not count). Read once per process, as the code in memory is."""
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no", "--", *CODE) if commit else None
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def environment(device: torch.device, *, step: int, world_size: int = 1, job_id: str | None = None) -> dict[str, Any]:
    """One ``environment.jsonl`` row: what this attempt, starting at ``step``, computes on.

    ``job_id``: the scheduler's id of this job as the run lock's holder file names it (``slurm.job``; the
    local pool's too); without one, SLURM's variables (``<array job>_<task>`` in an array)."""
    cuda = device.type == "cuda"
    job = job_id or os.environ.get("SLURM_JOB_ID") or None
    if not job_id and job and os.environ.get("SLURM_ARRAY_TASK_ID"):
        job = f"{os.environ.get('SLURM_ARRAY_JOB_ID', job)}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return {
        "step": step,
        "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "job_id": job,
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if cuda else None,
        "cuda": torch.version.cuda if cuda else None,
        "world_size": world_size,
        "torch": torch.__version__,
        "python": platform.python_version(),
        **code_version(),
    }
