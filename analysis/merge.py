"""Folding run folders into committed ``summary.csv`` files by run id, or refusing to drop runs.

The committed summaries of ``results/ablations/`` and ``results/recipe/`` outlive their run
folders: a re-run of a few runs must update those rows and keep the rest (``--merge``), and a
plain rewrite must refuse to drop rows whose runs are not under the runs root
(:class:`WouldLoseRuns`). :func:`command_text` merges the ``command.txt`` that goes with them;
:func:`reruns` says which re-run runs did not reproduce their committed numbers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from analysis.claims import SUMMARY_ENV, grid_columns

# The final numbers a re-run must reproduce (those of them that both summaries hold).
RERUN_METRICS = ("final_val_usage_fraction", "final_val_psnr", "final_usage_fraction", "final_codes_used")


class WouldLoseRuns(ValueError):
    """Writing would drop rows of an existing ``summary.csv`` whose runs are not under the runs root."""


def _sorted(summary: pd.DataFrame) -> pd.DataFrame:
    keys = [c for c in ("sweep", *grid_columns(summary), "seed", "run_id") if c in summary]
    return summary.sort_values(keys, kind="stable").reset_index(drop=True)


def merge_summaries(old: pd.DataFrame, new: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """``old`` (a committed ``summary.csv``) updated by ``new`` (rows from run folders), by run id.

    A run in both takes its new row, except that a finished old row is never replaced by an
    unfinished new one (a run restarted with ``--force`` and not done yet); rows of runs only in
    ``old`` are kept. Returns the merged summary, sorted as :func:`summarize` sorts, and one note
    per run whose finished row was kept over an unfinished one."""
    for frame, name in ((old, "the existing summary"), (new, "the runs")):
        if "run_id" not in frame or frame["run_id"].isna().any():
            raise ValueError(f"{name} has rows without a run_id: cannot merge by run; "
                             "rewrite it from its run folders instead")
    old = old.astype({"run_id": str})
    new = new.astype({"run_id": str})
    old_status = old.set_index("run_id")["status"] if "status" in old else pd.Series(dtype=object)
    new_status = new["status"] if "status" in new else pd.Series(None, index=new.index, dtype=object)
    keep_old = new["run_id"].map(old_status).eq("done") & new_status.ne("done")
    notes = [f"{run_id}: kept the finished row; its run folder is now {status if isinstance(status, str) else 'not started'}"
             for run_id, status in zip(new.loc[keep_old, "run_id"], new_status[keep_old], strict=True)]
    fresh = new[~keep_old]
    columns = list(dict.fromkeys([*new.columns, *old.columns]))
    kept = old[~old["run_id"].isin(fresh["run_id"])]
    merged = pd.concat([kept, fresh], ignore_index=True) if len(kept) else fresh.copy()
    merged = merged.reindex(columns=columns)
    for column in merged.columns:
        dtypes = [f[column].dtype for f in (new, old) if column in f]
        numeric = [pd.api.types.is_numeric_dtype(d) and not pd.api.types.is_bool_dtype(d) for d in dtypes]
        if merged[column].dtype == object and any(numeric):
            # numbers in one frame, only None in the other (a metric another quantizer kind has not):
            # kept as objects they would reach the CSV as reprs, not in the float format of the rest
            merged[column] = pd.to_numeric(merged[column])
        if any(pd.api.types.is_integer_dtype(d) for d in dtypes) and merged[column].notna().all():
            merged[column] = merged[column].astype("int64")  # a NaN in an unfinished row made ints floats
    return _sorted(merged), notes


def _as_committed(value: object) -> float:
    """``value`` at the committed CSVs' precision (6 significant digits): a fresh run's full-precision
    number and its committed row are compared as the CSV would hold both."""
    return float(f"{float(value):.6g}")


def reruns(old: pd.DataFrame, new: pd.DataFrame, metrics: tuple[str, ...] = RERUN_METRICS) -> list[str]:
    """Notes on the runs finished in both ``old`` (committed) and ``new`` (run folders): how many
    reproduce ``metrics`` at the committed 6 significant digits, and one note per run that did not, naming what it ran
    on where that differs (``env_*`` columns; a run computed on another CPU ISA or torch sums in
    another order: ``experiments.provenance``) or that the committed row recorded nothing."""
    if not len(old) or not len(new) or "status" not in old or "status" not in new:
        return []
    done_old = old[old["status"] == "done"].astype({"run_id": str}).set_index("run_id")
    done_new = new[new["status"] == "done"].astype({"run_id": str}).set_index("run_id")
    both = done_old.index.intersection(done_new.index)
    notes = []
    for run_id in both:
        changed = [f"{m} {done_old.at[run_id, m]:.6g} -> {done_new.at[run_id, m]:.6g}"
                   for m in metrics if m in done_old and m in done_new
                   and not np.isclose(_as_committed(done_old.at[run_id, m]), _as_committed(done_new.at[run_id, m]),
                                      rtol=1e-6, atol=0.0, equal_nan=True)]
        if not changed:
            continue
        recorded = [c for c in SUMMARY_ENV if c in done_old and pd.notna(done_old.at[run_id, c])]
        differs = [f"{c} {done_old.at[run_id, c]} -> {done_new.at[run_id, c]}" for c in recorded
                   if c in done_new and str(done_old.at[run_id, c]) != str(done_new.at[run_id, c])]
        where = (f"; it ran elsewhere: {'; '.join(differs)}" if differs
                 else "; same recorded environment" if recorded else "; the committed run recorded no environment")
        notes.append(f"{run_id}: re-run did not reproduce the committed numbers ({'; '.join(changed)}{where})")
    return [f"{len(both)} finished run(s) are both committed and in the run folders read; {len(both) - len(notes)} "
            "match the committed final numbers", *notes] if len(both) else []


def merged_or_refused(summary: pd.DataFrame, existing: Path, mode: str) -> tuple[pd.DataFrame, list[str]]:
    """What to write over ``existing`` (a ``summary.csv``, maybe absent) for ``mode`` ``"replace"``,
    ``"merge"`` or ``"refuse"`` (:class:`WouldLoseRuns` if it holds runs ``summary`` lacks), and notes."""
    if mode == "replace" or not existing.is_file():
        return summary, []
    old = pd.read_csv(existing, dtype={"run_id": str})  # an all-digit id keeps its leading zeros
    if mode == "merge":
        merged, notes = merge_summaries(old, summary)
        return merged, [*reruns(old, summary), *notes]
    refuse_dropping(old.get("run_id", pd.Series(dtype=str)), summary["run_id"], f"{existing} has",
                    "the runs root", "the summary")
    return summary, []


def refuse_dropping(old_ids: pd.Series, new_ids: pd.Series, holder: str, root: str, what: str) -> None:
    """:class:`WouldLoseRuns` if ``old_ids`` (committed) holds run ids that ``new_ids`` lacks."""
    missing = sorted(set(old_ids.astype(str)) - set(new_ids.astype(str)))
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise WouldLoseRuns(
            f"{holder} {len(missing)} run(s) that are not under {root} ({shown}); writing would drop them. "
            f"Pass --merge to keep them and update the rest by run id, or --replace to rewrite {what} "
            "from these runs alone")


RUNS_HEADER = "# the runs ("  # how analysis.studies.submit_commands starts each sweep's block


def command_text(path: Path, run_lines: list[str], command: str, keep_old: bool, marker: str) -> str:
    """``command.txt``: how the runs were made (``run_lines``: blocks that each start with a
    ``# the runs (<sweep>/...)`` line), then ``marker``, then every analysis command that fed the
    tables. With ``keep_old`` the earlier ``path``'s lines of both kinds are kept: a sweep's new
    submit lines join its old block, and the new command follows the old ones."""
    old_runs: list[str] = []
    analysis_lines: list[str] = []
    if keep_old and path.is_file():
        lines = path.read_text(encoding="utf-8").splitlines()
        cut = lines.index(marker) if marker in lines else len(lines)
        old_runs, analysis_lines = lines[:cut], lines[cut + 1:]
    blocks: dict[str, list[str]] = {}
    for line in [*old_runs, *run_lines]:
        if line.startswith(RUNS_HEADER) or not blocks:
            blocks.setdefault(line, [])
            header = line
        elif line not in blocks[header]:
            blocks[header].append(line)
    for header, lines in blocks.items():  # "N submission(s) recorded no command" stays its block's last line
        blocks[header] = sorted(lines, key=lambda line: line.startswith("# "))
    run_part = [line for header, lines in blocks.items() for line in (header, *lines)]
    analysis_lines = list(dict.fromkeys([*analysis_lines, command]))
    return "\n".join([*run_part, marker, *analysis_lines]) + "\n"
