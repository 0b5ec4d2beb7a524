"""Synthetic run folders in the layout of docs/ARCHITECTURE.md, written by the tests themselves.

(A uniquely named module rather than conftest.py, so test files can import it.)
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any


def write_run(
    root: Path,
    run_id: str,
    *,
    gamma: float = 1.0,
    frac: float = 1.0,
    seed: int = 0,
    steps: int = 5,
    status: str | None = "done",
    final_usage: float = 0.5,
    layers: tuple[str, ...] = ("quantizer",),
    histograms: bool = True,
    codebook_size: int = 16,
    kind: str = "lfq",
) -> Path:
    """A run folder with ``steps`` logged steps. ``status=None``: still running (no summary)."""
    run_dir = root / run_id
    run_dir.mkdir(parents=True)
    config = {
        "name": "synthetic",
        "task": "synthetic",
        "seed": seed,
        "scale": "smoke",
        "model": {"hidden": [32, 32]},
        "quantizer": {
            "kind": kind,
            "codebook_size": codebook_size,
            "num_codebooks": 1,
            "diversity_gamma": gamma,
            "frac_per_sample_entropy": frac,
        },
        "schedule": {"steps": steps, "val_every": 2},
        "run_id": run_id,
    }
    (run_dir / "config.json").write_text(json.dumps(config))
    rows: list[dict[str, Any]] = []
    for step in range(steps):
        usage = final_usage * (step + 1) / steps
        for layer in layers:
            rows.append({
                "step": step, "kind": "quantizer", "layer": layer, "codebook": 0, "mode": "train",
                "codebook_size": codebook_size, "per_sample_entropy": 1.0 / (step + 1),
                "batch_entropy": math.log(codebook_size) * usage, "commitment": 0.1 / (step + 1),
                "aux_loss": 0.01, "codes_used": round(usage * codebook_size), "perplexity": usage * codebook_size,
                "usage_fraction": usage, "dead_codes": codebook_size - round(usage * codebook_size),
                "bit_balance_mad": float("nan"),
            })
        rows.append({"step": step, "kind": "train", "loss": 1.0 / (step + 1), "recon_loss": 0.9 / (step + 1),
                     "aux_loss": 0.01, "lr": 1e-3})
        if step % 2 == 0:
            rows.append({"step": step, "kind": "val", "val_mse": 0.1 / (step + 1), "val_psnr": 10.0 + step})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if histograms:
        snaps = []
        for step in (steps // 2, steps - 1):
            for layer in layers:
                used = max(1, round(final_usage * codebook_size))
                snaps.append({"step": step, "layer": layer, "codebook": 0, "codebook_size": codebook_size,
                              "codes": list(range(used)), "counts": [2 ** (used - i) for i in range(used)]})
        (run_dir / "histograms.jsonl").write_text("".join(json.dumps(s) + "\n" for s in snaps))
    if status is not None:
        summary = {"run_id": run_id, "status": status, "reason": None if status == "done" else "loss is nan",
                   "step": steps, "wall_time_s": 1.5, "final_val_mse": 0.1 / steps, "final_val_psnr": 10.0 + steps,
                   "best_val_mse": 0.1 / steps, "best_val_psnr": 10.0 + steps,
                   "final_usage_fraction": final_usage, "final_perplexity": final_usage * codebook_size,
                   "final_codes_used": round(final_usage * codebook_size),
                   "final_dead_codes": codebook_size - round(final_usage * codebook_size),
                   "final_train_loss": 1.0 / steps}
        (run_dir / "summary.json").write_text(json.dumps(summary))
        if status == "done":
            (run_dir / "DONE").write_text("")
    return run_dir


# A 2 x 2 grid with two seeds each; final usage = gamma * frac / 2 + seed / 10 (hand-checkable).
GAMMAS = (0.5, 1.0)
FRACS = (0.5, 1.0)
SEEDS = (0, 1)


def grid_usage(gamma: float, frac: float, seed: int) -> float:
    return gamma * frac / 2 + seed / 10




def make_grid_sweep(parent: Path) -> Path:
    """The GAMMAS x FRACS x SEEDS sweep ``parent/results/gamma_frac`` of finished runs."""
    sweep = parent / "results" / "gamma_frac"
    for gamma in GAMMAS:
        for frac in FRACS:
            for seed in SEEDS:
                write_run(sweep, f"g{gamma}-f{frac}-s{seed}", gamma=gamma, frac=frac, seed=seed,
                          final_usage=grid_usage(gamma, frac, seed))
    return sweep


def write_regime_sweep(root: Path) -> Path:
    """Run folders of a 2-temperature x 2-seed regime sweep, with diagnostics every other step."""
    sweep = root / "recipe_regime"
    for tau, seed in itertools.product((10.0, 100.0), (0, 1)):
        run_dir = write_run(sweep, f"t{int(tau)}s{seed}", seed=seed, steps=6, final_usage=0.9 if tau == 10 else 0.7)
        config = json.loads((run_dir / "config.json").read_text())
        config["quantizer"]["inv_temperature"] = tau
        (run_dir / "config.json").write_text(json.dumps(config))
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        for row in rows:
            if row["kind"] == "quantizer" and row["step"] % 2 == 0:
                row["saturated_fraction"] = 0.97 if tau == 100 else 0.5
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        summary = json.loads((run_dir / "summary.json").read_text())
        summary.update(final_val_usage_fraction=0.9 if tau == 10 else 0.7, final_val_tokens=4096)
        (run_dir / "summary.json").write_text(json.dumps(summary))
    return sweep


# The demo's shape (issue 28): gamma x frac x inverse temperature, 2 seeds, few validation tokens per code.
DEMO_GAMMAS = (0.5, 2.0)
DEMO_FRACS = (0.25, 1.0)
DEMO_TAUS = (10.0, 100.0)
DEMO_VAL_TOKENS = 30  # of K = 64 codes: N/K = 0.47, ceiling 1 - exp(-0.47) = 0.37


def make_demo_sweep(parent: Path, *, single_seed: tuple[float, float, float] | None = (2.0, 1.0, 100.0),
                    summary_ceiling: bool = False) -> Path:
    """``parent/demo``: DEMO_GAMMAS x DEMO_FRACS x DEMO_TAUS x seeds 0, 1, K = 64, validation usage
    below the ceiling of DEMO_VAL_TOKENS tokens, quantizer rows with ``tokens`` (8 a step, usage window
    4 steps) and a per-sample entropy that falls to 1e-40 at tau = 100. The grid point ``single_seed``
    (gamma, frac, tau) has seed 0 only. ``summary_ceiling``: summaries hold the trainer's N/K and ceiling."""
    sweep = parent / "demo"
    for gamma, frac, tau, seed in itertools.product(DEMO_GAMMAS, DEMO_FRACS, DEMO_TAUS, (0, 1)):
        if seed and (gamma, frac, tau) == single_seed:
            continue
        usage = 0.3 * frac * (0.5 if tau == 100 else 1.0) + 0.02 * seed + 0.01 * gamma
        run_dir = write_run(sweep, f"g{gamma}f{frac}t{int(tau)}s{seed}", gamma=gamma, frac=frac, seed=seed, steps=8,
                            final_usage=usage, codebook_size=64)
        config = json.loads((run_dir / "config.json").read_text())
        config["quantizer"]["inv_temperature"] = tau
        config["monitor"] = {"usage_window": 4}
        (run_dir / "config.json").write_text(json.dumps(config))
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        for row in rows:
            if row["kind"] == "quantizer":
                row["tokens"] = 8
                if tau == 100:
                    row["per_sample_entropy"] = 10.0 ** (-40 * row["step"] / 7)
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        summary = json.loads((run_dir / "summary.json").read_text())
        summary.update(final_val_usage_fraction=usage, final_val_tokens=DEMO_VAL_TOKENS,
                       final_val_perplexity=usage * 64, final_val_codes_used=round(usage * 64))
        if summary_ceiling:
            summary.update(final_val_tokens_per_code=DEMO_VAL_TOKENS / 64,
                           final_val_usage_ceiling=1 - math.exp(-DEMO_VAL_TOKENS / 64))
        (run_dir / "summary.json").write_text(json.dumps(summary))
    return sweep
