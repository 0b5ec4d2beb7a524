"""Read back what the TensorBoard and wandb sinks wrote: event files and an offline wandb run."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import torch

from lfq.sinks import ID_FIELDS, PER_BIT_PREFIXES

WANDB_BLOCK = 32768  # the .wandb file is a LevelDB-style log: 32 KiB blocks of framed records
WANDB_HEADER = 7  # ":W&B", a 2-byte magic, a version byte


def tensorboard_events(log_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "histograms": 0, "images": 0})
    accumulator.Reload()
    return accumulator


def tensorboard_scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    events = tensorboard_events(log_dir)
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def _wandb_records(path: Path) -> list[bytes]:
    data = path.read_bytes()
    records, partial, pos = [], b"", WANDB_HEADER
    while pos + 7 <= len(data):
        left = WANDB_BLOCK - pos % WANDB_BLOCK
        if left < 7:  # block trailer
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:  # zero padding to the end of the block
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            records.append(chunk)
        elif kind == 2:
            partial = chunk
        elif kind == 3:
            partial += chunk
        elif kind == 4:
            records.append(partial + chunk)
    return records


def wandb_history(run_dir: Path) -> list[dict[str, Any]]:
    """The history rows of an offline run folder (``wandb/offline-run-*``), values decoded."""
    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.glob("run-*.wandb")
    rows = []
    for raw in _wandb_records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def expected_scalars(records: list[dict[str, Any]]) -> dict[tuple[str, int], float]:
    """(tag, step) -> value the sinks must have logged for monitor records (lfq.sinks.scalar_tags):
    training rows under ``lfq.``, evaluation passes under ``lfq_eval.``, eval-mode step rows not
    at all, and no NaN (a column not computed on that step)."""
    out = {}
    for r in records:
        if "codes" in r:
            continue
        if r.get("kind") == "evaluation":
            prefix = "lfq_eval"
        elif r.get("mode", "train") == "train":
            prefix = "lfq"
        else:
            continue
        for name, value in r.items():
            if name in ID_FIELDS or name.startswith(PER_BIT_PREFIXES) or not isinstance(value, (int, float)) \
                    or math.isnan(value):
                continue
            out[(f"{prefix}.{r['layer']}.codebook{r['codebook']}/{name}", r["step"])] = float(value)
    return out


def same(a: float, b: float) -> bool:
    """A record's float64 value against what a sink stored: TensorBoard keeps float32 scalars, one
    rounding (eps relative; below float32's smallest normal number, its absolute spacing)."""
    f32 = torch.finfo(torch.float32)
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=f32.eps, abs_tol=f32.tiny)
