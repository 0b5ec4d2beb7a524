"""Run folders -> DataFrames: one row per run, tidy metrics, code histograms.

A run folder is any folder holding ``config.json`` (docs/ARCHITECTURE.md). Folders that look
like runs but cannot be read (no or bad ``config.json``, bad ``summary.json``) are reported as
:class:`LoadProblem` s, in ``frame.attrs["problems"]`` and one ``LoadWarning``, and skipped.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis import columnar as cols
from analysis.jsonl_reader import (
    Build,
    LoadProblem,
    Source,
    cache_listing,
    cache_lookup,
    parse_and_cache_safely,
    read_last_row,
    read_set_cache,
    resolve_cache,
    set_cache_file,
    stale_entries,
    write_set_cache,
)
from common.run_state import read_object, state_of

RUN_MARKERS = ("config.json", "metrics.jsonl", "summary.json", "DONE")
# What a folder says, in the words of common.run_state.RUN_STATES (docs/ARCHITECTURE.md; a folder
# that load_runs finds is never "missing"). Whether a started run's process is alive the files
# cannot say: ``last_write_age_s`` is the age of its newest write, for a reader to judge.
STATUSES = ("done", "failed", "started", "corrupt")
STATUS_MEANINGS = {
    "done": "DONE, a summary.json saying done and a config.json with a run_id: finished",
    "failed": "a summary.json saying failed (the trainer's reason)",
    "started": "a config.json and no end yet: running, killed, or waiting for a requeue (see last_write_age_s)",
    "corrupt": "DONE but a summary.json or config.json missing or unreadable (the reason names it)",
}
# Leading columns of the metrics frame; every other column is a metric.
ID_COLUMNS = ("run_id", "step", "kind", "layer", "codebook", "mode")

POOL_MIN_FILES = 64  # cache misses from which a cold load parses in a process pool
PathLike = str | os.PathLike[str]
CacheArg = bool | PathLike | None


class LoadWarning(UserWarning):
    """Some run folders under the loaded path were skipped or repaired."""


def find_run_dirs(root: PathLike) -> tuple[list[Path], list[LoadProblem]]:
    """Run folders under ``root`` (sorted), and folders with run files but no ``config.json``.

    Folders whose name starts with ``.`` or ``_`` are not searched.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"results folder {root} does not exist or is not a folder")
    runs: list[Path] = []
    problems: list[LoadProblem] = []
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError as err:
            problems.append(LoadProblem(str(folder), "", f"cannot list folder: {err}", True))
            continue
        names = {e.name for e in entries}
        if "config.json" in names or "DONE" in names:  # DONE without a config: a corrupt run, reported as one
            runs.append(folder)
            continue  # a run folder holds no nested runs
        present = [m for m in RUN_MARKERS if m in names]
        if present:
            problems.append(
                LoadProblem(str(folder), "config.json", f"no config.json (has {', '.join(present)})", True)
            )
        # Hidden folders are caches and temp report folders; "_" folders are bookkeeping, like
        # slurm's ``_sweep/`` whose ``trash/`` holds superseded copies of run folders.
        stack.extend(Path(e.path) for e in entries if e.is_dir() and not e.name.startswith((".", "_")))
    return sorted(runs), problems


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists become tuples so the columns can be grouped on."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, prefix=f"{name}."))
        elif isinstance(value, list):
            flat[name] = tuple(value)
        else:
            flat[name] = value
    return flat


# What each attempt at a run computed on (experiments.provenance writes environment.jsonl, one
# row per start or resume): these fields become ``env_<field>`` columns of the runs frame.
ENV_FIELDS = ("cpu", "cpu_capability", "threads", "device", "gpu", "torch", "commit", "dirty")
ENV_COLUMNS = (*(f"env_{f}" for f in ENV_FIELDS), "env_attempts")


def read_environment(run_dir: Path) -> dict[str, Any]:
    """``env_<field>`` for :data:`ENV_FIELDS` (the distinct values of the run's attempts, in order,
    joined by ``" | "`` where they differ: a run resumed on another node) and ``env_attempts``;
    empty for a run folder written before environment.jsonl existed. Unparseable lines (a
    write cut short) are skipped."""
    try:
        lines = (run_dir / "environment.jsonl").read_bytes().decode("utf-8", errors="replace").splitlines()
    except OSError:
        return {}
    rows = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    if not rows:
        return {}
    env: dict[str, Any] = {}
    for field in ENV_FIELDS:
        values = list(dict.fromkeys(row.get(field) for row in rows if row.get(field) is not None))
        env[f"env_{field}"] = values[0] if len(values) == 1 else (" | ".join(map(str, values)) if values else None)
    env["env_attempts"] = len(rows)
    return env


