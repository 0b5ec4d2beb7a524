"""Where LFQ collapses and what keeps it from collapsing (issue 15): the data of the recipe study
(``results/recipe``) and its two own figures. The regime sweep (``experiments/sweeps/recipe_regime.yaml``)
trains the images tokenizer over inverse temperature x entropy-weight schedule x ``diversity_gamma``;
:func:`regime_curves` keeps the monitor's diagnostics per run and step, :func:`regime_figure` draws
validation usage and PSNR against the inverse temperature and :func:`collapse_figure` usage and
saturation over training; :func:`comparisons` picks the runs of claims 1-3 on this task. The figures
are entries of :mod:`analysis.figures`; :mod:`analysis.studies` writes the folder.
"""

from __future__ import annotations

import functools
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis.claims import SUMMARY_ENV
from analysis.column_names import (
    ADVERSARIAL,
    BATCH,
    COMMITMENT,
    DOWNSAMPLE,
    GAMMA,
    KIND,
    MODE,
    PRESET,
    RESOLUTION,
    SCHEDULE,
    SCHEDULE_START,
    SCHEDULE_STEPS,
    SIZE,
    STEPS,
    TAU,
    WEIGHT,
)
from analysis.style import LINESTYLES, MARKERS, NoData, colors, dodge, new_figure, require, skippable
from common.cli import fail

SERIES = (SCHEDULE, GAMMA)
CURVE_METRICS = ("usage_fraction", "saturated_fraction", "per_sample_entropy", "batch_entropy", "mean_abs_z",
                 "dead_bits")
# the targets for validation usage, by codebook size
TARGETS = {1024: 0.95, 16384: 0.80}
REFERENCE = {TAU: 100.0, SCHEDULE: "constant", GAMMA: 1.0}
OFFSET = 0.12  # decades between the outermost series at one temperature and its true x


def regime_curves(metrics: pd.DataFrame, runs: pd.DataFrame, *, layer: str | None = None,
                  mode: str = "train") -> pd.DataFrame:
    """One row per run and diagnostic step: the run's keys (sweep, size, temperature, schedule,
    gamma, seed) and the monitor's curves at the steps where ``saturated_fraction`` was logged.

    ``metrics``/``runs``: from ``analysis.load.load_metrics`` / ``load_runs``. ``layer``: the
    quantizer layer (default: the only one; an error names them when there are several)."""
    require("saturated_fraction" in metrics.columns, "no saturated_fraction column: runs without the diagnostics")
    rows = metrics[(metrics["kind"] == "quantizer") & metrics["saturated_fraction"].notna()]
    if "mode" in rows:
        rows = rows[rows["mode"] == mode]
    layers = sorted(rows["layer"].dropna().unique()) if "layer" in rows else []
    if layer is None and len(layers) > 1:
        raise ValueError(f"the runs log {len(layers)} quantizer layers ({', '.join(layers)}); pass layer=")
    if layer is not None:
        require(layer in layers, f"no layer {layer!r}; the runs log {', '.join(layers) or 'none'}")
        rows = rows[rows["layer"] == layer]
    require(len(rows), "no diagnostic rows (saturated_fraction is NaN everywhere)")
    keys = [c for c in ("run_id", "sweep", SIZE, TAU, SCHEDULE, GAMMA, "seed", *FIXED_KEYS) if c in runs.columns]
    columns = ["run_id", "step", *[m for m in CURVE_METRICS if m in rows.columns]]
    return sorted_curves(rows[columns].merge(runs[keys], on="run_id", how="inner"))


def sorted_curves(curves: pd.DataFrame) -> pd.DataFrame:
    keys = [c for c in ("sweep", SIZE, TAU, SCHEDULE, GAMMA, "seed", *FIXED_KEYS) if c in curves.columns]
    return curves.sort_values([*keys, "run_id", "step"], kind="stable").reset_index(drop=True)


def _series(frame: pd.DataFrame) -> list[tuple[object, ...]]:
    present = [c for c in SERIES if c in frame.columns]
    return sorted({tuple(row) for row in frame[present].itertuples(index=False)}, key=lambda t: tuple(map(str, t)))


