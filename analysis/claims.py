"""The ablation claims (issue 8) and their per-sweep summaries: which sweep tests which claim
(``CLAIMS``: 1 ``vocab``, 2 ``entropy_weight``, 3 ``gamma_frac``, 4 ``clamp`` and where the clamp binds),
and run folders or committed ``summary.csv`` files -> one row per run. Statistics use finished runs;
``n`` is the number of seeds behind each point, so a partial sweep shows as a smaller ``n``. The claims'
figures are entries of :mod:`analysis.figures`; :mod:`analysis.studies` writes ``results/ablations``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from analysis.aggregate import parameters
from analysis.aggregate import where as pick
from analysis.column_names import FRAC, GAMMA, KIND, MODE, SIZE, WEIGHT
from analysis.load import load_runs
from analysis.style import require

# Always in summary.csv, varying or not: the vocab claim joins two sweeps in which kind and size
# are constant, and a reader of one CSV should see the setting without the config.
KEY_COLUMNS = (KIND, SIZE, MODE, WEIGHT, GAMMA, FRAC)
METRICS = ("final_usage_fraction", "final_perplexity", "final_codes_used", "final_dead_codes", "final_val_mse",
           "final_val_psnr", "best_val_psnr", "final_batch_entropy", "final_per_sample_entropy", "wall_time_s")
# What a run computed on (analysis.load.ENV_COLUMNS), kept in summaries so that a re-run that does
# not reproduce can be told from one on another CPU ISA, torch or commit (experiments.provenance).
SUMMARY_ENV = ("env_cpu", "env_cpu_capability", "env_device", "env_gpu", "env_torch", "env_commit", "env_dirty")
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
    # the same claim where the clamp binds: 65,536 tokens per entropy batch, "clamped" (the
    # reference's numbers from the factorisation) instead of the dense reference, which cannot run there
    Claim("clamp_train", ("clamp_train",), SIZE, MODE,
          "Where the clamp binds (65,536 tokens per entropy batch, 2^17-2^18 codes), training with the "
          "reference's clamped entropy uses fewer codes than with the exact entropy."),
    # the same on the images tokenizer at inverse temperature 10, where LFQ does not collapse
    Claim("clamp_train_images", ("clamp_train_images",), SIZE, MODE,
          "The same where the entropy loss is not inert: the images tokenizer at inverse temperature 10, "
          "65,536 tokens per entropy batch, 2^18 codes."),
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
    columns = ["run_id", "sweep", "status", "step", *params, "seed", *METRICS, "reason", *SUMMARY_ENV]
    table = runs[[c for c in columns if c in runs.columns]]
    return table.sort_values([c for c in ("sweep", *params, "seed") if c in table]).reset_index(drop=True)


def summaries_from_runs(root: PathLike, log: Callable[[str], None] | None = None, *,
                        where: Sequence[str] | Mapping[str, object] = ()) -> dict[str, pd.DataFrame]:
    """``{sweep: summary}`` for every sweep under ``root`` (a folder of sweeps, or one sweep), of the
    runs matching ``where`` (:func:`analysis.aggregate.where`). Run folders that cannot be read are
    left out, each named with its reason through ``log`` (default: a LoadWarning); corrupt runs stay
    in, with status ``corrupt`` and the reason."""
    runs = load_runs(root, warn=log is None)
    for problem in runs.attrs.get("problems", ()) if log is not None else ():
        log(f"{'skipped' if problem.skipped else 'repaired'} {problem.run_dir}: {problem.reason}")
    require(len(runs), f"no run folders under {root}")
    if where:
        runs = pick(runs, where)
    return {str(sweep): summarize(part) for sweep, part in runs.groupby("sweep", sort=True)}


def read_summaries(folder: PathLike) -> dict[str, pd.DataFrame]:
    """``{sweep: summary}`` from ``folder/<sweep>/summary.csv`` (or ``folder/summary.csv``)."""
    folder = Path(folder)
    paths = sorted(folder.glob("*/summary.csv")) or sorted(folder.glob("summary.csv"))
    if not paths:
        raise FileNotFoundError(f"no <sweep>/summary.csv under {folder.resolve()}; "
                                "write them with `python -m analysis.report RUNS_ROOT --study ablations --out DIR`")
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
    """The columns that name a grid point of a summary: the claim keys present, then anything varying."""
    return [c for c in dict.fromkeys([*KEY_COLUMNS, *parameters(summary)]) if c in summary]


PROBE_COLUMNS = ("bits", "inv_temperature", "tokens", "clamped_mass", "grad_cosine")


def require_probe(probe: pd.DataFrame, what: str = "not") -> None:
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
    require_probe(probe, f"{found} is not")
    return probe
