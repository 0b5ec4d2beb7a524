"""Every figure of every report, declared once: its file stem, title, caption (the one table of
captions) and a function of the study's loaded data that draws it. Four studies draw from here:
``sweep`` (``python -m analysis.report RESULTS``: a sweep's ``report.md``), ``ablations`` (the paper's
claims, ``results/ablations``), ``recipe`` (the images task's regime study, ``results/recipe``) and
``video`` (claim 1 on the video task, ``results/video``) and ``generation`` (issue 33's token priors
against their tokenizers, ``results/generation``). A
study's data is a mapping of names to frames (and, for a sweep, the words its captions are made of);
a report draws the entries of its study whose ``needs`` are all in it. Adding a figure is its drawing
function (``plots.py``, ``diagnostics.py``, ``claim_figures.py``, or a module of its own) plus one
``register(Plot(...))`` line or one line of :data:`FIGURES`; docs/experiments.md says how.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from analysis.adversarial_game import adversarial_curves_figure, adversarial_game, played
from analysis.aggregate import parameters, select
from analysis.claim_figures import (
    CLAMP_TRAIN_TITLES,
    clamp_figure,
    clamp_probe_figure,
    entropy_weight_figure,
    vocab_figure,
)
from analysis.column_names import FRAC, GAMMA
from analysis.diagnostics import bit_pair_mi_heatmap, bit_usage_heatmap, saturation_and_usage
from analysis.generation_claim import generation_figure, utilization_figure
from analysis.glossary import figure_title
from analysis.plots import (
    layers,
    rank_frequency,
    reconstruction_vs_usage,
    training_curves,
    usage_heatmap,
    usage_vs_gamma,
    with_window_ceiling,
)
from analysis.prior_figures import is_prior_sweep, prior_samples
from analysis.regime import collapse_figure, comparison_figure, regime_figure
from analysis.video_claim import frame_parts_figure, video_figure

Data = Mapping[str, Any]
STUDIES = ("sweep", "ablations", "recipe", "video", "generation")


@dataclass(frozen=True)
class Plot:
    """One figure: ``stem``, ``title`` and ``caption`` are format strings over the study's data (a
    sweep's caption words, :func:`sweep_data`); ``draw`` raises ``NoData`` when it cannot draw."""

    stem: str  # file name without .png/.svg
    study: str  # which report draws it: one of STUDIES
    title: str
    caption: str  # what a reader sees under it
    draw: Callable[[Data], Figure | None]
    needs: tuple[str, ...] = ()  # the data it draws from: left out of a report that lacks one
    shows: str | None = None  # the data's frame of the runs it shows (its caption says what they held fixed)
    when: Callable[[Data], bool] | None = None  # drawn only where this holds of the data
    each: Callable[[Data], list[dict[str, Any]]] | None = None  # one figure per item, merged into the data


@dataclass(frozen=True)
class Planned:
    """A registry entry made concrete for one report: its words filled in, its data bound."""

    stem: str
    title: str
    caption: str
    plot: Plot
    data: Data

    def draw(self) -> Figure | None:
        return self.plot.draw(self.data)

    @property
    def shows(self) -> pd.DataFrame | None:
        return self.data[self.plot.shows] if self.plot.shows else None


def register(plot: Plot) -> Plot:
    """Add ``plot`` to :data:`FIGURES` (drawn after the entries already there); a stem is one file
    per study, so a second entry with the same study and stem is refused."""
    if plot.study not in STUDIES:
        raise ValueError(f"Plot {plot.stem!r}: study {plot.study!r} is none of {', '.join(STUDIES)}")
    if any(p.study == plot.study and p.stem == plot.stem for p in FIGURES):
        raise ValueError(f"the {plot.study} study already has a figure {plot.stem!r}")
    FIGURES.append(plot)
    return plot


def entries(study: str) -> list[Plot]:
    """The registry's entries of ``study``, in reading order."""
    return [p for p in FIGURES if p.study == study]


