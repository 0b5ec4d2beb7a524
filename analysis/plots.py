"""Utilization figures from the frames of ``analysis.load``: pure functions returning Figures.

Every function returns a ``matplotlib.figure.Figure`` 1280 px wide, or, when the data it
needs is missing, ``None`` with a ``NoDataWarning`` saying why (``strict=True`` raises
``NoData`` instead). Bands over seeds are min-max; lines are the mean over seeds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis.aggregate import (
    FRAC,
    GAMMA,
    curves,
    fmt_value,
    grid_summary,
    parameters,
    run_labels,
    select,
    short_name,
)
from analysis.style import (
    BAND_ALPHA,
    HEATMAP_CMAP,
    LINESTYLES,
    MARKERS,
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
    set_scale_for_zeros,
    skippable,
    spread_coincident,
    text_color_on,
    title,
)

CURVE_METRICS = ("per_sample_entropy", "batch_entropy", "commitment", "usage_fraction")


def _grid_columns(runs: pd.DataFrame, x: str, y: str) -> None:
    """Refuse to average over parameters that are neither on an axis nor seeds (among the
    finished runs, the only ones grid plots use)."""
    for column in (x, y):
        require(column in runs.columns, f"no config column {column!r} in these runs")
    others = [p for p in parameters(select(runs)) if p not in (x, y)]
    shown = ", ".join(others[:4]) + (f" and {len(others) - 4} more" if len(others) > 4 else "")
    require(not others, f"other parameters vary too ({shown}); pick one value of each with --where KEY=VALUE "
            f"(analysis.where(runs, [...]) in Python), or report one sweep folder")


def _codebook_size(runs: pd.DataFrame) -> float | None:
    """The codebook size shared by all runs, if they share one."""
    column = "quantizer.codebook_size"
    if column in runs and runs[column].nunique() == 1:
        return float(runs[column].iloc[0])
    return None


def _finished(runs: pd.DataFrame, metric: str) -> pd.DataFrame:
    require(metric in runs.columns, f"no {metric!r} in any summary.json (no finished runs yet?)")
    done = select(runs)
    done = done[done[metric].notna()]
    require(len(done), f"no finished run has a {metric!r}")
    return done


@skippable
def usage_heatmap(
    runs: pd.DataFrame, metric: str = "final_usage_fraction", x: str = GAMMA, y: str = FRAC
) -> Figure:
    """Mean over seeds of ``metric`` for every (``x``, ``y``) grid point, annotated mean ± std (n)."""
    _grid_columns(runs, x, y)
    done = _finished(runs, metric)
    table = grid_summary(done, metric, by=[y, x])
    mean = table.pivot(index=y, columns=x, values="mean").sort_index(ascending=False)
    std = table.pivot(index=y, columns=x, values="std").reindex_like(mean)
    n = table.pivot(index=y, columns=x, values="n").reindex_like(mean)
    fig, axes = new_figure(height=max(3.6, 1.0 + 0.95 * len(mean.index)))
    ax = axes[0, 0]
    # Anchored at 0 for counts and fractions so that colour is proportional to the value; the
    # top follows the data, or a smoke sweep's 1-3 % usage would be one dark block.
    values = mean.to_numpy(float)
    nonnegative = np.nanmin(values) >= 0
    image = ax.imshow(values, cmap=HEATMAP_CMAP, aspect="auto", vmin=0.0 if nonnegative else None)
    for i in range(mean.shape[0]):
        for j in range(mean.shape[1]):
            value = mean.iat[i, j]
            if not np.isfinite(value):
                ax.text(j, i, "no run", ha="center", va="center", color="0.4")
                continue
            spread = f" ± {std.iat[i, j]:.2g}" if np.isfinite(std.iat[i, j]) else ""
            ax.text(j, i, f"{value:.3g}{spread}\nn={int(n.iat[i, j])}", ha="center", va="center",
                    color=text_color_on(image.cmap(image.norm(value))), fontsize=11)
    ax.set_xticks(range(mean.shape[1]), [fmt_value(v) for v in mean.columns])
    ax.set_yticks(range(mean.shape[0]), [fmt_value(v) for v in mean.index])
    ax.set_xlabel(f"diversity_gamma ({short_name(x)})" if x == GAMMA else x)
    ax.set_ylabel("frac_per_sample_entropy" if y == FRAC else y)
    ax.grid(False)
    fig.colorbar(image, ax=ax, label=label(metric), fraction=0.05, pad=0.02)
    ax.set_title(f"{title(label(metric))}: mean ± std over seeds ({len(done)} finished runs)")
    return fig


@skippable
def usage_vs_gamma(
    runs: pd.DataFrame,
    metrics: Sequence[str] = ("final_usage_fraction", "final_perplexity"),
    x: str = GAMMA,
    hue: str = FRAC,
) -> Figure:
    """One panel per metric against ``x``; a line (mean over seeds) per ``hue`` value with min-max
    whiskers over seeds. Each line has its own colour, line style and marker, is drawn thinner than
    the one before and a little to the side of it, so that equal results stay two visible lines."""
    _grid_columns(runs, x, hue)
    present = [m for m in metrics if m in runs.columns and select(runs)[m].notna().any()]
    require(present, f"no finished run has any of {list(metrics)}")
    fig, axes = new_figure(1, len(present), height=5.2)
    for ax, metric in zip(axes[0], present, strict=True):
        table = grid_summary(_finished(runs, metric), metric, by=[hue, x])
        groups = list(table.groupby(hue, sort=True))
        set_parameter_axis(ax, table[x].tolist())
        xlog = ax.get_xscale() != "linear"
        for i, ((value, part), color, (dash, marker)) in enumerate(
                zip(groups, colors(len(groups)), series_styles(len(groups)), strict=True)):
            xs = dodge(part[x], i, len(groups), log=xlog)
            ax.plot(xs, part["mean"], color=color, marker=marker, linestyle=dash, label=fmt_value(value),
                    markerfacecolor="none" if i else color, zorder=2 + i, **layered(i, len(groups)))
            # Whiskers, not shaded bands: overlapping bands blend into a colour of neither line.
            ax.vlines(xs, part["min"], part["max"], color=color, linewidth=1.4, alpha=0.8, zorder=2 + i)
        size = _codebook_size(runs)
        if metric.endswith("perplexity") and size:
            # Perplexity runs from 1 (one code) to K (all codes equally): log shows both ends.
            ax.axhline(size, color="0.35", linestyle="--", linewidth=1.2, label=f"K = {size:g} (all codes, uniform)")
            ax.set_yscale("log")
        elif "usage" in metric:
            ax.set_ylim(bottom=0)
        else:
            set_log_if_wide(ax, np.r_[table["min"].to_numpy(float), table["max"].to_numpy(float)])
        ax.set_xlabel("diversity_gamma" if x == GAMMA else x)
        ax.set_ylabel(label(metric))
        ax.set_title(title(label(metric)))
    # One legend for both panels, outside them: the lines are the same frac values in each.
    figure_legend(fig, axes, short_name(hue) if hue == FRAC else hue)
    what = " and ".join(label(m).split(" (")[0] for m in present)
    fig.suptitle(f"{title(what)} against {x.rsplit('.', 1)[-1]}\n(line: mean over seeds, whiskers: min-max over "
                 "seeds; lines a little aside, so that equal ones stay visible)")
    return fig


def layers(metrics: pd.DataFrame) -> list[str]:
    """Quantizer layers that logged metrics, in first-seen order."""
    if "layer" not in metrics or "kind" not in metrics:
        return []
    rows = metrics.loc[metrics["kind"] == "quantizer", "layer"].dropna()
    return list(dict.fromkeys(rows.astype(str)))


def _ordered(values: Sequence[object]) -> list[object]:
    """Numbers in numeric order (10 after 2), anything else in text order."""
    try:
        return sorted(values)  # type: ignore[type-var]
    except TypeError:
        return sorted(values, key=str)


def _styles(groups: pd.DataFrame, by: list[str]) -> dict[str, tuple[object, str, str]]:
    """(colour, line style, marker) per group, each (line style, marker) pair distinct. Colour and
    marker by the first parameter's value, line style by the second's, so a grid of 4 x 3 stays
    readable; with other shapes, one colour per group and :func:`series_styles`."""
    labels = groups["group"].tolist()
    if len(by) in (1, 2) and groups[by[0]].nunique() <= 8 and (len(by) == 1 or groups[by[1]].nunique() <= len(LINESTYLES)):
        first = _ordered(list(groups[by[0]].unique()))
        palette = dict(zip(first, colors(len(first)), strict=True))
        marks = dict(zip(first, MARKERS, strict=False))
        if len(by) == 1:  # one parameter: line styles turn with it too
            dashes = {v: style[0] for v, style in zip(first, series_styles(len(first)), strict=True)}
            return {g: (palette[row[by[0]]], dashes[row[by[0]]], marks[row[by[0]]])
                    for g, (_, row) in zip(labels, groups.iterrows(), strict=True)}
        second = dict(zip(_ordered(list(groups[by[1]].unique())), LINESTYLES, strict=False))
        return {g: (palette[row[by[0]]], second[row[by[1]]], marks[row[by[0]]])
                for g, (_, row) in zip(labels, groups.iterrows(), strict=True)}
    palette = colors(len(labels))
    pairs = series_styles(len(labels)) if len(labels) <= 32 else [
        (LINESTYLES[(i // 8) % len(LINESTYLES)], MARKERS[i % len(MARKERS)]) for i in range(len(labels))]
    return {g: (palette[i], *pairs[i]) for i, g in enumerate(labels)}


@skippable
def training_curves(
    metrics: pd.DataFrame,
    runs: pd.DataFrame,
    *,
    layer: str | None = None,
    names: Sequence[str] = CURVE_METRICS,
    mode: str = "train",
    per_run: bool = False,
) -> Figure:
    """Per-step ``names`` of one quantizer layer, one line per grid point (mean over seeds,
    min-max band) or per run (``per_run=True``). ``layer=None`` needs a single layer."""
    found = layers(metrics)
    require(found, "no quantizer rows in metrics.jsonl")
    if layer is None:
        if len(found) > 1:
            raise ValueError(f"metrics hold several quantizer layers {found}; pass layer=")
        layer = found[0]
    require(layer in found, f"no quantizer rows for layer {layer!r} (layers: {found})")
    rows = metrics[metrics["layer"].astype(str).eq(layer)]
    by = parameters(runs) + (["seed"] if per_run else [])
    fig, axes = new_figure(2, 2, height=8.6, sharex=True)
    drawn = 0
    for ax, metric in zip(axes.flat, names, strict=False):
        stats = curves(rows, runs, metric, mode=mode, by=by)
        ax.set_title(title(label(metric)))
        ax.set_ylabel(label(metric))
        if stats.empty:
            ax.text(0.5, 0.5, f"no {metric} values", transform=ax.transAxes, ha="center", color="0.4")
            continue
        drawn += 1
        styles = _styles(stats.drop_duplicates("group")[[*by, "group"]], by)
        # Many overlapping bands turn into a mud of colour: fainter bands when there are many.
        alpha = BAND_ALPHA if len(styles) <= 4 else BAND_ALPHA / 2
        count = stats["group"].nunique()
        for i, (group, part) in enumerate(stats.groupby("group", sort=False)):
            color, dash, marker = styles[group]
            # A few markers per line, at steps that differ between lines, so equal curves stay apart.
            every = max(1, len(part) // 6)
            ax.plot(part["step"], part["mean"], color=color, linestyle=dash, marker=marker, label=group,
                    markevery=(i * every // max(1, count), every), markerfacecolor="none" if i else color,
                    zorder=2 + i, **layered(i, count))
            if not per_run and (part["n"] > 1).any():
                ax.fill_between(part["step"], part["min"], part["max"], color=color, alpha=alpha, linewidth=0)
        if metric == "commitment":
            set_log_if_wide(ax, stats["mean"].to_numpy(float))
        # A series that sits near 0 most of the time (the per-sample entropy once assignments are
        # confident) is a flat line on a linear axis: log, or symlog when it reaches 0.
        scale = set_scale_for_zeros(ax, stats["mean"].to_numpy(float)) if metric != "commitment" else "linear"
        if scale == "symlog":
            ax.set_ylim(bottom=0)
            ax.set_title(f"{title(label(metric))} (symlog: linear near 0)")
        elif scale == "log":
            ax.set_title(f"{title(label(metric))} (log scale)")
        elif metric in ("usage_fraction", "per_sample_entropy", "batch_entropy"):
            ax.set_ylim(bottom=0)
        size = _codebook_size(runs)
        if metric == "batch_entropy" and size:
            ceiling = math.log(size)
            ax.set_title(f"{ax.get_title()}, ceiling ln K = {ceiling:.2f}")
            # Drawn only when the curves come near it; far above them it squashes them flat.
            if stats["max"].max() > 0.4 * ceiling:
                ax.axhline(ceiling, color="0.35", linestyle="--", linewidth=1.2)
    require(drawn, f"no values of {list(names)} for layer {layer!r} in {mode} mode")
    for ax in axes[-1]:
        ax.set_xlabel("training step")
    how = "run" if per_run else "grid point\n(line: mean over seeds,\nband: min-max)"
    figure_legend(fig, axes, how)
    fig.suptitle(f"Training dynamics of quantizer layer {layer!r} ({mode} steps)")
    return fig


def rank_frequencies(hist: pd.DataFrame, snapshot: str = "last") -> pd.DataFrame:
    """Sorted code frequencies per (run, layer, codebook): columns ``rank`` (1 = most used),
    ``frequency`` (share of that codebook's assignments), ``codebook_size``, ``step``.

    ``snapshot="last"``: the last snapshot only (counts since the one before: the final code
    distribution); ``"all"``: every snapshot summed (the whole run).
    """
    if snapshot not in ("last", "all"):
        raise ValueError(f"snapshot must be 'last' or 'all', got {snapshot!r}")
    rows = hist
    if "mode" in rows and (rows["mode"] == "train").any():
        rows = rows[rows["mode"] == "train"]
    keys = ["run_id", "layer", "codebook"]
    if snapshot == "last":
        last = rows.groupby(keys, observed=True)["step"].transform("max")
        rows = rows[rows["step"] == last]
    counts = rows.groupby([*keys, "code"], observed=True).agg(count=("count", "sum"), step=("step", "max"),
                                                             codebook_size=("codebook_size", "max")).reset_index()
    counts = counts[counts["count"] > 0].sort_values([*keys, "count"], ascending=[True, True, True, False])
    grouped = counts.groupby(keys, observed=True)
    counts["rank"] = grouped.cumcount() + 1
    counts["frequency"] = counts["count"] / grouped["count"].transform("sum")
    counts["step"] = grouped["step"].transform("max")
    return counts[[*keys, "rank", "frequency", "codebook_size", "step"]].reset_index(drop=True)


@skippable
def rank_frequency(hist: pd.DataFrame, runs: pd.DataFrame, *, snapshot: str = "last") -> Figure:
    """Code rank against frequency (log-log), one panel per layer: a thin line per run and
    codebook (each seed's own distribution), and per grid point a bold line, the lower median over
    them at each rank (a run that used fewer codes counts 0 there, so the median ends where
    half the runs have run out of codes). The dashed line is a uniform codebook, 1/K."""
    require(len(hist), "no histogram snapshots (histograms.jsonl) in these runs")
    freq = rank_frequencies(hist, snapshot)
    require(len(freq), "histogram snapshots hold no counts")
    by = parameters(runs)
    meta = runs.set_index("run_id")
    freq["group"] = freq["run_id"].astype(str).map(run_labels(runs, by))
    freq = freq[freq["group"].notna()]
    require(len(freq), "histogram snapshots belong to no loaded run")
    layer_names = list(dict.fromkeys(freq["layer"].astype(str)))
    ncols = min(3, len(layer_names))
    nrows = math.ceil(len(layer_names) / ncols)
    fig, axes = new_figure(nrows, ncols, height=5.4 * nrows)
    groups = freq.drop_duplicates("group")[["run_id", "group"]]
    group_meta = groups.assign(**{c: groups["run_id"].astype(str).map(meta[c]) for c in by})
    styles = _styles(group_meta.sort_values(by or ["group"])[[*by, "group"]], by)
    for ax, layer in zip(axes.flat, layer_names, strict=False):
        part = freq[freq["layer"].astype(str) == layer]
        size = int(part["codebook_size"].max())
        for i, group in enumerate(styles):
            rows = part[part["group"] == group]
            if rows.empty:
                continue
            color, dash, marker = styles[group]
            dists = []
            for _, one in rows.groupby(["run_id", "codebook"], sort=True, observed=True):
                dist = np.zeros(size)
                dist[one["rank"].to_numpy() - 1] = one["frequency"].to_numpy()
                used = int((dist > 0).sum())
                # A seed's own curve, thin; markers keep a run that used one code visible.
                ax.plot(np.arange(1, used + 1), dist[:used], color=color, linestyle="-", linewidth=0.9, alpha=0.55,
                        marker="." if used <= 32 else None, markersize=4, label="_nolegend_")
                dists.append(dist)
            # The lower median: at an even count the smaller middle value, so that every point is some
            # run's own (the mean of a 16-code and a 32-code seed is a curve neither has).
            median = np.quantile(np.vstack(dists), 0.5, axis=0, method="lower")
            ranks = np.flatnonzero(median > 0) + 1
            counts = ", ".join(str(int((d > 0).sum())) for d in dists)
            ax.plot(ranks, median[ranks - 1], color=color, linestyle=dash, marker=marker if len(ranks) <= 32 else None,
                    markersize=6, linewidth=2.6, zorder=3 + i,
                    label=f"{group} (codes: {counts})" if len(layer_names) == 1 else group)
        ax.axhline(1.0 / size, color="0.35", linestyle="--", linewidth=1.2, label=f"uniform: 1/K, K={size}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(0.8, size * 1.25)
        ax.set_xlabel("code rank (1 = most used)")
        ax.set_ylabel("frequency (share of assignments)")
        ax.set_title(f"Layer {layer!r}")
    for ax in list(axes.flat)[len(layer_names):]:
        ax.set_visible(False)
    figure_legend(fig, axes, "grid point, bold: median\n(codes used by each run)" if len(layer_names) == 1
                  else "grid point, bold: median")
    which = "last snapshot (final window)" if snapshot == "last" else "all snapshots summed"
    fig.suptitle(f"Code rank-frequency, {which}; thin: one line per run (seed), bold: median over them")
    return fig


@skippable
def reconstruction_vs_usage(
    runs: pd.DataFrame, x: str = "final_usage_fraction", ys: Sequence[str] = ("final_val_mse", "final_val_psnr")
) -> Figure:
    """Reconstruction against utilization, one point per finished run: colour = first
    varying parameter, marker = second (one colour per grid point when more vary)."""
    done = _finished(runs, x)
    present = [y for y in ys if y in done.columns and done[y].notna().any()]
    require(present, f"no finished run has any of {list(ys)}")
    by = parameters(done)
    done = done.assign(group=done["run_id"].map(run_labels(done, by)))
    styles = _styles(done.drop_duplicates("group").sort_values(by or ["group"])[[*by, "group"]], by)
    fig, axes = new_figure(1, len(present), height=5.2)
    order = {g: i for i, g in enumerate(styles)}
    for ax, y in zip(axes[0], present, strict=True):
        if "mse" in y:
            set_log_if_wide(ax, done[y].to_numpy(float), decades=1.0)
        # Runs with (nearly) equal results would hide behind one another: spread sideways.
        points = done[done[y].notna()]
        points = points.assign(order=points["group"].map(order)).sort_values(["order", "run_id"])
        # Markers (s=70) are ~2.2 % of a panel wide: closer points overlap, so they are spread that far apart.
        xs = spread_coincident(points[x].to_numpy(float), points[y].to_numpy(float), ylog=ax.get_yscale() == "log",
                               tol=0.022, step=0.024)
        for group, (color, dash, marker) in styles.items():
            mask = (points["group"] == group).to_numpy()
            if len(by) == 2:  # no line here to carry the second parameter: its marker does
                marker = MARKERS[LINESTYLES.index(dash) % len(MARKERS)]
            ax.scatter(xs[mask], points.loc[mask, y], color=color, marker=marker, s=70, label=group, alpha=0.85,
                       edgecolor="white", linewidth=0.6)
        ax.set_xlabel(label(x))
        ax.set_ylabel(label(y))
        ax.set_title(f"{title(label(y))} against usage")
    figure_legend(fig, axes[:, :1], "grid point")
    fig.suptitle(f"Reconstruction against codebook utilization ({len(done)} finished runs, one point each; "
                 "coinciding points spread sideways)")
    return fig
