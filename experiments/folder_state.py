"""What a run folder's files say about the run: the file names, the one state vocabulary
(:data:`RUN_STATES`, defined by :func:`finished`), and the errors a run folder raises.

Layout and contents are specified in docs/ARCHITECTURE.md; ``experiments.run_dir`` re-exports
every name here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from experiments.files import read_json

CONFIG = "config.json"
METRICS = "metrics.jsonl"
HISTOGRAMS = "histograms.jsonl"
CHECKPOINT = "checkpoint.pt"
SUMMARY = "summary.json"
DONE = "DONE"
ENVIRONMENT = "environment.jsonl"  # one row per attempt: experiments.provenance
RUN_STATES = ("done", "corrupt", "failed", "started", "missing")


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


def finished(run_dir: Path | str) -> tuple[str, str]:
    """``(state, reason)`` of a run folder, read from its files alone; THE definition of a finished run.

    - ``done``: ``DONE``, a ``summary.json`` holding a JSON object whose status is ``done``, and a
      ``config.json`` holding a JSON object with a ``run_id``;
    - ``corrupt``: ``DONE`` but one of those files missing or unreadable (the reason names it);
      such a run is never skipped as finished: ``--restart`` / ``--resubmit`` start it over;
    - ``failed``: a summary with status ``failed`` (the reason is the trainer's);
    - ``started``: a config and no end yet (running, killed, or waiting for a requeue);
    - ``missing``: nothing of the run.

    analysis.load applies the same rules to the same files (it may not import this package):
    docs/ARCHITECTURE.md states them, tests/test_dependencies.py checks both agree.
    """
    run_dir = Path(run_dir)
    summary, summary_err = _read_object(run_dir / SUMMARY)
    if summary is not None and summary.get("status") == "failed":  # with or without DONE: the trainer's verdict
        return "failed", str(summary.get("reason") or "")
    if (run_dir / DONE).exists():
        config, config_err = _read_object(run_dir / CONFIG)
        if config is None:
            return "corrupt", f"DONE but {config_err}"
        if not config.get("run_id"):
            return "corrupt", f"DONE but {CONFIG} has no run_id"
        if summary is None:
            return "corrupt", f"DONE but {summary_err}"
        if summary.get("status") != "done":
            return "corrupt", f"DONE but {SUMMARY} says status {summary.get('status')!r}"
        return "done", ""
    if (run_dir / CONFIG).exists():
        return "started", ""
    return "missing", ""


def _read_object(path: Path) -> tuple[dict[str, Any] | None, str]:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        return None, f"no {path.name}"
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None, f"{path.name} is unreadable ({type(e).__name__}: {str(e).splitlines()[0][:80]})"
    if not isinstance(data, dict):
        return None, f"{path.name} holds a JSON {type(data).__name__}, not an object"
    return data, ""


def run_status(run_dir: Path | str) -> str:
    """What the folder alone says: one of RUN_STATES (see :func:`finished`).

    'started' covers running, killed and queued-for-requeue alike; telling those apart needs
    the scheduler, which is slurm's job, not this module's.
    """
    return finished(run_dir)[0]
