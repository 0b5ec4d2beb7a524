"""Issue 8's ablations: run folders -> per-sweep ``summary.csv``, ``grid.csv``, claim plots; and the
same tables and plots rebuilt from the committed ``summary.csv`` files alone (the notebook's path).

    python -m analysis.ablations /root/lfq-ablations --out results/ablations
    python -m analysis.ablations /tmp/rerun --out results/ablations --merge   # fold in a few re-run runs

Claims (``CLAIMS``): 1 ``vocab`` (LFQ/VQ/FSQ over codebook size), 2 ``entropy_weight``,
3 ``gamma_frac``, 4 ``clamp`` (exact vs reference entropy). Statistics use finished runs;
``n`` is the number of seeds behind each point, so a partial sweep shows as a smaller ``n``.
Claim 4's mechanism is measured without training by ``python -m experiments.clamp_probe``
(``results/ablations/clamp_probe/probe.csv``), drawn by :func:`clamp_probe_figure`.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from analysis.aggregate import FRAC, GAMMA, fmt_value, parameters, seed_stats, select, short_name
from analysis.cli import OneLineParser, fail, guarded
from analysis.jsonl import write_atomic
from analysis.load import load_runs
from analysis.plots import usage_heatmap, usage_vs_gamma
from analysis.style import (
    BAND_ALPHA,
    DPI,
    LINESTYLES,
    MARKERS,
    NoData,
    colors,
    label,
    new_figure,
    require,
    set_log_if_wide,
    set_parameter_axis,
    skippable,
    title,
)

KIND = "quantizer.kind"
SIZE = "quantizer.codebook_size"
WEIGHT = "quantizer.entropy_loss_weight"
MODE = "quantizer.entropy_mode"
# Always in summary.csv, varying or not: the vocab claim joins two sweeps in which kind and size
# are constant, and a reader of one CSV should see the setting without the config.
KEY_COLUMNS = (KIND, SIZE, MODE, WEIGHT, GAMMA, FRAC)
METRICS = ("final_usage_fraction", "final_perplexity", "final_codes_used", "final_dead_codes", "final_val_mse",
           "final_val_psnr", "best_val_psnr", "final_batch_entropy", "final_per_sample_entropy", "wall_time_s")
TABLE_METRICS = ("final_usage_fraction", "final_val_psnr", "final_batch_entropy")
CLAMP_NATS = -math.log(1e-5)  # the reference clamps probabilities at 1e-5: entropy <= 11.51 nats
PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class Claim:
    name: str
    sweeps: tuple[str, ...]  # sweep folders holding its runs
    x: str
    hue: str | None
    statement: str


CLAIMS = (
    Claim("vocab", ("ablation_vocab", "ablation_vocab_lfq18"), SIZE, KIND,
          "MAGVIT-v2 Fig. 1: as the vocabulary grows, LFQ reconstructs better while VQ degrades."),
    Claim("entropy_weight", ("ablation_entropy_weight",), WEIGHT, None,
          "A larger entropy weight gives higher utilization and worse reconstruction; without it utilization drops."),
    Claim("gamma_frac", ("ablation_gamma_frac",), GAMMA, FRAC,
          "diversity_gamma raises utilization; frac_per_sample_entropy < 1 keeps utilization."),
    Claim("clamp", ("ablation_clamp",), SIZE, MODE,
          "The reference's 1e-5 clamp removes the diversity push at 2^17+ codes; the exact entropy uses more."),
)
BY_NAME = {c.name: c for c in CLAIMS}


def claim_of(sweep: str, summary: pd.DataFrame) -> Claim | None:
    """The claim a sweep tests: by its name, else (a renamed or smoke sweep) by what varies."""
    for claim in CLAIMS:
        if sweep in claim.sweeps:
            return claim
    varying = set(parameters(summary))
    for column, name in ((MODE, "clamp"), (KIND, "vocab"), (WEIGHT, "entropy_weight"), (GAMMA, "gamma_frac"),
                         (FRAC, "gamma_frac")):
        if column in varying:
            return BY_NAME[name]
    return None


def summarize(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per run: id, sweep, status, grid parameters (claim keys + anything varying), seed,
    final metrics, reason. Dotted config names are kept so the CSV reads back as a runs frame."""
    params = list(dict.fromkeys([*KEY_COLUMNS, *parameters(runs)]))
    columns = ["run_id", "sweep", "status", "step", *params, "seed", *METRICS, "reason"]
    table = runs[[c for c in columns if c in runs.columns]]
    return table.sort_values([c for c in ("sweep", *params, "seed") if c in table]).reset_index(drop=True)


