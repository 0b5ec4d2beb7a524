"""How the run folder's and the sweep folder's files are written and read back: the one atomic
writer of the lfq -> experiments -> slurm chain (:func:`atomic_write`), ``lfq.jsonl_writer``'s
appender (:func:`append_jsonl`, here so that ``slurm`` uses the same one), :func:`truncate_jsonl`,
and JSON readers that run no code; the rules are in docs/ARCHITECTURE.md ("Who owns which file
format") and docs/run_folder.md.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lfq.jsonl_writer import append_jsonl  # the one appender, re-exported for slurm

__all__ = ["append_jsonl", "atomic_write", "atomic_write_csv", "atomic_write_json", "read_json", "read_jsonl",
           "temp_beside", "truncate_jsonl"]


def temp_beside(path: Path) -> tuple[int, str]:
    """A new empty temp file in ``path``'s folder, open for writing: (descriptor, its path).

    Created with mode 0o666, which the kernel narrows by the umask (and a default ACL), as a plain
    ``open`` would: 0644 under umask 022, 0600 under 077. Not ``tempfile.mkstemp``, whose 0600 would
    make every result unreadable to the group on shared storage once renamed over its target.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            return os.open(tmp, flags, 0o666), str(tmp)
        except FileExistsError:  # another writer's temp file of the same name: draw again
            continue
    raise FileExistsError(f"no free temp file name beside {path} after 100 tries")


def atomic_write(path: Path | str, write: Callable[[Any], None], mode: str = "w") -> None:
    """Call ``write(file)`` on a temp file beside ``path``, fsync it, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_beside(path)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_csv(path: Path | str, rows: list[dict[str, Any]], fieldnames: list[str] | None = None,
                     extrasaction: str = "raise") -> None:
    """``rows`` as a CSV with a header (``fieldnames``, or the first row's keys; a missing value is
    empty), written atomically with ``\\n`` line ends as pandas writes them: the benchmarks' tables."""
    import csv

    def write(f: Any) -> None:
        writer = csv.DictWriter(f, fieldnames=fieldnames or list(rows[0]), extrasaction=extrasaction,
                                lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)

    atomic_write(path, write)


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
