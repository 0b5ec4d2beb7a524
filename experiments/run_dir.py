"""The run folder ``results/<sweep>/<run_id>/``: its errors, what its files say, and how to resume it.

The one owner of a run folder's rules: the errors (:class:`RunDirError`, :class:`CorruptRun`), a
run's state read from its files (the file names, ``RUN_STATES`` and ``finished`` themselves are
``common.run_state``'s, shared with analysis), names and places, setting a run aside, the Parquet
copy of the metrics, resume verification and :class:`RunDir`. Files are written through
``experiments.files``; the run lock (one process per folder, and ``restart`` under it) is
``experiments.run_lock``. The layout is specified in docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from common.run_state import CHECKPOINT, CONFIG, DONE, ENVIRONMENT, HISTOGRAMS, METRICS, SUMMARY, finished
from experiments.files import atomic_write, atomic_write_json, read_json, read_jsonl

COMPACT_METRICS = "metrics.parquet"
COMPACT_SOURCE_KEY = b"lfq.source_bytes"


class RunDirError(ValueError):
    """A run folder cannot be used as asked; the message says why and what to do."""


class CorruptRun(RunDirError):
    """A file the run needs to resume (or to count as finished) cannot be trusted."""


def read_summary(run_dir: Path | str) -> dict[str, Any] | None:
    return read_json(Path(run_dir) / SUMMARY)


def is_done(run_dir: Path | str) -> bool:
    """Whether the folder has its DONE marker (``common.run_state.finished`` says whether it is whole)."""
    return (Path(run_dir) / DONE).exists()


def run_status(run_dir: Path | str) -> str:
    """What the folder alone says: one of ``common.run_state.RUN_STATES``.

    'started' covers running, killed and queued-for-requeue alike; telling those apart needs
    the scheduler, which is slurm's job, not this module's.
    """
    return finished(run_dir)[0]



def compact_metrics(run_dir: Path | str) -> Path | None:
    """``metrics.jsonl`` once more as ``metrics.parquet`` (atomically), for fast columnar reads of a finished run.

    The JSON log stays the record; the Parquet file carries the JSON file's size in its metadata
    (``lfq.source_bytes``), and a reader takes it only while the sizes agree. Columns are the union of
    the rows' keys in first-seen order; a number missing from a row is NaN (as pandas reads the JSON),
    a string missing is null. Returns None (and writes nothing) when
    pyarrow is absent or the rows do not fit one type per column: readers then parse the JSON.
    """
    source = Path(run_dir) / METRICS
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return None
    if not source.exists():
        return None
    size = source.stat().st_size
    rows = read_jsonl(source)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    try:
        table = pa.table({k: [r.get(k) for r in rows] for k in keys})
    except (pa.ArrowException, TypeError, ValueError):
        return None
    for i, field in enumerate(table.schema):  # a number missing from some rows is NaN, as pandas reads it
        if (pa.types.is_integer(field.type) or pa.types.is_floating(field.type)) and table.column(i).null_count:
            table = table.set_column(i, field.name, table.column(i).cast(pa.float64()).fill_null(float("nan")))
    table = table.replace_schema_metadata({COMPACT_SOURCE_KEY: str(size).encode()})
    target = Path(run_dir) / COMPACT_METRICS
    strings = [f.name for f in table.schema if pa.types.is_string(f.type)]  # kind, layer, mode: few values
    atomic_write(target, lambda f: pq.write_table(table, f, use_dictionary=strings), mode="wb")
    return target


# --- names and places ------------------------------------------------------------------------------------

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=-]*")
NAME_MAX = 100


def name_problem(name: object) -> str:
    """'' if ``name`` can be a folder name of a results root (a config's ``name``), else what is wrong.

    One path component of letters, digits and ``. _ + = -``, not starting with ``.`` or ``_``
    (such folders are never run folders: ``_sweep/``, caches), at most 100 characters.
    """
    if not isinstance(name, str) or not name:
        return "must be a non-empty string"
    if len(name) > NAME_MAX:
        return f"must be at most {NAME_MAX} characters (got {len(name)})"
    if not NAME_RE.fullmatch(name):
        return ("must be one folder name: letters, digits and . _ + = -, starting with a letter or digit "
                "(no '/', not '.' or '..')")
    return ""


def confine(root: Path | str, path: Path | str) -> Path:
    """``path`` resolved, if it lies inside the resolved ``root`` (symlinks followed); else RunDirError."""
    root_r, path_r = Path(root).resolve(), Path(path).resolve()
    if path_r == root_r or root_r not in path_r.parents:
        raise RunDirError(f"run folder {path} resolves to {path_r}, outside the results root {root_r}: "
                          f"choose a name that is a plain folder name")
    return path_r


def check_writable(folder: Path | str, what: str) -> Path:
    """The nearest existing ancestor of ``folder`` must be a writable folder; else RunDirError, nothing created."""
    folder = Path(folder)
    probe = folder
    while not probe.exists():
        if probe.is_symlink():
            raise RunDirError(f"{what} {folder}: {probe} is a dangling symlink; remove it or choose another folder")
        probe = probe.parent
    if not probe.is_dir():
        raise RunDirError(f"{what} {folder}: {probe} is a file, not a folder; choose another folder")
    try:  # a real try, not os.access: root passes access() on read-only mounts and /proc
        os.rmdir(tempfile.mkdtemp(dir=probe, prefix=".write-probe-"))
    except OSError as e:
        raise RunDirError(f"{what} {folder}: cannot create anything in {probe} ({e.strerror}); choose another "
                          f"folder (or fix its permissions)") from None
    return folder


# --- setting a run aside ---------------------------------------------------------------------------------

TRASH = Path("_sweep") / "trash"  # beside the run folders; never read as runs (the name starts with _)


def set_aside(run_dir: Path | str) -> Path:
    """Move the whole run folder to ``<parent>/_sweep/trash/<run_id>-<stamp>`` (never deleted); returns it."""
    run_dir = Path(run_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S") + f"-{time.time_ns() % 10**6:06d}"
    target = run_dir.parent / TRASH / f"{run_dir.name}-{stamp}"
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(run_dir, target)
    return target


def prepare_run_folder(out: Path | str | None, config: Any, results: Path | str = "results") -> Path:
    """``out/<run_id>`` (default ``results/<name>/<run_id>``, confined to ``results``), checked to be
    creatable; RunDirError before anything is written."""
    if out is None:
        parent = Path(results) / config.name
        confine(results, parent)  # the name is one folder name; a symlink out of the root is refused too
    else:
        parent = Path(out)
    run_dir = parent / config.run_id
    for path in (parent, run_dir):
        if path.exists() and not path.is_dir():
            raise RunDirError(f"{path} is a file, not a folder; choose another --out")
    check_writable(run_dir, "run folder")
    return run_dir


# --- resume verification -----------------------------------------------------------------------------------

def rows_by_step(path: Path, max_step: int) -> tuple[dict[str, set[int]], list[int]]:
    """Steps present per row kind among rows with ``step <= max_step``, and the numbers of
    unparseable lines that lie before the last line (a torn last line is an interrupted write)."""
    steps: dict[str, set[int]] = {}
    bad: list[int] = []
    try:
        lines = path.read_bytes().decode("utf-8", errors="replace").split("\n")
    except FileNotFoundError:
        return steps, bad
    if lines and lines[-1] == "":
        lines.pop()
    for number, line in enumerate(lines, start=1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number < len(lines):
                bad.append(number)
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= max_step:
            steps.setdefault(str(row.get("kind", "quantizer")), set()).add(row["step"])
    return steps, bad


def _ranges(values: list[int], period: int = 1) -> str:
    """``[5, 10, 15, 30]`` with period 5 -> ``"5-15, 30"``."""
    spans: list[list[int]] = []
    for v in values:
        if spans and v - spans[-1][1] == period:
            spans[-1][1] = v
        else:
            spans.append([v, v])
    text = [str(a) if a == b else f"{a}-{b}" for a, b in spans]
    return ", ".join(text[:4]) + (" ..." if len(text) > 4 else "")


def log_gaps(path: Path, step: int, every: dict[str, int], recorded_bytes: int | None = None) -> str:
    """'' if ``path`` holds every row a run writes up to ``step``, else what is missing.

    ``every``: row kind -> the period of its rows (``{"train": log_every, "val": val_every}``);
    ``recorded_bytes``: the file's size when the checkpoint was written (rows before it only grow).
    """
    steps, bad = rows_by_step(path, step)
    problems = []
    if bad:
        problems.append(f"unparseable line(s) {_ranges(bad)} in the middle")
    for kind, period in every.items():
        want = list(range(period, step + 1, period))
        missing = sorted(set(want) - steps.get(kind, set()))
        if missing:
            problems.append(f"no {kind!r} rows for steps {_ranges(missing, period)}")
    size = path.stat().st_size if path.exists() else 0
    if recorded_bytes is not None and size < recorded_bytes:
        problems.append(f"{size} bytes where the checkpoint saw {recorded_bytes}")
    return "; ".join(problems)


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
    def environment(self) -> Path:
        return self.path / ENVIRONMENT

    @property
    def done(self) -> Path:
        return self.path / DONE

    def is_done(self) -> bool:
        return self.done.exists()

    def status(self) -> str:
        return run_status(self.path)

    def read_summary(self) -> dict[str, Any] | None:
        return read_json(self.summary)

    def finished_summary(self) -> dict[str, Any] | None:
        """The summary of a finished run, None if it is not finished, CorruptRun if it has DONE but is not whole."""
        state, why = finished(self.path)
        if state == "corrupt":
            raise CorruptRun(f"{self.path} is corrupt ({why}): it is not counted as finished. Start it over with "
                             f"--restart (the folder is moved to {self.path.parent / TRASH}/, not deleted)")
        return self.read_summary() if state == "done" else None

    def read_config(self) -> dict[str, Any] | None:
        return read_json(self.config)

    def write_config(self, config_dict: dict[str, Any], run_id: str) -> None:
        atomic_write_json(self.config, {**config_dict, "run_id": run_id})

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_json(self.summary, summary)

    def mark_done(self) -> None:
        """Compact the metrics log to Parquet, then write DONE (last: a folder with it is complete)."""
        compact_metrics(self.path)
        atomic_write(self.done, lambda f: None)

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        import torch  # here, so that reading a run folder never needs torch

        # what the logs held when the checkpoint was written: a resume checks they still do
        sizes = {name: (self.path / name).stat().st_size if (self.path / name).exists() else 0
                 for name in (METRICS, HISTOGRAMS)}
        atomic_write(self.checkpoint, lambda f: torch.save({**state, "log_bytes": sizes}, f), mode="wb")

    def load_checkpoint(self, run_id: str | None = None) -> dict[str, Any] | None:
        """The checkpoint (None if there is none), loaded with ``weights_only=True``: tensors and plain
        containers only, so a planted file cannot run code. CorruptRun if it cannot be read or is not
        this run's."""
        import torch

        if not self.checkpoint.exists():
            return None
        try:
            state = torch.load(self.checkpoint, map_location="cpu", weights_only=True)
        except Exception as e:  # UnpicklingError, EOFError, RuntimeError (zip), ...: all say "not trustworthy"
            raise CorruptRun(self._corrupt(CHECKPOINT, f"{type(e).__name__}: {str(e).strip().splitlines()[0][:120]}"
                                           if str(e).strip() else type(e).__name__)) from None
        missing = [k for k in CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
        if missing:
            raise CorruptRun(self._corrupt(CHECKPOINT, f"no {', '.join(missing)} in it"))
        if run_id is not None and state.get("run_id") not in (None, run_id):
            raise CorruptRun(self._corrupt(CHECKPOINT, f"it is run {state.get('run_id')!r}'s, not {run_id!r}'s"))
        return state

    def verify_logs(self, checkpoint: dict[str, Any], every: dict[str, int]) -> None:
        """CorruptRun unless ``metrics.jsonl`` holds every row up to the checkpoint's step (a resume
        would otherwise leave a silent hole), naming the gap."""
        step = int(checkpoint["progress"]["step"])
        sizes = checkpoint.get("log_bytes") or {}
        gap = log_gaps(self.metrics, step, every, sizes.get(METRICS))
        if gap:
            raise CorruptRun(self._corrupt(METRICS, f"rows before the checkpoint's step {step} are missing: {gap}"))
        hist = self.histograms
        if sizes.get(HISTOGRAMS) and (not hist.exists() or hist.stat().st_size < sizes[HISTOGRAMS]):
            have = hist.stat().st_size if hist.exists() else 0
            raise CorruptRun(self._corrupt(HISTOGRAMS, f"{have} bytes where the checkpoint of step {step} saw "
                                                       f"{sizes[HISTOGRAMS]}: snapshots are missing"))

    def _corrupt(self, name: str, why: str) -> str:
        return (f"{self.path / name} is corrupt ({why}); the run cannot resume from it. Start this run over with "
                f"--restart (the folder is moved to {self.path.parent / TRASH}/, not deleted), or restore the file")


CHECKPOINT_KEYS = ("model", "optimizer", "torch_rng", "data_rng", "monitor", "progress")