def _series_label(values: tuple[object, ...], frame: pd.DataFrame) -> str:
    present = [c for c in SERIES if c in frame.columns]
    names = {SCHEDULE: "entropy weight ", GAMMA: "gamma="}
    return ", ".join(f"{names[c]}{v:g}" if isinstance(v, float) else f"{names[c]}{v}"
                     for c, v in zip(present, values, strict=True))


FIXED_KEYS = (KIND, MODE, WEIGHT, COMMITMENT, PRESET, RESOLUTION, DOWNSAMPLE, BATCH, STEPS, SCHEDULE_START,
              SCHEDULE_STEPS)


def held_fixed(frame: pd.DataFrame, keys: Sequence[str] = (SIZE, TAU, SCHEDULE, GAMMA, *FIXED_KEYS),
               width: int = 115) -> str:
    """"held fixed: ..." for those of ``keys`` that take one value in ``frame``."""
    fixed = []
    for column in keys:
        if column in frame and frame[column].nunique(dropna=False) == 1:
            value = frame[column].iloc[0]
            fixed.append(f"{column.split('.')[-1]}={value:g}" if isinstance(value, float) else f"{column.split('.')[-1]}={value}")
    return textwrap.fill("held fixed: " + (", ".join(fixed) if fixed else "nothing else recorded"), width=width)


@skippable
def regime_figure(summary: pd.DataFrame, metrics: Sequence[str] = ("final_val_usage_fraction", "final_val_psnr")
                  ) -> Figure:
    """Validation usage (and PSNR) against the inverse temperature: one column per codebook size,
    one row per metric; each (schedule, gamma) series its own colour, line style, marker and
    horizontal offset; every seed a small marker, the mean over seeds a line. Targets dashed."""
    done = summary[summary["status"] == "done"] if "status" in summary else summary
    require(len(done) and TAU in done and SIZE in done, "no finished runs with an inverse temperature")
    sizes = sorted(done[SIZE].unique())
    series = _series(done)
    palette = colors(len(series))
    fig, axes = new_figure(len(metrics), len(sizes), height=3.6 * len(metrics) + 0.8, sharex=True)
    for col, size in enumerate(sizes):
        part = done[done[SIZE] == size]
        for row, metric in enumerate(metrics):
            ax = axes[row, col]
            require(metric in part, f"no column {metric}")
            for i, key in enumerate(series):
                mask = np.ones(len(part), dtype=bool)
                for c, v in zip([c for c in SERIES if c in part], key, strict=True):
                    mask &= (part[c] == v).to_numpy()
                runs = part[mask]
                if not len(runs):
                    continue
                scale = 100.0 if metric.endswith("usage_fraction") else 1.0
                style = dict(color=palette[i], marker=MARKERS[i % len(MARKERS)])
                x = dodge(runs[TAU].to_numpy(float), i, len(series), log=True, width=OFFSET)
                ax.scatter(x, runs[metric] * scale, s=22, alpha=0.55, color=palette[i],
                           marker=MARKERS[i % len(MARKERS)], linewidths=0)
                mean = runs.groupby(TAU)[metric].mean() * scale
                ax.plot(dodge(mean.index.to_numpy(float), i, len(series), log=True, width=OFFSET), mean.to_numpy(),
                        linestyle=LINESTYLES[i % len(LINESTYLES)], markersize=6, markerfacecolor="white",
                        label=_series_label(key, part)
                        if row == 0 and col == 0 else None, **style)
            if metric.endswith("usage_fraction") and int(size) in TARGETS:
                ax.axhline(100 * TARGETS[int(size)], color="0.4", linestyle=(0, (4, 3)), linewidth=1.2)
                ax.annotate(f"target {100 * TARGETS[int(size)]:.0f} %", (0.01, 100 * TARGETS[int(size)]),
                            xycoords=("axes fraction", "data"), va="bottom", fontsize=10, color="0.3")
            ax.set_xscale("log")
            taus = sorted(part[TAU].unique())
            ax.set_xticks(taus, [f"{t:g}" for t in taus])
            ax.minorticks_off()
            ax.set_ylabel("val usage (% of codebook)" if metric.endswith("usage_fraction")
                          else "val PSNR (dB)" if metric.endswith("psnr") else metric.replace("_", " "))
            if row == 0:
                tokens = int(part["final_val_tokens"].max()) if "final_val_tokens" in part else None
                per_code = f", {tokens / size:.0f} val tokens per code" if tokens else ""
                ax.set_title(f"2^{int(np.log2(size))} codes{per_code}")
            if row == len(metrics) - 1:
                ax.set_xlabel("inverse temperature (log; series offset sideways)")
    seeds = done.groupby([c for c in (SIZE, TAU, *SERIES) if c in done]).size()
    fig.legend(loc="outside lower center", ncols=min(2, len(series)),
               title=f"line: mean over seeds ({seeds.min()}-{seeds.max()} per point); small markers: one seed each")
    fig.suptitle("Validation usage and PSNR against the inverse temperature\n" + held_fixed(done, FIXED_KEYS), fontsize=13)
    return fig


