"""Does utilization buy generation (issue 33's claim, ``results/generation``)? Each token prior (task
``prior``) joined to the tokenizer it was trained on (its ``data.tokenizer_run`` names the tokenizer's
folder, whose name is the tokenizer's run id): the tokenizer's reconstruction and validation usage
beside the prior's validation bits per image and its samples' usage. :func:`generation_summary` is
that join (one row per prior, each with a *series*: ``LFQ recipe`` (inverse temperature 10, gamma 1,
the sweeps' recipe), ``VQ fair`` (random-sample init and dead-code replacement), or what else tells a
tokenizer apart), :func:`generation_table` the mean, std and n over seeds per series and codebook
size, :func:`utilization_table` the rank correlations at 2^14 codes; :func:`generation_figure` draws
MAGVIT-v2's Fig. 1 at this scale (against the vocabulary) and :func:`utilization_figure` each 2^14
prior's bits per image and its tokenizer's PSNR against its tokenizer's usage. Bits per image alone
favour a tokenizer that carries less (a collapsed one is easy to model), so reconstruction is always
shown beside it, and ``unigram_bits_per_image`` (a model that ignores context) is a reference.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import PurePath

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from analysis.claims import SUMMARY_ENV
from analysis.column_names import FRAC, GAMMA, KIND, SCHEDULE, SIZE, STEPS, TAU, VQ_DEAD, VQ_INIT, WEIGHT
from analysis.glossary import kind_label
from analysis.quantizer_comparison import value_or
from analysis.style import (
    colors,
    new_figure,
    require,
    seed_series,
    series_styles,
    skippable,
    spread_coincident,
)

TOKENIZER_RUN = "data.tokenizer_run"
HEAD = "model.head"
SAMPLES = "eval.prior_samples"
SAMPLES_DEFAULT = 256  # experiments/sections.py: config.json lists eval.prior_samples away from it only
RECIPE = {TAU: 10.0, GAMMA: 1.0, WEIGHT: 0.1, FRAC: 1.0, SCHEDULE: "constant"}  # generation_lfq_images.yaml's LFQ
# how a series names a setting away from the recipe
APART = {TAU: "inv. temp. {:g}", GAMMA: "gamma {:g}", WEIGHT: "entropy weight {:g}", FRAC: "frac {:g}",
         SCHEDULE: "{} entropy schedule"}
FIRST = ("LFQ recipe", "VQ fair")  # the Fig. 1 series, first in every table and legend
TOKENIZER_CONFIG = (KIND, SIZE, TAU, GAMMA, WEIGHT, FRAC, SCHEDULE, VQ_INIT, VQ_DEAD)
TOKENIZER_METRICS = ("final_val_usage_fraction", "final_val_usage_ceiling", "final_val_psnr", "final_val_ssim", "final_val_perplexity",
                     "final_val_codes_used", "final_val_tokens")
PRIOR_METRICS = ("final_val_bits_per_token", "final_val_bits_per_image", "final_sample_codes_used",
                 "final_sample_usage_fraction", "final_sample_kl")
DERIVED = ("tokens_per_image", "unigram_bits_per_image", "sample_usage_ceiling")
# the tokenizer's own run columns, renamed in the join so that they stand beside the prior's
TOKENIZER_RENAMED = {"run_id": "tokenizer_run_id", "sweep": "tokenizer_sweep", "status": "tokenizer_status",
                     "seed": "tokenizer_seed", STEPS: "tokenizer_steps", "wall_time_s": "tokenizer_wall_time_s",
                     **{c: f"tokenizer_{c}" for c in SUMMARY_ENV}}
TABLE_METRICS = ("final_val_usage_fraction", "final_val_psnr", "final_val_ssim", "final_val_bits_per_image",
                 "final_val_bits_per_token", "unigram_bits_per_image", "final_sample_usage_fraction",
                 "final_sample_codes_used", "final_sample_kl")
UTILIZATION_SIZE = 2**14  # the vocabulary the utilization question compares tokenizers at
USAGE, BITS, PSNR = "final_val_usage_fraction", "final_val_bits_per_image", "final_val_psnr"

Log = Callable[[str], None]


def is_prior(runs: pd.DataFrame) -> pd.Series:
    """Which rows of ``load_runs`` are token priors (task ``prior``)."""
    return runs["task"].eq("prior") if "task" in runs else pd.Series(False, index=runs.index)


def tokenizer_id(raw: object) -> str | None:
    """The tokenizer's run id a prior's ``data.tokenizer_run`` names: its folder's name."""
    return PurePath(str(raw).rstrip("/\\")).name if isinstance(raw, str) and raw.strip() else None


