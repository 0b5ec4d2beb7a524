"""Figure conventions: 1280 px wide, colour-blind-safe colours, units on every axis.

Figures are built with ``matplotlib.figure.Figure`` rather than pyplot, so drawing needs no
display, keeps no global figure list (a report that draws hundreds does not leak), and works
under any backend.
"""

from __future__ import annotations

import functools
import io
import math
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ParamSpec

import matplotlib as mpl
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from analysis.jsonl_reader import write_atomic

# 12.8 in x 100 dpi = 1280 px: a page at 1280 px shows the figure at 1:1, text unscaled.
WIDTH_IN = 12.8
DPI = 100
# Okabe & Ito (2008), ordered so the first colours are the most distinct; yellow last
# because it is faint on white.
OKABE_ITO = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#56B4E9", "#CC79A7", "#000000", "#F0E442")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LINESTYLES = ("-", "--", ":", "-.")
HEATMAP_CMAP = "viridis"  # perceptually uniform and readable with every common colour deficiency
BAND_ALPHA = 0.18
RC: dict[str, Any] = {
    "font.size": 12,
    "axes.titlesize": 13,
    "axes.labelsize": 12,
    "xtick.labelsize": 11,
    "ytick.labelsize": 11,
    "legend.fontsize": 10.5,
    "legend.title_fontsize": 11,
    "figure.titlesize": 15,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "lines.linewidth": 2.0,
    "lines.markersize": 7,
    "svg.fonttype": "none",  # keep SVG text as text: searchable, smaller
}

METRIC_LABELS = {
    "final_usage_fraction": "final usage (fraction of codebook)",
    "final_val_usage_fraction": "final val usage (fraction, all val tokens)",
    "final_val_perplexity": "final validation perplexity (codes)",
    "final_val_codes_used": "final validation codes used (codes)",
    "final_val_ssim": "final validation SSIM",
    "final_val_rfid": "final validation rFID",
    "samples_per_s": "throughput (samples/s)",
    "step_time_s": "step time (s)",
    "final_perplexity": "final perplexity (codes)",
    "final_codes_used": "final codes used (codes)",
    "final_dead_codes": "final dead codes (codes)",
    "final_val_mse": "final validation MSE",
    "best_val_mse": "best validation MSE",
    "final_val_psnr": "final validation PSNR (dB)",
    "best_val_psnr": "best validation PSNR (dB)",
    "per_sample_entropy": "per-sample entropy (nats)",
    "batch_entropy": "batch entropy (nats)",
    "commitment": "commitment loss (mean sq. distance)",
    "usage_fraction": "usage (fraction of codebook)",
    "perplexity": "perplexity (codes)",
    "codes_used": "codes used (codes)",
    "dead_codes": "dead codes (codes)",
    "val_mse": "validation MSE",
    "val_psnr": "validation PSNR (dB)",
    "loss": "training loss",
}

P = ParamSpec("P")


class NoData(ValueError):
    """The data a plot needs is not there; the message says what is missing."""


class NoDataWarning(UserWarning):
    """A plot was skipped because its data is missing."""


