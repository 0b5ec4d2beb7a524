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
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from analysis.aggregate import (
    curves,
    fmt_value,
    grid_summary,
    parameters,
    run_labels,
    select,
    short_name,
)
from analysis.column_names import FRAC, GAMMA, SIZE
from analysis.glossary import CEILING_LABEL, figure_title, words
from analysis.load import TOKENS_PER_CODE, USAGE_CEILING, uniform_ceiling
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
    linear_below,
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

# Markers of the thin per-seed lines: open shapes, none of them the bold median's filled ones at a glance.
THIN_MARKERS = ("o", "x", "^", "+", "s", "1", "v", "*")
CURVE_METRICS = ("per_sample_entropy", "batch_entropy", "commitment", "usage_fraction")


def _grid_columns(runs: pd.DataFrame, x: str, y: str) -> str | None:
    """The parameter drawn one panel per value (None: none), refusing to average over parameters
    that are neither on an axis, nor panels, nor seeds (among the finished runs, the only ones grid
    plots use). One parameter beyond ``x`` and ``y`` makes panels when each of its values holds a
    grid of two points or more (a temperature swept beside the grid); a value with one point is a
    stray run from elsewhere, which the user should pick apart."""
    for column in (x, y):
        require(column in runs.columns, f"no config column {column!r} in these runs")
    done = select(runs)
    others = [p for p in parameters(done) if p not in (x, y)]
    if len(others) == 1:
        points = done.astype({x: str, y: str}).groupby(others[0], dropna=False)[[x, y]].apply(
            lambda part: len(part.drop_duplicates()))
        if (points >= 2).all():
            return others[0]
    shown = ", ".join(others[:4]) + (f" and {len(others) - 4} more" if len(others) > 4 else "")
    require(not others, f"other parameters vary too ({shown}); pick one value of each with --where KEY=VALUE "
            f"(analysis.where(runs, [...]) in Python), or report one sweep folder")
    return None


def _panels(runs: pd.DataFrame, panel: str | None) -> list[tuple[str, pd.DataFrame]]:
    """(title, runs) per panel value, in order; one untitled panel when there is no panel parameter."""
    if panel is None:
        return [("", runs)]
    return [(f"{words(panel)} {fmt_value(value)}", runs[runs[panel].astype(str) == str(value)])
            for value in _ordered(list(runs[panel].dropna().unique()))]


# The ceiling of each usage metric: (its ceiling column, its N/K column). The training window's are
# added by :func:`with_window_ceiling` from the metrics (the runs frame cannot know its token count).
CEILINGS = {
    "final_val_usage_fraction": (USAGE_CEILING, TOKENS_PER_CODE),
    "final_usage_fraction": ("final_usage_ceiling", "final_usage_tokens_per_code"),
}


def _ceiling_points(done: pd.DataFrame, keys: Sequence[str], metric: str = "final_val_usage_fraction") -> pd.DataFrame:
    """Mean ceiling and N/K of ``metric`` (:data:`CEILINGS`) per ``keys`` group, in the columns
    ``ceiling`` and ``ratio`` (empty when unknown)."""
    ceiling, ratio = CEILINGS.get(metric, (None, None))
    if ceiling not in done or done[ceiling].isna().all():
        return pd.DataFrame(columns=[*keys, "ceiling", "ratio"])
    have = done[done[ceiling].notna()]
    return (have.groupby(list(keys), sort=True)[[ceiling, ratio]].mean().reset_index()
            .rename(columns={ceiling: "ceiling", ratio: "ratio"}))


def with_window_ceiling(runs: pd.DataFrame, metrics: pd.DataFrame) -> pd.DataFrame:
    """``runs`` (a copy, attrs kept) with ``final_usage_tokens_per_code`` and ``final_usage_ceiling``:
    N/K and 1 - exp(-N/K) of the training usage window at each run's last logged quantizer step (N:
    that step's tokens x the window's steps, at most ``monitor.usage_window``; the mean over layers
    and codebooks), where the metrics have ``tokens``."""
    out = runs.copy()
    out.attrs.update(runs.attrs)
    need = {"tokens", "codebook_size", "step", "run_id", "kind"}
    if not need <= set(metrics.columns) or "monitor.usage_window" not in runs or not len(runs):
        return out
    rows = metrics[(metrics["kind"] == "quantizer") & metrics["tokens"].notna()]
    if "mode" in rows:
        rows = rows[rows["mode"] == "train"]
    rows = rows[rows["step"] == rows.groupby("run_id", observed=True)["step"].transform("max")]
    window = rows["run_id"].astype(str).map(runs.set_index(runs["run_id"].astype(str))["monitor.usage_window"])
    ratio = (rows["tokens"].astype(float) * np.minimum(rows["step"].astype(float) + 1, window.astype(float))
             / rows["codebook_size"].astype(float))
    per_run = ratio.groupby(rows["run_id"].astype(str), observed=True).mean()
    out["final_usage_tokens_per_code"] = out["run_id"].astype(str).map(per_run)
    out["final_usage_ceiling"] = uniform_ceiling(out["final_usage_tokens_per_code"])
    return out