def series_of(tokenizer: pd.Series) -> str:
    """The claim's name for a tokenizer (a row of ``load_runs``): ``LFQ recipe``, ``VQ fair``, or
    the kind and what sets it apart (``LFQ inv. temp. 1``, ``LFQ gamma 2``, ``VQ plain``)."""
    kind = str(value_or(tokenizer, KIND, "lfq"))
    if kind in ("lfq", "bsq"):
        apart = []
        for column, default in RECIPE.items():
            value = value_or(tokenizer, column, default)
            if float(value) != default if isinstance(default, float) else str(value) != default:
                apart.append(APART[column].format(value))
        return f"{kind_label(kind)} " + (", ".join(apart) if apart else "recipe")
    if kind == "vq":
        init, dead = str(value_or(tokenizer, VQ_INIT, "uniform")), float(value_or(tokenizer, VQ_DEAD, 0.0))
        if init != "uniform" and dead > 0:
            return "VQ fair" + ("" if init == "random_sample" else f" ({init.replace('_', '-')} init)")
        return "VQ " + (f"{init.replace('_', '-')} init" if init != "uniform" else "plain") + (
            f" + dead-code {dead:g}" if dead > 0 else "")
    return kind_label(kind)


def series_order(names: pd.Series) -> list[str]:
    """The series in reading order: :data:`FIRST`, then LFQ's others, then the rest, by name."""
    found = set(names.dropna())
    return sorted(found, key=lambda s: (FIRST.index(s) if s in FIRST else len(FIRST), not s.startswith("LFQ"), s))


