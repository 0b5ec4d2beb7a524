"""Why a run collapses, from the monitor's diagnostics: per-bit usage over steps, and saturation
against usage over steps, as pure functions of the metrics frame of ``analysis.load_metrics``
returning 1280 px Figures (``None`` with a ``NoDataWarning`` when the columns are missing, as in
``analysis.plots``); the columns they read (``bit_frequency_<i>``, ``usage_fraction``,
``saturated_fraction``, ``dead_bits``, ``bit_entropy``) are defined in docs/records.md.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis.style import HEATMAP_CMAP, colors, new_figure, require, skippable

BIT_FREQUENCY = re.compile(r"^bit_frequency_(\d+)$")


def bit_columns(metrics: pd.DataFrame) -> list[str]:
    """The ``bit_frequency_<i>`` columns, ordered by bit i."""
    found = [(int(m.group(1)), c) for c in metrics.columns if (m := BIT_FREQUENCY.match(str(c)))]
    return [c for _, c in sorted(found)]


def _one_series(metrics: pd.DataFrame, run_id: str | None, layer: str | None, codebook: int,
                mode: str) -> tuple[pd.DataFrame, str, str]:
    """The quantizer rows of one (run, layer, codebook, mode), sorted by step; and the run and layer."""
    require("kind" in metrics.columns and len(metrics), "no metrics rows")
    rows = metrics[(metrics["kind"] == "quantizer") & (metrics["mode"] == mode)]
    require(len(rows), f"no quantizer rows in mode {mode!r}")
    runs = sorted(rows["run_id"].astype(str).unique())
    if run_id is None:
        require(len(runs) == 1, f"{len(runs)} runs in the frame ({', '.join(runs[:4])}...): pass run_id")
        run_id = runs[0]
    rows = rows[rows["run_id"].astype(str) == run_id]
    require(len(rows), f"no quantizer rows of run {run_id!r}; runs: {runs[:6]}")
    layers = list(dict.fromkeys(rows["layer"].astype(str)))
    layer = layers[0] if layer is None else layer
    rows = rows[(rows["layer"].astype(str) == layer) & (rows["codebook"] == codebook)]
    require(len(rows), f"no rows of layer {layer!r} codebook {codebook} in run {run_id!r}; layers: {layers}")
    return rows.sort_values("step"), run_id, layer


def _edges(steps: np.ndarray) -> np.ndarray:
    """Cell edges around each step, halfway between neighbours (irregular logging works)."""
    if len(steps) == 1:
        return np.array([steps[0] - 0.5, steps[0] + 0.5])
    middle = (steps[:-1] + steps[1:]) / 2
    return np.concatenate([[steps[0] - (middle[0] - steps[0])], middle, [steps[-1] + (steps[-1] - middle[-1])]])


@skippable
def bit_usage_heatmap(metrics: pd.DataFrame, run_id: str | None = None, layer: str | None = None,
                      codebook: int = 0, mode: str = "train") -> Figure:
    """Per-bit usage over steps: a cell per (bit, step) coloured by the fraction of tokens with the
    bit set. 0.5 is a balanced bit; a row at 0 or 1 is a bit that never flips (a dead bit)."""
    columns = bit_columns(metrics)
    require(columns, "no bit_frequency_<i> columns (a quantizer whose indices are not bit strings?)")
    rows, run_id, layer = _one_series(metrics, run_id, layer, codebook, mode)
    values = rows[columns].to_numpy(float)
    require(np.isfinite(values).any(), f"no bit frequencies logged for layer {layer!r}")
    steps = rows["step"].to_numpy(float)
    fig, axes = new_figure(height=max(3.6, 1.2 + 0.28 * len(columns)))
    ax = axes[0, 0]
    image = ax.pcolormesh(_edges(steps), np.arange(len(columns) + 1) - 0.5, values.T, cmap=HEATMAP_CMAP,
                          vmin=0.0, vmax=1.0, shading="flat")
    ax.set_yticks(range(len(columns)), [str(i) for i in range(len(columns))])
    ax.invert_yaxis()  # bit 0, the most significant, on top
    ax.set_xlabel("step")
    ax.set_ylabel("bit (0 = most significant)")
    ax.grid(False)
    fig.colorbar(image, ax=ax, label="fraction of tokens with the bit set", fraction=0.05, pad=0.02)
    ax.set_title(f"Per-bit usage over training: {layer}, codebook {codebook} ({mode}), run {run_id}")
    return fig


@skippable
def bit_pair_mi_heatmap(pair_mi: pd.DataFrame, run_id: str | None = None, layer: str | None = None,
                        codebook: int = 0, mode: str = "train") -> Figure:
    """The latest snapshot's d x d mutual information between bits (nats) of one run, layer and
    codebook (``analysis.load.load_bit_pair_mi``): bright off-diagonal cells are bits that repeat
    each other, capacity the per-bit view counts twice."""
    require(len(pair_mi), "no bit_pair_mi in the histogram snapshots (a monitor before issue 34, or no diagnostic step)")
    rows = pair_mi[(pair_mi["codebook"] == codebook) & (pair_mi["mode"] == mode)]
    if run_id is not None:
        rows = rows[rows["run_id"] == run_id]
    if layer is not None:
        rows = rows[rows["layer"] == layer]
    require(len(rows), f"no bit_pair_mi for codebook {codebook} ({mode})")
    run_id, layer = rows["run_id"].iloc[0], rows["layer"].iloc[0]
    rows = rows[(rows["run_id"] == run_id) & (rows["layer"] == layer)]
    rows = rows[rows["step"] == rows["step"].max()]
    bits = int(rows["bit_i"].max()) + 1
    matrix = np.zeros((bits, bits))
    matrix[rows["bit_i"].to_numpy(int), rows["bit_j"].to_numpy(int)] = rows["mi"].to_numpy(float)
    fig, axes = new_figure(height=max(3.6, 1.5 + 0.3 * bits))
    ax = axes[0, 0]
    image = ax.imshow(matrix, cmap=HEATMAP_CMAP, vmin=0.0, vmax=max(float(matrix.max()), 1e-6), aspect="auto")
    ax.set_xticks(range(bits), [str(i) for i in range(bits)])
    ax.set_yticks(range(bits), [str(i) for i in range(bits)])
    ax.set_xlabel("bit j (0 = most significant)")
    ax.set_ylabel("bit i")
    ax.grid(False)
    fig.colorbar(image, ax=ax, label="mutual information (nats)", fraction=0.05, pad=0.02)
    ax.set_title(f"Mutual information between bits (ln 2 = one bit copies the other), step "
                 f"{int(rows['step'].iloc[0])}\n{layer}, codebook {codebook} ({mode}), run {run_id}")
    return fig


@skippable
def saturation_and_usage(metrics: pd.DataFrame, run_id: str | None = None, layer: str | None = None,
                         codebook: int = 0, mode: str = "train") -> Figure:
    """On one axis of fractions: code usage, the saturated share of token-bits (where the entropy
    loss has no gradient left), dead bits over bits and mean bit entropy over log 2, by step."""
    require("saturated_fraction" in metrics.columns, "no saturated_fraction column (monitor without diagnostics?)")
    rows, run_id, layer = _one_series(metrics, run_id, layer, codebook, mode)
    bits = len(bit_columns(metrics))
    series = [("usage_fraction", "usage (fraction of codebook)", 1.0),
              ("saturated_fraction", "saturated token-bits (fraction)", 1.0)]
    if bits:
        series += [("dead_bits", "dead bits (fraction of bits)", 1.0 / bits),
                   ("bit_entropy", "mean bit entropy / log 2", 1.0 / math.log(2))]
    fig, axes = new_figure()
    ax = axes[0, 0]
    drawn = 0
    for (column, text, scale), color in zip(series, colors(len(series)), strict=True):
        if column not in rows:
            continue
        part = rows[rows[column].notna()]
        if not len(part):
            continue
        marker = "o" if column == "saturated_fraction" else None  # logged on diagnostic steps only
        ax.plot(part["step"], part[column] * scale, label=text, color=color, marker=marker)
        drawn += column == "saturated_fraction"
    require(drawn, f"saturated_fraction is NaN on every step of layer {layer!r} (no diagnostic steps logged)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("step")
    ax.set_ylabel("fraction")
    ax.legend(loc="best")
    ax.set_title(f"Saturation and usage over training: {layer}, codebook {codebook} ({mode}), run {run_id}")
    return fig
