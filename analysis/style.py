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
from typing import Any, ParamSpec

import matplotlib as mpl
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

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
