"""The ablation claims' figures (issue 8): one per claim from its joined summaries, and the clamp
probe's (``python -m experiments.clamp_probe``, ``results/ablations/clamp_probe/probe.csv``).

Lines are the mean over finished seeds with min-max whiskers; each line has its own colour, line
style and marker and sits a little to the side of the others, so equal results stay visible.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from analysis.aggregate import fmt_value, seed_stats, select
from analysis.claims import CLAMP_NATS, require_probe
from analysis.column_names import KIND, MODE, SIZE, WEIGHT
from analysis.plots import usage_heatmap, usage_vs_gamma
from analysis.style import (
    BAND_ALPHA,
    colors,
    dodge,
    figure_legend,
    label,
    layered,
    new_figure,
    require,
    series_styles,
    set_log_if_wide,
    set_parameter_axis,
    skippable,
    title,
)


def _lines(ax: Axes, summary: pd.DataFrame, x: str, hue: str | None, metric: str, *, xlog: bool = True
           ) -> pd.DataFrame:
    """Mean over seeds against ``x``, a line per ``hue`` value, min-max whiskers; ``n=`` where fewer
    seeds finished than at the best-covered point, so a partial sweep is visible in the plot."""
    done = select(summary)
    done = done[done[metric].notna()] if metric in done else done.iloc[:0]
    require(len(done), f"no finished run has a {metric!r}")
    by = [hue, x] if hue else [x]
    table = seed_stats(done, by, metric)
    groups = list(table.groupby(hue, sort=True)) if hue else [(None, table)]
    full = table["n"].max()
    styles = zip(colors(len(groups)), series_styles(len(groups)), strict=True)
    for i, ((value, part), (color, (dash, marker))) in enumerate(zip(groups, styles, strict=True)):
        # Dashes and markers differ too, and each line sits a little aside: two kinds with equal
        # results would otherwise hide one another.
        xs = dodge(part[x], i, len(groups), log=xlog)
        ax.plot(xs, part["mean"], color=color, marker=marker, linestyle=dash, zorder=2 + i,
                markerfacecolor="none" if i else color, label=fmt_value(value) if hue else "mean over seeds",
                **layered(i, len(groups)))
        ax.vlines(xs, part["min"], part["max"], color=color, linewidth=1.4, alpha=0.8, zorder=2 + i)
        for xv, yv, n in zip(xs, part["mean"], part["n"], strict=True):
            if n < full:
                ax.annotate(f"n={n}", (xv, yv), textcoords="offset points", xytext=(4, 6), fontsize=9, color=color)
    ax.set_ylabel(label(metric))
    ax.set_title(title(label(metric)))
    return table


def _log2_axis(ax: Axes, sizes: Sequence[float]) -> None:
    ax.set_xscale("log", base=2)
    values = sorted({float(v) for v in sizes})
    ax.set_xticks(values, [f"$2^{{{int(round(math.log2(v)))}}}$" for v in values])
    ax.set_xlabel("codebook size K (codes, log2 scale)")


def _finished(summary: pd.DataFrame) -> int:
    return int((summary["status"] == "done").sum())


@skippable
def vocab_figure(summary: pd.DataFrame, metrics: Sequence[str] = ("final_usage_fraction", "final_val_psnr")) -> Figure:
    """Claim 1: usage and validation PSNR against codebook size, a line per quantizer kind."""
    require(SIZE in summary and KIND in summary, "no quantizer.codebook_size / quantizer.kind columns")
    fig, axes = new_figure(1, len(metrics))
    for ax, metric in zip(axes[0], metrics, strict=True):
        table = _lines(ax, summary, SIZE, KIND, metric)
        _log2_axis(ax, table[SIZE].tolist())
        if "usage" in metric:
            set_log_if_wide(ax, table["min"].to_numpy(float), decades=1.0)
    figure_legend(fig, axes, "quantizer")
    fig.suptitle(f"Claim 1: vocabulary size ({_finished(summary)} finished runs; line: mean, whiskers: min-max over seeds)")
    return fig


@skippable
def entropy_weight_figure(summary: pd.DataFrame,
                          metrics: Sequence[str] = ("final_usage_fraction", "final_val_psnr")) -> Figure:
    """Claim 2: usage and validation PSNR against the entropy loss weight (symlog: 0 is swept)."""
    require(WEIGHT in summary, "no quantizer.entropy_loss_weight column")
    fig, axes = new_figure(1, len(metrics))
    for ax, metric in zip(axes[0], metrics, strict=True):
        table = _lines(ax, summary, WEIGHT, None, metric, xlog=False)
        set_parameter_axis(ax, table[WEIGHT].tolist())
        ax.set_xlabel("entropy_loss_weight (symlog scale: 0 is swept)")
    figure_legend(fig, axes, "")
    fig.suptitle(f"Claim 2: entropy loss weight ({_finished(summary)} finished runs; whiskers: min-max over seeds)")
    return fig


CLAMP_TRAIN_TITLES = {
    "clamp_train": "Claim 4 where the clamp binds (patches task): exact vs clamped entropy, 65,536 tokens per batch",
    "clamp_train_images": "Claim 4 where the clamp binds (images task, inv. temp. 10): exact vs clamped, 65,536 tokens",
}


@skippable
def clamp_figure(summary: pd.DataFrame, title: str = "Claim 4: exact vs reference (clamped) entropy") -> Figure:
    """Claim 4: usage and final batch entropy against codebook size, one line per entropy mode
    (exact vs reference, or vs "clamped" where the clamp binds), with the ln K ceiling and the
    reference clamp's 11.51-nat cap."""
    require(SIZE in summary and MODE in summary, "no quantizer.codebook_size / quantizer.entropy_mode columns")
    fig, axes = new_figure(1, 2)
    usage = _lines(axes[0, 0], summary, SIZE, MODE, "final_usage_fraction")
    set_log_if_wide(axes[0, 0], usage["min"].to_numpy(float), decades=1.0)
    entropy = _lines(axes[0, 1], summary, SIZE, MODE, "final_batch_entropy")
    sizes = np.array(sorted(set(usage[SIZE]) | set(entropy[SIZE])), dtype=float)
    # a marker as well as the line: with one codebook size the line alone is a single invisible point
    axes[0, 1].plot(sizes, np.log(sizes), color="0.35", linestyle="--", linewidth=1.2, marker="_", markersize=28,
                    label="ceiling ln K")
    axes[0, 1].axhline(CLAMP_NATS, color="#D55E00", linestyle=":", linewidth=1.5,
                       label=f"reference clamp cap -ln 1e-5 = {CLAMP_NATS:.2f} nats")
    axes[0, 1].set_ylim(bottom=0)
    axes[0, 1].set_ylabel("final batch entropy (nats)")
    axes[0, 1].set_title("Final batch entropy (nats)")
    for ax in axes[0]:
        _log2_axis(ax, sizes.tolist())
    figure_legend(fig, axes, "entropy_mode")
    fig.suptitle(f"{title} ({_finished(summary)} finished runs)")
    return fig


