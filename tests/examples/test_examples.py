"""The scripts in examples/ run (a few steps each) and leave TensorBoard logs with the monitor's tags."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

REPO = Path(__file__).resolve().parents[2]


def _tags(log_dir: Path) -> dict[str, list[str]]:
    (events,) = {p.parent for p in log_dir.rglob("events.out.tfevents.*")}
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    return accumulator.Tags()


def _run(script: str, tmp_path: Path, *args: str) -> str:
    done = subprocess.run([sys.executable, str(REPO / "examples" / script), "--log-dir", str(tmp_path), *args],
                          check=True, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    return done.stdout


def test_upstream_lfq_tensorboard_example(tmp_path: Path):
    out = _run("upstream_lfq_tensorboard.py", tmp_path, "--steps", "4", "--log-every", "2", "--bits", "8")
    assert "validation usage:" in out
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "quantizer" and r["mode"] == "train"]
    assert [r["step"] for r in train] == [0, 1, 2, 3] and train[0]["codebook_size"] == 256
    assert [r["step"] for r in train if r["batch_entropy"] == r["batch_entropy"]] == [0, 2]
    tags = _tags(tmp_path)
    assert "lfq.quantizer.codebook0/batch_entropy" in tags["scalars"]
    assert "lfq_eval.quantizer.codebook0/usage_fraction" in tags["scalars"]
    assert "lfq.quantizer/bit_frequencies" in tags["images"]


def test_lightning_example(tmp_path: Path):
    out = _run("lightning_lfq.py", tmp_path, "--steps", "4", "--log-every", "2")
    assert "validation usage:" in out
    tags = _tags(tmp_path)
    assert {"lfq.quantizer.codebook0/usage_fraction", "lfq_eval.quantizer.codebook0/usage_fraction",
            "val_usage_fraction"} <= set(tags["scalars"])
