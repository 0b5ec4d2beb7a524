"""Claim 1 on the video task (issue 32): LFQ, BSQ, FSQ and VQ given its fair chance at 2^10 and 2^14
codes on the causal 3D tokenizer's validation clips, beside the same quantizers on the images task
(``results/recipe/quantizers_summary.csv``), and whether the causal first frame, encoded alone, uses
the codebook differently from the later frames. Each run gets the images comparison's *series*
(:func:`analysis.quantizer_comparison.series_of`) and a *quantizer*, the line both tasks share: the
series, except that VQ's dead-code threshold is named by its rule (a quarter of the tokens a code gets
per batch when all are used alike, which differs between the tasks' batches). A part's usage is also
given relative to the most codes that part's N tokens can reach, min(K, N), since the first frame
holds a fifth of the tokens. The study is written by :mod:`analysis.studies` (``--study video``).
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from analysis.claims import SUMMARY_ENV
from analysis.column_names import BATCH, DOWNSAMPLE, KIND, RESOLUTION, SIZE, TAU, VQ_DEAD, VQ_INIT
from analysis.glossary import kind_rank
from analysis.quantizer_comparison import FIXED, series_of, value_or
from analysis.style import LINESTYLES, MARKERS, colors, dodge, new_figure, require, skippable

IMAGES_SUMMARY = Path("results/recipe/quantizers_summary.csv")  # claim 1 on the images task, committed
FRAMES = "data.frames"
TEMPORAL = "model.temporal_downsample"
PARTS = ("first_frame", "later_frames")  # experiments.evaluation.VIDEO_PARTS: token step 0, and steps 1..
PART_WORDS = {"first_frame": "first frame", "later_frames": "later frames"}
METRICS = ("final_val_usage_fraction", "final_val_psnr", "final_val_ssim", "final_val_perplexity",
           "final_val_codes_used", "final_val_usage_ceiling", "final_val_tokens")
PART_METRICS = ("final_val_usage_fraction", "final_val_codes_used", "final_val_perplexity", "final_val_usage_ceiling",
                "final_val_tokens")
TABLE_METRICS = ("final_val_usage_fraction", "final_val_psnr", "final_val_ssim", "final_val_perplexity",
                 *(f"final_val_usage_fraction_{p}" for p in PARTS), *(f"val_usage_of_max_{p}" for p in PARTS),
                 *(f"val_perplexity_of_max_{p}" for p in PARTS))
DEAD_RULE = 4  # the fair VQ's threshold: a batch's tokens / (DEAD_RULE x K), on both tasks


def batch_tokens(row: pd.Series) -> float:
    """Tokens a training batch holds: batch x (resolution / downsample)^2, times the causal token steps
    1 + (frames - 1) / temporal downsample for a video run. NaN where the run does not record them."""
    try:
        side = float(row[RESOLUTION]) / float(row[DOWNSAMPLE])
        steps = 1.0
        if not pd.isna(row.get(FRAMES, np.nan)):
            steps = 1.0 + (float(row[FRAMES]) - 1.0) / float(value_or(row, TEMPORAL, 1.0))
        return float(row[BATCH]) * side * side * steps
    except (KeyError, TypeError, ValueError):
        return float("nan")


def quantizer_of(row: pd.Series, series: str) -> str:
    """The line a run belongs to on both tasks: its series, with a VQ dead-code threshold of a batch's
    tokens / (4 K) named by that rule (0.625 at 2^10 on video, 0.5 on images: the same chance)."""
    dead = float(value_or(row, VQ_DEAD, 0.0))
    tokens = float(value_or(row, "batch_tokens", np.nan))
    if str(value_or(row, KIND, "")) == "vq" and dead > 0 and np.isclose(dead, tokens / (DEAD_RULE * float(row[SIZE]))):
        return series.split(" + dead-code")[0] + f" + dead-code (batch tokens / {DEAD_RULE}K)"
    return series


def with_parts(runs: pd.DataFrame) -> pd.DataFrame:
    """``runs`` with the codes the quantizer has (``codebook_codes``, K: validation tokens over tokens per
    code), each part's token count (``final_val_tokens_<part>`` = its N/K x K) and its usage and
    perplexity relative to the most codes its tokens can reach (``val_usage_of_max_<part>`` = codes
    used / min(K, N), ``val_perplexity_of_max_<part>`` = perplexity / min(K, N)). Unchanged for runs
    without the parts."""
    out = runs.copy()
    # The codes the quantizer has: FSQ's product of levels is not the codebook size it rounds (1,000 for 2^10).
    size = out[SIZE].astype(float)
    if {"final_val_tokens", "final_val_tokens_per_code"} <= set(out.columns):
        size = (out["final_val_tokens"].astype(float) / out["final_val_tokens_per_code"].astype(float)).round().fillna(size)
    for part in PARTS:
        per_code = f"final_val_tokens_per_code_{part}"
        if not {per_code, f"final_val_codes_used_{part}", f"final_val_perplexity_{part}"} <= set(out.columns):
            continue
        out["codebook_codes"] = size
        tokens = (out[per_code].astype(float) * size).round()
        out[f"final_val_tokens_{part}"] = tokens
        reach = np.minimum(size, tokens)
        out[f"val_usage_of_max_{part}"] = out[f"final_val_codes_used_{part}"].astype(float) / reach
        out[f"val_perplexity_of_max_{part}"] = out[f"final_val_perplexity_{part}"].astype(float) / reach
    return out


def _order(table: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """``table`` sorted by quantizer kind (LFQ, BSQ, FSQ, VQ, then others), then ``keys``."""
    table = table.assign(_k=table[KIND].map(kind_rank) if KIND in table else 0)
    return table.sort_values(["_k", *keys], kind="stable").drop(columns="_k").reset_index(drop=True)


def video_summary(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per video run of the comparison (config ``task: video``), run ids unique: keys, series,
    quantizer, the final validation metrics overall and of the first and later frames, the parts'
    usage relative to min(K, N), what was held fixed, and the environment it ran in."""
    require(len(runs), "no runs")
    video = runs[runs["task"] == "video"] if "task" in runs else runs.iloc[:0]
    require(len(video), f"none of the {len(runs)} runs is a video run (config task: video); give the folders of "
                        "the quantizers_video and vq_fair_video sweeps")
    table = with_parts(video)
    table["series"] = [series_of(row) for _, row in table.iterrows()]
    table = table[table["series"].notna()].copy()
    require(len(table), "no video run has the comparison's settings (entropy weight 0.1, gamma 1, frac 1)")
    table["batch_tokens"] = [batch_tokens(row) for _, row in table.iterrows()]
    table["quantizer"] = [quantizer_of(row, s) for (_, row), s in zip(table.iterrows(), table["series"], strict=True)]
    parts = [f"{m}_{p}" for p in PARTS for m in PART_METRICS]
    derived = [f"val_{m}_of_max_{p}" for p in PARTS for m in ("usage", "perplexity")]
    columns = ["run_id", "sweep", "status", "series", "quantizer", KIND, SIZE, TAU, VQ_INIT, VQ_DEAD, "seed",
               *METRICS, "codebook_codes", *parts, *derived, "batch_tokens", FRAMES, TEMPORAL, "wall_time_s", *FIXED, *SUMMARY_ENV]
    table = table[[c for c in columns if c in table]].drop_duplicates("run_id").astype({"run_id": str})
    return sort_summary(table)


