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
    """``runs`` with each part's token count (``final_val_tokens_<part>`` = its N/K x K) and its usage and
    perplexity relative to the most codes its tokens can reach (``val_usage_of_max_<part>`` = codes
    used / min(K, N), ``val_perplexity_of_max_<part>`` = perplexity / min(K, N)). Unchanged for runs
    without the parts."""
    out = runs.copy()
    for part in PARTS:
        per_code = f"final_val_tokens_per_code_{part}"
        if not {per_code, f"final_val_codes_used_{part}", f"final_val_perplexity_{part}"} <= set(out.columns):
            continue
        size = out[SIZE].astype(float)
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
               *METRICS, *parts, *derived, "batch_tokens", FRAMES, TEMPORAL, "wall_time_s", *FIXED, *SUMMARY_ENV]
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


def parts_panel(ax: Axes, runs: pd.DataFrame, group: str, what: str = "usage", fill_by_size: bool = True
                ) -> list[str]:
    """One point per run: its first frame's ``what`` (usage or perplexity) relative to min(K, N)
    against its later frames', colour and marker by ``group``, filled at the smallest codebook size and
    hollow above (``fill_by_size``; else all filled); the diagonal (both parts alike) and, grey, where uniformly random codes would land
    (the expected usage 1 - exp(-N/K) of each part over min(K, N)). Returns the groups in order."""
    x, y = f"val_{what}_of_max_later_frames", f"val_{what}_of_max_first_frame"
    require(x in runs and y in runs and runs[x].notna().any(), "no runs with first-frame and later-frame usage")
    runs = runs[runs[x].notna() & runs[y].notna()]
    groups = list(dict.fromkeys(runs[group]))
    palette = colors(len(groups))
    sizes = sorted(runs[SIZE].unique())
    for i, name in enumerate(groups):
        for j, size in enumerate(sizes):
            part = runs[(runs[group] == name) & (runs[SIZE] == size)]
            ax.scatter(part[x], part[y], s=46, marker=MARKERS[i % len(MARKERS)], linewidths=1.4,
                       edgecolors=palette[i], facecolors=palette[i] if j == 0 or not fill_by_size else "white",
                       zorder=3 + i)
    if what == "usage":
        for size in sizes:
            at = runs[runs[SIZE] == size].iloc[0]
            expect = [-np.expm1(-float(at[f"final_val_tokens_{p}"]) / size) * size
                      / min(size, float(at[f"final_val_tokens_{p}"])) for p in ("later_frames", "first_frame")]
            ax.scatter(*expect, marker="x", s=60, color="0.45", zorder=2)
            ax.annotate(f"uniform random, 2^{int(np.log2(size))}", expect, textcoords="offset points",
                        xytext=(-8, -4), ha="right", va="top", fontsize=9, color="0.35")
    lo = float(np.nanmin([runs[x].min(), runs[y].min()]))
    hi = float(np.nanmax([runs[x].max(), runs[y].max(), 1.0 if what == "usage" else 0.0]))
    pad = 0.04 * (hi - lo or 1.0)
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="0.6", linestyle=":", linewidth=1.2)
    ax.set_xlim(lo - pad, hi + pad)
    ax.set_ylim(lo - pad, hi + pad)
    noun = "codes used" if what == "usage" else "perplexity"
    ax.set_xlabel(f"later frames: {noun} / min(K, N)")
    ax.set_ylabel(f"first frame: {noun} / min(K, N)")
    return groups


