"""Claims 2 and 3 on the images task, in both regimes (issue 15, step 4): ``entropy_weight`` (usage
and reconstruction against ``entropy_loss_weight``, one series per inverse temperature, 10 the
recipe's and 100 the reference's) and ``gamma_frac`` (against ``diversity_gamma``, one series per
inverse temperature and ``frac_per_sample_entropy``); the runs come from several sweeps
(``entropy_weight_images``, ``gamma_frac_images``, ``recipe_regime``), so they are picked by their
settings, not by their sweep, and a run listed by two sweeps counts once. The claims and their
verdicts are in results/README.md.
"""

from __future__ import annotations

import dataclasses
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

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
    MODE,
    PRESET,
    RESOLUTION,
    SCHEDULE,
    SIZE,
    STEPS,
    TAU,
    WEIGHT,
)
from analysis.quantizer_comparison import value_or
from analysis.style import new_figure, require, seed_series, skippable

METRICS = ("final_val_usage_fraction", "final_val_psnr", "final_val_ssim", "final_val_perplexity")
FIXED = (COMMITMENT, MODE, PRESET, RESOLUTION, DOWNSAMPLE, BATCH, STEPS)
# a config's value where a run's table has none (older runs, or a key the sweep never set)
DEFAULTS = {KIND: "lfq", SCHEDULE: "constant", GAMMA: 1.0, FRAC: 1.0, WEIGHT: 0.1, TAU: 100.0, ADVERSARIAL: 0.0}
REGIMES = {10.0: "recipe", 100.0: "reference"}


@dataclass(frozen=True)
class ImagesClaim:
    name: str
    number: int  # in results/README.md
    x: str  # the swept setting
    series: tuple[str, ...]  # what tells the lines apart
    select: Mapping[str, tuple[object, ...]]  # the settings a run must have to be part of the claim
    statement: str
    only: Mapping[str, tuple[object, ...]] = dataclasses.field(default_factory=dict)  # as select, not a column


IMAGES_CLAIMS = (
    ImagesClaim("entropy_weight", 2, WEIGHT, (TAU,),
                {KIND: ("lfq",), SIZE: (16384,), SCHEDULE: ("constant",), GAMMA: (1.0,), FRAC: (1.0,),
                 TAU: (10.0, 100.0)},
                "A larger entropy weight gives higher utilization and worse reconstruction; "
                "without it utilization drops.", only={ADVERSARIAL: (0.0,)}),
    ImagesClaim("gamma_frac", 3, GAMMA, (TAU, FRAC),
                {KIND: ("lfq",), SIZE: (16384,), SCHEDULE: ("constant",), WEIGHT: (0.1,), TAU: (10.0, 100.0)},
                "diversity_gamma raises utilization; frac_per_sample_entropy < 1 keeps utilization.",
                only={ADVERSARIAL: (0.0,)}),
    ImagesClaim("adversarial", 5, ADVERSARIAL, (TAU, SIZE),
                {KIND: ("lfq",), SIZE: (1024, 16384), SCHEDULE: ("constant",), GAMMA: (1.0,), FRAC: (1.0,),
                 WEIGHT: (0.1,), TAU: (10.0,)},
                "Training against a discriminator (Open-MAGVIT2's objective) changes how much of the codebook "
                "the tokenizer uses."),
)
BY_NAME = {c.name: c for c in IMAGES_CLAIMS}


def _value(run: pd.Series, column: str) -> object:
    return value_or(run, column, DEFAULTS.get(column))


def _matches(value: object, allowed: tuple[object, ...]) -> bool:
    if isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
        return any(isinstance(a, (int, float)) and np.isclose(float(value), float(a)) for a in allowed)
    return value in allowed


def series_name(claim: ImagesClaim, run: pd.Series) -> str:
    """``inv. temp. 10 (recipe)``, ``inv. temp. 100 (reference), frac 0.25``, ..."""
    tau = float(_value(run, TAU))
    parts = [f"inv. temp. {tau:g}" + (f" ({REGIMES[tau]})" if tau in REGIMES else "")]
    parts += [f"2^{int(np.log2(float(_value(run, c))))} codes" if c == SIZE else
              f"{c.split('.')[-1].replace('frac_per_sample_entropy', 'frac')} {float(_value(run, c)):g}"
              for c in claim.series if c != TAU]
    return ", ".join(parts)