def sort_summary(summary: pd.DataFrame) -> pd.DataFrame:
    """A video summary in its committed order: kind, series, codebook size, seed, run id."""
    return _order(summary, ["series", SIZE, "seed", "run_id"])


def images_rows(images: pd.DataFrame, quantizers: Sequence[str]) -> pd.DataFrame:
    """The finished runs of the images comparison (a ``quantizers_summary.csv``) on the lines
    ``quantizers`` (those of the video runs), each with its ``quantizer``."""
    require({"series", SIZE, "status"} <= set(images.columns),
            "the images summary has no series, quantizer.codebook_size and status columns: not a "
            "results/recipe/quantizers_summary.csv")
    done = images[images["status"] == "done"].copy()
    done["batch_tokens"] = [batch_tokens(row) for _, row in done.iterrows()]
    done["quantizer"] = [quantizer_of(row, s) for (_, row), s in zip(done.iterrows(), done["series"], strict=True)]
    return done[done["quantizer"].isin(set(quantizers))].reset_index(drop=True)


def video_table(summary: pd.DataFrame, images: pd.DataFrame | None = None,
                metrics: Sequence[str] = TABLE_METRICS) -> pd.DataFrame:
    """Mean, sample std and n over seeds per (task, quantizer, codebook size) of the finished runs: the
    video runs of ``summary``, then the images runs of ``images`` (:func:`images_rows`) on the same lines."""
    frames = [("video", summary[summary["status"] == "done"])]
    if images is not None and len(images):
        frames.append(("images", images))
    rows = []
    for task, done in frames:
        present = [m for m in metrics if m in done]
        grouped = done.groupby(["quantizer", "series", SIZE], sort=False)[present]
        table = grouped.agg(["mean", "std"])
        table.columns = [f"{m}_{s}" for m, s in table.columns]
        table["n_seeds"] = grouped.size()
        table = table.reset_index()
        table.insert(0, "task", task)
        kinds = done.drop_duplicates("quantizer").set_index("quantizer")[KIND]
        table.insert(2, KIND, table["quantizer"].map(kinds))
        rows.append(_order(table, ["quantizer", SIZE]))
    table = pd.concat(rows, ignore_index=True)
    columns = ["task", "quantizer", KIND, "series", SIZE, *(f"{m}_{s}" for m in metrics for s in ("mean", "std")),
               "n_seeds"]
    return table.reindex(columns=columns)