def summaries_from_runs(root: PathLike, log: Callable[[str], None] | None = None) -> dict[str, pd.DataFrame]:
    """``{sweep: summary}`` for every sweep under ``root`` (a folder of sweeps, or one sweep).

    Run folders that cannot be read are left out, each named with its reason through ``log``
    (default: a LoadWarning); corrupt runs stay in, with status ``corrupt`` and the reason."""
    runs = load_runs(root, warn=log is None)
    for problem in runs.attrs.get("problems", ()) if log is not None else ():
        log(f"{'skipped' if problem.skipped else 'repaired'} {problem.run_dir}: {problem.reason}")
    require(len(runs), f"no run folders under {root}")
    return {str(sweep): summarize(part) for sweep, part in runs.groupby("sweep", sort=True)}


def read_summaries(folder: PathLike) -> dict[str, pd.DataFrame]:
    """``{sweep: summary}`` from ``folder/<sweep>/summary.csv`` (or ``folder/summary.csv``)."""
    folder = Path(folder)
    paths = sorted(folder.glob("*/summary.csv")) or sorted(folder.glob("summary.csv"))
    if not paths:
        raise FileNotFoundError(f"no <sweep>/summary.csv under {folder.resolve()}; "
                                "write them with `python -m analysis.ablations RUNS_ROOT --out DIR`")
    return {p.parent.name: pd.read_csv(p) for p in paths}


