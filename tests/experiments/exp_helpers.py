"""Shared helpers of the experiments tests (a plain module: test folders have no __init__.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from experiments import train
from experiments.config import Config, load_config

REPO = Path(__file__).resolve().parents[2]
SYNTHETIC_YAML = REPO / "experiments" / "configs" / "synthetic.yaml"
PATCHES_YAML = REPO / "experiments" / "configs" / "patches.yaml"


def smoke_config(*overrides: str, path: Path = SYNTHETIC_YAML) -> Config:
    """The shipped config at smoke scale: 30 steps, a checkpoint every 10; about a second."""
    return load_config(path, ["scale=smoke", *overrides])


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSON-lines log without the timing columns, which differ between two runs."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in train.TIMING_KEYS} for row in rows]


def without_wall_time(summary: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in summary.items() if k != "wall_time_s"}


def run(config: Config, run_dir: Path, **kwargs: Any) -> dict[str, Any]:
    """``train.run`` on one thread: six test processes share two cores here, and torch's spinning
    threads make every run ten times slower when oversubscribed."""
    return train.run(config, run_dir, num_threads=1, **kwargs)


class Kill(Exception):
    """Raised by :func:`kill_at` to stop a run mid-way, as a crash or a preemption would."""


def kill_at(step: int):
    """An ``on_step`` that kills the run right after ``step``."""
    def on_step(s: int) -> None:
        if s == step:
            raise Kill(f"killed at step {s}")

    return on_step