@skippable
def video_figure(summary: pd.DataFrame, table: pd.DataFrame) -> Figure:
    """Validation usage and PSNR against codebook size per quantizer, video solid (every seed a small
    marker) and images dashed (the mean of the images task's runs); below, each run's first-frame
    against later-frame usage and perplexity relative to min(K, N)."""
    done = summary[summary["status"] == "done"]
    require(len(done), "no finished video runs")
    lines = list(dict.fromkeys(done["quantizer"]))
    palette = colors(len(lines))
    images = table[table["task"] == "images"] if "task" in table else table.iloc[:0]
    sizes = sorted(set(done[SIZE].astype(int)) | set(images[SIZE].astype(int)))
    fig, axes = new_figure(2, 2, height=11.0)
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
    for col, what in enumerate(("usage", "perplexity")):
        parts_panel(axes[1, col], done, "quantizer", what)
    n = done.groupby(["quantizer", SIZE]).size()
    below = sorted(done[SIZE].unique())  # the bottom panels' sizes: the video runs
    handles = [Line2D([], [], color=palette[i], marker=MARKERS[i % len(MARKERS)], linestyle=LINESTYLES[0],
                      markerfacecolor="white",
                      label=f"{name} (n={n[name].min()}" + (f"-{n[name].max()})" if n[name].max() != n[name].min() else ")"))
               for i, name in enumerate(lines)]
    handles += [Line2D([], [], color="0.3", linestyle="-", label="video: mean over seeds (small markers: seeds)"),
                Line2D([], [], color="0.3", linestyle="--", label="images task: mean over its seeds"),
                *(Line2D([], [], color="0.3", marker="o", linestyle="none", markerfacecolor=face,
                         label="bottom: " + ", ".join(f"2^{int(np.log2(s))}" for s in group) + " codes")
                  for face, group in (("0.3", below[:1]), ("white", below[1:])) if group),
                Line2D([], [], color="0.45", marker="x", linestyle="none", label="bottom: uniformly random codes"),
                Line2D([], [], color="0.6", linestyle=":", label="bottom: first frame = later frames")]
    fig.legend(handles=handles, loc="outside lower center", ncols=3)
    tokens = done[[f"final_val_tokens_{p}" for p in PARTS if f"final_val_tokens_{p}" in done]].max()
    counted = ", ".join(f"{int(v):,} {PART_WORDS[k.split('final_val_tokens_')[1]]}" for k, v in tokens.items()
                        if pd.notna(v))
    total = done["final_val_tokens"].max() if "final_val_tokens" in done else np.nan
    note = (f"validation tokens: {int(total):,} ({counted}); " if counted and pd.notna(total) else "") + (
        "bottom: one point per run, each part's codes used (left) and perplexity (right) over the most its "
        "N tokens can reach, min(K, N)")
    fig.suptitle("Quantizers on the video task beside the images task: validation usage and PSNR against "
                 "codebook size, and the first frame against the later frames\n" + textwrap.fill(note, 125),
                 fontsize=12)
    return fig


@skippable
def frame_parts_figure(runs: pd.DataFrame, group: Sequence[str]) -> Figure:
    """A sweep's first frame against its later frames: :func:`parts_panel` for usage and perplexity,
    one colour and marker per grid point (the values of ``group``)."""
    done = with_parts(runs[runs["status"] == "done"])
    require(len(done), "no finished runs")
    require("val_usage_of_max_first_frame" in done, "no runs with first-frame and later-frame usage")
    done = done.assign(_point=[", ".join(f"{c.split('.')[-1]}={v}" for c, v in zip(group, row, strict=True))
                               or "all runs" for row in done[list(group)].itertuples(index=False)])
    fig, axes = new_figure(1, 2, height=6.2)
    groups = []
    by_size = SIZE not in group and done[SIZE].nunique() > 1  # else the grid point names the size
    for col, what in enumerate(("usage", "perplexity")):
        groups = parts_panel(axes[0, col], done, "_point", what, fill_by_size=by_size)
    palette = colors(len(groups))
    handles = [Line2D([], [], color=palette[i], marker=MARKERS[i % len(MARKERS)], linestyle="none", label=name)
               for i, name in enumerate(groups)]
    fig.legend(handles=handles, loc="outside lower center", ncols=3,
               title="filled: the smallest codebook size; hollow: larger ones" if by_size else None)
    return fig
