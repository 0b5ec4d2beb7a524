"""The words of ``report.md``: every column it prints defined once, and the settings held fixed.

A report puts numbers of different kinds side by side (``final_codes_used`` counts the codes of
the last logged step alone, ``final_usage_fraction`` those of the whole usage window): the
definitions section says which is which, and the caption of each figure says what was the same
in every run it shows.
"""

from __future__ import annotations

from collections.abc import Iterable

import pandas as pd

from analysis.aggregate import config_columns, fmt_value
from analysis.column_names import FRAC, GAMMA, KIND, SIZE, TAU, WEIGHT
from analysis.load import STATUS_MEANINGS
from analysis.style import label

_MEAN = "mean over quantizer layers and codebooks"
# Summary metrics (summary.json, written by the trainer at the end of a run).
METRIC_DEFINITIONS = {
    "final_val_usage_fraction": "share of the codebook assigned to at least one validation token at the last "
                                "validation (final_val_codes_used / K; every validation token counts), " + _MEAN,
    "final_val_codes_used": "codes assigned to at least one validation token at the last validation, " + _MEAN,
    "final_val_perplexity": "exp of the entropy of the last validation's code histogram (K when K codes are used "
                            "equally), " + _MEAN,
    "final_val_tokens": "validation tokens counted at the last validation, per codebook (the histogram's sample size)",
    "final_val_tokens_per_code": "N/K: final_val_tokens over the codebook size K; below about 4 the validation "
                                 "set is too small to show a codebook's usage (see final_val_usage_ceiling)",
    "final_val_usage_ceiling": "1 - exp(-N/K): the expected share of the K codes that N validation tokens reach when "
                               "assigned uniformly at random, the most final_val_usage_fraction can be expected to show",
    "final_val_usage_fraction_first_frame": "video runs: final_val_usage_fraction of the first frame's tokens alone "
                                            "(the causal first frame, encoded on its own: a fifth of video.yaml's "
                                            "tokens, so its ceiling 1 - exp(-N/K) is lower)",
    "final_val_usage_fraction_later_frames": "video runs: final_val_usage_fraction of the later frames' tokens "
                                             "(every token step after the first)",
    "final_usage_fraction": "share of the codebook used at least once in the training usage window ending at the "
                            "last logged step (the last `monitor.usage_window` steps), " + _MEAN,
    "final_perplexity": "exp of the entropy of the code histogram of the last logged training step alone "
                        "(that step's tokens, not the window), " + _MEAN,
    "final_codes_used": "distinct codes among the tokens of the last logged training step alone (one batch; "
                        "the window's count is final_usage_fraction x K), " + _MEAN,
    "final_dead_codes": "codes used in none of the last `monitor.dead_after` training steps, at the last logged "
                        "step, " + _MEAN,
    "final_val_mse": "validation mean squared error at the last validation",
    "final_val_psnr": "validation PSNR in dB at the last validation (peak: the width of the data's value range)",
    "final_val_ssim": "validation SSIM (Gaussian, per image, averaged) at the last validation; image tasks only",
    "best_val_psnr": "validation PSNR in dB at the validation with the lowest MSE",
    "final_train_loss": "training loss (reconstruction + the quantizer's auxiliary loss) of the last logged step",
    "wall_time_s": "seconds of training, as the run's summary.json records them",
}
THROUGHPUT_DEFINITIONS = {
    "step_time_s": "seconds per training step",
    "samples_per_s": "training samples per second",
    "tokens_per_s": "quantized tokens per second",
    "data_wait_s": "seconds per step spent waiting for the next batch",
    "max_memory_mb": "peak memory in MB (CUDA max allocated, or the process's peak RSS on a CPU)",
}
ENV_DEFINITIONS = {
    "env_cpu": "CPU model the run computed on (environment.jsonl; values of several attempts joined by |)",
    "env_cpu_capability": "vector ISA torch's CPU kernels dispatched to (AVX512, AVX2, ...): runs on different "
                          "ISAs sum in different orders, so their floats differ",
    "env_device": "torch device of the run (cpu, cuda:N)",
    "env_gpu": "GPU model, for CUDA runs",
    "env_torch": "torch version",
    "env_commit": "git commit of the checkout that trained it (first 10 digits; + dirty: its lfq, experiments or slurm code differed from that commit)",
}
COLUMN_DEFINITIONS = {
    "status": "what the run folder holds: " + "; ".join(f"`{s}`: {m}" for s, m in STATUS_MEANINGS.items()),
    "meaning": "what a run folder with that status holds",
    "runs": "run folders counted in the row (with that status; at that grid point)",
    "done": "of those, the finished ones (status `done`): grid statistics use these alone",
    "run_id": "the run folder's name: 10 hex digits of the sha256 of the resolved config (without name and logging)",
    "sweep": "the folder of run folders the run is in",
    "step": "last logged training step / `schedule.steps`",
    "seed": "the run's seed; grid statistics are over seeds",
    "reason": "why a run failed or is corrupt, or what a started run's folder shows (empty: nothing to report)",
    "alarm_count": "collapse alarms the monitor raised in the run (lfq.alarms: a dead bit, usage halving within "
                   "the usage window, saturation above 0.95 on 3 diagnostic steps in a row); empty: none",
    "last_write_age_s": "seconds from the newest write in the run folder (config.json, metrics.jsonl, summary.json, "
                        "DONE) to the reading of this report: the files cannot say whether a started run still "
                        "runs, this says how long it has been quiet",
    "folder": "the run folder, relative to the results folder",
    "file": "the file with the problem",
    "action": "`skipped` (not read) or `repaired` (read without its torn or bad lines)",
    "problem": "what is wrong with it",
    "setting": "a config field (config.json, dotted) with one value in every run of the report",
    "value": "that value",
    **METRIC_DEFINITIONS,
    **ENV_DEFINITIONS,
    **{k: f"median over the run's logged intervals: {v}" for k, v in THROUGHPUT_DEFINITIONS.items()},
}
# The grid table prints metrics by their labels, as mean ± std over finished seeds.
for _metric, _text in METRIC_DEFINITIONS.items():
    COLUMN_DEFINITIONS[label(_metric)] = f"`{_metric}` as mean ± sample std over the finished seeds: {_text}"


