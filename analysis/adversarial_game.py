"""The adversarial game beside utilization: for runs trained with a discriminator, the training
usage, the discriminator's loss and LeCAM term, its mean logits on real and reconstructed images,
and the generator's adversarial term with the weight it took, per step, one line style per run."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis.aggregate import parameters
from analysis.style import colors, figure_legend, new_figure, require, series_styles, skippable

GAME_COLUMNS = ("d_loss", "g_adv_loss", "adaptive_weight", "d_real", "d_fake", "lecam_loss")


def played(metrics: pd.DataFrame) -> bool:
    """Whether any run logged a step of the game (a finite ``d_loss`` on a train row)."""
    return "d_loss" in metrics and "kind" in metrics and bool(metrics.loc[metrics["kind"] == "train", "d_loss"].notna().any())


def _run_labels(runs: pd.DataFrame, run_ids: list[str]) -> dict[str, str]:
    """Each run's id with the values of the parameters that differ between the runs shown."""
    shown = runs[runs["run_id"].isin(run_ids)] if "run_id" in runs else runs
    varied = [p for p in parameters(shown) if p in shown]
    labels = {}
    for run_id in run_ids:
        row = shown[shown["run_id"] == run_id]
        values = ", ".join(f"{p.split('.')[-1]}={row[p].iloc[0]}" for p in varied) if len(row) else ""
        labels[run_id] = f"{run_id}" + (f" ({values})" if values else "")
    return labels


@skippable
def adversarial_game(metrics: pd.DataFrame, runs: pd.DataFrame) -> Figure:
    """Four panels over training steps: usage fraction (mean over quantizer layers and codebooks),
    the discriminator's hinge loss (and LeCAM, dotted), its mean logits on real (solid) and
    reconstructed (dashed) images, and the generator's adversarial term with its weight (dotted,
    right axis)."""
    require(played(metrics), "no run logged a finite d_loss (no adversarial loss, or its start not reached)")
    train = metrics[metrics["kind"] == "train"]
    game_runs = sorted(train.loc[train["d_loss"].notna(), "run_id"].astype(str).unique())
    quantizer = metrics[(metrics["kind"] == "quantizer") & (metrics.get("mode") == "train")]
    usage = quantizer[quantizer["run_id"].astype(str).isin(game_runs)].groupby(["run_id", "step"], observed=True)[
        "usage_fraction"].mean().reset_index() if "usage_fraction" in quantizer else pd.DataFrame()
    fig, axes = new_figure(2, 2, height=7.2, sharex=True)
    palette = colors(len(game_runs))
    styles = series_styles(len(game_runs))
    labels = _run_labels(runs, game_runs)
    weight_axis = axes[1, 1].twinx()
    for i, run_id in enumerate(game_runs):
        color, (line, marker) = palette[i], styles[i]
        rows = train[train["run_id"].astype(str) == run_id].sort_values("step")
        common = {"color": color, "marker": marker, "markevery": max(1, len(rows) // 8), "markersize": 4}
        if len(usage):
            u = usage[usage["run_id"].astype(str) == run_id]
            axes[0, 0].plot(u["step"], u["usage_fraction"], linestyle=line, label=labels[run_id],
                            **{**common, "markevery": max(1, len(u) // 8)})
        axes[0, 1].plot(rows["step"], rows["d_loss"], linestyle=line, **common)
        if "lecam_loss" in rows and rows["lecam_loss"].notna().any():
            axes[0, 1].plot(rows["step"], rows["lecam_loss"], linestyle=":", color=color)
        axes[1, 0].plot(rows["step"], rows["d_real"], linestyle="-", **common)
        axes[1, 0].plot(rows["step"], rows["d_fake"], linestyle="--", **common)
        axes[1, 1].plot(rows["step"], rows["g_adv_loss"], linestyle=line, **common)
        weight_axis.plot(rows["step"], rows["adaptive_weight"], linestyle=":", color=color)
    axes[0, 0].set_ylabel("usage fraction (training window)")
    axes[0, 0].set_ylim(-0.02, 1.02)
    axes[0, 0].set_title("Usage of the codebook")
    axes[0, 1].set_ylabel("hinge loss (LeCAM dotted)")
    axes[0, 1].set_title("Discriminator loss")
    axes[1, 0].set_ylabel("mean logit: real solid, reconstructed dashed")
    axes[1, 0].set_title("Discriminator logits")
    axes[1, 0].axhline(0.0, color="0.6", linewidth=0.8)
    axes[1, 1].set_ylabel("generator's adversarial loss")
    weight_axis.set_ylabel("its weight (dotted)")
    weights = train["adaptive_weight"].to_numpy(dtype=float)
    finite = weights[np.isfinite(weights) & (weights > 0)]
    if len(finite) and finite.max() / finite.min() > 30:
        weight_axis.set_yscale("log")
    axes[1, 1].set_title("Generator's adversarial term")
    for ax in axes[1]:
        ax.set_xlabel("step")
    figure_legend(fig, axes, "run")
    return fig


CURVE_PANELS = (("usage_fraction", "usage (training window)"),
                ("saturated_fraction", "saturated token-bits"),
                ("dead_bits", "dead bits"),
                ("batch_entropy", "batch entropy (nats)"))


@skippable
def adversarial_curves_figure(curves: pd.DataFrame) -> Figure:
    """Claim 5 over training: usage, saturation, dead bits and batch entropy per diagnostic step,
    one line per (codebook size, adversarial weight): the mean over seeds, with its min-max band;
    colour by codebook size, solid without the discriminator and dashed with it."""
    from analysis.column_names import ADVERSARIAL, SIZE

    require(len(curves) and ADVERSARIAL in curves and SIZE in curves, "no adversarial curves")
    sizes = sorted(curves[SIZE].astype(int).unique())
    weights = sorted(curves[ADVERSARIAL].astype(float).unique())
    palette = dict(zip(sizes, colors(len(sizes)), strict=True))
    fig, axes = new_figure(2, 2, height=7.2, sharex=True)
    for ax, (column, text) in zip(axes.flat, CURVE_PANELS, strict=True):
        if column not in curves:
            ax.set_visible(False)
            continue
        for size in sizes:
            for weight in weights:
                part = curves[(curves[SIZE].astype(int) == size) & (curves[ADVERSARIAL].astype(float) == weight)]
                stats = part.groupby("step")[column].agg(["mean", "min", "max", "count"]).reset_index()
                if not len(stats) or stats["mean"].isna().all():
                    continue
                n = int(part["run_id"].nunique())
                style = "-" if weight == 0 else "--"
                label = f"2^{int(np.log2(size))} codes, " + (
                    "no discriminator" if weight == 0 else f"adversarial weight {weight:g}") + f" (n={n})"
                ax.plot(stats["step"], stats["mean"], linestyle=style, color=palette[size], label=label,
                        marker="o" if weight else "s", markersize=3)
                ax.fill_between(stats["step"], stats["min"], stats["max"], color=palette[size], alpha=0.12)
        ax.set_ylabel(text)
        ax.set_title(text[:1].upper() + text[1:].split(" (")[0])
    for ax in axes[1]:
        ax.set_xlabel("step")
    figure_legend(fig, axes, "mean over seeds; band: min-max")
    return fig
