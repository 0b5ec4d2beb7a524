"""What a run folder's files say about its run: the file names, the state words
(:data:`RUN_STATES`) and THE definition of a finished run (:func:`state_of`, :func:`finished`).

experiments (which writes run folders), slurm (which resumes them) and analysis (which reads them)
all decide a run's state here; the layout is specified in docs/run_folder.md.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CONFIG = "config.json"
METRICS = "metrics.jsonl"
HISTOGRAMS = "histograms.jsonl"
CHECKPOINT = "checkpoint.pt"
SUMMARY = "summary.json"
DONE = "DONE"
ENVIRONMENT = "environment.jsonl"  # one row per attempt: experiments.provenance
RUN_STATES = ("done", "corrupt", "failed", "started", "missing")


def read_object(path: Path) -> tuple[dict[str, Any] | None, str]:
    """The JSON object in ``path``, or None and why not (missing, unreadable, not an object)."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        return None, f"no {path.name}"
    except (OSError, ValueError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None, f"{path.name} is unreadable ({type(err).__name__}: {str(err).splitlines()[0][:80]})"
    if not isinstance(data, dict):
        return None, f"{path.name} holds a JSON {type(data).__name__}, not an object"
    return data, ""


def state_of(*, done_marker: bool, config: dict[str, Any] | None, config_err: str,
             summary: dict[str, Any] | None, summary_err: str) -> tuple[str, str]:
    """``(state, reason)`` from what :func:`read_object` returned for the config and the summary.

    - ``failed``: a summary with status ``failed``, with or without DONE (the reason is the trainer's);
    - ``done``: ``DONE``, a ``summary.json`` object whose status is ``done``, and a ``config.json``
      object with a ``run_id``;
    - ``corrupt``: ``DONE`` but one of those missing or unreadable (the reason names it); such a run
      is never skipped as finished: ``--restart`` / ``--resubmit`` start it over;
    - ``started``: a config and no end yet (running, killed, or waiting for a requeue);
    - ``missing``: nothing of the run.
    """
    if summary is not None and summary.get("status") == "failed":
        return "failed", str(summary.get("reason") or "")
    if done_marker:
        if config is None:
            return "corrupt", f"DONE but {config_err}"
        if not config.get("run_id"):
            return "corrupt", f"DONE but {CONFIG} has no run_id"
        if summary is None:
            return "corrupt", f"DONE but {summary_err}"
        if summary.get("status") != "done":
            return "corrupt", f"DONE but {SUMMARY} says status {summary.get('status')!r}"
        return "done", ""
    if config is not None or not config_err.startswith("no "):
        return "started", ""
    return "missing", ""


def finished(run_dir: Path | str) -> tuple[str, str]:
    """``(state, reason)`` of a run folder, read from its files alone (see :func:`state_of`)."""
    run_dir = Path(run_dir)
    summary, summary_err = read_object(run_dir / SUMMARY)
    config, config_err = read_object(run_dir / CONFIG)
    return state_of(done_marker=(run_dir / DONE).exists(), config=config, config_err=config_err,
                    summary=summary, summary_err=summary_err)