# Words for figure titles: what a metric or a parameter is, short ("Validation usage against
# diversity gamma, by frac per sample entropy"), not its column name or axis label.
WORDS = {
    "final_val_usage_fraction": "validation usage",
    "final_usage_fraction": "training usage",
    "final_val_perplexity": "validation perplexity",
    "final_perplexity": "last-step perplexity",
    "final_val_codes_used": "validation codes used",
    "final_val_mse": "validation MSE",
    "final_val_psnr": "validation PSNR",
    "final_val_ssim": "validation SSIM",
    "final_val_usage_ceiling": "usage ceiling",
    GAMMA: "diversity gamma",
    FRAC: "frac",
    TAU: "inverse temperature",
    SIZE: "codebook size",
    WEIGHT: "entropy loss weight",
    "seed": "seed",
}
CEILING_LABEL = "ceiling 1-exp(-N/K)"
# Quantizer kinds in the order reports list them; a kind not here (a new registry entry in
# experiments/quantizers.py) comes after them, by name, labelled by kind_label: no edit here needed.
KIND_ORDER = ("lfq", "bsq", "fsq", "vq")


def kind_label(kind: object) -> str:
    """A quantizer kind as reports name it: ``lfq`` -> ``LFQ``, and any other kind upper-cased too."""
    return str(kind).upper()


def kind_rank(kind: object) -> tuple[int, str]:
    """Sort key of a kind: :data:`KIND_ORDER` first, then every other kind by name."""
    return (KIND_ORDER.index(kind), "") if kind in KIND_ORDER else (len(KIND_ORDER), str(kind))


