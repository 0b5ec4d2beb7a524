"""What a run folder's files say about the run: the file names, the one state vocabulary
(`common.run_state`: RUN_STATES, `finished`), and the errors a run folder raises.

Layout and contents are specified in docs/ARCHITECTURE.md; ``experiments.run_dir`` re-exports
every name here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from common.run_state import (  # noqa: F401 - the run folder's names, importable from experiments.run_dir
    CHECKPOINT,
    CONFIG,
    DONE,
    ENVIRONMENT,
    HISTOGRAMS,
    METRICS,
    RUN_STATES,
    SUMMARY,
    finished,
)
from experiments.files import read_json


class RunDirError(ValueError):
    """A run folder cannot be used as asked; the message says why and what to do."""


class RunLocked(RunDirError):
    """Another live process holds the run's lock (``experiments.run_lock``)."""


class CorruptRun(RunDirError):
    """A file the run needs to resume (or to count as finished) cannot be trusted."""


def read_summary(run_dir: Path | str) -> dict[str, Any] | None:
    return read_json(Path(run_dir) / SUMMARY)


def is_done(run_dir: Path | str) -> bool:
    """Whether the folder has its DONE marker (see :func:`finished` for whether it is whole)."""
    return (Path(run_dir) / DONE).exists()


def run_status(run_dir: Path | str) -> str:
    """What the folder alone says: one of RUN_STATES (see :func:`finished`).

    'started' covers running, killed and queued-for-requeue alike; telling those apart needs
    the scheduler, which is slurm's job, not this module's.
    """
    return finished(run_dir)[0]
