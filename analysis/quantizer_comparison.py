"""Claim 1 on the images task, in both regimes: LFQ, BSQ, FSQ and VQ over codebook size, from the
runs of several sweeps (``recipe_regime``, ``quantizers_images``, ``vq_fair_images``,
``vq_dead_scaled_images``); each run gets a *series*, the quantizer and what distinguishes it (LFQ's
and BSQ's inverse temperature, VQ's initialisation and dead-code threshold), and LFQ and BSQ runs
away from the constant entropy weight 0.1, gamma 1 and frac 1 (the regime grid's, claims 2's and
3's) get none. The claim and its verdict are in results/README.md.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis.column_names import (
    ADVERSARIAL,
    BATCH,
    COMMITMENT,
    DOWNSAMPLE,
    FRAC,
    GAMMA,
    KIND,
    PRESET,
    RESOLUTION,
    SCHEDULE,
    SIZE,
    STEPS,
    TAU,
    VQ_DEAD,
    VQ_INIT,
    WEIGHT,
)
from analysis.glossary import kind_label, kind_rank
from analysis.style import new_figure, require, seed_series, skippable

WEIGHT_COMPARED = 0.1  # images.yaml's entropy weight: the one claim 1 compares at
METRICS = ("final_val_usage_fraction", "final_val_psnr", "final_val_ssim", "final_val_perplexity")
# the settings the comparison holds fixed, kept in its summary so that its caption can say so
FIXED = (WEIGHT, COMMITMENT, PRESET, RESOLUTION, DOWNSAMPLE, BATCH, STEPS)


def value_or(run: pd.Series, column: str, default: object) -> object:
    """``run[column]``, or ``default`` where the run has no value there (missing, None or NaN)."""
    value = run.get(column, default)
    return default if value is None or (isinstance(value, float) and np.isnan(value)) else value


def series_of(run: pd.Series) -> str | None:
    """The comparison's name for one run (a row of ``load_runs``), or None if it is not part of it."""
    kind = str(value_or(run, KIND, "lfq"))
    if float(value_or(run, ADVERSARIAL, 0.0)) != 0.0:
        return None  # trained against a discriminator: the adversarial comparison's run
    if kind in ("lfq", "bsq"):
        if (value_or(run, SCHEDULE, "constant") != "constant" or float(value_or(run, GAMMA, 1.0)) != 1.0
                or float(value_or(run, FRAC, 1.0)) != 1.0 or float(value_or(run, WEIGHT, WEIGHT_COMPARED)) != WEIGHT_COMPARED):
            return None  # a regime or claim 2-3 run: other settings than this comparison's
        tau = float(value_or(run, TAU, 100.0))
        return f"{kind_label(kind)} inv. temp. {tau:g}" + (" (reference)" if tau == 100.0 and kind == "lfq" else "")
    if kind == "vq":
        init, dead = str(value_or(run, VQ_INIT, "uniform")), float(value_or(run, VQ_DEAD, 0.0))
        return "VQ" + ("" if init == "uniform" else f" {init.replace('_', '-')} init") + (
            f" + dead-code {dead:g}" if dead > 0 else "")
    return kind_label(kind)  # any other kind, a new one included, by its name


def quantizers_summary(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per run of the comparison, run ids unique (a run found in two sweeps counts once)."""
    require(len(runs), "no runs")
    table = runs.copy()
    table["series"] = [series_of(row) for _, row in table.iterrows()]
    table = table[table["series"].notna()]
    columns = ["run_id", "sweep", "status", "series", KIND, SIZE, TAU, VQ_INIT, VQ_DEAD, "seed", *METRICS,
               "final_val_tokens", "wall_time_s", *FIXED]
    table = table[[c for c in columns if c in table]].drop_duplicates("run_id")
    table = table.assign(_k=table[KIND].map(kind_rank) if KIND in table else 0)
    return table.sort_values(["_k", "series", SIZE, "seed"]).drop(columns="_k").reset_index(drop=True)


def quantizers_table(summary: pd.DataFrame, metrics: Sequence[str] = METRICS) -> pd.DataFrame:
    """Mean, std, min and n over seeds per (series, codebook size), finished runs only."""
    done = summary[summary["status"] == "done"]
    present = [m for m in metrics if m in done]
    grouped = done.groupby(["series", SIZE], sort=False)[present]
    table = grouped.agg(["mean", "std", "min"])
    table.columns = [f"{m}_{s}" for m, s in table.columns]
    table["n_seeds"] = grouped.size()
    return table.reset_index()


@skippable
def quantizers_figure(summary: pd.DataFrame, metrics: Sequence[str] = ("final_val_usage_fraction", "final_val_psnr"),
                      held_fixed: str = "") -> Figure:
    """Validation usage and PSNR against codebook size, one line per series (mean over seeds,
    own colour, line style and marker, dodged sideways), every seed a small marker."""
    done = summary[summary["status"] == "done"]
    require(len(done), "no finished runs to compare")
    series = list(dict.fromkeys(done["series"]))
    fig, axes = new_figure(1, len(metrics), height=6.0)
    for col, metric in enumerate(metrics):
        ax = axes[0, col]
        require(metric in done, f"no column {metric}")
        scale = 100.0 if metric.endswith("usage_fraction") else 1.0
        seed_series(ax, [(name, part[SIZE].to_numpy(float), part[metric].to_numpy(float) * scale)
                         for name in series for part in [done[done["series"] == name]]], log=True, width=0.12)
        sizes = sorted(done[SIZE].unique())
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [f"2^{int(np.log2(s))}" for s in sizes])
        ax.minorticks_off()
        ax.set_xlabel("codebook size (log2; series dodged sideways)")
        ax.set_ylabel("val usage (% of codebook)" if scale == 100 else
                      "val PSNR (dB)" if metric.endswith("psnr") else metric.replace("_", " "))
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=3,
               title="line: mean over seeds (n seeds); small markers: one seed each")
    counted = done["final_val_tokens"].dropna() if "final_val_tokens" in done else pd.Series(dtype=float)
    tokens = int(counted.max()) if len(counted) else None  # runs without validation have no count
    title = "Quantizers on the images task: validation usage and PSNR against codebook size"
    note = (f"held fixed: {held_fixed}" if held_fixed else "") + (f"; {tokens:,} validation tokens" if tokens else "")
    fig.suptitle(title + ("\n" + textwrap.fill(note, 115) if note else ""), fontsize=13)
    return fig