def load_ablations(path: PathLike) -> dict[str, pd.DataFrame]:
    """``{sweep: summary}`` from summary CSVs if ``path`` holds any, else from its run folders."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path.resolve()} is not a folder of ablation summaries or run folders")
    has_csv = any(path.glob("*/summary.csv")) or (path / "summary.csv").is_file()
    return read_summaries(path) if has_csv else summaries_from_runs(path)


def claim_summaries(summaries: Mapping[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """``{claim name: its sweeps' summaries joined}`` for the claims that have data, in CLAIMS order."""
    parts: dict[str, list[pd.DataFrame]] = {}
    for sweep, summary in summaries.items():
        claim = claim_of(sweep, summary)
        if claim is not None and len(summary):
            parts.setdefault(claim.name, []).append(summary)
    return {c.name: pd.concat(parts[c.name], ignore_index=True) for c in CLAIMS if c.name in parts}


def grid_columns(summary: pd.DataFrame) -> list[str]:
    return [c for c in dict.fromkeys([*KEY_COLUMNS, *parameters(summary)]) if c in summary]


def grid_table(summary: pd.DataFrame, metrics: Sequence[str] = METRICS) -> pd.DataFrame:
    """Tidy seed statistics: one row per (grid point, metric) with ``runs`` (folders found),
    ``done`` and ``mean``, ``std`` (ddof=1), ``min``, ``max``, ``n`` over finished runs."""
    by = grid_columns(summary)
    keys = by or ["sweep"]
    points = summary.groupby(keys, dropna=False, sort=True).agg(
        runs=("run_id", "size"), done=("status", lambda s: int((s == "done").sum()))).reset_index()
    done, parts = select(summary), []
    for metric in [m for m in metrics if m in summary]:
        stats = seed_stats(done, keys, metric) if len(done) else pd.DataFrame(columns=[*keys, "n"])
        # Left join: a point whose runs all failed or still run stays in the table, with n = 0.
        part = points.merge(stats, on=keys, how="left").assign(metric=metric)
        part["n"] = part["n"].fillna(0).astype(int)
        parts.append(part)
    # No run has finished yet: the points and their run counts are still worth a table.
    table = pd.concat(parts, ignore_index=True) if parts else points.assign(metric=None, n=0)
    return table.reindex(columns=[*keys, "runs", "done", "metric", "mean", "std", "min", "max", "n"])


def claim_table(summary: pd.DataFrame, metrics: Sequence[str] = TABLE_METRICS, keep: Sequence[str] = ()
                ) -> pd.DataFrame:
    """Per grid point: short-named parameters (those that vary, and ``keep``), runs, n, and
    ``mean ± std`` per metric: the readable table of a claim."""
    tidy = grid_table(summary, [m for m in metrics if m in summary and summary[m].notna().any()] or metrics)
    keys = [c for c in tidy.columns if c not in ("runs", "done", "metric", "mean", "std", "min", "max", "n")]
    cells = tidy.assign(cell=[("" if pd.isna(m) else f"{m:.4g}" + ("" if pd.isna(s) else f" ± {s:.2g}"))
                              for m, s in zip(tidy["mean"], tidy["std"], strict=True)])
    wide = cells.set_index([*keys, "metric"])["cell"].unstack("metric")
    counts = tidy.groupby(keys, dropna=False, sort=True).agg(runs=("runs", "first"), n=("n", "max"))
    table = counts.join(wide[[m for m in metrics if m in wide]]).reset_index()
    # Constant settings (the entropy mode of a vocab sweep, ...) are in summary.csv; here they are noise.
    constant = [c for c in keys if c not in keep and table[c].nunique(dropna=False) == 1] if len(table) > 1 else []
    table = table.drop(columns=constant)
    return table.rename(columns={**{c: short_name(c) for c in keys}, **{m: label(m) for m in metrics}})


def ablation_tables(source: PathLike | Mapping[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """``{claim name: claim_table}`` from a folder (see ``load_ablations``) or a ``{sweep: summary}``."""
    summaries = load_ablations(source) if isinstance(source, str | os.PathLike) else source
    return {name: claim_table(summary, keep=[c for c in (BY_NAME[name].x, BY_NAME[name].hue) if c])
            for name, summary in claim_summaries(summaries).items()}


def _lines(ax: Axes, summary: pd.DataFrame, x: str, hue: str | None, metric: str) -> pd.DataFrame:
    """Mean over seeds against ``x``, a line per ``hue`` value, min-max band; ``n=`` where fewer
    seeds finished than at the best-covered point, so a partial sweep is visible in the plot."""
    done = select(summary)
    done = done[done[metric].notna()] if metric in done else done.iloc[:0]
    require(len(done), f"no finished run has a {metric!r}")
    by = [hue, x] if hue else [x]
    table = seed_stats(done, by, metric)
    groups = list(table.groupby(hue, sort=True)) if hue else [(None, table)]
    full = table["n"].max()
    styles = zip(colors(len(groups)), MARKERS * 4, LINESTYLES * 8, strict=False)
    for (value, part), (color, marker, dash) in zip(groups, styles, strict=False):
        # Dashes differ too: two kinds with equal results would otherwise hide one another.
        ax.plot(part[x], part["mean"], color=color, marker=marker, linestyle=dash,
                label=fmt_value(value) if hue else "mean over seeds")
        ax.fill_between(part[x], part["min"], part["max"], color=color, alpha=BAND_ALPHA, linewidth=0)
        for xv, yv, n in zip(part[x], part["mean"], part["n"], strict=True):
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


def _legend(fig: Figure, axes: np.ndarray, legend_title: str) -> None:
    handles: dict[str, object] = {}
    for ax in axes.flat:
        handles.update(zip(*reversed(ax.get_legend_handles_labels()), strict=True))
    fig.legend(list(handles.values()), list(handles.keys()), loc="outside right center", title=legend_title)


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
    _legend(fig, axes, "quantizer")
    fig.suptitle(f"Claim 1: vocabulary size ({_finished(summary)} finished runs; line: mean, band: min-max over seeds)")
    return fig


@skippable
def entropy_weight_figure(summary: pd.DataFrame,
                          metrics: Sequence[str] = ("final_usage_fraction", "final_val_psnr")) -> Figure:
    """Claim 2: usage and validation PSNR against the entropy loss weight (symlog: 0 is swept)."""
    require(WEIGHT in summary, "no quantizer.entropy_loss_weight column")
    fig, axes = new_figure(1, len(metrics))
    for ax, metric in zip(axes[0], metrics, strict=True):
        table = _lines(ax, summary, WEIGHT, None, metric)
        set_parameter_axis(ax, table[WEIGHT].tolist())
        ax.set_xlabel("entropy_loss_weight (symlog scale: 0 is swept)")
    _legend(fig, axes, "")
    fig.suptitle(f"Claim 2: entropy loss weight ({_finished(summary)} finished runs; band: min-max over seeds)")
    return fig


@skippable
def clamp_figure(summary: pd.DataFrame) -> Figure:
    """Claim 4: usage and final batch entropy against codebook size, exact vs reference entropy,
    with the ln K ceiling and the reference clamp's 11.51-nat cap."""
    require(SIZE in summary and MODE in summary, "no quantizer.codebook_size / quantizer.entropy_mode columns")
    fig, axes = new_figure(1, 2)
    usage = _lines(axes[0, 0], summary, SIZE, MODE, "final_usage_fraction")
    set_log_if_wide(axes[0, 0], usage["min"].to_numpy(float), decades=1.0)
    entropy = _lines(axes[0, 1], summary, SIZE, MODE, "final_batch_entropy")
    sizes = np.array(sorted(set(usage[SIZE]) | set(entropy[SIZE])), dtype=float)
    axes[0, 1].plot(sizes, np.log(sizes), color="0.35", linestyle="--", linewidth=1.2, label="ceiling ln K")
    axes[0, 1].axhline(CLAMP_NATS, color="#D55E00", linestyle=":", linewidth=1.5,
                       label=f"reference clamp cap -ln 1e-5 = {CLAMP_NATS:.2f} nats")
    axes[0, 1].set_ylim(bottom=0)
    axes[0, 1].set_ylabel("final batch entropy (nats)")
    axes[0, 1].set_title("Final batch entropy (nats)")
    for ax in axes[0]:
        _log2_axis(ax, sizes.tolist())
    _legend(fig, axes, "entropy_mode")
    fig.suptitle(f"Claim 4: exact vs reference (clamped) entropy ({_finished(summary)} finished runs)")
    return fig


PROBE_COLUMNS = ("bits", "inv_temperature", "tokens", "clamped_mass", "grad_cosine")


def _require_probe(probe: pd.DataFrame, what: str = "not") -> None:
    missing = [c for c in PROBE_COLUMNS if c not in probe]
    require(not missing, f"{what} a clamp probe table: no {missing} columns")


def load_clamp_probe(path: PathLike) -> pd.DataFrame | None:
    """The clamp probe's table: ``path`` itself if it is a CSV file, else ``path/clamp_probe/probe.csv``
    or ``path/probe.csv``; None if there is none (``python -m experiments.clamp_probe`` writes it)."""
    path = Path(path)
    candidates = [path] if path.suffix == ".csv" else [path / "clamp_probe" / "probe.csv", path / "probe.csv"]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        return None
    probe = pd.read_csv(found)
    _require_probe(probe, f"{found} is not")
    return probe


PROBE_METRICS = ("clamped_mass", "grad_cosine", "grad_norm_ratio")


def clamp_probe_table(probe: pd.DataFrame) -> pd.DataFrame:
    """Rows (inv_temperature, highest first; bits), columns (metric, tokens): clamped mass and the
    reference-vs-exact diversity gradient (cosine, norm ratio) as ``mean ± std`` over seeds (the
    mean alone where a point has one seed)."""
    _require_probe(probe)
    keys = ["inv_temperature", "bits", "tokens"]
    stats = probe.groupby(keys)[list(PROBE_METRICS)].agg(["mean", "std"])
    cells = pd.DataFrame({m: [f"{mean:.3g}" + ("" if pd.isna(std) else f" ± {std:.2g}")
                              for mean, std in zip(stats[(m, "mean")], stats[(m, "std")], strict=True)]
                          for m in PROBE_METRICS}, index=stats.index)
    table = cells.unstack("tokens")
    table.columns.names = ["metric", "tokens"]
    return table.sort_index(ascending=[False, True])


@skippable
def clamp_probe_figure(probe: pd.DataFrame) -> Figure:
    """Claim 4's mechanism (``python -m experiments.clamp_probe``): per inverse temperature (a
    column), the clamped mass, and the reference's diversity gradient against the exact one
    (cosine; norm ratio), against the tokens in the entropy batch, a line per codebook size."""
    _require_probe(probe)
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
        for bits, color, marker, dash in zip(sizes, colors(len(sizes)), MARKERS * 4, LINESTYLES * 8, strict=False):
            if (tau, bits) not in stats.index.droplevel("tokens"):
                continue
            line = stats.loc[(tau, bits)].sort_index()
            for row, metric in enumerate(rows):
                ax = axes[row, col]
                ax.plot(line.index, line[(metric, "mean")], color=color, marker=marker, linestyle=dash,
                        label=f"$2^{{{bits}}}$ codes")
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
    _legend(fig, axes, "codebook size")
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
    }[claim]


def save_figure(fig: Figure, folder: Path, stem: str) -> None:
    write_atomic(folder / f"{stem}.png", lambda p: fig.savefig(p, dpi=DPI, format="png"))
    fig.set_layout_engine("none")  # settled by the first save; redoing it doubles the SVG's time
    write_atomic(folder / f"{stem}.svg", lambda p: fig.savefig(p, format="svg"))


def sweep_commands(sweep: str, sweeps_dir: Path | None) -> list[str]:
    """The ``python -m ...`` lines of the sweep file's header comment (how its runs were made)."""
    if sweeps_dir is None:  # the sweep files of this checkout, read as files (analysis imports no other package)
        sweeps_dir = Path(__file__).resolve().parents[1] / "experiments" / "sweeps"
    path = sweeps_dir / f"{sweep}.yaml" if sweeps_dir else None
    if path is None or not path.is_file():
        return [f"# no sweep file {sweep}.yaml found in {sweeps_dir}"]
    header = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    commands = [m.group(1) for m in (re.match(r"#\s+(python -m slurm\.submit .*)$", h) for h in header) if m]
    return [f"# sweep ({path.name}):", *(commands or ["# (no command in the header comment)"])]


class WouldLoseRuns(ValueError):
    """Writing would drop rows of an existing ``summary.csv`` whose runs are not under the runs root."""


def _sorted(summary: pd.DataFrame) -> pd.DataFrame:
    keys = [c for c in ("sweep", *grid_columns(summary), "seed", "run_id") if c in summary]
    return summary.sort_values(keys, kind="stable").reset_index(drop=True)


def merge_summaries(old: pd.DataFrame, new: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """``old`` (a committed ``summary.csv``) updated by ``new`` (rows from run folders), by run id.

    A run in both takes its new row, except that a finished old row is never replaced by an
    unfinished new one (a run restarted with ``--force`` and not done yet); rows of runs only in
    ``old`` are kept. Returns the merged summary, sorted as :func:`summarize` sorts, and one note
    per run whose finished row was kept over an unfinished one."""
    for frame, name in ((old, "the existing summary"), (new, "the runs")):
        if "run_id" not in frame or frame["run_id"].isna().any():
            raise ValueError(f"{name} has rows without a run_id: cannot merge by run; "
                             "rewrite it from its run folders instead")
    old = old.astype({"run_id": str})
    new = new.astype({"run_id": str})
    old_status = old.set_index("run_id")["status"] if "status" in old else pd.Series(dtype=object)
    new_status = new["status"] if "status" in new else pd.Series(None, index=new.index, dtype=object)
    keep_old = new["run_id"].map(old_status).eq("done") & new_status.ne("done")
    notes = [f"{run_id}: kept the finished row; its run folder is now {status if isinstance(status, str) else 'not started'}"
             for run_id, status in zip(new.loc[keep_old, "run_id"], new_status[keep_old], strict=True)]
    fresh = new[~keep_old]
    columns = list(dict.fromkeys([*new.columns, *old.columns]))
    kept = old[~old["run_id"].isin(fresh["run_id"])]
    merged = pd.concat([kept, fresh], ignore_index=True) if len(kept) else fresh.copy()
    merged = merged.reindex(columns=columns)
    for column in merged.columns:  # a NaN in an unfinished row made ints floats in one of them
        dtypes = [f[column].dtype for f in (new, old) if column in f]
        if any(pd.api.types.is_integer_dtype(d) for d in dtypes) and merged[column].notna().all():
            merged[column] = merged[column].astype("int64")
    return _sorted(merged), notes


def _merged_or_refused(summary: pd.DataFrame, existing: Path, mode: str) -> tuple[pd.DataFrame, list[str]]:
    if mode == "replace" or not existing.is_file():
        return summary, []
    old = pd.read_csv(existing)
    if mode == "merge":
        return merge_summaries(old, summary)
    missing = sorted(set(old.get("run_id", pd.Series(dtype=str)).astype(str)) - set(summary["run_id"].astype(str)))
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise WouldLoseRuns(
            f"{existing} has {len(missing)} run(s) that are not under the runs root ({shown}); "
            "writing would drop them. Pass --merge to keep them and update the rest by run id, "
            "or --replace to rewrite the summary from these runs alone")
    return summary, []


def _command_lines(path: Path, sweep_lines: list[str], command: str, keep_old: bool) -> str:
    """``command.txt``: how the runs were made, then every analysis command that fed the summary
    (the earlier ones too when merging)."""
    analysis_lines: list[str] = []
    if keep_old and path.is_file():
        lines = path.read_text(encoding="utf-8").splitlines()
        if "# tables and plots:" in lines:
            analysis_lines = lines[lines.index("# tables and plots:") + 1:]
    analysis_lines = list(dict.fromkeys([*analysis_lines, command]))
    return "\n".join([*sweep_lines, "# tables and plots:", *analysis_lines]) + "\n"


def write_ablations(root: PathLike, out: PathLike, *, command: str, sweeps_dir: Path | None = None,
                    mode: str = "refuse", log: Callable[[str], None] | None = None) -> dict[str, list[str]]:
    """Write every sweep's CSVs and ``command.txt`` and every claim's figures into ``out/<sweep>/``.

    ``mode`` says what to do with an existing ``out/<sweep>/summary.csv`` (committed results whose
    run folders may be long gone): ``"refuse"`` (default) raises :class:`WouldLoseRuns`, before
    anything is written, if it holds runs that are not under ``root``; ``"merge"`` keeps those
    rows and updates the others by run id (:func:`merge_summaries`), so that a few re-run or
    finished runs can be folded into committed results; ``"replace"`` rewrites it from ``root``.
    A claim's figures are drawn from every sweep of that claim now in ``out`` (the vocab claim
    joins two sweeps; re-running one of them keeps the other in the plot).
    Returns ``{sweep: files written}``; a figure that cannot be drawn is reported on stderr."""
    if mode not in ("refuse", "merge", "replace"):
        raise ValueError(f"mode must be 'refuse', 'merge' or 'replace', not {mode!r}")
    log = log or (lambda message: print(message, file=sys.stderr))
    out = Path(out)
    summaries = summaries_from_runs(root, log)
    # Decide every sweep before writing any: a refusal leaves out/ exactly as it was.
    planned = {sweep: _merged_or_refused(summary, out / sweep / "summary.csv", mode)
               for sweep, summary in summaries.items()}
    written: dict[str, list[str]] = {}
    for sweep, (summary, notes) in planned.items():
        for note in notes:
            log(f"{sweep}: {note}")
        folder = out / sweep
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(folder / "summary.csv", lambda p, s=summary: s.to_csv(p, index=False))
        write_atomic(folder / "grid.csv", lambda p, s=summary: grid_table(s).to_csv(p, index=False))
        text = _command_lines(folder / "command.txt", sweep_commands(sweep, sweeps_dir), command, mode == "merge")
        write_atomic(folder / "command.txt", lambda p, t=text: p.write_text(t, encoding="utf-8"))
        written[sweep] = ["summary.csv", "grid.csv", "command.txt"]
    present = {**read_summaries(out), **{s: m for s, (m, _) in planned.items()}}
    touched = {c.name for s, (m, _) in planned.items() if (c := claim_of(s, m)) is not None}
    for sweep, (m, _) in planned.items():
        if claim_of(sweep, m) is None:
            log(f"{sweep}: tests no claim (its name is no ablation sweep's and no claim's parameter "
                f"varies): summary.csv and grid.csv only, no claim figure")
    for name, summary in claim_summaries(present).items():
        if name not in touched:
            continue
        # A claim's figures go with its first sweep present (the vocab claim joins two sweeps).
        home = next(s for s in BY_NAME[name].sweeps + tuple(present) if s in present
                    and claim_of(s, present[s]) is BY_NAME[name])
        for stem, draw in claim_figures(name, summary).items():
            try:
                fig = draw()
            except NoData as err:
                for suffix in (".png", ".svg"):  # an old figure of other data would mislead
                    (out / home / f"{stem}{suffix}").unlink(missing_ok=True)
                log(f"{home}/{stem}: not drawn: {err}")
                continue
            assert fig is not None  # strict=True raises instead of returning None
            save_figure(fig, out / home, stem)
            written.setdefault(home, []).extend([f"{stem}.png", f"{stem}.svg"])
    return written


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = OneLineParser(prog="python -m analysis.ablations", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs_root", type=Path, nargs="?", help="folder of ablation sweep folders (or one sweep folder)")
    parser.add_argument("--probe", type=Path, metavar="DIR",
                        help="instead: draw claim4_probe.png/.svg from DIR/probe.csv (python -m experiments.clamp_probe)")
    parser.add_argument("--out", type=Path, default=Path("results/ablations"), help="default: results/ablations")
    parser.add_argument("--sweeps", type=Path, default=None, help="sweep files (default: experiments/sweeps)")
    existing = parser.add_mutually_exclusive_group()
    existing.add_argument("--merge", action="store_const", const="merge", dest="mode",
                          help="keep the rows of an existing summary.csv whose runs are not under RUNS_ROOT "
                               "and update the others by run id (fold re-run or finished runs into results)")
    existing.add_argument("--replace", action="store_const", const="replace", dest="mode",
                          help="rewrite each summary.csv from RUNS_ROOT alone, dropping runs not found there")
    parser.set_defaults(mode="refuse")
    args = parser.parse_args(argv)
    command = shlex.join(["python", "-m", "analysis.ablations", *argv])
    if (args.runs_root is None) == (args.probe is None):
        parser.error("give RUNS_ROOT or --probe DIR (one of them)")
    if args.probe is not None:
        probe = load_clamp_probe(args.probe) if args.probe.is_dir() else None
        if probe is None:
            return fail(f"--probe {args.probe}: no probe.csv there; write it with python -m experiments.clamp_probe "
                        f"--out {args.probe}")
        save_figure(clamp_probe_figure(probe), args.probe, "claim4_probe")
        print(f"{args.probe}: claim4_probe.png, claim4_probe.svg")
        return 0
    if not args.runs_root.is_dir():
        what = "is a file" if args.runs_root.exists() else "does not exist"
        return fail(f"RUNS_ROOT {args.runs_root} {what}: give a folder of sweep folders (or one sweep folder)")
    if args.out.exists() and not args.out.is_dir():
        return fail(f"--out {args.out} is a file; give the folder of the ablation tables (default results/ablations)")
    try:
        written = write_ablations(args.runs_root, args.out, command=command, sweeps_dir=args.sweeps, mode=args.mode)
    except (FileNotFoundError, NoData, ValueError) as err:
        return fail(err)
    except OSError as err:  # e.g. --out not writable
        return fail(f"cannot write under {args.out}: {err.strerror or err}; choose another --out")
    for sweep, files in written.items():
        print(f"{args.out / sweep}: {', '.join(files)}")
    return 0


if __name__ == "__main__":
    sys.exit(guarded(main))