def _last_write_age(run_dir: Path) -> float | None:
    """Seconds since the newest of the run's written files changed (None when none is there)."""
    times = []
    for name in ("config.json", "metrics.jsonl", "summary.json", "DONE"):
        try:
            times.append((run_dir / name).stat().st_mtime)
        except OSError:
            continue
    return round(max(0.0, time.time() - max(times)), 1) if times else None


def _run_row(
    run_dir: Path, root: Path, stale_after_s: float | None
) -> tuple[dict[str, Any] | None, list[str], list[LoadProblem]]:
    """The runs-frame row of one folder, its config's column names, and what was wrong."""
    done_marker = (run_dir / "DONE").exists()
    metrics_path = run_dir / "metrics.jsonl"
    age = _last_write_age(run_dir)
    config, config_err = read_object(run_dir / "config.json")
    summary, summary_err = read_object(run_dir / "summary.json")
    if config is None and not done_marker:
        return None, [], [LoadProblem(str(run_dir), "config.json", config_err, True)]
    # The definition of a finished run is common.run_state's; a started run's reason says more here.
    status, reason = state_of(done_marker=done_marker, config=config, config_err=config_err,
                              summary=summary, summary_err=summary_err)
    reason = reason or None
    if status == "failed":
        reason = (summary or {}).get("reason")
    elif status == "started":  # no end yet; summary.json is written atomically, so being rewritten never shows
        if summary is not None:
            reason = ("summary.json says done but there is no DONE marker" if summary.get("status") == "done"
                      else f"summary.json has unknown status {summary.get('status')!r}")
        elif not summary_err.startswith("no "):
            reason = summary_err
        elif stale_after_s is not None and age > stale_after_s:
            reason = f"no summary.json and no write for {age / 3600:.1f} h"
    config = config or {}
    summary = summary or {}

    if run_dir == root:  # pointed at one run folder
        sweep = root.parent.name
    elif run_dir.parent == root:  # pointed at a sweep folder
        sweep = root.name
    else:
        sweep = str(run_dir.parent.relative_to(root))
    row: dict[str, Any] = {
        "run_id": str(config.get("run_id") or summary.get("run_id") or run_dir.name),
        "sweep": sweep,
        "status": status,
        "reason": reason or None,  # the trainer writes "" for a run that had nothing to report
        "run_dir": str(run_dir),
        "last_write_age_s": age,
    }
    flat = flatten(config)
    flat.pop("run_id", None)
    row.update(flat)
    for key, value in summary.items():
        if key in ("run_id", "status", "reason") or (key in flat and flat[key] == value):
            continue  # the summary repeats some config fields (name, task)
        row[f"summary.{key}" if key in flat else key] = value
    row.update(read_environment(run_dir))
    if "step" not in summary and metrics_path.exists():
        last = read_last_row(metrics_path)
        row["step"] = last.get("step") if last else None
    return row, list(flat), []


def _report(problems: list[LoadProblem], root: Path, what: str) -> None:
    if not problems:
        return
    skipped = sorted({p.run_dir for p in problems if p.skipped})
    repaired = sorted({p.run_dir for p in problems if not p.skipped} - set(skipped))
    first = "; ".join(f"{Path(p.run_dir).name}/{p.file}: {p.reason}" for p in problems[:3])
    more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
    warnings.warn(
        f"{what} under {root}: skipped {len(skipped)} run folder(s) or file(s), repaired {len(repaired)}: "
        f"{first}{more}. Details in DataFrame.attrs['problems'].",
        LoadWarning,
        stacklevel=3,
    )


def numeric_metrics(runs: pd.DataFrame) -> pd.DataFrame:
    """``runs`` with every ``final_*`` / ``best_*`` column that holds only numbers and nulls as a
    numeric column, in place. A metric a quantizer kind does not have (VQ's entropies) is null in
    all of its summaries, so its column would otherwise be one of objects, and it would stay one
    when joined with the runs that have numbers there, reaching a CSV as reprs
    (1.1269999742507935) instead of in the table's float format."""
    for column in runs.columns:
        if str(column).startswith(("final_", "best_")) and runs[column].dtype == object:
            values = runs[column].dropna()
            if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                runs[column] = pd.to_numeric(runs[column])
    return runs