def _runs_per_size(curves: pd.DataFrame) -> str:
    """``median of 3``, or ``median of 2 at 2^10, 3 at 2^14`` where the sizes have different counts."""
    counts = curves.groupby(SIZE)["run_id"].nunique()
    if counts.nunique() == 1:
        return f"median of {counts.iloc[0]}"
    return "median of " + ", ".join(f"{n} at 2^{int(np.log2(size))}" for size, n in counts.items())


@skippable
def collapse_figure(curves: pd.DataFrame, *, schedule: str = "constant", gamma: float = 1.0) -> Figure:
    """Usage (top) and the saturated share of token-bits (bottom) over training, one column per
    codebook size, one colour and line style per inverse temperature; seeds thin, median bold.
    Shows when usage stops growing and whether the entropy loss still has a gradient then."""
    part = curves
    if SCHEDULE in part:
        part = part[part[SCHEDULE] == schedule]
    if GAMMA in part:
        part = part[part[GAMMA] == gamma]
    require(len(part), f"no curves with entropy schedule {schedule!r} and gamma {gamma:g}")
    sizes = sorted(part[SIZE].unique())
    taus = sorted(part[TAU].unique())
    palette = colors(len(taus))
    rows = (("usage_fraction", "train usage (fraction)"),
            ("saturated_fraction", "saturated bits (fraction)"))
    fig, axes = new_figure(len(rows), len(sizes), height=7.6, sharex=True)
    for col, size in enumerate(sizes):
        for row, (metric, text) in enumerate(rows):
            ax = axes[row, col]
            for i, tau in enumerate(taus):
                runs = part[(part[SIZE] == size) & (part[TAU] == tau)]
                if not len(runs):
                    continue
                style = dict(color=palette[i], linestyle=LINESTYLES[i % len(LINESTYLES)])
                for _, run in runs.groupby("run_id"):
                    ax.plot(run["step"], run[metric], linewidth=0.8, alpha=0.45, **style)
                median = runs.groupby("step")[metric].median()
                ax.plot(median.index, median.to_numpy(), linewidth=2.4, marker=MARKERS[i % len(MARKERS)],
                        markevery=max(1, len(median) // 6),
                        label=f"inverse temperature {tau:g} ({_runs_per_size(part[part[TAU] == tau])})"
                        if row == 0 and col == 0 else None, **style)
            ax.set_ylim(-0.02, 1.02)
            ax.set_ylabel(text)
            if row == 0:
                ax.set_title(f"2^{int(np.log2(size))} codes")
            if row == len(rows) - 1:
                ax.set_xlabel("step")
    labels = axes[0, 0].get_legend_handles_labels()[1]
    fig.legend(loc="outside lower center", ncols=len(taus) if not any(" at 2^" in t for t in labels) else 2,
               title="thin: one seed each; bold: median over seeds")  # long labels: two columns, all inside
    fig.suptitle("Usage and saturation over training\n" + held_fixed(part, (SCHEDULE, GAMMA, *FIXED_KEYS)), fontsize=13)
    return fig


SUMMARY_METRICS = ("final_val_usage_fraction", "final_val_codes_used", "final_val_tokens", "final_val_perplexity",
                   "final_val_psnr", "final_val_ssim", "final_usage_fraction", "final_per_sample_entropy",
                   "final_batch_entropy", "wall_time_s")


def regime_summary(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per run: id, sweep, status, the swept keys, seed, what was held fixed, final metrics."""
    columns = ["run_id", "sweep", "status", SIZE, TAU, SCHEDULE, GAMMA, "seed", *FIXED_KEYS, *SUMMARY_METRICS,
               *SUMMARY_ENV]
    table = runs[[c for c in columns if c in runs.columns]]
    order = [c for c in ("sweep", SIZE, TAU, SCHEDULE, GAMMA, "seed") if c in table]
    return table.sort_values(order).reset_index(drop=True)


def regime_table(summary: pd.DataFrame, metrics: Sequence[str] = ("final_val_usage_fraction", "final_val_psnr",
                                                                  "final_val_ssim", "final_val_perplexity")
                 ) -> pd.DataFrame:
    """Mean, std, min and n over seeds per (size, temperature, schedule, gamma), reference row marked."""
    done = summary[summary["status"] == "done"] if "status" in summary else summary
    keys = [c for c in (SIZE, TAU, SCHEDULE, GAMMA) if c in done]
    present = [m for m in metrics if m in done]
    grouped = done.groupby(keys, dropna=False)[present]
    table = grouped.agg(["mean", "std", "min"])
    table.columns = [f"{m}_{s}" for m, s in table.columns]
    table["n_seeds"] = grouped.size()
    table = table.reset_index()
    table["reference_defaults"] = np.logical_and.reduce([table[k] == v for k, v in REFERENCE.items() if k in table])
    return table


def read_regime(folder: Path | str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(summary, curves)`` from ``folder``: its committed ``summary.csv`` and ``curves.csv`` when
    there, else computed from the run folders under it."""
    folder = Path(folder)
    if (folder / "summary.csv").is_file():
        curves = folder / "curves.csv"
        return pd.read_csv(folder / "summary.csv"), pd.read_csv(curves) if curves.is_file() else pd.DataFrame()
    from analysis.load import load_metrics, load_runs

    runs = load_runs(folder)
    require(len(runs), f"no summary.csv and no run folders under {folder}")
    done = runs[runs["status"] == "done"]
    curves = regime_curves(load_metrics(done, kinds=["quantizer"]), done) if len(done) else pd.DataFrame()
    return regime_summary(runs), curves


COMPARISONS = ("quantizers", "entropy_weight", "gamma_frac", "adversarial")  # claims 1, 2, 3 and 5 on this task


def comparisons(runs: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """``{name: summary}`` of the comparisons the runs hold, in :data:`COMPARISONS` order:
    ``quantizers`` (claim 1) where they hold more than one quantizer kind, ``entropy_weight``
    and ``gamma_frac`` (claims 2 and 3, :mod:`analysis.image_claims`) where finished runs vary
    the claim's setting."""
    from analysis.image_claims import IMAGES_CLAIMS, claim_summary
    from analysis.quantizer_comparison import quantizers_summary

    found = {}
    if KIND in runs and runs[KIND].nunique() > 1:
        found["quantizers"] = quantizers_summary(runs)
    for claim in IMAGES_CLAIMS:
        try:
            picked = claim_summary(runs, claim)
        except NoData:  # none of the runs has the claim's settings
            continue
        if picked[picked["status"] == "done"][claim.x].nunique() > 1:
            found[claim.name] = picked
    return found


def comparison_table(name: str, summary: pd.DataFrame) -> pd.DataFrame:
    """Mean, std, min and n over seeds of one comparison (``name`` from :data:`COMPARISONS`)."""
    from analysis.image_claims import claim_table
    from analysis.quantizer_comparison import quantizers_table

    require(name in COMPARISONS, f"no comparison {name!r}; there are {', '.join(COMPARISONS)}")
    return quantizers_table(summary) if name == "quantizers" else claim_table(summary, name)


def comparison_figure(name: str, summary: pd.DataFrame, *, strict: bool = False) -> Figure | None:
    """The figure of one comparison, with what its runs held fixed under the title."""
    from analysis.image_claims import FIXED as CLAIM_FIXED
    from analysis.image_claims import claim_figure
    from analysis.quantizer_comparison import quantizers_figure

    require(name in COMPARISONS, f"no comparison {name!r}; there are {', '.join(COMPARISONS)}")
    if name == "quantizers":
        keys: Sequence[str] = [k for k in FIXED_KEYS if k not in (KIND, MODE)]
    else:
        keys = CLAIM_FIXED
    fixed = held_fixed(summary, keys)[len("held fixed: "):].replace("\n", " ")
    figure = quantizers_figure if name == "quantizers" else functools.partial(claim_figure, claim=name)
    return figure(summary, held_fixed=fixed, strict=strict)


def read_comparisons(folder: Path | str) -> dict[str, pd.DataFrame]:
    """``{name: summary}`` from ``folder``: its committed ``<name>_summary.csv`` files when there,
    else computed from the run folders under it (see :func:`comparisons`)."""
    folder = Path(folder)
    committed = {n: folder / f"{n}_summary.csv" for n in COMPARISONS if (folder / f"{n}_summary.csv").is_file()}
    if committed or (folder / "summary.csv").is_file():
        return {n: pd.read_csv(p) for n, p in committed.items()}
    from analysis.load import load_runs

    runs = load_runs(folder)
    require(len(runs), f"no summary CSVs and no run folders under {folder}")
    return comparisons(runs)


ADVERSARIAL_CURVES = "adversarial_curves.csv"


def adversarial_curves(summary: pd.DataFrame, *known: pd.DataFrame) -> pd.DataFrame:
    """Claim 5's curves: the rows of ``known`` curve tables (first wins per run) for the runs of the
    adversarial comparison ``summary``, each with its adversarial weight."""
    weight = summary.astype({"run_id": str}).set_index("run_id")[ADVERSARIAL]
    parts, seen = [], set()
    for frame in known:
        if not len(frame):
            continue
        frame = frame.astype({"run_id": str})
        part = frame[frame["run_id"].isin(set(weight.index) - seen)].drop(columns=ADVERSARIAL, errors="ignore")
        seen |= set(part["run_id"])
        parts.append(part)
    require(parts and sum(len(p) for p in parts), "no curves of the adversarial comparison's runs")
    curves = pd.concat(parts, ignore_index=True)
    curves[ADVERSARIAL] = curves["run_id"].map(weight).astype(float)
    return sorted_curves(curves).sort_values([ADVERSARIAL, SIZE, "seed", "run_id", "step"], kind="stable"
                                             ).reset_index(drop=True)


def committed_runs(folder: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(runs, curves)`` that an earlier :func:`write_regime` committed to ``folder``: one row per
    run from ``summary.csv`` and every ``<name>_summary.csv`` (a run in several joins its columns;
    the comparisons' ``series`` is dropped, it is recomputed), and ``curves.csv``. Empty frames
    where ``folder`` holds none of them."""
    parts = [pd.read_csv(p) for p in (folder / "summary.csv", *(folder / f"{n}_summary.csv" for n in COMPARISONS))
             if p.is_file()]
    parts = [p.drop(columns="series", errors="ignore").astype({"run_id": str}) for p in parts if len(p)]
    runs = (pd.concat(parts, ignore_index=True).groupby("run_id", sort=False).first().reset_index()
            if parts else pd.DataFrame())
    curves = pd.read_csv(folder / "curves.csv") if (folder / "curves.csv").is_file() else pd.DataFrame()
    return runs, curves


if __name__ == "__main__":  # its command line became analysis.report's; a recorded command.txt says the old one
    sys.exit(fail("python -m analysis.regime ARGS is now python -m analysis.report ARGS --study recipe "
                  "(docs/experiments.md)"))
