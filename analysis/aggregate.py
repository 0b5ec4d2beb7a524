"""Runs and metrics frames -> statistics over seeds, per grid point.

A grid point is a set of runs whose configs differ only in the seed (and in fields that do not
change results, like logging cadence). Statistics over seeds: mean, sample standard deviation
(ddof=1, NaN for a single seed), min, max and the number of seeds ``n``.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import yaml

from analysis.column_names import FRAC, GAMMA, KIND, MODE, SEED, SIZE, WEIGHT

STATS = ("mean", "std", "min", "max", "n")

# Config fields that never tell grid points apart: they identify or log a run.
# data_*, val_images: what a run on data.root read (config.json records it beside the config), not a setting.
_NOT_PARAMETERS = ("seed", "name", "run_id", "logging.", "schedule.val_every", "schedule.checkpoint_every",
                   "data_files", "data_bytes", "data_sha256", "val_images")
SHORT_NAMES = {
    GAMMA: "γ",
    FRAC: "frac",
    SEED: "seed",
    SIZE: "K",
    WEIGHT: "w_ent",
    KIND: "quantizer",
    MODE: "entropy",
}


def config_columns(runs: pd.DataFrame) -> list[str]:
    """The runs frame's columns that came from ``config.json`` (see ``load_runs``)."""
    names = runs.attrs.get("config_columns")
    if names:
        return [c for c in names if c in runs.columns]
    # A frame built by hand: dotted names are config sections.
    return [c for c in runs.columns if "." in c and not c.startswith("summary.")]


def parameters(runs: pd.DataFrame) -> list[str]:
    """Config columns that vary across ``runs`` and can change results (the seed excluded).

    A key that some ``config.json`` files lack and the others hold with one value does not
    vary: the files without it were written before the field existed, and a field added later
    keeps the earlier behaviour at its default (``experiments.sections.new_field``), which is
    what the newer files record."""
    varying = []
    for column in config_columns(runs):
        if column.startswith(_NOT_PARAMETERS) or column in _NOT_PARAMETERS:
            continue
        if runs[column].astype(str).nunique(dropna=False) > 1 and runs[column].astype(str)[runs[column].notna()].nunique() != 1:
            varying.append(column)
    return varying


def short_name(column: str) -> str:
    return SHORT_NAMES.get(column, column.rsplit(".", 1)[-1])


def fmt_value(value: object) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def group_label(columns: Sequence[str], values: Iterable[object]) -> str:
    """``γ=0.5, frac=1`` for a grid point; ``all runs`` when nothing varies."""
    parts = [f"{short_name(c)}={fmt_value(v)}" for c, v in zip(columns, values, strict=True)]
    return ", ".join(parts) or "all runs"


def run_labels(runs: pd.DataFrame, by: Sequence[str], max_chars: int = 48) -> pd.Series:
    """A legend label per run (indexed by run id) naming its grid point, e.g. ``γ=0.5, frac=1``.

    When many parameters vary (say smoke and full runs side by side, which differ in a dozen
    resolved fields) the full label is unreadable: then only the parameters people sweep are
    named, and grid points those do not tell apart get a ``#n`` suffix.
    """
    keyed = runs.set_index("run_id")
    values = [tuple(row) for row in keyed[list(by)].itertuples(index=False)] if by else [()] * len(keyed)
    labels = [group_label(by, v) for v in values]
    if labels and max(map(len, labels)) > max_chars:
        named = [c for c in by if c in SHORT_NAMES or c == "scale"] or list(by[:2])
        picked = [tuple(v[by.index(c)] for c in named) for v in values]
        labels = [group_label(named, p) for p in picked]
        seen: dict[str, dict[tuple[object, ...], int]] = {}
        for i, (text, full) in enumerate(zip(list(labels), values, strict=True)):
            variants = seen.setdefault(text, {})
            variants.setdefault(full, len(variants) + 1)
            if variants[full] > 1:
                labels[i] = f"{text} #{variants[full]}"
    return pd.Series(labels, index=keyed.index, dtype=object)


def select(runs: pd.DataFrame, statuses: Iterable[str] | None = ("done",)) -> pd.DataFrame:
    """Runs with one of ``statuses`` (all runs for None). Partial runs would mix in results
    from fewer training steps, so grid statistics use finished runs by default."""
    if statuses is None:
        return runs
    return runs[runs["status"].isin(list(statuses))]


def seed_stats(frame: pd.DataFrame, by: Sequence[str], value: str) -> pd.DataFrame:
    """Mean, std (ddof=1), min, max and count of ``value`` per ``by`` group, NaNs ignored."""
    grouped = frame.groupby(list(by), observed=True, dropna=False, sort=True)[value]
    out = grouped.agg(["mean", "std", "min", "max", "count"]).rename(columns={"count": "n"})
    return out.reset_index()


