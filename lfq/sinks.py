"""Where the monitor's records go: a sink is any callable taking a list of flat dict records
(``MemorySink``, ``JsonlSink``, ``TensorBoardSink``, ``WandbSink``, ``Tee``), the scalars they log
are :func:`scalar_tags`, and :func:`default_histogram_sink` says where histogram snapshots go;
docs/monitor.md ("Where the rows go") is the manual.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lfq.jsonl_writer import append_jsonl

Record = dict[str, Any]
Sink = Callable[[list[Record]], None]


class MemorySink:
    """Keeps every record in ``self.records``, in the order received."""

    def __init__(self) -> None:
        self.records: list[Record] = []

    def __call__(self, records: list[Record]) -> None:
        self.records.extend(records)

    def to_frame(self):
        """The records as a ``pandas.DataFrame`` (pandas is imported here, not by ``lfq``)."""
        try:
            import pandas as pd
        except ImportError as err:  # lfq must import with torch and einops alone
            raise ImportError("MemorySink.to_frame needs pandas; install it or read .records") from err
        return pd.DataFrame.from_records(self.records)


class JsonlSink:
    """Appends one JSON object per record to ``path`` (``lfq.jsonl_writer.append_jsonl``, the one appender).
    Every batch is written with a single ``write``, flushed and fsynced before returning, so
    a killed process loses at most the records the monitor had not yet flushed (and at worst
    leaves one partial last line if it dies mid-write). The file is opened per batch: the
    monitor flushes every ``log_every`` steps, so this costs nothing that matters, and a
    training loop may truncate the file (on resume) between batches without reopening us.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        path = Path(path)
        if path.exists() and path.is_dir():
            raise ValueError(f"JsonlSink needs a file path, got the directory {str(path)!r}")
        self.path = path

    def __call__(self, records: list[Record]) -> None:
        # NaN marks "not reported" (eval-mode losses); pandas reads it as NaN.
        append_jsonl(self.path, records)

    @property
    def histogram_path(self) -> Path:
        """Where the monitor's histogram snapshots go by default: ``<stem>.histograms<suffix>``
        beside the file (``metrics.jsonl`` -> ``metrics.histograms.jsonl``)."""
        return self.path.with_name(f"{self.path.stem}.histograms{self.path.suffix or '.jsonl'}")

    def __repr__(self) -> str:
        return f"JsonlSink({str(self.path)!r})"


class Tee:
    """Sends every batch of records to each of ``sinks`` in turn (e.g. JSON lines and TensorBoard)."""

    def __init__(self, *sinks: Sink) -> None:
        bad = [s for s in sinks if not callable(s)]
        if not sinks or bad:
            raise ValueError(f"Tee needs one or more sinks (callables taking a list of records), got {sinks!r}")
        self.sinks = sinks

    def __call__(self, records: list[Record]) -> None:
        for sink in self.sinks:
            sink(records)


# Columns that identify a record rather than measure something; never logged as scalars.
ID_FIELDS = frozenset({"step", "layer", "codebook", "kind", "mode", "codebook_size"})
PER_BIT_PREFIXES = ("bit_frequency_", "bit_entropy_")  # per-bit columns: drawn as an image instead
STEP_TAG = "lfq/step"  # the x axis of WandbSink's charts
TRAIN_FAMILY, EVAL_FAMILY = "lfq", "lfq_eval"  # the two tag families of the scalar sinks


def scalar_tags(record: Record) -> dict[str, float]:
    """The scalars of one monitor record that TensorBoardSink, WandbSink and the Lightning
    callback log, only what was computed (no NaN, no per-bit columns, no histograms): training
    rows as ``lfq.<layer>.codebook<c>/<column>``, evaluation passes as
    ``lfq_eval.<layer>.codebook<c>/<column>``, eval-mode step rows not at all (they stay in the
    JSON lines); docs/monitor.md ("Where the rows go") says why."""
    if "codes" in record or record.get("kind") == "alarm":  # histograms; alarms are events, not scalars
        return {}
    kind, mode = record.get("kind", "quantizer"), record.get("mode", "train")
    if kind == "evaluation":
        prefix = EVAL_FAMILY
    elif mode == "train":
        prefix = TRAIN_FAMILY
    else:
        return {}
    group = f"{prefix}.{record.get('layer', '')}.codebook{record.get('codebook', 0)}" if "layer" in record \
        else f"{prefix}.{kind}"
    return {
        f"{group}/{name}": float(value) for name, value in record.items()
        if name not in ID_FIELDS and not name.startswith(PER_BIT_PREFIXES)
        and isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
    }