def planned(study: str, data: Data) -> list[Planned]:
    """The figures ``study`` draws from ``data``: its entries whose needs are there and whose
    ``when`` holds, one per item of ``each``, with stem, title and caption filled in."""
    out = []
    for plot in entries(study):
        if any(k not in data for k in plot.needs) or (plot.when is not None and not plot.when(data)):
            continue
        for item in plot.each(data) if plot.each else [{}]:
            bound = {**data, **item}
            out.append(Planned(plot.stem.format_map(bound), plot.title.format_map(bound),
                               plot.caption.format_map(bound), plot, bound))
    return out


# ---- the sweep report: its data, and the words its captions are made of ------------------------

def usage_metric(runs: pd.DataFrame) -> str:
    """The utilization figures show: over every validation token where runs report it (what papers
    compare), else the training window's."""
    val = "final_val_usage_fraction"
    return val if val in runs and runs[val].notna().any() else "final_usage_fraction"


def sweep_data(runs: pd.DataFrame, metrics: pd.DataFrame, hist: pd.DataFrame) -> dict[str, Any]:
    """A sweep's frames (runs with the training window's ceiling, the finished ones, metrics,
    histograms) and the words of its captions, which depend on what the runs logged."""
    usage = usage_metric(runs)
    val = usage == "final_val_usage_fraction"
    others = ("final_usage_fraction", "final_val_perplexity") if val else ("final_perplexity",)
    runs = with_window_ceiling(runs, metrics)  # the training window's ceiling, from the logged token counts
    finished = select(runs)
    # What splits the grid beyond gamma (x) and frac (lines): a third swept parameter, drawn one panel each.
    third = [p for p in parameters(finished) if p not in (GAMMA, FRAC)]
    panel = third[0] if len(third) == 1 else None
    return {
        "runs": runs, "finished": finished, "metrics": metrics, "hist": hist, "usage": usage, "others": others,
        "usage_title": figure_title([usage], GAMMA, FRAC, panel),
        "others_title": figure_title(others, GAMMA, FRAC, panel),
        "over": ("over every validation token (the histogram of all validation tokens' codes)" if val
                 else "in the last training usage window"),
        "lines": ("One line per frac_per_sample_entropy: the mean over seeds, with min-max whiskers over seeds"
                  + (f"; one panel per {panel}" if panel else "") + ". Each line has its own colour, line style and "
                  "marker, is drawn thinner than the one before and a few % of the axis to the side, so that lines "
                  "with equal values stay visible as two. A point with one seed is marked n=1. "),
        "usage_ceiling": ("The dashed line is the ceiling 1 - exp(-N/K): the share of the K codes that the N "
                          "validation tokens counted reach when assigned uniformly at random; usage near it is "
                          "capped by the validation set's size, not by the tokenizer." if val else ""),
        "cell_ceiling": "; where the ceiling 1 - exp(-N/K) is under 0.98, the cell says it" if val else "",
        "heatmap_panels": f"; one heatmap per {panel}, on one colour scale" if panel else "",
        "window_usage": ("The training window's usage (the last `monitor.usage_window` steps) as a second view, and "
                         if val else ""),
        "window_ceiling": ("The dashed line in the training usage panels is the ceiling 1 - exp(-N/K) of the "
                           "window's N tokens. " if val else ""),
    }


def _per_layer(data: Data) -> list[dict[str, Any]]:
    """One training-curves figure per quantizer layer; a stem per layer only where there are several."""
    found = layers(data["metrics"])
    return [{"layer": layer, "of_layer": f" of layer `{layer}`" if layer else "",
             "layer_stem": "" if len(found) <= 1 else "_" + re.sub(r"[^A-Za-z0-9_.-]+", "_", layer or "")}
            for layer in found or [None]]


def _one_run_with_bits(data: Data) -> bool:
    metrics = data["metrics"]
    return "bit_frequency_0" in metrics and "run_id" in metrics and metrics["run_id"].nunique() == 1


SWEEP = "sweep"
ABLATIONS = "ablations"
RECIPE = "recipe"
GENERATION = "generation"
VIDEO = "video"