def draw_ceiling(ax: Axes, xs: Sequence[float] | np.ndarray, ceilings: Sequence[float] | np.ndarray,
                 ratios: Sequence[float] | np.ndarray, *, axis: str = "y", color: object = "0.3") -> None:
    """The usage ceiling 1 - exp(-N/K): one dashed line across the panel when all points share it,
    else dashed segments through each point's; labelled with its value and N/K for the legend."""
    ceilings, ratios = np.asarray(ceilings, dtype=float), np.asarray(ratios, dtype=float)
    if not ceilings.size or not np.isfinite(ceilings).any():
        return
    shared = np.nanmax(ceilings) - np.nanmin(ceilings) < 5e-4  # 4 digits: what the label prints
    text = (f"{CEILING_LABEL} = {np.nanmean(ceilings):.4f} (N/K = {np.nanmean(ratios):.3g})" if shared
            else f"{CEILING_LABEL} (N/K = {np.nanmin(ratios):.3g}-{np.nanmax(ratios):.3g})")
    if shared:
        (ax.axhline if axis == "y" else ax.axvline)(float(np.nanmean(ceilings)), color=color, linestyle=(0, (5, 3)),
                                                    linewidth=1.4, label=text, zorder=1)
    elif axis == "x":  # one vertical line per distinct ceiling
        for i, value in enumerate(sorted({round(float(c), 4) for c in ceilings if np.isfinite(c)})):
            ax.axvline(value, color=color, linestyle=(0, (5, 3)), linewidth=1.4, label=text if i == 0 else "_nolegend_",
                       zorder=1)
    else:
        ax.plot(xs, ceilings, color=color, linestyle=(0, (5, 3)), linewidth=1.4, marker="_", markersize=14,
                label=text, zorder=1)


def _codebook_size(runs: pd.DataFrame) -> float | None:
    """The codebook size shared by all runs, if they share one."""
    column = SIZE
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
    """Mean over seeds of ``metric`` for every (``x``, ``y``) grid point, annotated mean ± std and
    the number of seeds (n); a cell whose validation usage is capped (ceiling 1 - exp(-N/K) under
    0.98) also says its ceiling. One heatmap per value of a third swept parameter (a temperature)."""
    panel = _grid_columns(runs, x, y)
    done = _finished(runs, metric)
    tables = [(name, part, grid_summary(part, metric, by=[y, x])) for name, part in _panels(done, panel) if len(part)]
    rows = max(t[y].nunique() for _, _, t in tables)
    fig, axes = new_figure(1, len(tables), height=max(3.6, 1.0 + 0.95 * rows))
    values = np.concatenate([t["mean"].to_numpy(float) for _, _, t in tables])
    nonnegative = np.nanmin(values) >= 0
    # One colour scale for all panels, so equal colours mean equal values. Anchored at 0 for counts
    # and fractions so that colour is proportional to the value; the top follows the data, or a
    # smoke sweep's 1-3 % usage would be one dark block.
    vmin, vmax = (0.0 if nonnegative else float(np.nanmin(values))), float(np.nanmax(values))
    ceiling = metric in CEILINGS
    for ax, (name, part, table) in zip(axes[0], tables, strict=True):
        mean = table.pivot(index=y, columns=x, values="mean").sort_index(ascending=False)
        std = table.pivot(index=y, columns=x, values="std").reindex_like(mean)
        n = table.pivot(index=y, columns=x, values="n").reindex_like(mean)
        caps = _ceiling_points(part, [y, x], metric) if ceiling else None
        cap = (caps.pivot(index=y, columns=x, values="ceiling").reindex_like(mean)
               if caps is not None and len(caps) else None)
        image = ax.imshow(mean.to_numpy(float), cmap=HEATMAP_CMAP, aspect="auto", vmin=vmin, vmax=vmax)
        for i in range(mean.shape[0]):
            for j in range(mean.shape[1]):
                value = mean.iat[i, j]
                if not np.isfinite(value):
                    ax.text(j, i, "no run", ha="center", va="center", color="0.4")
                    continue
                spread = f" ± {std.iat[i, j]:.2g}" if np.isfinite(std.iat[i, j]) else ""
                text = f"{value:.3g}{spread}\nn={int(n.iat[i, j])}"
                if cap is not None and np.isfinite(cap.iat[i, j]) and cap.iat[i, j] < 0.98:
                    text += f"\nceiling {cap.iat[i, j]:.2g}"
                ax.text(j, i, text, ha="center", va="center",
                        color=text_color_on(image.cmap(image.norm(value))), fontsize=11 if len(tables) == 1 else 9.5)
        ax.set_xticks(range(mean.shape[1]), [fmt_value(v) for v in mean.columns])
        ax.set_yticks(range(mean.shape[0]), [fmt_value(v) for v in mean.index])
        ax.set_xlabel(f"diversity_gamma ({short_name(x)})" if x == GAMMA else x)
        ax.set_ylabel("frac_per_sample_entropy" if y == FRAC else y)
        ax.grid(False)
        if name:
            ax.set_title(name)
    fig.colorbar(image, ax=list(axes[0]), label=label(metric), fraction=0.05, pad=0.02)
    fig.suptitle(f"{figure_title([metric], x, y, panel)}\n(mean ± std over seeds, n = seeds; {len(done)} finished runs)")
    return fig