def generation_summary(runs: pd.DataFrame, log: Log | None = None) -> pd.DataFrame:
    """One row per prior in ``runs`` (``load_runs`` of the prior and tokenizer sweeps together),
    joined to its tokenizer by run id. A prior whose tokenizer is not among ``runs`` is left out and
    said in one ``log`` line (and the tokenizers without a prior in another); ``NoData`` if no prior or no tokenizer is there, or none joins."""
    require(len(runs), "no run folders")
    priors, tokenizers = runs[is_prior(runs)], runs[~is_prior(runs)]
    require(len(priors), "no token prior (a run of task prior) among the runs: give the prior sweep folders "
                         "(prior_generation_images, prior_regime_images) too")
    require(len(tokenizers), "no tokenizer run among the runs: give the tokenizer sweep folders "
                             "(generation_lfq_images, generation_vq_images, generation_regime_images) too")
    require(TOKENIZER_RUN in priors, f"the priors have no {TOKENIZER_RUN} column")
    priors = priors.assign(tokenizer_run_id=priors[TOKENIZER_RUN].map(tokenizer_id))
    # a tokenizer in two sweeps is one run (the same config): its finished copy first
    tokenizers = tokenizers.astype({"run_id": str}).sort_values("status", key=lambda s: s.ne("done"), kind="stable")
    tokenizers = tokenizers.drop_duplicates("run_id").copy()  # one block: adding a column stays cheap
    tokenizers = tokenizers.assign(series=[series_of(row) for _, row in tokenizers.iterrows()])
    missing = priors[~priors["tokenizer_run_id"].isin(tokenizers["run_id"])]
    require(len(missing) < len(priors), "no prior's tokenizer is under the folders given: give the tokenizer "
                                        "sweep folders beside the prior sweep folders")
    if len(missing) and log is not None:
        shown = ", ".join(f"{r} (tokenizer {t})" for r, t in zip(missing["run_id"], missing["tokenizer_run_id"],
                                                                  strict=True))
        log(f"{len(missing)} prior(s) left out, their tokenizer is not under the folders given: {shown}; "
            "add its sweep folder to RUNS")
    alone = sorted(set(tokenizers["run_id"]) - set(priors["tokenizer_run_id"]))
    if alone and log is not None:  # not an error (the tokenizer sweeps may hold more), but worth seeing
        log(f"{len(alone)} tokenizer(s) under the folders given have no prior there: {', '.join(alone)}")
    kept = [c for c in dict.fromkeys(("run_id", *TOKENIZER_CONFIG, *TOKENIZER_METRICS, *TOKENIZER_RENAMED, "series"))
            if c in tokenizers]
    side = tokenizers[kept].rename(columns=TOKENIZER_RENAMED)
    own = [c for c in ("run_id", "tokenizer_run_id", "sweep", "status", "reason", "seed", HEAD, STEPS, SAMPLES,
                       *PRIOR_METRICS, "wall_time_s", *SUMMARY_ENV) if c in priors]
    joined = priors[own].astype({"run_id": str}).merge(side, on="tokenizer_run_id", how="inner")
    # config.json lists these away from their defaults only
    joined[HEAD] = joined[HEAD].fillna("full") if HEAD in joined else "full"
    joined[SAMPLES] = pd.to_numeric(joined[SAMPLES], errors="coerce").fillna(SAMPLES_DEFAULT) if SAMPLES in joined \
        else SAMPLES_DEFAULT
    per_token = pd.to_numeric(joined.get("final_val_bits_per_token"), errors="coerce")
    joined["tokens_per_image"] = (pd.to_numeric(joined.get("final_val_bits_per_image"), errors="coerce")
                                  / per_token).round()
    perplexity = pd.to_numeric(joined["final_val_perplexity"], errors="coerce") if "final_val_perplexity" in joined \
        else np.nan
    joined["unigram_bits_per_image"] = np.log2(perplexity) * joined["tokens_per_image"]
    # the share of K codes the samples' tokens reach when drawn uniformly at random: their usage's ceiling
    sizes = pd.to_numeric(joined[SIZE], errors="coerce") if SIZE in joined else np.nan
    joined["sample_usage_ceiling"] = -np.expm1(-joined[SAMPLES] * joined["tokens_per_image"] / sizes)
    order = ["run_id", "tokenizer_run_id", "sweep", "tokenizer_sweep", "status", "tokenizer_status", "series",
             *TOKENIZER_CONFIG, "tokenizer_seed", "seed", HEAD, STEPS, SAMPLES, "tokenizer_steps", *TOKENIZER_METRICS,
             *PRIOR_METRICS, *DERIVED, "wall_time_s", "tokenizer_wall_time_s", "reason", *SUMMARY_ENV,
             *(f"tokenizer_{c}" for c in SUMMARY_ENV)]
    return claim_order(joined[[c for c in order if c in joined]])


def claim_order(summary: pd.DataFrame) -> pd.DataFrame:
    """The summary's rows in the claim's order: series (:func:`series_order`), codebook size, seeds, run id."""
    rank = {s: i for i, s in enumerate(series_order(summary["series"]))}
    keys = [c for c in (SIZE, "tokenizer_seed", "seed", "run_id") if c in summary]
    ordered = summary.assign(_s=summary["series"].map(rank)).sort_values(["_s", *keys], kind="stable")
    return ordered.drop(columns="_s").reset_index(drop=True)


def finished(summary: pd.DataFrame) -> pd.DataFrame:
    """The finished priors, each with ``label``: its series, and its head where the priors have several."""
    done = summary[summary["status"] == "done"]
    heads = done[HEAD].fillna("full") if HEAD in done else pd.Series("full", index=done.index)
    several = heads.nunique() > 1
    return done.assign(label=[f"{s}, {h} head" if several else s for s, h in zip(done["series"], heads, strict=True)])


def labels(done: pd.DataFrame) -> list[str]:
    """The labels of :func:`finished` in series order."""
    rank = {s: i for i, s in enumerate(series_order(done["series"]))}
    return sorted(set(done["label"]), key=lambda label: (rank[done.loc[done["label"] == label, "series"].iloc[0]], label))