def words(column: str) -> str:
    """A metric or config field in words for a title: :data:`WORDS`, else its last dotted part with spaces."""
    return WORDS.get(column, column.rsplit(".", 1)[-1].replace("_", " "))


def figure_title(metrics: Iterable[str], x: str | None = None, *by: str | None) -> str:
    """``Validation usage and validation perplexity against diversity gamma, by ...``: the metrics once each,
    in words (:func:`words`), what they are drawn against, and what splits them into lines or panels."""
    names = list(dict.fromkeys(words(m) for m in metrics))
    what = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    text = what[:1].upper() + what[1:]
    if x:
        text += f" against {words(x)}"
    split = [words(b) for b in by if b]
    if split:
        text += ", by " + " and ".join(split)
    return text


def define(column: str, runs: pd.DataFrame) -> str:
    """The definition of a printed column; a config parameter (varying across the runs) is one."""
    if column in COLUMN_DEFINITIONS:
        return COLUMN_DEFINITIONS[column]
    if column in config_columns(runs):
        return "config setting (config.json) that varies across these runs: a grid axis"
    raise KeyError(f"report.md prints a column {column!r} that analysis.glossary does not define")


def definitions_section(columns: Iterable[str], runs: pd.DataFrame) -> str:
    """``## Columns``: every printed column once, in first-printed order, with its definition."""
    lines = [f"- `{c}`: {define(c, runs)}" for c in dict.fromkeys(columns)]
    return "## Columns\n\nEvery column of the tables above, defined once.\n\n" + "\n".join(lines) + "\n"


# Settings named in a figure's caption first (what reading a utilization plot needs); the rest
# are counted there and listed in the report's table of settings held fixed.
CAPTION_FIRST = ("task", "scale", "quantizer.", "schedule.steps", "data.batch_size", "monitor.", "optim.lr", "loss.")
_BOOKKEEPING = ("run_id", "name", "seed", "logging.")


def held_fixed(runs: pd.DataFrame) -> dict[str, object]:
    """Config fields with one value (not null) in every one of ``runs``, bookkeeping left out."""
    fixed: dict[str, object] = {}
    for column in config_columns(runs):
        if column in _BOOKKEEPING or column.startswith(_BOOKKEEPING[-1]) or column not in runs:
            continue
        values = runs[column]
        if len(values) and values.notna().all() and values.astype(str).nunique() == 1:
            fixed[column] = values.iloc[0]
    return fixed


def _shown(value: object) -> str:
    return "[" + ", ".join(map(fmt_value, value)) + "]" if isinstance(value, tuple) else fmt_value(value)


def held_fixed_line(runs: pd.DataFrame) -> str:
    """The caption line: ``Held fixed (all N runs shown): task=..., quantizer....; and M more (table).``"""
    fixed = held_fixed(runs)
    kind = fixed.get(KIND)
    # Another quantizer kind's fields (vq_init for LFQ runs) stay in the table, out of the caption.
    other = tuple(f"quantizer.{k}_" for k in KIND_ORDER if kind is not None and k != kind)

    def rank(key: str) -> int:
        return next(i for i, prefix in enumerate(CAPTION_FIRST) if key.startswith(prefix))

    first = sorted((k for k in fixed if k.startswith(CAPTION_FIRST) and not (other and k.startswith(other))),
                   key=rank)
    named = ", ".join(f"`{k}={_shown(fixed[k])}`" for k in first) or "nothing of note"
    rest = len(fixed) - len(first)
    more = f"; and {rest} more, listed under *Settings held fixed*" if rest else ""
    return f"Held fixed (the same in all {len(runs)} runs shown): {named}{more}."


def held_fixed_table(runs: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame([(k, _shown(v)) for k, v in held_fixed(runs).items()], columns=["setting", "value"])