@skippable
def usage_vs_gamma(
    runs: pd.DataFrame,
    metrics: Sequence[str] = ("final_usage_fraction", "final_perplexity"),
    x: str = GAMMA,
    hue: str = FRAC,
) -> Figure:
    """A row of panels per metric against ``x``, a column per value of a third swept parameter (a
    temperature; one column when there is none); a line (mean over seeds) per ``hue`` value with
    min-max whiskers over seeds. Each line has its own colour, line style and marker, is drawn
    thinner than the one before and a little to the side of it, so that equal results stay two
    visible lines. Validation usage panels draw the ceiling 1 - exp(-N/K); a point with one seed
    says ``n=1``."""
    panel = _grid_columns(runs, x, hue)
    present = [m for m in metrics if m in runs.columns and select(runs)[m].notna().any()]
    require(present, f"no finished run has any of {list(metrics)}")
    columns = _panels(select(runs), panel)
    # Without panels the metrics stand side by side (as wide as the page); with them, a row each.
    rows_first = panel is not None
    shape = (len(present), len(columns)) if rows_first else (1, len(present))
    fig, axes = new_figure(*shape, height=5.2 if shape[0] == 1 else 4.3 * shape[0])
    hues = _ordered(list(select(runs)[hue].dropna().unique()))
    styles = dict(zip(hues, zip(colors(len(hues)), series_styles(len(hues)), strict=True), strict=True))
    single = False
    for row, metric in enumerate(present):
        done = _finished(runs, metric)
        for col, (name, part) in enumerate(columns):
            ax = axes[row, col] if rows_first else axes[0, row]
            part = done[done.index.isin(part.index)]
            if part.empty:
                ax.text(0.5, 0.5, f"no finished run with {label(metric)}", transform=ax.transAxes, ha="center")
                continue
            table = grid_summary(part, metric, by=[hue, x])
            set_parameter_axis(ax, done[x].tolist())
            xlog = ax.get_xscale() != "linear"
            for value, line in table.groupby(hue, sort=True):
                i = hues.index(value)
                color, (dash, marker) = styles[value]
                xs = dodge(line[x], i, len(hues), log=xlog)
                ax.plot(xs, line["mean"], color=color, marker=marker, linestyle=dash, label=fmt_value(value),
                        markerfacecolor="none" if i else color, zorder=2 + i, **layered(i, len(hues)))
                # Whiskers, not shaded bands: overlapping bands blend into a colour of neither line.
                ax.vlines(xs, line["min"], line["max"], color=color, linewidth=1.4, alpha=0.8, zorder=2 + i)
                for xv, yv, n in zip(xs, line["mean"], line["n"], strict=True):
                    if n == 1:  # a mean of one seed says so where it stands
                        single = True
                        ax.annotate("n=1", (xv, yv), xytext=(4, 5), textcoords="offset points", fontsize=9,
                                    color=color)
            size = _codebook_size(part)
            if metric.endswith("perplexity") and size:
                # Perplexity runs from 1 (one code) to K (all codes equally): log shows both ends.
                ax.axhline(size, color="0.35", linestyle="--", linewidth=1.2, label=f"K = {size:g} (all codes, uniform)")
                ax.set_yscale("log")
            elif "usage" in metric:
                caps = _ceiling_points(part, [x], metric)
                draw_ceiling(ax, caps[x].to_numpy(float), caps["ceiling"], caps["ratio"])
                ax.set_ylim(bottom=0)
            else:
                set_log_if_wide(ax, np.r_[table["min"].to_numpy(float), table["max"].to_numpy(float)])
            if row == len(present) - 1 or not rows_first:
                ax.set_xlabel("diversity_gamma" if x == GAMMA else x)
            if col == 0:
                ax.set_ylabel(label(metric))
            # What tells the panels apart, in words: the panel parameter's value, the metric where several.
            ax.set_title(": ".join(t for t in (name, title(words(metric)) if len(present) > 1 else "") if t))
    for row_axes in (axes if rows_first else axes.T):  # one scale across a metric's panels: compared by eye
        lows, highs = zip(*(ax.get_ylim() for ax in row_axes), strict=True)
        for ax in row_axes:
            ax.set_ylim(min(lows), max(highs))
    # One legend for all panels, outside them: the lines are the same frac values in each.
    figure_legend(fig, axes, (short_name(hue) if hue == FRAC else hue) + ("\n(n=1: one seed)" if single else ""))
    fig.suptitle(f"{figure_title(present, x, hue, panel)}\n(line: mean over seeds, whiskers: min-max over seeds; "
                 "lines a little aside, so that equal ones stay visible)")
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
        # Decided on the bands too: a seed's minimum at 1e-40 would otherwise stretch a log axis to it.
        shown = np.r_[stats["mean"].to_numpy(float), stats["min"].to_numpy(float), stats["max"].to_numpy(float)]
        scale = set_scale_for_zeros(ax, shown) if metric != "commitment" else "linear"
        if scale == "symlog":
            ax.set_ylim(bottom=0)
            # The scale on a second line: on one, a half-width panel's title runs into its neighbour's.
            ax.set_title(f"{title(label(metric))}\nsymlog: linear below {linear_below(ax):.2g}")
        elif scale == "log":
            ax.set_title(f"{title(label(metric))}\nlog scale")
        elif metric in ("usage_fraction", "per_sample_entropy", "batch_entropy"):
            ax.set_ylim(bottom=0)
        size = _codebook_size(runs)
        if metric == "batch_entropy" and size:
            ceiling = math.log(size)
            ax.set_title(f"{ax.get_title()}{', ' if chr(10) in ax.get_title() else chr(10)}ceiling ln K = {ceiling:.2f}")
            # Drawn only when the curves come near it; far above them it squashes them flat.
            if stats["max"].max() > 0.4 * ceiling:
                ax.axhline(ceiling, color="0.35", linestyle="--", linewidth=1.2)
        if metric == "usage_fraction":
            window = window_ceiling(rows, runs, mode=mode)
            if len(window):
                ax.plot(window["step"], window["ceiling"], color="0.3", linestyle=(0, (5, 3)), linewidth=1.4,
                        label=f"{CEILING_LABEL}, N: tokens in the usage window", zorder=1)
                ax.set_ylim(0, max(ax.get_ylim()[1], 1.03 * float(window["ceiling"].max())))
    require(drawn, f"no values of {list(names)} for layer {layer!r} in {mode} mode")
    for ax in axes[-1]:
        ax.set_xlabel("training step")
    how = "run" if per_run else "grid point\n(line: mean over seeds,\nband: min-max)"
    figure_legend(fig, axes, how)
    fig.suptitle(f"Training dynamics of quantizer layer {layer!r} ({mode} steps)")
    return fig