def _has_frame_parts(data: Data) -> bool:
    """Whether the sweep's finished runs report their first frame's and later frames' validation usage."""
    column = "final_val_usage_fraction_first_frame"
    return column in data["finished"] and data["finished"][column].notna().any()

FIGURES: list[Plot] = [
    # A sweep's report (analysis.report), in reading order.
    Plot("usage", SWEEP, "{usage_title}",
         "The final usage fraction (share of the codebook used {over}) of every grid point. {lines}{usage_ceiling}",
         lambda d: usage_vs_gamma(d["runs"], metrics=(d["usage"],), strict=True), shows="finished"),
    Plot("usage_heatmap", SWEEP, "{usage_title}",
         "Each cell is one grid point: the mean over seeds of the final usage fraction (share of the codebook "
         "used {over}), annotated mean ± sample std and the number of seeds (n){cell_ceiling}{heatmap_panels}. "
         "Brighter cells use more of the codebook.",
         lambda d: usage_heatmap(d["runs"], metric=d["usage"], strict=True), shows="finished"),
    Plot("usage_vs_gamma", SWEEP, "{others_title}",
         "{window_usage}the perplexity of the codes. {lines}{window_ceiling}The dashed line in the perplexity "
         "panels is the codebook size (every code used equally often).",
         lambda d: usage_vs_gamma(d["runs"], metrics=d["others"], strict=True), shows="finished"),
    Plot("training_curves{layer_stem}", SWEEP, "Training dynamics{of_layer}",
         "Per-sample entropy (low = confident assignments), batch entropy (high = codes spread over the "
         "codebook; its ceiling ln K is in the panel title), commitment loss and usage fraction per training "
         "step; one line per grid point (mean over seeds, min-max band), each with its own line style and "
         "markers. A panel whose values sit near 0 most of the time is drawn on a log axis, or symlog "
         "(linear below the threshold its title gives) when it reaches 0 or spans more than 4 decades. The "
         "usage panel's dashed line is the ceiling 1 - exp(-N/K) of the usage window's N tokens. Started runs "
         "(not finished) are included up to their last step.",
         lambda d: training_curves(d["metrics"], d["runs"], layer=d["layer"], strict=True), shows="runs",
         each=_per_layer),
    Plot("rank_frequency", SWEEP, "Code rank-frequency",
         "Per run and codebook, a thin line in its grid point's colour and its seed's line style and marker (the "
         "lower legend): its codes sorted from most to least used in the last histogram snapshot, with their "
         "share of the assignments, log-log; where a thin line ends, that run's remaining codes were unused. The "
         "bold line of each grid point is the median over its runs at each rank (a run counts 0 past its last "
         "code); the legend gives each run's number of codes used. A flat line at 1/K (dashed) is a uniformly "
         "used codebook; a steep drop means a few codes take most tokens.",
         lambda d: rank_frequency(d["hist"], d["runs"], strict=True), shows="runs"),
    Plot("reconstruction_vs_usage", SWEEP, "Reconstruction against utilization",
         "One point per finished run: final validation MSE and PSNR against final usage fraction {over}. Colour "
         "and marker are the grid point. Points that would lie on one another are spread sideways, about 2 % of "
         "the axis (a marker's width) apart, so every run shows (their x is exact at the centre of the group).",
         lambda d: reconstruction_vs_usage(d["runs"], x=d["usage"], strict=True), shows="finished"),
    Plot("bit_usage", SWEEP, "Per-bit usage over training",
         "Share of tokens with each bit set, per logged step (0.5 = balanced; 0 or 1 = a dead bit).",
         lambda d: bit_usage_heatmap(d["metrics"], strict=True), shows="runs", when=_one_run_with_bits),
    Plot("bit_pair_mi", SWEEP, "Mutual information between bits",
         "The pairwise mutual information between the bits of the codes (nats) under the batch distribution of "
         "the last diagnostic step the histogram snapshots carry; the diagonal is left at 0. Bright cells are pairs of "
         "bits that repeat each other: their sum over pairs bounds how much a per-bit entropy overstates the "
         "codes' diversity (bit_total_correlation in metrics.jsonl).",
         lambda d: bit_pair_mi_heatmap(d["pair_mi"], strict=True), needs=("pair_mi",), shows="runs",
         when=_one_run_with_bits),
    Plot("saturation_and_usage", SWEEP, "Saturation and usage over training",
         "Share of token-bits whose entropy gradient is below 1e-4 of its maximum (there the entropy loss does "
         "nothing), with the usage fraction on the same steps.",
         lambda d: saturation_and_usage(d["metrics"], strict=True), shows="runs", when=_one_run_with_bits),
    Plot("adversarial_game", SWEEP, "The adversarial game beside usage",
         "For runs trained with a discriminator (loss.adversarial_weight > 0), per logged training step: the "
         "training window's usage fraction; the discriminator's hinge loss (LeCAM's term dotted); its mean logit "
         "on real images (solid) and on reconstructions (dashed): the gap is how well it tells them apart; and "
         "the generator's adversarial loss with the weight it took (dotted, right axis: VQGAN's adaptive weight "
         "times loss.adversarial_weight, or the fixed weight). One colour and marker per run; the game's columns "
         "are NaN before loss.disc_start, so its lines start there.",
         lambda d: adversarial_game(d["metrics"], d["runs"], strict=True), shows="runs",
         when=lambda d: played(d["metrics"])),
    Plot("usage_by_frame", SWEEP, "The first frame beside the later frames",
         "Video runs, one column per codebook size: for each grid point, the first frame's tokens (the causal "
         "first frame, encoded alone; filled, left) beside the later frames' tokens (hollow, right) of the last "
         "validation: codes used (top) and perplexity (bottom), each over the most codes that part's N tokens "
         "can reach, min(K, N); the mean over finished seeds, joined, each seed a small marker. Grey lines are "
         "where uniformly random codes would land (first frame dashed, later frames dotted).",
         lambda d: frame_parts_figure(d["finished"], parameters(d["finished"]), strict=True), shows="finished",
         when=_has_frame_parts),
    Plot("prior_samples", SWEEP, "Samples of the token priors",
         "For each finished token prior (task prior), the first 16 of its samples at temperature 1, decoded by "
         "its tokenizer's decoder (the run folder's samples.png), titled with its tokenizer's run id, its head, "
         "its validation bits per image (the negative log-likelihood of the validation tokens, summed over an "
         "image's tokens) and the share of the codebook its samples use.",
         lambda d: prior_samples(d["finished"], strict=True), shows="finished",
         when=lambda d: is_prior_sweep(d["finished"])),
    # The paper's claims (results/ablations): the data are the claims' joined summaries
    # (analysis.claims.claim_summaries) and the clamp probe's table; each figure goes to its claim's folder.
    Plot("claim1_vocab", ABLATIONS, "Claim 1: vocabulary size",
         "Final usage and validation PSNR against the codebook size, one line per quantizer kind: the mean over "
         "finished seeds with min-max whiskers, each line in its own colour, line style and marker and a little "
         "to the side of the others; n= marks a point with fewer seeds than the best-covered one.",
         lambda d: vocab_figure(d["vocab"], strict=True), needs=("vocab",)),
    Plot("claim2_entropy_weight", ABLATIONS, "Claim 2: entropy loss weight",
         "Final usage and validation PSNR against the entropy loss weight (symlog: 0 is swept), the mean over "
         "finished seeds with min-max whiskers.",
         lambda d: entropy_weight_figure(d["entropy_weight"], strict=True), needs=("entropy_weight",)),
    Plot("claim3_usage_heatmap", ABLATIONS, "Claim 3: usage over diversity gamma and frac",
         "Each cell one grid point of diversity_gamma x frac_per_sample_entropy: the mean over finished seeds of "
         "the final usage fraction, annotated mean ± sample std and n.",
         lambda d: usage_heatmap(d["gamma_frac"], strict=True), needs=("gamma_frac",)),
    Plot("claim3_usage_vs_gamma", ABLATIONS, "Claim 3: usage against diversity gamma",
         "Final usage and perplexity against diversity_gamma, one line per frac_per_sample_entropy (mean over "
         "finished seeds, min-max whiskers).",
         lambda d: usage_vs_gamma(d["gamma_frac"], strict=True), needs=("gamma_frac",)),
    Plot("claim4_clamp", ABLATIONS, "Claim 4: exact vs reference (clamped) entropy",
         "Final usage and final batch entropy against the codebook size, one line per entropy mode, with the "
         "ln K ceiling (dashed) and the reference clamp's cap -ln 1e-5 = 11.51 nats (dotted).",
         lambda d: clamp_figure(d["clamp"], strict=True), needs=("clamp",)),
    Plot("claim4_train", ABLATIONS, CLAMP_TRAIN_TITLES["clamp_train"],
         "Claim 4 where the clamp binds (65,536 tokens per entropy batch, 2^17-2^18 codes, patches task): final "
         "usage and batch entropy of the exact and the clamped entropy against the codebook size.",
         lambda d: clamp_figure(d["clamp_train"], CLAMP_TRAIN_TITLES["clamp_train"], strict=True),
         needs=("clamp_train",)),
    Plot("claim4_train_images", ABLATIONS, CLAMP_TRAIN_TITLES["clamp_train_images"],
         "Claim 4 where the entropy loss is not inert: the images tokenizer at inverse temperature 10, 65,536 "
         "tokens per entropy batch, 2^18 codes, exact against clamped entropy.",
         lambda d: clamp_figure(d["clamp_train_images"], CLAMP_TRAIN_TITLES["clamp_train_images"], strict=True),
         needs=("clamp_train_images",)),
    Plot("claim4_probe", ABLATIONS, "Claim 4 mechanism: the 1e-5 clamp and the diversity gradient",
         "From the clamp probe's table (python -m experiments.clamp_probe, random z ~ N(0, 1), no training): per "
         "inverse temperature, the probability mass the clamp removes and the reference's diversity gradient "
         "against the exact one (cosine, norm ratio), against the tokens in the entropy batch, a line per "
         "codebook size.",
         lambda d: clamp_probe_figure(d["probe"], strict=True), needs=("probe",)),
    # The recipe study (results/recipe): the regime sweep's summary and curves, and the comparisons
    # of analysis.regime.comparisons (claims 1-3 on the images task) that the runs hold.
    # The video claim (results/video, issue 32): the video runs' summary and the table of both tasks.
    Plot("video", VIDEO, "Claim 1 on the video task, beside the images task",
         "Top: validation usage and PSNR of LFQ, BSQ, FSQ and VQ given its fair chance against the codebook "
         "size: video solid (the mean over seeds, each seed a small marker), the images task's runs of the same "
         "quantizers dashed (their mean, results/recipe). Below, one column per codebook size: each quantizer's "
         "first frame (filled, left) beside its later frames (hollow, right), codes used (middle row) and "
         "perplexity (bottom row) over the most codes that part's N tokens can reach, min(K, N): the mean over "
         "seeds, joined, each seed a small marker; grey lines are where uniformly random codes would land "
         "(first frame dashed, later frames dotted).",
         lambda d: video_figure(d["summary"], d["table"], strict=True), needs=("summary", "table")),
    Plot("regime", RECIPE, "Validation usage and PSNR against the inverse temperature",
         "One column per codebook size; each (schedule, gamma) series has its own colour, line style and marker "
         "and is offset sideways so coincident series stay visible; small markers are single seeds, lines the "
         "mean over seeds. Dashed: the targets (95 % at 2^10, 80 % at 2^14).",
         lambda d: regime_figure(d["summary"], strict=True), needs=("summary",)),
    Plot("collapse", RECIPE, "Usage and saturation over training",
         "Training usage (top) and the saturated share of token-bits (bottom, where the entropy terms' gradient "
         "is below 1e-4 of its maximum) over training, per inverse temperature; seeds thin, median bold.",
         lambda d: collapse_figure(d["curves"], strict=True), needs=("curves",)),
    Plot("quantizers", RECIPE, "Claim 1 on the images task: quantizers against codebook size",
         "Validation usage and PSNR of LFQ, BSQ, FSQ and VQ (and any other kind the runs hold) against the "
         "codebook size, one line per series (mean over seeds, dodged sideways), every seed a small marker.",
         lambda d: comparison_figure("quantizers", d["quantizers"], strict=True), needs=("quantizers",)),
    Plot("entropy_weight", RECIPE, "Claim 2 on the images task: entropy loss weight",
         "Validation usage and PSNR against the entropy loss weight, one line per inverse temperature (10: the "
         "recipe; 100: the reference's default), every seed a small marker.",
         lambda d: comparison_figure("entropy_weight", d["entropy_weight"], strict=True), needs=("entropy_weight",)),
    Plot("gamma_frac", RECIPE, "Claim 3 on the images task: diversity gamma and frac",
         "Validation usage and PSNR against diversity_gamma, one line per (inverse temperature, "
         "frac_per_sample_entropy), every seed a small marker.",
         lambda d: comparison_figure("gamma_frac", d["gamma_frac"], strict=True), needs=("gamma_frac",)),
    Plot("adversarial", RECIPE, "Claim 5 on the images task: the adversarial loss",
         "Validation usage and PSNR without (0) and with Open-MAGVIT2's adversarial objective (a PatchGAN from "
         "step 0, the non-saturating generator loss at a fixed weight 0.1, LeCAM 0.005), at 2^10 and 2^14 codes, "
         "the recipe otherwise: the mean over seeds, each seed a small marker.",
         lambda d: comparison_figure("adversarial", d["adversarial"], strict=True), needs=("adversarial",)),
    Plot("adversarial_curves", RECIPE, "Claim 5 over training: the adversarial loss and the codes",
         "Per diagnostic step of the same runs: the training window's usage, the share of token-bits whose "
         "entropy gradient is below 1e-4 of its maximum, dead bits and the batch entropy; solid without the "
         "discriminator, dashed with it; the mean over seeds with its min-max band.",
         lambda d: adversarial_curves_figure(d["adversarial_curves"], strict=True), needs=("adversarial_curves",)),
    # Issue 33's claim (results/generation): each token prior joined to its tokenizer
    # (analysis.generation_claim.generation_summary).
    Plot("generation", GENERATION, "Reconstruction and generation against the vocabulary",
         "MAGVIT-v2's Fig. 1 at this scale: per series with finished priors at two codebook sizes or more (LFQ's "
         "recipe and VQ's fair variant), against the codebook size: the tokenizer's validation usage and PSNR "
         "(top) and its token prior's validation bits per image and the share of the codebook its samples use "
         "(bottom); the line is the mean over tokenizer seeds, each seed a small marker, series dodged sideways. "
         "Bits per image alone favour a tokenizer that carries less, so read them beside the PSNR; the thin "
         "dotted line is the unigram bits per image (log2 of the tokenizer's validation perplexity, times the "
         "tokens per image): a prior under it gains from the context. The dashed grey lines are the usage "
         "ceilings 1 - exp(-N/K) of the N tokens counted (the validation tokens; the samples' tokens).",
         lambda d: generation_figure(d["summary"], strict=True), needs=("summary",)),
    Plot("utilization", GENERATION, "Does a tokenizer that uses more of its codes give a better prior?",
         "Each finished prior on a tokenizer of 2^14 codes one point (LFQ's recipe, LFQ at inverse temperature "
         "1, LFQ with gamma 2, VQ's fair variant): its tokenizer's validation usage against the prior's "
         "validation bits per image (left) and the tokenizer's validation PSNR (right), a colour and marker per "
         "series; the title gives Spearman's rank correlations over all of them and over LFQ's (utilization.csv).",
         lambda d: utilization_figure(d["summary"], strict=True), needs=("summary",)),
]


def captions(study: str | None = None) -> list[tuple[str, str, str, str]]:
    """``(study, stem, title, caption)`` of every entry (of ``study``), as declared: the caption table."""
    return [(p.study, p.stem, p.title, p.caption) for p in FIGURES if study in (None, p.study)]


def stems(study: str, data: Data) -> list[str]:
    """The stems ``study`` would draw from ``data``."""
    return [item.stem for item in planned(study, data)]