@skippable
def clamp_probe_figure(probe: pd.DataFrame) -> Figure:
    """Claim 4's mechanism (``python -m experiments.clamp_probe``): per inverse temperature (a
    column), the clamped mass, and the reference's diversity gradient against the exact one
    (cosine; norm ratio), against the tokens in the entropy batch, a line per codebook size."""
    require_probe(probe)
    require(len(probe), "the clamp probe table is empty")
    temperatures = sorted(probe["inv_temperature"].unique(), reverse=True)
    sizes = sorted(probe["bits"].unique())
    tokens = sorted(probe["tokens"].unique())
    rows = {"clamped_mass": "clamped mass (probability\non codes under 1e-5)",
            "grad_cosine": "cosine(reference, exact)\ndiversity gradient wrt z",
            "grad_norm_ratio": "|reference| / |exact|\ndiversity gradient norm"}
    seeds = probe["seed"].nunique() if "seed" in probe else 1
    stats = probe.groupby(["inv_temperature", "bits", "tokens"])[list(rows)].agg(["mean", "min", "max"])
    fig, axes = new_figure(len(rows), len(temperatures), height=9.6, sharex=True, sharey="row")
    for col, tau in enumerate(temperatures):
        styles = zip(sizes, colors(len(sizes)), series_styles(len(sizes)), strict=True)
        for i, (bits, color, (dash, marker)) in enumerate(styles):
            if (tau, bits) not in stats.index.droplevel("tokens"):
                continue
            line = stats.loc[(tau, bits)].sort_index()
            for row, metric in enumerate(rows):
                ax = axes[row, col]
                # Small codebooks sit on one another at 0 and 1: wider filled markers below, hollow above.
                ax.plot(line.index, line[(metric, "mean")], color=color, marker=marker, linestyle=dash, zorder=2 + i,
                        markerfacecolor="none" if i else color, label=f"$2^{{{bits}}}$ codes", **layered(i, len(sizes)))
                if seeds > 1:
                    ax.fill_between(line.index, line[(metric, "min")], line[(metric, "max")], color=color,
                                    alpha=BAND_ALPHA, linewidth=0)
        for ax in axes[:, col]:
            ax.axvline(1 / 1e-5, color="0.35", linestyle=":", linewidth=1.2,
                       label="1e5 tokens (one token's share = 1e-5)")
            ax.grid(alpha=0.3)
        axes[0, col].set_title(f"inv_temperature {tau:g}" + (" (default)" if tau == 100 else ""))
        axes[-1, col].set_xscale("log", base=2)
        axes[-1, col].set_xticks(tokens, [f"$2^{{{int(round(math.log2(t)))}}}$" for t in tokens])
        axes[-1, col].set_xlabel("tokens in the entropy batch")
    for row, text in enumerate(rows.values()):
        axes[row, 0].set_ylabel(text)
    axes[0, 0].set_ylim(-0.03, 1.03)
    axes[1, 0].set_ylim(-0.03, 1.03)
    axes[2, 0].set_yscale("log")
    axes[2, 0].axhline(1.0, color="0.6", linewidth=0.8)
    figure_legend(fig, axes, "codebook size")
    spread = f"mean of {seeds} seeds, band min-max" if seeds > 1 else "one seed"
    fig.suptitle(f"Claim 4 mechanism: the 1e-5 clamp and the diversity gradient (random z ~ N(0, 1), {spread})")
    return fig


def claim_figures(claim: str, summary: pd.DataFrame) -> dict[str, Callable[[], Figure | None]]:
    """File stem -> drawing (``strict=True``: raises ``NoData`` instead of returning None)."""
    return {
        "vocab": {"claim1_vocab": lambda: vocab_figure(summary, strict=True)},
        "entropy_weight": {"claim2_entropy_weight": lambda: entropy_weight_figure(summary, strict=True)},
        "gamma_frac": {"claim3_usage_heatmap": lambda: usage_heatmap(summary, strict=True),
                       "claim3_usage_vs_gamma": lambda: usage_vs_gamma(summary, strict=True)},
        "clamp": {"claim4_clamp": lambda: clamp_figure(summary, strict=True)},
        "clamp_train": {"claim4_train": lambda: clamp_figure(summary, CLAMP_TRAIN_TITLES[claim], strict=True)},
        "clamp_train_images": {"claim4_train_images": lambda: clamp_figure(summary, CLAMP_TRAIN_TITLES[claim],
                                                                          strict=True)},
    }[claim]