TOKENS_PER_CODE = "final_val_tokens_per_code"
USAGE_CEILING = "final_val_usage_ceiling"


def codebook_sizes(runs: pd.DataFrame) -> pd.Series:
    """Codes per codebook of each run: ``quantizer.codebook_size``, or for FSQ with explicit
    ``quantizer.fsq_levels`` their product (what the quantizer builds); NaN where the config has neither."""
    size = runs["quantizer.codebook_size"] if "quantizer.codebook_size" in runs else pd.Series(np.nan, index=runs.index)
    sizes = pd.to_numeric(size, errors="coerce").astype(float)
    if "quantizer.fsq_levels" in runs and "quantizer.kind" in runs:
        fsq = (runs["quantizer.kind"] == "fsq") & runs["quantizer.fsq_levels"].map(lambda v: isinstance(v, tuple) and bool(v))
        sizes[fsq] = runs.loc[fsq, "quantizer.fsq_levels"].map(lambda v: float(math.prod(int(x) for x in v)))
    return sizes.where(sizes > 0)


def uniform_ceiling(tokens_per_code: Any) -> Any:
    """1 - exp(-N/K) of N/K (a number, array or Series): the share of K codes N uniform tokens reach."""
    return -np.expm1(-tokens_per_code)


def usage_ceiling(runs: pd.DataFrame) -> pd.DataFrame:
    """``runs`` with ``final_val_tokens_per_code`` (N/K: validation tokens of one codebook, which is
    what ``final_val_tokens`` counts (experiments.evaluation), over its codes K) and
    ``final_val_usage_ceiling`` (1 - exp(-N/K): the expected share of K codes that N tokens
    assigned uniformly at random reach, so no usage fraction over N tokens is expected above it),
    in place. The summary's own values where it has them; else derived from ``final_val_tokens``
    and the config, so runs written before the trainer recorded them get them too."""
    if not len(runs) or "final_val_tokens" not in runs:
        return runs
    tokens = pd.to_numeric(runs["final_val_tokens"], errors="coerce")
    ratio = tokens / codebook_sizes(runs)
    derived = {TOKENS_PER_CODE: ratio, USAGE_CEILING: uniform_ceiling(ratio)}
    for column, values in derived.items():
        if column in runs:
            runs[column] = pd.to_numeric(runs[column], errors="coerce").fillna(values)
        else:
            runs[column] = values
    return runs


def load_runs(path: PathLike, *, stale_after_s: float | None = 3600.0, warn: bool = True) -> pd.DataFrame:
    """One row per run folder under ``path``.

    Columns: ``run_id``, ``sweep``, ``status`` (one of :data:`STATUSES`, the words of
    ``common.run_state.RUN_STATES``: done/failed/started/corrupt), ``reason``, ``run_dir``,
    ``last_write_age_s`` (seconds since the newest write of its config, metrics, summary or DONE),
    the config flattened to dotted names (``quantizer.diversity_gamma``), the summary's keys
    (``final_usage_fraction``, ...; metrics numeric even where every run has none:
    :func:`numeric_metrics`), ``final_val_tokens_per_code`` and ``final_val_usage_ceiling`` (N/K and
    1 - exp(-N/K), :func:`usage_ceiling`; derived for runs whose summary lacks them) and, where the folder has ``environment.jsonl``, what the run
    computed on (:data:`ENV_COLUMNS`: ``env_cpu_capability``, ``env_torch``, ``env_commit``, ...). Files cannot say whether a ``started`` run is still running;
    one with no write for more than ``stale_after_s`` seconds gets that as its ``reason``.
    Unreadable folders are skipped and listed in ``attrs["problems"]`` (``LoadProblem`` s).
    Two folders with the same run id hold the same config, so only the first is kept.
    ``attrs["config_columns"]`` names the columns that came from ``config.json``.
    """
    root = Path(path)
    run_dirs, problems = find_run_dirs(root)
    rows: list[dict[str, Any]] = []
    seen: dict[tuple[str, str], str] = {}
    config_columns: dict[str, None] = {}
    for run_dir in run_dirs:
        try:
            row, keys, found = _run_row(run_dir, root, stale_after_s)
        except OSError as err:  # e.g. moved away by `slurm.submit --force` while we read it
            row, keys, found = None, [], [LoadProblem(str(run_dir), "", f"unreadable folder: {err}", True)]
        problems.extend(found)
        if row is None:
            continue
        # The same config in two sweeps is two legitimate runs (e.g. the default point of two
        # ablations); within one sweep a second folder with the same id is a stray copy.
        key = (row["sweep"], row["run_id"])
        if key in seen:
            problems.append(LoadProblem(str(run_dir), "config.json", f"duplicate run_id, kept {seen[key]}", True))
            continue
        seen[key] = row["run_dir"]
        config_columns.update(dict.fromkeys(keys))
        rows.append(row)
    runs = pd.DataFrame(rows, columns=None if rows else ["run_id", "sweep", "status", "reason", "run_dir",
                                                         "last_write_age_s"])
    numeric_metrics(runs)
    usage_ceiling(runs)
    runs.attrs["problems"] = tuple(problems)
    # Which columns came from config.json, so that analysis can tell parameters from results.
    runs.attrs["config_columns"] = tuple(config_columns)
    if warn:
        _report(problems, root, "load_runs")
    return runs