def generation_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Mean, sample std and n over the finished priors (one per tokenizer seed) per series, codebook
    size and prior head, of :data:`TABLE_METRICS`; series in :func:`series_order`."""
    done = finished(summary).assign(**{HEAD: lambda d: d[HEAD].fillna("full") if HEAD in d else "full"})
    present = [m for m in TABLE_METRICS if m in done]
    keys = ["series", SIZE, HEAD]
    grouped = done.groupby(keys, sort=False)[present]
    table = grouped.agg(["mean", "std"])
    table.columns = [f"{m}_{s}" for m, s in table.columns]
    table["n_seeds"] = grouped.size()
    table = table.reset_index()
    rank = {s: i for i, s in enumerate(series_order(table["series"]))}
    return table.sort_values(keys, key=lambda c: c.map(rank) if c.name == "series" else c,
                             kind="stable").reset_index(drop=True)


def at_size(summary: pd.DataFrame, size: int = UTILIZATION_SIZE) -> pd.DataFrame:
    """The finished priors (:func:`finished`) on tokenizers of ``size`` codes."""
    done = finished(summary)
    return done[pd.to_numeric(done[SIZE], errors="coerce") == size]


def spearman(x: pd.Series, y: pd.Series) -> float:
    """Spearman's rank correlation of the pairs where both are numbers (NaN under 3 pairs or a constant)."""
    both = pd.DataFrame({"x": pd.to_numeric(x, errors="coerce"), "y": pd.to_numeric(y, errors="coerce")}).dropna()
    if len(both) < 3 or both["x"].nunique() < 2 or both["y"].nunique() < 2:
        return float("nan")
    return float(both["x"].rank().corr(both["y"].rank()))


def utilization_table(summary: pd.DataFrame, size: int = UTILIZATION_SIZE) -> pd.DataFrame:
    """Over the finished priors at ``size`` codes, all of them and LFQ's alone: n, and Spearman's rank
    correlation of the tokenizer's validation usage with the prior's bits per image and with the
    tokenizer's PSNR, and of PSNR with bits per image."""
    points = at_size(summary, size)
    rows = []
    for scope, part in (("all series", points), ("LFQ", points[points[KIND] == "lfq"] if KIND in points else points)):
        rows.append({"scope": scope, SIZE: size, "n_priors": len(part), "series": "; ".join(series_order(part["series"])),
                     "spearman_usage_bits_per_image": spearman(part[USAGE], part[BITS]),
                     "spearman_usage_psnr": spearman(part[USAGE], part[PSNR]),
                     "spearman_psnr_bits_per_image": spearman(part[PSNR], part[BITS])})
    return pd.DataFrame(rows)


# each panel of the generation figure: its metric, its y label, its scale, and the ceiling it is drawn with
PANELS = ((USAGE, "tokenizer: val usage (% of codebook)", 100.0, "final_val_usage_ceiling"),
          (PSNR, "tokenizer: val PSNR (dB, higher is better)", 1.0, None),
          (BITS, "prior: val bits per image (lower is easier to model)", 1.0, None),
          ("final_sample_usage_fraction", "prior: sample usage (% of codebook)", 100.0, "sample_usage_ceiling"))


def _log2_axis(ax: Axes, sizes: list[float]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [f"2^{int(np.log2(s))}" for s in sizes])
    ax.minorticks_off()
    ax.set_xlabel("codebook size (log2; series dodged sideways)")


def _by_size(frame: pd.DataFrame, column: str) -> pd.Series:
    return pd.to_numeric(frame[column], errors="coerce").groupby(frame[SIZE].astype(float)).mean().dropna()