def skippable(fn: Callable[P, Figure]) -> Callable[..., Figure | None]:
    """Make a plot return None with a ``NoDataWarning`` instead of raising ``NoData``.

    ``strict=True`` raises instead, for callers (the report) that record the reason.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, strict: bool = False, **kwargs: Any) -> Figure | None:
        with mpl.rc_context(RC):
            try:
                return fn(*args, **kwargs)
            except NoData as err:
                if strict:
                    raise
                warnings.warn(f"{fn.__name__} skipped: {err}", NoDataWarning, stacklevel=2)
                return None

    return wrapper


def require(condition: object, reason: str) -> None:
    if not condition:
        raise NoData(reason)


class ReportFigure(Figure):
    """A Figure that shows itself in Jupyter as a PNG without pyplot or ``%matplotlib inline``."""

    def _repr_png_(self) -> bytes:
        buffer = io.BytesIO()
        self.savefig(buffer, format="png", dpi=DPI)
        return buffer.getvalue()


def new_figure(nrows: int = 1, ncols: int = 1, *, height: float = 5.2, **kwargs: Any) -> tuple[Figure, np.ndarray]:
    """A 1280 px wide figure and its axes as a 2-D array."""
    fig = ReportFigure(figsize=(WIDTH_IN, height), dpi=DPI, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **kwargs)
    return fig, axes


def title(text: str) -> str:
    """``text`` with a capital first letter (``str.capitalize`` would lower "MSE" and "dB")."""
    return text[:1].upper() + text[1:]


def label(metric: str) -> str:
    return METRIC_LABELS.get(metric, metric.replace("_", " "))


def colors(n: int) -> list[Any]:
    """``n`` distinguishable colours: Okabe-Ito up to 8, then evenly spaced viridis."""
    if n <= len(OKABE_ITO):
        return list(OKABE_ITO[:n])
    cmap = mpl.colormaps["viridis"]
    return [cmap(x) for x in np.linspace(0.0, 0.9, n)]


def spans_decades(values: Sequence[float] | np.ndarray, decades: float = 1.5) -> bool:
    """Whether positive ``values`` span more than ``decades`` orders of magnitude."""
    arr = np.asarray(values, dtype=float)
    arr = arr[np.isfinite(arr)]
    if arr.size < 2 or (arr <= 0).any():
        return False
    return math.log10(arr.max() / arr.min()) > decades


def set_log_if_wide(ax: Axes, values: Sequence[float] | np.ndarray, axis: str = "y", decades: float = 1.5) -> None:
    if spans_decades(values, decades):
        (ax.set_yscale if axis == "y" else ax.set_xscale)("log")


def set_parameter_axis(ax: Axes, values: Sequence[float], axis: str = "x") -> None:
    """Scale for a swept parameter like gamma: log when the values span a decade or form a
    geometric grid, symlog when 0 is among them; ticks at the swept values."""
    vals = sorted({float(v) for v in values if v is not None and np.isfinite(v)})
    positive = [v for v in vals if v > 0]
    set_scale = ax.set_xscale if axis == "x" else ax.set_yscale
    ratios = [b / a for a, b in zip(positive, positive[1:], strict=False)]
    # A doubling grid (0.5, 1, 2, 4) reads best evenly spaced, i.e. on a log axis.
    geometric = len(ratios) >= 2 and min(ratios) > 1.5 and max(ratios) / min(ratios) < 1.1
    if len(positive) >= 2 and (positive[-1] / positive[0] >= 10 or geometric):
        if len(positive) == len(vals):
            set_scale("log")
        else:
            set_scale("symlog", linthresh=positive[0])
    ticks = ax.set_xticks if axis == "x" else ax.set_yticks
    ticks(vals, [f"{v:g}" for v in vals])
    # Log axes add minor ticks with their own labels, which crowd the swept values.
    (ax.xaxis if axis == "x" else ax.yaxis).set_minor_formatter(mpl.ticker.NullFormatter())


def text_color_on(rgba: Sequence[float]) -> str:
    """Black or white, whichever reads better on a cell of colour ``rgba``."""
    r, g, b = rgba[:3]
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"


# --- shared by every figure module: series styles, offsets, legends, scales, saving ----------------------


def series_styles(n: int) -> list[tuple[str, str]]:
    """``n`` (line style, marker) pairs, all distinct for up to 32 series: two series with equal
    values still show as two (a dashed line over a solid one, a square around a circle)."""
    return [(LINESTYLES[(i + i // len(MARKERS)) % len(LINESTYLES)], MARKERS[i % len(MARKERS)]) for i in range(n)]


def layered(i: int, n: int) -> dict[str, float]:
    """Line width and marker size of the ``i``-th of ``n`` series: the first widest, so that a
    later series drawn exactly over it leaves its edges visible."""
    shrink = 0.0 if n <= 1 else i / (n - 1)
    return {"linewidth": 3.0 - 1.6 * shrink, "markersize": 10.0 - 4.5 * shrink}


def dodge(x: Sequence[float] | np.ndarray, i: int, n: int, *, log: bool, width: float = 0.025) -> np.ndarray:
    """``x`` moved sideways for the ``i``-th of ``n`` series drawn at the same x values, by up to
    ``width`` of a decade (log axis) or of the values' span (linear), so equal points stand apart."""
    arr = np.asarray(x, dtype=float)
    if n <= 1 or arr.size == 0:
        return arr
    shift = (i - (n - 1) / 2) * width / max(1, n - 1) * 2
    if log:
        return arr * 10.0 ** shift
    finite = arr[np.isfinite(arr)]
    span = float(finite.max() - finite.min()) if finite.size > 1 else 0.0
    return arr + shift * (span or max(abs(float(finite.max())) if finite.size else 1.0, 1.0))


def seed_series(ax: Axes, series: Sequence[tuple[str, np.ndarray, np.ndarray]], *, log: bool, width: float) -> None:
    """For each ``(name, x, y)`` (one entry per seed), a small marker per seed and a line through
    the mean over the seeds at each x, labelled ``name (n=...)``; each series its own colour,
    line style and marker, dodged sideways (:func:`dodge`) so coincident series stay visible."""
    palette = colors(len(series))
    for i, (name, x, y) in enumerate(series):
        x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
        style = dict(color=palette[i], marker=MARKERS[i % len(MARKERS)])
        ax.scatter(dodge(x, i, len(series), log=log, width=width), y, s=20, alpha=0.5, linewidths=0, **style)
        at = sorted(set(x.tolist()))
        mean = np.array([y[x == v].mean() for v in at])
        n = [int((x == v).sum()) for v in at]
        label = f"{name} (n={min(n)})" if min(n) == max(n) else f"{name} (n={min(n)}-{max(n)})"
        ax.plot(dodge(at, i, len(series), log=log, width=width), mean, linestyle=LINESTYLES[i % len(LINESTYLES)],
                markerfacecolor="white", markersize=7, label=label, **style)