# ---- the figure ------------------------------------------------------------------------------------

def _size_ticks(ax: Axes, sizes: Sequence[float]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [f"2^{int(np.log2(s))}" for s in sizes])
    ax.minorticks_off()
    ax.set_xlabel("codebook size (log2; lines dodged sideways)")


def uniform_expectation(run: pd.Series, part: str) -> float:
    """Codes used / min(K, N) that a part's N tokens reach when the run's K codes are drawn uniformly at
    random: (1 - exp(-N/K)) K / min(K, N)."""
    tokens, codes = float(run[f"final_val_tokens_{part}"]), float(value_or(run, "codebook_codes", run[SIZE]))
    return float(-np.expm1(-tokens / codes) * codes / min(codes, tokens))


PART_OFFSET = 0.18  # the first frame left of a quantizer's tick, the later frames right of it


def parts_dots(ax: Axes, runs: pd.DataFrame, lines: Sequence[str], size: int, what: str = "usage",
               group: str = "quantizer") -> None:
    """At codebook size ``size``, per value of ``group`` in ``lines`` (a quantizer; a sweep's grid point): its first frame's ``what`` (usage or
    perplexity) over min(K, N) (filled marker, left) and its later frames' (hollow, right), the mean over
    seeds joined by a line, each seed a small marker; for usage, grey lines where uniformly random
    codes would land (first frame dashed, later frames dotted), each at its quantizer's own K."""
    palette = colors(len(lines))
    at = runs[runs[SIZE] == size]
    for i, name in enumerate(lines):
        part = at[at[group] == name]
        if not len(part):
            continue
        style = dict(color=palette[i], marker=MARKERS[i % len(MARKERS)])
        means = []
        for side, frame_part in ((-1, "first_frame"), (1, "later_frames")):
            y = part[f"val_{what}_of_max_{frame_part}"].to_numpy(float)
            x = i + side * PART_OFFSET + (np.arange(len(y)) - (len(y) - 1) / 2) * 0.035
            ax.scatter(x, y, s=14, alpha=0.55, linewidths=0, **style)
            means.append(float(np.nanmean(y)))
            ax.plot([i + side * PART_OFFSET], [means[-1]], linestyle="none", markersize=10, markeredgewidth=1.6,
                    markerfacecolor=palette[i] if side < 0 else "white", **style)
        ax.plot([i - PART_OFFSET, i + PART_OFFSET], means, color=palette[i], linewidth=1.2)
        if what == "usage":  # each quantizer's own K (FSQ's levels give it fewer codes than the size)
            for side, frame_part, dash in ((-1, "first_frame", "--"), (1, "later_frames", ":")):
                level = uniform_expectation(part.iloc[0], frame_part)
                ax.plot([i + side * PART_OFFSET - 0.15, i + side * PART_OFFSET + 0.15], [level, level], color="0.5",
                        linestyle=dash, linewidth=1.3, zorder=1)
    ax.set_xticks(range(len(lines)), [textwrap.fill(name, 20) for name in lines], fontsize=9)
    ax.set_xlim(-0.6, len(lines) - 0.4)
    noun = "codes used" if what == "usage" else "perplexity"
    ax.set_ylabel(f"val {noun} / min(K, N)")
    ax.set_title(f"2^{int(np.log2(size))} codes: {noun} of the first frame (filled) and the later frames (hollow)"
                 if size > 0 and np.log2(size).is_integer() else f"{size:,} codes: {noun} of the first frame (filled) "
                 "and the later frames (hollow)", fontsize=10)