def _workers(misses: int, workers: int | None) -> int:
    if workers is not None:
        return max(1, workers)
    # A pool costs ~0.5 s to start and pickles every table back: worth it for many files only.
    return min(8, os.cpu_count() or 1) if misses >= POOL_MIN_FILES else 1


def _source(source: PathLike | pd.DataFrame, warn: bool) -> tuple[pd.DataFrame, Path, list[LoadProblem]]:
    """The runs to read (``source`` itself if it is a runs frame), the folder loaded, and load_runs' problems."""
    if isinstance(source, pd.DataFrame):
        return source, Path(os.path.commonpath(source["run_dir"].tolist() or ["."])), []
    runs = load_runs(source, warn=warn)
    return runs, Path(source), list(runs.attrs.get("problems", ()))


Files = list[tuple[str, Path, Source | None]]


def _files(runs: pd.DataFrame, filename: str) -> Files:
    """Each run's id, its ``filename`` and that file's :class:`Source` (None where it has none yet)."""
    files: Files = []
    for run_id, run_dir in zip(runs["run_id"], runs["run_dir"], strict=True):
        path = Path(run_dir) / filename
        try:
            files.append((str(run_id), path, Source(path)))
        except FileNotFoundError:
            files.append((str(run_id), path, None))  # this run has no such file (yet)
    return files