def window_ceiling(rows: pd.DataFrame, runs: pd.DataFrame, *, mode: str = "train") -> pd.DataFrame:
    """Per logged step, the lowest over runs of the training usage's ceiling 1 - exp(-N/K), with N the
    tokens of the usage window then (``tokens`` of the step x the window's steps so far, at most
    ``monitor.usage_window``) and K ``codebook_size``; empty where the rows lack ``tokens``."""
    need = {"tokens", "codebook_size", "step", "run_id"}
    if not need <= set(rows.columns) or "monitor.usage_window" not in runs:
        return pd.DataFrame(columns=["step", "ceiling"])
    part = rows[(rows["kind"] == "quantizer") & rows["tokens"].notna()] if "kind" in rows else rows.iloc[:0]
    if "mode" in part:
        part = part[part["mode"] == mode]
    windows = runs.set_index(runs["run_id"].astype(str))["monitor.usage_window"]
    window = part["run_id"].astype(str).map(windows).astype(float)
    steps = np.minimum(part["step"].astype(float) + 1, window)
    ceiling = -np.expm1(-part["tokens"].astype(float) * steps / part["codebook_size"].astype(float))
    frame = pd.DataFrame({"step": part["step"], "ceiling": ceiling}).dropna()
    return frame.groupby("step", sort=True)["ceiling"].min().reset_index()


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
    seeds = meta["seed"].astype(str) if "seed" in meta else pd.Series("", index=meta.index, dtype=object)
    seed_order = _ordered(list(dict.fromkeys(seeds.loc[seeds.index.isin(freq["run_id"].astype(str))])))
    seed_styles = {v: (LINESTYLES[i % len(LINESTYLES)], THIN_MARKERS[i % len(THIN_MARKERS)])
                   for i, v in enumerate(seed_order)}
    seed_styles[None] = (LINESTYLES[0], THIN_MARKERS[0])
    seeds = seeds.to_dict()
    for ax, layer in zip(axes.flat, layer_names, strict=False):
        part = freq[freq["layer"].astype(str) == layer]
        size = int(part["codebook_size"].max())
        for i, group in enumerate(styles):
            rows = part[part["group"] == group]
            if rows.empty:
                continue
            color, dash, marker = styles[group]
            dists = []
            for (run_id, _), one in rows.groupby(["run_id", "codebook"], sort=True, observed=True):
                dist = np.zeros(size)
                dist[one["rank"].to_numpy() - 1] = one["frequency"].to_numpy()
                used = int((dist > 0).sum())
                # A seed's own curve, thin, in its grid point's colour and its seed's line style and
                # marker (a few per line, spread along it), so that two seeds of a point stay two.
                seed_dash, seed_marker = seed_styles[seeds.get(str(run_id))]
                ax.plot(np.arange(1, used + 1), dist[:used], color=color, linestyle=seed_dash, linewidth=1.1,
                        alpha=0.7, marker=seed_marker, markevery=0.12 if used > 8 else 1, markersize=5,
                        markerfacecolor="none", label="_nolegend_")
                dists.append(dist)
            # The lower median: at an even count the smaller middle value, so that every point is some
            # run's own (the mean of a 16-code and a 32-code seed is a curve neither has).
            median = np.quantile(np.vstack(dists), 0.5, axis=0, method="lower")
            ranks = np.flatnonzero(median > 0) + 1
            counts = ", ".join(str(int((d > 0).sum())) for d in dists)
            ax.plot(ranks, median[ranks - 1], color=color, linestyle=dash, marker=marker if len(ranks) <= 32 else None,
                    markersize=6, linewidth=2.6, zorder=3 + i,
                    label=(f"{group} (codes: {counts})" if len(layer_names) == 1 else group)
                    + (", n=1" if len(dists) == 1 else ""))
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
    if len(seed_order) > 1:  # which thin line is which seed: a second legend, below the first
        proxies = [Line2D([], [], color="0.3", linestyle=dash, marker=marker, markerfacecolor="none", linewidth=1.1)
                   for dash, marker in (seed_styles[v] for v in seed_order)]
        fig.legend(proxies, [f"seed {v}" for v in seed_order], loc="outside lower right", title="thin: one run",
                   ncols=min(4, len(seed_order)))
    which = "last snapshot (final window)" if snapshot == "last" else "all snapshots summed"
    fig.suptitle(f"Code rank-frequency, {which}\n(thin: one line per run, bold: median over a grid point's runs)")
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
        if x in CEILINGS:  # the most usage these runs' tokens could show
            caps = _ceiling_points(points, ["run_id"], x)
            draw_ceiling(ax, caps["ceiling"], caps["ceiling"], caps["ratio"], axis="x")
        ax.set_xlabel(label(x))
        ax.set_ylabel(label(y))
        ax.set_title(f"{title(label(y))} against usage")
    figure_legend(fig, axes[:, :1], "grid point")
    fig.suptitle(f"Reconstruction against codebook usage\n({len(done)} finished runs, one point each; "
                 "coinciding points spread sideways)")
    return fig