@skippable
def video_figure(summary: pd.DataFrame, table: pd.DataFrame) -> Figure:
    """Validation usage and PSNR against codebook size per quantizer, video solid (every seed a small
    marker) and images dashed (the mean of the images task's runs); below, per codebook size, each
    quantizer's first frame beside its later frames: codes used and perplexity over min(K, N)."""
    done = summary[summary["status"] == "done"]
    require(len(done), "no finished video runs")
    require("val_usage_of_max_first_frame" in done and done["val_usage_of_max_first_frame"].notna().any(),
            "no finished video run logged its first frame's and later frames' usage")
    lines = list(dict.fromkeys(done["quantizer"]))
    palette = colors(len(lines))
    images = table[table["task"] == "images"] if "task" in table else table.iloc[:0]
    sizes = sorted(set(done[SIZE].astype(int)) | set(images[SIZE].astype(int)))
    below = sorted(done[SIZE].astype(int).unique())  # the lower panels' sizes: the video runs'
    columns = max(2, len(below))
    fig, axes = new_figure(3, columns, height=15.5)
    for col, metric in enumerate(("final_val_usage_fraction", "final_val_psnr")):
        ax = axes[0, col]
        scale = 100.0 if metric.endswith("usage_fraction") else 1.0
        for i, name in enumerate(lines):
            style = dict(color=palette[i], marker=MARKERS[i % len(MARKERS)])
            part = done[done["quantizer"] == name]
            xs = part[SIZE].to_numpy(float)
            ax.scatter(dodge(xs, i, len(lines), log=True, width=0.12), part[metric] * scale, s=20, alpha=0.5,
                       linewidths=0, **style)
            at = sorted(set(xs.tolist()))
            mean = [part.loc[part[SIZE] == s, metric].mean() * scale for s in at]
            ax.plot(dodge(at, i, len(lines), log=True, width=0.12), mean, linestyle="-", markersize=7,
                    markerfacecolor="white", **style)
            other = images[images["quantizer"] == name].sort_values(SIZE)
            if len(other):
                ax.plot(dodge(other[SIZE].to_numpy(float), i, len(lines), log=True, width=0.12),
                        other[f"{metric}_mean"] * scale, linestyle="--", linewidth=1.4, markersize=6,
                        markerfacecolor="none", alpha=0.85, zorder=4, **style)  # over a video line it meets
        _size_ticks(ax, sizes)
        ax.set_ylabel("val usage (% of codebook)" if scale == 100 else "val PSNR (dB)")
    for extra in axes[0, 2:]:
        extra.set_visible(False)
    for row, what in ((1, "usage"), (2, "perplexity")):
        for col, size in enumerate(below):
            parts_dots(axes[row, col], done, lines, size, what)
        if len(below) < columns:
            axes[row, -1].set_visible(False)
    n = done.groupby(["quantizer", SIZE]).size()
    handles = [Line2D([], [], color=palette[i], marker=MARKERS[i % len(MARKERS)], linestyle=LINESTYLES[0],
                      markerfacecolor="white",
                      label=f"{name} (n={n[name].min()}" + (f"-{n[name].max()})" if n[name].max() != n[name].min() else ")"))
               for i, name in enumerate(lines)]
    handles += [Line2D([], [], color="0.3", linestyle="-", label="top, video: mean over seeds (small markers: seeds)"),
                Line2D([], [], color="0.3", linestyle="--", label="top, images task: mean over its seeds"),
                Line2D([], [], color="0.3", marker="o", linestyle="-", markersize=9,
                       label="below: first frame (filled) to later frames (hollow), mean over seeds"),
                Line2D([], [], color="0.5", linestyle="--", label="below: uniformly random codes, first frame"),
                Line2D([], [], color="0.5", linestyle=":", label="below: uniformly random codes, later frames")]
    fig.legend(handles=handles, loc="outside lower center", ncols=3, fontsize=9)
    tokens = done[[f"final_val_tokens_{p}" for p in PARTS if f"final_val_tokens_{p}" in done]].max()
    counted = ", ".join(f"{int(v):,} {PART_WORDS[k.split('final_val_tokens_')[1]]}" for k, v in tokens.items()
                        if pd.notna(v))
    total = done["final_val_tokens"].max() if "final_val_tokens" in done else np.nan
    note = (f"validation tokens: {int(total):,} ({counted}); " if counted and pd.notna(total) else "") + (
        "below: each part's codes used and perplexity over the most codes its N tokens can reach, min(K, N)")
    fig.suptitle("Quantizers on the video task beside the images task: validation usage and PSNR against "
                 "codebook size, and the first frame against the later frames\n" + textwrap.fill(note, 125),
                 fontsize=12)
    return fig