def _per_run(
    files: Files, kind: str, build: Build, cache_dir: Path | None, workers: int | None
) -> tuple[list[cols.Part], list[str], list[LoadProblem]]:
    """Each run's file as a part (from the cache when unchanged), its run id, and problems.

    Files not in the cache are parsed in a thread pool when there are many (``workers=None``:
    Arrow's readers and compute calls release the GIL), or in ``workers`` processes when given.
    """
    listing = cache_listing(cache_dir)
    found: dict[int, Any] = {}
    misses: list[tuple[int, Source]] = []
    for i, (_, _, source) in enumerate(files):
        if source is None:
            continue
        hit = cache_lookup(source, kind, cache_dir, listing)
        if hit is None:
            misses.append((i, source))
        else:
            found[i] = hit
    args = [(source, kind, build, cache_dir, stale_entries(listing, source, kind, cache_dir)) for _, source in misses]
    n_workers = _workers(len(misses), workers)
    if n_workers > 1 and workers is None:
        # Threads by default: Arrow's Parquet and JSON readers release the GIL, and nothing is pickled back.
        with ThreadPoolExecutor(n_workers) as threads:
            results = list(threads.map(lambda a: parse_and_cache_safely(*a), args))
    elif n_workers > 1:  # workers=N: processes, for logs only the stdlib parser can read (GIL-bound)
        with ProcessPoolExecutor(n_workers) as pool:
            results = list(pool.map(parse_and_cache_safely, *zip(*args, strict=True),
                                    chunksize=max(1, len(misses) // (4 * n_workers))))
    else:
        results = [parse_and_cache_safely(*a) for a in args]
    found.update(zip([i for i, _ in misses], results, strict=True))
    parts, ids, problems = [], [], []
    for i in sorted(found):
        run_id, path, _ = files[i]
        result = found[i]
        if isinstance(result, str):
            problems.append(LoadProblem(str(path.parent), path.name, result, True))
            continue
        part, notes = result
        problems.extend(LoadProblem(str(path.parent), path.name, note, False) for note in notes)
        parts.append(part)
        ids.append(run_id)
    return parts, ids, problems


def load_metrics(
    source: PathLike | pd.DataFrame,
    *,
    kinds: Iterable[str] | None = None,
    cache: CacheArg = True,
    workers: int | None = None,
    warn: bool = True,
) -> pd.DataFrame:
    """Every ``metrics.jsonl`` row of every run: ``run_id``, ``step``, ``kind``, ``layer``,
    ``codebook``, ``mode``, then metric columns (NaN where a row kind lacks the metric).

    ``source``: a results folder, or a runs frame from :func:`load_runs` (only its runs are
    read). ``kinds``: keep only these row kinds (``"quantizer"``, ``"train"``, ``"val"``).
    ``cache``: True (default folder, see ``LFQ_ANALYSIS_CACHE``), False, or a folder.
    ``workers``: processes parsing uncached files (default None: up to 8 threads when 64 or more miss).
    """
    runs, root, run_problems = _source(source, warn)
    cache_dir = resolve_cache(cache)
    files = _files(runs, "metrics.jsonl")
    # A whole load that was made before from the same files is one memory-mapped read (warm path).
    target = set_cache_file(cache_dir, "metrics", files, str(root.resolve())) if cache_dir is not None else None
    hit = read_set_cache(target) if target is not None else None
    if hit is not None:
        metrics, problems = hit
    else:
        parts, ids, problems = _per_run(files, "metrics", cols.metrics_columns, cache_dir, workers)
        metrics = cols.concat(parts, ids, ID_COLUMNS[1:]) if parts else pd.DataFrame(columns=list(ID_COLUMNS))
        if target is not None and parts:
            write_set_cache(target, metrics, problems)
    if kinds is not None and "kind" in metrics:
        metrics = metrics[metrics["kind"].isin(list(kinds))].reset_index(drop=True)
    problems = [*run_problems, *problems]
    metrics.attrs["problems"] = tuple(problems)
    if warn:
        _report([p for p in problems if p.file == "metrics.jsonl"], root, "load_metrics")
    return metrics


def load_bit_pair_mi(
    source: PathLike | pd.DataFrame, *, cache: CacheArg = True, workers: int | None = None, warn: bool = True
) -> pd.DataFrame:
    """The pairwise mutual information between bits that histogram snapshots carry, one row per
    (run, snapshot, bit i, bit j): ``run_id``, ``step`` (the diagnostic step it was measured on),
    ``layer``, ``codebook``, ``mode``, ``codebook_size``, ``bit_i``, ``bit_j``, ``mi`` (nats)."""
    runs, root, run_problems = _source(source, warn)
    parts, ids, problems = _per_run(_files(runs, "histograms.jsonl"), "pair_mi", cols.pair_mi_columns,
                                    resolve_cache(cache), workers)
    lead = (*cols.HISTOGRAM_META, "bit_i", "bit_j", "mi")
    frame = cols.concat(parts, ids, lead) if parts else pd.DataFrame(columns=["run_id", *lead])
    frame.attrs["problems"] = tuple([*run_problems, *problems])
    return frame


def load_histograms(
    source: PathLike | pd.DataFrame, *, cache: CacheArg = True, workers: int | None = None, warn: bool = True
) -> pd.DataFrame:
    """Code histogram snapshots, one row per (run, snapshot, code):
    ``run_id``, ``step``, ``layer``, ``codebook``, ``mode``, ``codebook_size``, ``code``, ``count``.
    Counts are those since the previous snapshot of the same run (as written)."""
    runs, root, run_problems = _source(source, warn)
    parts, ids, problems = _per_run(_files(runs, "histograms.jsonl"), "histograms", cols.histogram_columns,
                                    resolve_cache(cache), workers)
    problems = [*run_problems, *problems]
    lead = (*cols.HISTOGRAM_META, "code", "count")
    hist = cols.concat(parts, ids, lead) if parts else pd.DataFrame(columns=["run_id", *lead])
    hist.attrs["problems"] = tuple(problems)
    if warn:
        _report([p for p in problems if p.file == "histograms.jsonl"], root, "load_histograms")
    return hist
