"""The run folder ``results/<sweep>/<run_id>/``: everything a run learns, and how to resume it.

Layout and contents are specified in docs/ARCHITECTURE.md. Every file except the append-only
JSON-lines logs is written atomically (a temp file in the same folder, then ``os.replace``),
so a run killed at any instant leaves either the old or the new version, never half of one.
``DONE`` is written last; a folder with it is never run again.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

CONFIG = "config.json"
METRICS = "metrics.jsonl"
HISTOGRAMS = "histograms.jsonl"
CHECKPOINT = "checkpoint.pt"
SUMMARY = "summary.json"
DONE = "DONE"


def atomic_write(path: Path | str, write: Callable[[Any], None], mode: str = "w") -> None:
    """Call ``write(file)`` on a temp file beside ``path``, fsync it, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path | str, obj: Any) -> None:
    # allow_nan: a NaN metric is data (JSON extension NaN), which json and pandas read back.
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2, sort_keys=True, allow_nan=True) + "\n"))


def read_json(path: Path | str) -> Any | None:
    """The parsed file, or None when it is missing or unreadable (e.g. written by an older crash)."""
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def read_jsonl(path: Path | str) -> list[dict[str, Any]]:
    """All complete rows; a partial last line (the process died mid-write) is skipped."""
    rows = []
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return rows
    for line in lines:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def truncate_jsonl(path: Path | str, max_step: int) -> int:
    """Keep only the rows with ``step <= max_step`` (atomically); returns how many were dropped.

    On resume, rows written after the checkpoint will be written again by the resumed run.
    """
    path = Path(path)
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if isinstance(row, dict) and row.get("step", 0) <= max_step:
            kept.append(line + "\n")
        else:
            dropped += 1
    if dropped:
        atomic_write(path, lambda f: f.writelines(kept))
    return dropped


def read_summary(run_dir: Path | str) -> dict[str, Any] | None:
    return read_json(Path(run_dir) / SUMMARY)


def is_done(run_dir: Path | str) -> bool:
    return (Path(run_dir) / DONE).exists()


def run_status(run_dir: Path | str) -> str:
    """What the folder alone says: 'done', 'failed', 'started' (config written, no end yet) or 'missing'.

    'started' covers running, killed and queued-for-requeue alike; telling those apart needs
    the scheduler, which is slurm's job, not this module's.
    """
    run_dir = Path(run_dir)
    if is_done(run_dir):
        return "done"
    summary = read_summary(run_dir)
    if summary is not None and summary.get("status") == "failed":
        return "failed"
    if (run_dir / CONFIG).exists():
        return "started"
    return "missing"


class RunDir:
    """Paths and writers of one run folder."""

    def __init__(self, path: Path | str):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def config(self) -> Path:
        return self.path / CONFIG

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    @property
    def histograms(self) -> Path:
        return self.path / HISTOGRAMS

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT

    @property
    def summary(self) -> Path:
        return self.path / SUMMARY

    @property
    def done(self) -> Path:
        return self.path / DONE

    def is_done(self) -> bool:
        return self.done.exists()

    def status(self) -> str:
        return run_status(self.path)

    def read_summary(self) -> dict[str, Any] | None:
        return read_json(self.summary)

    def read_config(self) -> dict[str, Any] | None:
        return read_json(self.config)

    def write_config(self, config_dict: dict[str, Any], run_id: str) -> None:
        atomic_write_json(self.config, {**config_dict, "run_id": run_id})

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_json(self.summary, summary)

    def mark_done(self) -> None:
        atomic_write(self.done, lambda f: None)

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        import torch  # here, so that reading a run folder never needs torch

        atomic_write(self.checkpoint, lambda f: torch.save(state, f), mode="wb")

    def load_checkpoint(self) -> dict[str, Any] | None:
        import torch

        if not self.checkpoint.exists():
            return None
        # weights_only=False: the checkpoint holds RNG states and plain dicts we wrote ourselves.
        return torch.load(self.checkpoint, map_location="cpu", weights_only=False)