@skippable
def frame_parts_figure(runs: pd.DataFrame, group: Sequence[str]) -> Figure:
    """A sweep's first frame beside its later frames: :func:`parts_dots` of codes used (top) and
    perplexity (bottom), one column per codebook size, one colour and marker per grid point (the
    values of ``group`` other than the codebook size)."""
    done = with_parts(runs[runs["status"] == "done"])
    require(len(done), "no finished runs")
    require("val_usage_of_max_first_frame" in done and done["val_usage_of_max_first_frame"].notna().any(),
            "no runs with first-frame and later-frame usage")
    done = done[done["val_usage_of_max_first_frame"].notna()]
    named = [c for c in group if c != SIZE]
    done = done.assign(_point=[", ".join(f"{c.split('.')[-1]}={v}" for c, v in zip(named, row, strict=True))
                               or "all runs" for row in done[named].itertuples(index=False)])
    points = list(dict.fromkeys(done.sort_values([*named, SIZE])["_point"]))
    sizes = sorted(done[SIZE].astype(int).unique())
    fig, axes = new_figure(2, len(sizes), height=10.0)
    for row, what in enumerate(("usage", "perplexity")):
        for col, size in enumerate(sizes):
            parts_dots(axes[row, col], done, points, size, what, group="_point")
    fig.legend(handles=[Line2D([], [], color="0.3", marker="o", linestyle="-", markersize=9,
                               label="first frame (filled) to later frames (hollow), mean over seeds; small: seeds"),
                        Line2D([], [], color="0.5", linestyle="--", label="uniformly random codes, first frame"),
                        Line2D([], [], color="0.5", linestyle=":", label="uniformly random codes, later frames")],
               loc="outside lower center", ncols=3, fontsize=9)
    return fig