@skippable
def generation_figure(summary: pd.DataFrame) -> Figure:
    """MAGVIT-v2's Fig. 1 at this scale: per series present at two codebook sizes or more, the
    tokenizer's validation usage and PSNR and the prior's validation bits per image and sample usage
    against the codebook size (mean over seeds, every seed a small marker); usage panels draw their
    ceiling 1 - exp(-N/K) (dashed), the bits panel each series' unigram bits per image (dotted)."""
    done = finished(summary)
    require(len(done), "no finished prior to draw")
    spans = done.groupby("label")[SIZE].nunique()
    shown = [label for label in labels(done) if spans.get(label, 0) >= 2]
    require(shown, "no series has finished priors at two codebook sizes or more")
    done = done[done["label"].isin(shown)]
    fig, axes = new_figure(2, 2, height=9.5)
    sizes = sorted(float(s) for s in done[SIZE].unique())
    palette = colors(len(shown))
    for ax, (metric, ylabel, scale, ceiling) in zip(axes.flat, PANELS, strict=True):
        require(metric in done, f"no column {metric}")
        seed_series(ax, [(name, part[SIZE].to_numpy(float), part[metric].to_numpy(float) * scale)
                         for name in shown for part in [done[done["label"] == name]]], log=True, width=0.12)
        if ceiling in done and done[ceiling].notna().any():
            cap = _by_size(done, ceiling)
            ax.plot(cap.index, cap.to_numpy() * scale, linestyle="--", color="grey", linewidth=1.2,
                    label="ceiling 1 - exp(-N/K) of the N tokens counted")
        if metric == BITS and "unigram_bits_per_image" in done:
            for i, name in enumerate(shown):
                ref = _by_size(done[done["label"] == name], "unigram_bits_per_image")
                ax.plot(ref.index, ref.to_numpy(), linestyle=":", linewidth=1.4, color=palette[i],
                        label=f"{name}: unigram bits per image (no context)")
        _log2_axis(ax, sizes)
        ax.set_ylabel(ylabel)
    handles: dict[str, object] = {}
    for ax in axes.flat:
        for handle, text in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(text, handle)
    fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncols=2,
               title="line: mean over tokenizer seeds (n seeds); small markers: one seed each")
    heads = sorted(map(str, done[HEAD].dropna().unique())) if HEAD in done else []
    steps = sorted(int(s) for s in pd.to_numeric(done[STEPS], errors="coerce").dropna().unique()) if STEPS in done else []
    note = (f"prior: {', '.join(heads) or 'full'} head" + (f", {', '.join(map(str, steps))} steps" if steps else "")
            + "; bits per image: its negative log-likelihood of a validation image's tokens; sample usage over "
            f"{', '.join(sorted({f'{int(n):,}' for n in done[SAMPLES].dropna()})) if SAMPLES in done else '?'} samples")
    fig.suptitle("Reconstruction and generation against the vocabulary (MAGVIT-v2 Fig. 1 at this scale)\n"
                 + textwrap.fill(note, 120), fontsize=13)
    return fig


def _rho(value: float) -> str:
    return "n/a (under 3 points)" if not np.isfinite(value) else f"{value:+.2f}"


@skippable
def utilization_figure(summary: pd.DataFrame, size: int = UTILIZATION_SIZE) -> Figure:
    """Each finished prior at ``size`` codes a point: its tokenizer's validation usage (x) against the
    prior's validation bits per image (left) and the tokenizer's PSNR (right), a colour and marker per
    series; the title gives Spearman's rank correlations (:func:`utilization_table`)."""
    points = at_size(summary, size)
    require(len(points), f"no finished prior on a tokenizer of {size} codes")
    shown = labels(points)
    palette, styles = colors(len(shown)), series_styles(len(shown))
    fig, axes = new_figure(1, 2, height=6.4, sharex=True)
    x = points[USAGE].to_numpy(float) * 100
    for ax, (metric, ylabel) in zip(axes[0], ((BITS, "prior: val bits per image (lower is easier to model)"),
                                              (PSNR, "tokenizer: val PSNR (dB, higher is better)")), strict=True):
        y = points[metric].to_numpy(float)
        spread = spread_coincident(x, y)
        for i, name in enumerate(shown):
            mine = (points["label"] == name).to_numpy()
            ax.scatter(spread[mine], y[mine], s=80, color=palette[i], marker=styles[i][1], edgecolors="black",
                       linewidths=0.6, label=f"{name} (n={int(mine.sum())})", zorder=3)
        ax.set_xlabel(f"tokenizer: val usage (% of its {size:,} codes)")
        ax.set_ylabel(ylabel)
    handles, names = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", ncols=min(4, len(shown)),
               title="tokenizer series: one point per prior (one per tokenizer seed)")
    stats = utilization_table(summary, size).set_index("scope")
    line = "; ".join(f"{scope} (n={int(row['n_priors'])}): rho(usage, bits per image) "
                     f"{_rho(row['spearman_usage_bits_per_image'])}, rho(usage, PSNR) {_rho(row['spearman_usage_psnr'])}"
                     for scope, row in stats.iterrows())
    fig.suptitle(f"Does a tokenizer that uses more of its codes give a better prior? {size:,} codes\n"
                 + textwrap.fill(f"Spearman rank correlation over the priors, {line}", 120), fontsize=13)
    return fig