def grid_summary(
    runs: pd.DataFrame,
    metric: str,
    by: Sequence[str] | None = None,
    statuses: Iterable[str] | None = ("done",),
) -> pd.DataFrame:
    """One row per grid point: the ``by`` columns (default: every varying parameter) and the
    seed statistics of ``metric`` (``mean``, ``std``, ``min``, ``max``, ``n``)."""
    chosen = select(runs, statuses)
    if metric not in chosen.columns:
        raise KeyError(f"no column {metric!r} in the runs frame; summary columns: "
                       f"{sorted(c for c in chosen.columns if c.startswith(('final_', 'best_')))}")
    by = list(parameters(runs) if by is None else by)
    if not by:
        stats = chosen[metric].agg(["mean", "std", "min", "max", "count"])
        return pd.DataFrame([stats.to_numpy()], columns=list(STATS))
    return seed_stats(chosen, by, metric)


def curves(
    metrics: pd.DataFrame,
    runs: pd.DataFrame,
    metric: str,
    *,
    kind: str = "quantizer",
    mode: str | None = "train",
    by: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Seed statistics of ``metric`` per (grid point, layer, step) for ``kind`` rows.

    Columns: the ``by`` columns (default: every varying parameter), ``group`` (a label),
    ``layer`` (quantizer rows), ``step``, then ``mean``, ``std``, ``min``, ``max``, ``n``.
    """
    rows = metrics[metrics["kind"] == kind] if "kind" in metrics else metrics.iloc[:0]
    if mode is not None and "mode" in rows:
        rows = rows[rows["mode"] == mode]
    if metric not in rows.columns:
        return pd.DataFrame(columns=["group", "step", *STATS])
    rows = rows[rows[metric].notna()]
    by = list(parameters(runs) if by is None else by)
    meta = runs.set_index("run_id")[by] if by else pd.DataFrame(index=runs["run_id"])
    labels = run_labels(runs, by)
    keep = ["step", metric] + (["layer"] if kind == "quantizer" and "layer" in rows else [])
    frame = rows[keep].copy()
    run_ids = rows["run_id"].astype(str)
    frame["group"] = run_ids.map(labels)
    for column in by:
        frame[column] = run_ids.map(meta[column])
    frame = frame[frame["group"].notna()]  # rows of runs not in ``runs``
    keys = [*by, "group", *(["layer"] if "layer" in keep else []), "step"]
    if "layer" in frame:
        frame["layer"] = frame["layer"].astype(str)
    return seed_stats(frame, keys, metric)


class WhereError(ValueError):
    """A ``key=value`` run filter names no column, cannot be parsed, or matches no run."""


def where(runs: pd.DataFrame, conditions: Iterable[str] | Mapping[str, object]) -> pd.DataFrame:
    """The runs whose columns equal every condition: ``["quantizer.codebook_size=1024", "name=demo"]``
    or ``{"quantizer.codebook_size": 1024}``. Values in strings are read as YAML scalars (``1e-3``,
    ``true``, ``[8, 5]``); numbers compare as numbers (1024 == 1024.0). Keeps ``attrs``.
    WhereError if a key is no column, or if the conditions leave no run (naming the values there are)."""
    items = list(conditions.items()) if isinstance(conditions, Mapping) else [_split(c) for c in conditions]
    picked = runs
    for key, value in items:
        if key not in runs.columns:
            near = difflib.get_close_matches(key, [str(c) for c in runs.columns], n=3)
            hint = f"; did you mean {' or '.join(near)}?" if near else f"; columns: {', '.join(map(str, runs.columns[:12]))}"
            raise WhereError(f"--where {key}=...: the runs have no column {key!r}{hint}")
        mask = _equals(picked[key], value)
        if not mask.any():
            seen = sorted({fmt_value(v) for v in picked[key].dropna().tolist()})[:10]
            raise WhereError(f"--where {key}={fmt_value(value)} matches none of the {len(picked)} runs left; "
                             f"{key} has: {', '.join(seen) or 'no values'}")
        picked = picked[mask]
    picked = picked.copy()
    picked.attrs.update(runs.attrs)
    return picked


def _split(condition: str) -> tuple[str, object]:
    key, sep, raw = str(condition).partition("=")
    if not sep or not key.strip():
        raise WhereError(f"--where {condition!r} must look like KEY=VALUE, e.g. quantizer.codebook_size=1024")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise WhereError(f"--where {condition!r}: cannot read the value ({' '.join(str(err).split())})") from None
    return key.strip(), value


def _equals(column: pd.Series, value: object) -> pd.Series:
    if isinstance(value, list):
        value = tuple(value)
    if isinstance(value, bool) or value is None:
        return column.map(lambda v: v is value or v == value)
    if isinstance(value, (int, float)) and pd.api.types.is_numeric_dtype(column.dtype):
        return pd.Series(np.isclose(column.astype(float), float(value), rtol=1e-12, atol=0.0), index=column.index)
    return column.map(lambda v: v == value or fmt_value(v) == fmt_value(value))