def default_histogram_sink(sink: Sink) -> Sink | None:
    """The sink that gets the histogram snapshots of ``LFQMonitor(sink=sink)`` when no
    ``histogram_sink`` is given: the sink itself for TensorBoardSink and WandbSink (a code
    histogram and a per-bit image each), a JsonlSink of ``sink.histogram_path`` for a
    JsonlSink (the metrics file stays one table), a Tee of its members' for a Tee; None (no
    snapshots) for any other sink, e.g. MemorySink or a function."""
    if isinstance(sink, (TensorBoardSink, WandbSink)):
        return sink
    if isinstance(sink, JsonlSink):
        return JsonlSink(sink.histogram_path)
    if isinstance(sink, Tee):
        members = [h for h in map(default_histogram_sink, sink.sinks) if h is not None]
        return Tee(*members) if members else None
    return None


def histogram_buckets(record: Record, max_buckets: int = 64) -> tuple[list[float], list[float]]:
    """(right edges, counts) of a histogram snapshot's code indices in at most ``max_buckets``
    equal-width buckets over [0, codebook_size)."""
    size = int(record["codebook_size"])
    width = max(1, -(-size // max_buckets))
    counts = [0.0] * (-(-size // width))
    for code, count in zip(record["codes"], record["counts"], strict=True):
        counts[code // width] += count
    edges = [float(min(size, (i + 1) * width)) for i in range(len(counts))]
    return edges, counts


def bit_image(snapshots: list[Record], pixels: int = 8) -> list[list[float]]:
    """Rows = codebooks, columns = bits (MSB first) of the snapshots' ``bit_frequencies``, each
    value repeated ``pixels`` x ``pixels``: grey level = fraction of tokens with the bit set."""
    rows = sorted(snapshots, key=lambda r: r["codebook"])
    image: list[list[float]] = []
    for row in rows:
        line = [q if q == q else 0.0 for q in row["bit_frequencies"] for _ in range(pixels)]
        image.extend([line] * pixels)
    return image


def _snapshot_groups(records: list[Record]) -> dict[tuple[int, str, str], list[Record]]:
    groups: dict[tuple[int, str, str], list[Record]] = {}
    for record in records:
        if "codes" in record:
            groups.setdefault((record["step"], record["layer"], record.get("mode", "train")), []).append(record)
    return groups


def _snapshot_prefix(layer: str, mode: str) -> str:
    return f"{TRAIN_FAMILY if mode == 'train' else EVAL_FAMILY}.{layer}"


class TensorBoardSink:
    """Writes monitor records to TensorBoard event files in ``log_dir`` (``torch.utils.tensorboard``;
    needs the ``tensorboard`` package: ``pip install lfq-suite[tensorboard]``).
    As the monitor's ``sink`` it also gets the histogram snapshots (``histogram_sink`` defaults
    to it). Scalars go under :func:`scalar_tags` at the
    record's step; a histogram snapshot becomes a histogram of code indices
    (``lfq.<layer>.codebook<c>/codes``) and, for binary codes, an image of the per-bit usage
    (``lfq.<layer>/bit_frequencies``: codebooks x bits). ``writer``: an existing
    ``SummaryWriter`` to write with instead (e.g. Lightning's ``TensorBoardLogger.experiment``).
    """

    def __init__(self, log_dir: str | os.PathLike[str] | None = None, *, writer: Any = None) -> None:
        if (log_dir is None) == (writer is None):
            raise ValueError("TensorBoardSink needs exactly one of log_dir (a folder) or writer (a SummaryWriter)")
        if writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise ImportError("TensorBoardSink needs the tensorboard package: pip install lfq-suite[tensorboard]"
                                  ) from err
            writer = SummaryWriter(log_dir=str(log_dir))
        self.writer = writer

    def __call__(self, records: list[Record]) -> None:
        for record in records:
            for tag, value in scalar_tags(record).items():
                self.writer.add_scalar(tag, value, global_step=record.get("step", 0))
        for (step, layer, mode), snapshots in _snapshot_groups(records).items():
            prefix = _snapshot_prefix(layer, mode)
            for snap in snapshots:
                total = float(sum(snap["counts"]))
                if total == 0:
                    continue
                edges, counts = histogram_buckets(snap)
                codes = snap["codes"]
                self.writer.add_histogram_raw(
                    f"{prefix}.codebook{snap['codebook']}/codes", min=float(min(codes)), max=float(max(codes)),
                    num=total, sum=float(sum(c * n for c, n in zip(codes, snap["counts"], strict=True))),
                    sum_squares=float(sum(c * c * n for c, n in zip(codes, snap["counts"], strict=True))),
                    bucket_limits=edges, bucket_counts=counts, global_step=step)
            if all("bit_frequencies" in s for s in snapshots):
                image = torch.tensor(bit_image(snapshots), dtype=torch.float32)
                self.writer.add_image(f"{prefix}/bit_frequencies", image, global_step=step, dataformats="HW")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """Logs monitor records to a Weights & Biases run (``run``; None = the current ``wandb.run``;
    needs ``pip install lfq-suite[wandb]``).
    The monitor sends a flush's records some steps late, so they are logged against their own x
    axis ``lfq/step`` (``define_metric``), one ``run.log`` per step: scalars under
    :func:`scalar_tags`, histogram snapshots as ``wandb.Histogram`` of code indices and, for
    binary codes, a ``wandb.Image`` of the per-bit usage. Do not pass ``step=`` to your own
    ``run.log`` calls with this sink (wandb drops rows logged at a step below the run's).
    """

    def __init__(self, run: Any = None) -> None:
        try:
            import wandb
        except ImportError as err:
            raise ImportError("WandbSink needs the wandb package: pip install lfq-suite[wandb]") from err
        self._wandb = wandb
        self._run = run
        self._defined: set[int] = set()

    @property
    def run(self) -> Any:
        run = self._run if self._run is not None else self._wandb.run
        if run is None:
            raise RuntimeError("WandbSink(run=None) logs to the current wandb.run, but none is active: call "
                               "wandb.init() first or pass the run")
        if id(run) not in self._defined:
            run.define_metric(STEP_TAG)
            for prefix in (f"{TRAIN_FAMILY}.*", f"{EVAL_FAMILY}.*"):
                run.define_metric(prefix, step_metric=STEP_TAG)
            self._defined.add(id(run))
        return run

    def __call__(self, records: list[Record]) -> None:
        if not records:
            return
        run, wandb = self.run, self._wandb
        by_step: dict[int, dict[str, Any]] = {}
        for record in records:
            tags = scalar_tags(record)
            if tags:
                by_step.setdefault(int(record.get("step", 0)), {}).update(tags)
        for (step, layer, mode), snapshots in _snapshot_groups(records).items():
            prefix, row = _snapshot_prefix(layer, mode), by_step.setdefault(int(step), {})
            for snap in snapshots:
                if sum(snap["counts"]) == 0:
                    continue
                edges, counts = histogram_buckets(snap)
                row[f"{prefix}.codebook{snap['codebook']}/codes"] = wandb.Histogram(
                    np_histogram=(counts, [0.0] + edges))
            if all("bit_frequencies" in s for s in snapshots):
                image = (torch.tensor(bit_image(snapshots)) * 255).to(torch.uint8).numpy()
                row[f"{prefix}/bit_frequencies"] = wandb.Image(image, caption="rows: codebooks; columns: bits, MSB first")
        for step in sorted(by_step):
            run.log({STEP_TAG: step, **by_step[step]})