def spread_coincident(x: np.ndarray, y: np.ndarray, *, xlog: bool = False, ylog: bool = False,
                      tol: float = 0.022, step: float = 0.024) -> np.ndarray:
    """x positions for a scatter in which points closer than ``tol`` of the axes' spans (in both
    directions) are spread sideways by ``step`` each, centred on their true x: every run keeps a
    visible marker. Points that stand alone keep their x."""
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    fx = np.log10(np.where(x > 0, x, np.nan)) if xlog else x
    fy = np.log10(np.where(y > 0, y, np.nan)) if ylog else y

    def unit(v: np.ndarray) -> np.ndarray:
        finite = v[np.isfinite(v)]
        span = float(finite.max() - finite.min()) if finite.size > 1 else 0.0
        return (v - (finite.min() if finite.size else 0.0)) / (span or 1.0)

    ux, uy = unit(fx), unit(fy)
    cluster = list(range(len(x)))  # union-find over points within tol of one another

    def root(i: int) -> int:
        while cluster[i] != i:
            cluster[i] = cluster[cluster[i]]
            i = cluster[i]
        return i

    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            if abs(ux[i] - ux[j]) <= tol and abs(uy[i] - uy[j]) <= tol:
                cluster[root(j)] = root(i)
    out = fx.copy()
    members: dict[int, list[int]] = {}
    for i in range(len(x)):
        members.setdefault(root(i), []).append(i)
    finite = fx[np.isfinite(fx)]
    span = float(finite.max() - finite.min()) if finite.size > 1 else 0.0
    scale = span or max(abs(float(finite.max())) if finite.size else 1.0, 1e-12)
    for group in members.values():
        for k, i in enumerate(group):
            out[i] = fx[i] + (k - (len(group) - 1) / 2) * step * scale
    return 10.0 ** out if xlog else out


def figure_legend(fig: Figure, axes: np.ndarray | Sequence[Axes], legend_title: str = "", **kwargs: Any) -> None:
    """One legend for all panels, outside them on the right: every label once (the first
    handle drawn with it), in the order first drawn."""
    handles: dict[str, Any] = {}
    for ax in np.asarray(axes, dtype=object).flat:
        for handle, text in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(text, handle)
    fig.legend(list(handles.values()), list(handles.keys()), loc="outside right center", title=legend_title,
               **kwargs)


LOG_DECADES = 4  # the most decades below its maximum that an axis of a series near 0 spans


def set_scale_for_zeros(ax: Axes, values: Sequence[float] | np.ndarray, axis: str = "y") -> str:
    """Log, or symlog, for ``values`` that spend most of their time near 0 (the median under 5 % of
    the maximum), where a linear axis draws them as a flat line at 0; returns the scale set
    (``"linear"`` when left alone). Log when all are positive within :data:`LOG_DECADES` decades of
    the maximum; else symlog, linear below ``max / 10**LOG_DECADES`` (or the smallest values that are
    not 0, if larger): a per-sample entropy that reaches 1e-40 is drawn near 0 instead of stretching
    the axis over 40 decades where the rest of the run is one line at the top. The threshold is the
    axis' ``linthresh`` (:func:`linear_below`)."""
    arr = np.abs(np.asarray(values, dtype=float))
    arr = arr[np.isfinite(arr)]
    if arr.size < 3 or arr.max() <= 0 or np.median(arr) >= 0.05 * arr.max():
        return "linear"
    set_scale = ax.set_yscale if axis == "y" else ax.set_xscale
    positive = arr[arr > 0]
    floor = float(arr.max()) * 10.0 ** -LOG_DECADES
    if positive.size == arr.size and positive.min() >= floor:
        set_scale("log")
        return "log"
    set_scale("symlog", linthresh=max(float(np.quantile(positive, 0.1)), floor))
    return "symlog"


def linear_below(ax: Axes, axis: str = "y") -> float | None:
    """The ``linthresh`` of a symlog axis (None for other scales)."""
    scale = (ax.yaxis if axis == "y" else ax.xaxis).get_transform()
    return float(scale.linthresh) if hasattr(scale, "linthresh") else None


def save_figure(fig: Figure, folder: Path, stem: str) -> list[str]:
    """``folder/stem.png`` (at DPI) and ``.svg``, each written atomically; returns their names."""
    write_atomic(folder / f"{stem}.png", lambda p: fig.savefig(p, dpi=DPI, format="png"))
    # The layout is settled by the first save; redoing it for the SVG would double the time.
    fig.set_layout_engine("none")
    # No date and fixed element ids: the same figure gives the same bytes, so a redraw from
    # unchanged CSVs leaves the committed SVGs unchanged in git.
    with mpl.rc_context({"svg.hashsalt": stem}):
        write_atomic(folder / f"{stem}.svg", lambda p: fig.savefig(p, format="svg", metadata={"Date": None}))
    return [f"{stem}.png", f"{stem}.svg"]