def claim_summary(runs: pd.DataFrame, claim: ImagesClaim | str) -> pd.DataFrame:
    """One row per run of ``claim`` (picked by its settings; run ids unique), with its series."""
    claim = BY_NAME[claim] if isinstance(claim, str) else claim
    require(len(runs), "no runs")
    keep = [all(_matches(_value(row, c), allowed) for c, allowed in {**claim.select, **claim.only}.items())
            for _, row in runs.iterrows()]
    table = runs[keep].copy()
    require(len(table), f"no runs with the settings of claim {claim.name!r} "
                        f"({', '.join(f'{c.split(chr(46))[-1]} in {list(v)}' for c, v in claim.select.items())})")
    settings = list(dict.fromkeys([claim.x, *claim.series, *claim.select]))
    for column in settings:  # defaults filled in, so that the CSV states every setting the claim holds
        table[column] = [_value(row, column) for _, row in table.iterrows()]
    table["series"] = [series_name(claim, row) for _, row in table.iterrows()]
    columns = ["run_id", "sweep", "status", "series", *settings, "seed", *METRICS,
               "final_val_tokens", "wall_time_s", *FIXED]
    table = table[[c for c in dict.fromkeys(columns) if c in table]].drop_duplicates("run_id")
    return table.sort_values([*claim.series, claim.x, "seed"]).reset_index(drop=True)


def claim_table(summary: pd.DataFrame, claim: ImagesClaim | str, metrics: Sequence[str] = METRICS) -> pd.DataFrame:
    """Mean, std, min and n over seeds per (series, x), finished runs only."""
    claim = BY_NAME[claim] if isinstance(claim, str) else claim
    done = summary[summary["status"] == "done"]
    present = [m for m in metrics if m in done]
    grouped = done.groupby(["series", claim.x], sort=False)[present]
    table = grouped.agg(["mean", "std", "min"])
    table.columns = [f"{m}_{s}" for m, s in table.columns]
    table["n_seeds"] = grouped.size()
    return table.reset_index()


@skippable
def claim_figure(summary: pd.DataFrame, claim: ImagesClaim | str,
                 metrics: Sequence[str] = ("final_val_usage_fraction", "final_val_psnr"), held_fixed: str = ""
                 ) -> Figure:
    """Validation usage and PSNR against the claim's setting (its values evenly spaced), one line
    per series (mean over seeds; own colour, line style and marker; dodged sideways), every seed
    a small marker."""
    claim = BY_NAME[claim] if isinstance(claim, str) else claim
    done = summary[summary["status"] == "done"]
    require(len(done), f"no finished runs of claim {claim.name!r}")
    series = list(dict.fromkeys(done["series"]))
    values = sorted(done[claim.x].astype(float).unique())
    position = {v: i for i, v in enumerate(values)}
    fig, axes = new_figure(1, len(metrics), height=6.0)
    for col, metric in enumerate(metrics):
        ax = axes[0, col]
        require(metric in done, f"no column {metric}")
        scale = 100.0 if metric.endswith("usage_fraction") else 1.0
        seed_series(ax, [(name, part[claim.x].astype(float).map(position).to_numpy(float),
                          part[metric].to_numpy(float) * scale)
                         for name in series for part in [done[done["series"] == name]]], log=False, width=0.06)
        ax.set_xticks(range(len(values)), [f"{v:g}" for v in values])
        ax.set_xlim(-0.4, len(values) - 0.6)
        ax.set_xlabel(f"{claim.x.split('.')[-1]} (evenly spaced; series dodged sideways)")
        ax.set_ylabel("val usage (% of codebook)" if scale == 100 else
                      "val PSNR (dB)" if metric.endswith("psnr") else metric.replace("_", " "))
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(2, len(series)),
               title="line: mean over seeds (n seeds); small markers: one seed each")
    counted = done["final_val_tokens"].dropna() if "final_val_tokens" in done else pd.Series(dtype=float)
    tokens = int(counted.max()) if len(counted) else None  # runs without validation have no count
    sizes = sorted(done[SIZE].unique()) if SIZE in done else []
    note = "; ".join(p for p in (
        f"2^{int(np.log2(sizes[0]))} codes" if len(sizes) == 1 else "",
        f"{tokens:,} validation tokens" if tokens else "", f"held fixed: {held_fixed}" if held_fixed else "") if p)
    title = f"Claim {claim.number} on the images task: \u201c{claim.statement}\u201d"
    fig.suptitle(textwrap.fill(title, 110) + ("\n" + textwrap.fill(note, 115) if note else ""), fontsize=12)
    return fig
