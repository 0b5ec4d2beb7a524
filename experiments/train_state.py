"""What a training run has reached (:class:`TrainState`), the summary it ends with, and its progress line.

The state is everything the run reports beyond the model and optimiser: it goes into every
checkpoint as a plain dict under ``"progress"`` (``weights_only=True`` loads nothing else) and
comes back from it on a resume, so a run killed and resumed ends with the same summary as one
that was never interrupted (``wall_time_s`` adds up the attempts).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from experiments.config import Config
from experiments.evaluation import CAPPED_BELOW

Row = dict[str, Any]
# The monitor's utilization columns whose mean over layers and codebooks the summary reports as final_*.
USAGE_KEYS = ("usage_fraction", "perplexity", "codes_used", "dead_codes", "per_sample_entropy",
              "batch_entropy", "bit_balance_mad")
# Validation columns the summary reports as final_* when the task's evaluation produced them.
EXTRA_VAL_KEYS = ("val_ssim", "val_usage_fraction", "val_codes_used", "val_perplexity", "val_tokens",
                  "val_tokens_per_code", "val_usage_ceiling", "val_rfid")
LOSS_KEYS = ("loss", "recon_loss", "aux_loss")


@dataclass
class TrainState:
    """The run's progress; ``step`` is the last completed step (0 before the first)."""

    step: int = 0
    wall_time_s: float = 0.0  # training time of every attempt so far, setup included
    best_val_mse: float | None = None
    best_val_psnr: float | None = None  # the PSNR of the best-MSE validation, not the best PSNR
    best_val_step: int | None = None
    last_val: Row | None = None  # the latest validation's metrics
    last_train: dict[str, float] | None = None  # the latest logged losses (LOSS_KEYS), means over the ranks
    last_quantizer: list[Row] = field(default_factory=list)  # the monitor's training rows of its latest step
    unreadable_files: int = 0  # input files skipped as unreadable, as of the latest validation
    small_images: int = 0  # image files under data.resolution (skipped under data.min_size, else upscaled), likewise

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (a checkpoint's ``"progress"``): numbers, strings, lists and dicts only."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainState:
        """The state a checkpoint's ``"progress"`` holds; keys it lacks (older checkpoints) keep their defaults."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def load(self, data: dict[str, Any]) -> None:
        """Take every field from a checkpoint's ``"progress"`` (in place: the monitor's sink holds this object)."""
        loaded = TrainState.from_dict(data)
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(loaded, f.name))

    def note_quantizer_rows(self, rows: list[Row]) -> None:
        """Keep the training-mode monitor rows of the latest step among ``rows`` (the summary's final usage)."""
        train_rows = [r for r in rows if r.get("kind", "quantizer") == "quantizer" and r.get("mode") == "train"]
        if train_rows:
            last = max(r["step"] for r in train_rows)
            self.last_quantizer = [r for r in train_rows if r["step"] == last]

    def note_validation(self, step: int, val: Row, unreadable_files: int) -> None:
        self.last_val = val
        self.unreadable_files = unreadable_files
        if self.best_val_mse is None or val["val_mse"] < self.best_val_mse:
            self.best_val_mse, self.best_val_psnr, self.best_val_step = val["val_mse"], val["val_psnr"], step

    def summary(self, run_id: str, config: Config, status: str, reason: str) -> dict[str, Any]:
        """The flat ``summary.json`` of a run that ended with ``status`` ('done' or 'failed') for ``reason``."""
        last_val, last_train = self.last_val or {}, self.last_train or {}
        summary = {
            "run_id": run_id, "name": config.name, "task": config.task, "status": status, "reason": reason,
            "step": self.step, "steps": config.schedule.steps, "wall_time_s": round(self.wall_time_s, 3),
            "final_val_mse": last_val.get("val_mse"), "final_val_psnr": last_val.get("val_psnr"),
            "best_val_mse": self.best_val_mse, "best_val_psnr": self.best_val_psnr,
            "best_val_step": self.best_val_step,
            "final_train_loss": last_train.get("loss"), "final_recon_loss": last_train.get("recon_loss"),
            "final_aux_loss": last_train.get("aux_loss"),
        }
        for key in EXTRA_VAL_KEYS:
            if key in last_val:  # utilization over every validation token, and the image metrics
                summary[f"final_{key}"] = last_val[key]
        if self.unreadable_files:
            summary["unreadable_files"] = self.unreadable_files
        if self.small_images:
            summary["small_images"] = self.small_images
        summary.update({f"final_{k}": v for k, v in mean_usage(self.last_quantizer).items()})
        return summary


def mean_usage(rows: list[Row]) -> dict[str, float | None]:
    """Mean over layers and codebooks of monitor rows, per USAGE_KEYS column (None where no row has a number)."""
    out: dict[str, float | None] = {}
    for key in USAGE_KEYS:
        values = [float(r[key]) for r in rows if r.get(key) is not None and not math.isnan(float(r[key]))]
        out[key] = sum(values) / len(values) if values else None
    return out


def end_line(summary: dict[str, Any]) -> str:
    """The line a run ends with: validation usage, PSNR and tokens per code first (the suite's
    headline, not the training window's usage), and the ceiling when the token count caps it."""
    def number(value: Any, digits: int) -> str:
        return f"{value:.{digits}f}" if isinstance(value, (int, float)) and math.isfinite(value) else str(value)

    parts = [] if summary.get("status") == "done" else [f"status={summary.get('status')}"]
    usage, psnr = summary.get("final_val_usage_fraction"), summary.get("final_val_psnr")
    per_code, ceiling = summary.get("final_val_tokens_per_code"), summary.get("final_val_usage_ceiling")
    if usage is not None:
        parts.append(f"val_usage={number(usage, 3)}")
    if psnr is not None:
        parts.append(f"val_psnr={number(psnr, 2)}dB")
    if per_code is not None:
        parts.append(f"tokens_per_code={number(per_code, 2)}")
        if per_code < CAPPED_BELOW and ceiling is not None:
            parts.append(f"usage capped at {number(ceiling, 3)} (N/K = {number(per_code, 2)} < {CAPPED_BELOW:g})")
    if summary.get("status") == "done":
        parts.append("status=done")
    for key in ("reason", "step", "wall_time_s"):
        if summary.get(key) not in (None, ""):
            parts.append(f"{key}={summary[key]}")
    return " ".join(parts)


def progress_printer(config: Config, run_id: str, start: int) -> Callable[[int, float, float], None]:
    """tqdm on a terminal; otherwise a plain line every ``logging.print_every`` steps (batch logs)."""
    steps = config.schedule.steps
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=steps, initial=start, desc=run_id, dynamic_ncols=True)

        def show(step: int, loss: float, lr: float) -> None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4g}", lr=f"{lr:.2e}", refresh=False)
            if step == steps:
                bar.close()

        return show
    t0 = time.perf_counter()

    def show(step: int, loss: float, lr: float) -> None:
        if step % config.logging.print_every == 0 or step == steps:
            rate = (step - start) / max(time.perf_counter() - t0, 1e-9)
            print(f"[{run_id}] step {step}/{steps} loss {loss:.5g} lr {lr:.3g} ({rate:.1f} steps/s)", flush=True)

    return show
