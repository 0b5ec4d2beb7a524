"""Seed statistics as tables: the tidy grid table (``grid.csv``), its readable ``mean ± std`` form
(the report's grid points, a claim's table) and the clamp probe's table. One implementation each,
shared by :mod:`analysis.report`, :mod:`analysis.studies` and the notebooks.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import pandas as pd

from analysis.aggregate import seed_stats, select, short_name
from analysis.claims import (
    BY_NAME,
    METRICS,
    TABLE_METRICS,
    PathLike,
    claim_summaries,
    grid_columns,
    load_ablations,
    require_probe,
)
from analysis.style import label

TIDY = ("runs", "done", "metric", "mean", "std", "min", "max", "n")


def grid_table(summary: pd.DataFrame, metrics: Sequence[str] = METRICS, by: Sequence[str] | None = None
               ) -> pd.DataFrame:
    """Tidy seed statistics: one row per (grid point, metric) with ``runs`` (folders found),
    ``done`` and ``mean``, ``std`` (ddof=1), ``min``, ``max``, ``n`` over finished runs. A grid point
    is named by ``by`` (default: the claim keys present and every varying parameter)."""
    keys = list(grid_columns(summary) if by is None else by) or ["sweep"]
    points = summary.groupby(keys, dropna=False, sort=True).agg(
        runs=("run_id", "size"), done=("status", lambda s: int((s == "done").sum()))).reset_index()
    done, parts = select(summary), []
    for metric in [m for m in metrics if m in summary]:
        stats = seed_stats(done, keys, metric) if len(done) else pd.DataFrame(columns=[*keys, "n"])
        # Left join: a point whose runs all failed or have not finished stays in the table, with n = 0.
        part = points.merge(stats, on=keys, how="left").assign(metric=metric)
        part["n"] = part["n"].fillna(0).astype(int)
        parts.append(part)
    # No run has finished yet: the points and their run counts are still worth a table.
    table = pd.concat(parts, ignore_index=True) if parts else points.assign(metric=None, n=0)
    return table.reindex(columns=[*keys, *TIDY])


def cell(mean: float, std: float) -> str:
    """``mean ± std`` as the tables print it (the mean alone for one seed, empty for none)."""
    if pd.isna(mean):
        return ""
    return f"{mean:.4g}" + ("" if pd.isna(std) else f" ± {std:.2g}")


def readable_table(tidy: pd.DataFrame, metrics: Sequence[str], counts: Sequence[str] = ("runs", "done"),
                   *, mark_single: bool = False) -> pd.DataFrame:
    """A tidy :func:`grid_table` as one row per grid point: its keys, ``counts`` (``runs``,
    ``done``, ``n``: the most seeds behind any metric) and a ``mean ± std`` column per metric, in
    ``metrics`` order, named by its label; metrics no finished run has are left out.
    ``mark_single``: a cell from one seed reads ``0.36 (n=1)``, not a bare mean."""
    keys = [c for c in tidy.columns if c not in TIDY]
    shown = [m for m in metrics if tidy.loc[tidy["metric"] == m, "mean"].notna().any()]
    texts = [cell(m, s) + (" (n=1)" if mark_single and n == 1 else "")
             for m, s, n in zip(tidy["mean"], tidy["std"], tidy["n"], strict=True)]
    cells = tidy.assign(cell=texts)
    grouped = cells.groupby(keys, dropna=False, sort=True)
    table = grouped.agg(runs=("runs", "first"), done=("done", "first"), n=("n", "max"))[list(counts)]
    if shown:
        wide = cells[cells["metric"].isin(shown)].set_index([*keys, "metric"])["cell"].unstack("metric")
        table = table.join(wide[shown])
    return table.reset_index().rename(columns={m: label(m) for m in shown})


def claim_table(summary: pd.DataFrame, metrics: Sequence[str] = TABLE_METRICS, keep: Sequence[str] = ()
                ) -> pd.DataFrame:
    """Per grid point: short-named parameters (those that vary, and ``keep``), runs, n, and
    ``mean ± std`` per metric: the readable table of a claim."""
    tidy = grid_table(summary, [m for m in metrics if m in summary and summary[m].notna().any()] or metrics)
    keys = [c for c in tidy.columns if c not in TIDY]
    table = readable_table(tidy, metrics, counts=("runs", "n"))
    # Constant settings (the entropy mode of a vocab sweep, ...) are in summary.csv; here they are noise.
    constant = [c for c in keys if c not in keep and table[c].nunique(dropna=False) == 1] if len(table) > 1 else []
    return table.drop(columns=constant).rename(columns={c: short_name(c) for c in keys})


def ablation_tables(source: PathLike | Mapping[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """``{claim name: claim_table}`` from a folder (see ``load_ablations``) or a ``{sweep: summary}``."""
    summaries = load_ablations(source) if isinstance(source, str | os.PathLike) else source
    return {name: claim_table(summary, keep=[c for c in (BY_NAME[name].x, BY_NAME[name].hue) if c])
            for name, summary in claim_summaries(summaries).items()}


PROBE_METRICS = ("clamped_mass", "grad_cosine", "grad_norm_ratio")


def clamp_probe_table(probe: pd.DataFrame) -> pd.DataFrame:
    """Rows (inv_temperature, highest first; bits), columns (metric, tokens): clamped mass and the
    reference-vs-exact diversity gradient (cosine, norm ratio) as ``mean ± std`` over seeds (the
    mean alone where a point has one seed)."""
    require_probe(probe)
    keys = ["inv_temperature", "bits", "tokens"]
    stats = probe.groupby(keys)[list(PROBE_METRICS)].agg(["mean", "std"])
    cells = pd.DataFrame({m: [f"{mean:.3g}" + ("" if pd.isna(std) else f" ± {std:.2g}")
                              for mean, std in zip(stats[(m, "mean")], stats[(m, "std")], strict=True)]
                          for m in PROBE_METRICS}, index=stats.index)
    table = cells.unstack("tokens")
    table.columns.names = ["metric", "tokens"]
    return table.sort_index(ascending=[False, True])
