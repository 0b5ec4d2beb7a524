"""The machinery of one attempt at a run, which ``experiments.train`` drives step by step.

:class:`Training` builds the model, optimiser and monitor, restores them from the checkpoint, takes
one optimiser step, logs it, validates, checkpoints and ends the run; beside it, what it needs and
nothing else: the learning rate and the quantizer's schedules (pure functions of the step), this
rank's batches (:class:`Batches`; how a dataset orders them is ``experiments.data``'s), and what the
run has reached (:class:`TrainState`, the ``"progress"`` of every checkpoint, from which a resumed
run ends with the summary of one never interrupted). The data-parallel rules are in
docs/training.md.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from experiments import distributed as ddp
from experiments.config import Config
from experiments.evaluation import CAPPED_BELOW, VIDEO_PARTS, FrechetDistance, evaluate, inception_extractor
from experiments.files import truncate_jsonl
from experiments.objective import Objective
from experiments.run_dir import RunDir
from experiments.runtime import Runtime, Throughput
from lfq.alarms import describe as describe_alarm
from lfq.monitor import LFQMonitor
from lfq.sinks import JsonlSink

Row = dict[str, Any]


# --- the loss and the schedules: pure functions of the step ----------------------------------------

def lr_at(step: int, config: Config) -> float:
    """Linear warmup to ``optim.lr``, then cosine decay to ``optim.min_lr`` at the last step."""
    o, steps = config.optim, config.schedule.steps
    if step <= o.warmup_steps:
        return o.lr * step / o.warmup_steps
    progress = (step - o.warmup_steps) / max(1, steps - o.warmup_steps)
    return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1 + math.cos(math.pi * progress))


def reconstruction_loss(recon: torch.Tensor, x: torch.Tensor, config: Config) -> torch.Tensor:
    """The loss section's weighted terms, in float32. Perceptual and adversarial terms (none ships yet:
    docs/training.md) would be added here, each weighted by its own ``loss`` field."""
    recon, x = recon.float(), x.float()
    loss = recon.new_zeros(())
    if config.loss.l2_weight:
        loss = loss + config.loss.l2_weight * F.mse_loss(recon, x)
    if config.loss.l1_weight:
        loss = loss + config.loss.l1_weight * F.l1_loss(recon, x)
    return loss


def ramp(shape: str, start: float, end: float, steps: int, step: int) -> float:
    """``start`` at step 0 to ``end`` at ``steps`` along ``shape``, then ``end``."""
    if shape == "constant" or steps <= 0 or step >= steps:
        return end
    t = step / steps
    if shape == "linear":
        return start + (end - start) * t
    if shape == "cosine":
        return end + (start - end) * 0.5 * (1 + math.cos(math.pi * t))
    if shape == "exponential":
        return start * (end / start) ** t
    raise ValueError(f"unknown schedule shape {shape!r}: expected constant, linear, cosine or exponential")


def values_at(step: int, config: Config) -> dict[str, float]:
    """The entropy weight, inverse temperature and commitment weight in force at ``step``."""
    a, q = config.anneal, config.quantizer
    entropy = q.entropy_loss_weight * (1.0 if a.entropy == "constant" else ramp(a.entropy, a.entropy_start, 1.0,
                                                                                 a.entropy_steps, step))
    commitment = q.commitment_loss_weight * (1.0 if a.commitment == "constant" else ramp(
        a.commitment, a.commitment_start, 1.0, a.commitment_steps, step))
    inv_temperature = q.inv_temperature if a.inv_temperature == "constant" else ramp(
        a.inv_temperature, a.inv_temperature_start, q.inv_temperature, a.inv_temperature_steps, step)
    return {"entropy_weight": entropy, "inv_temperature": inv_temperature, "commitment_weight": commitment}


def apply_schedules(model: nn.Module, values: dict[str, float]) -> None:
    """Set the values on the model: every quantizer's weights, the model's inverse temperature
    (``lfq.LFQ`` keeps no training-loop state; the loop sets them before every step)."""
    for module in model.modules():
        if hasattr(module, "entropy_loss_weight"):
            module.entropy_loss_weight = values["entropy_weight"]
        if hasattr(module, "commitment_loss_weight") and hasattr(module, "codebook_size"):
            module.commitment_loss_weight = values["commitment_weight"]
    if hasattr(model, "inv_temperature"):
        model.inv_temperature = values["inv_temperature"]


# --- this rank's batches ----------------------------------------------------------------------

VAL_BATCH = 256


class Batches:
    """This rank's training batches on the device, and its share of the validation set.

    In-memory datasets move to the device once and draw with the run's data generator; file
    datasets come through a DataLoader whose order is a function of the seed and the step.
    Files that cannot be read are reported once each, on the main rank; of the training files
    smaller than ``data.resolution`` (``data.min_size``) the first is reported and all are counted
    (``small``). The dataset's own notes (its validation files, printed by its ``describe``) are
    counted too, not printed again.
    """

    def __init__(self, dataset: Any, config: Config, device: torch.device, start: int, rows: slice,
                 data_rng: torch.Generator, run_id: str):
        self.dataset, self.config, self.device, self.rows, self.data_rng = dataset, config, device, rows, data_rng
        self.run_id, self.unreadable, self.small = run_id, set(), set()
        for note in getattr(dataset, "notes", ()):
            if note.kind == "unreadable":
                self.unreadable.add(note.text)
            else:
                self.small.add(note.path)
        self._small_reported = False
        self.from_files = hasattr(dataset, "train_loader")
        if self.from_files:
            self._to_input = dataset.to_model_input
            self._train = iter(dataset.train_loader(config, device, start, rows))
            self._val = dataset.val_loader(config, device, ddp.rank(), ddp.world_size(), VAL_BATCH)
        elif hasattr(dataset, "to"):
            dataset.to(device)

    def _report(self, notes: list[Any]) -> None:
        item = getattr(self.dataset, "item_name", "image")
        for note in notes:
            if note.kind == "unreadable":
                if note.text not in self.unreadable:
                    self.unreadable.add(note.text)
                    print(f"[{self.run_id}] skipping an unreadable {item}: {note.text}", flush=True)
            elif note.path not in self.small:
                self.small.add(note.path)
                if not self._small_reported:
                    self._small_reported = True
                    if note.kind == "short":  # a video with fewer frames than a clip takes
                        what = (f"skipping a training video shorter than a clip (data.frames={self.config.data.frames}, "
                                f"data.frame_stride={self.config.data.frame_stride})")
                    else:
                        what = (f"{'skipping' if note.kind == 'small' else 'upscaling'} a training image smaller "
                                f"than data.resolution (data.min_size={self.config.data.min_size})")
                    print(f"[{self.run_id}] {what}: {note.text}; further ones are counted (small_images in "
                          f"summary.json), not printed", flush=True)

    def _from_loader(self, item: tuple[torch.Tensor, list[Any]]) -> torch.Tensor:
        crops, notes = item
        self._report(notes)
        return self._to_input(crops.to(self.device, non_blocking=True))

    def train(self) -> torch.Tensor:
        if self.from_files:
            return self._from_loader(next(self._train))
        return self.dataset.train_batch(self.data_rng, self.config.data.batch_size)[self.rows].to(self.device)

    def val(self) -> Iterator[torch.Tensor]:
        if self.from_files:
            for item in self._val:
                yield self._from_loader(item)
            return
        shard = self.dataset.val.tensor_split(ddp.world_size())[ddp.rank()]
        for i in range(0, len(shard), VAL_BATCH):
            yield shard[i:i + VAL_BATCH].to(self.device)


def dataset_value_range(dataset: Any) -> tuple[float, float]:
    """The range the task's data lies in (PSNR's peak is its width); [0, 1] unless the task says."""
    return tuple(getattr(dataset, "value_range", (0.0, 1.0)))


# --- what the run has reached ------------------------------------------------------------

MAX_SUMMARY_ALARMS = 20  # alarms listed in summary.json (alarm_count says how many there were)
# The monitor's utilization columns whose mean over layers and codebooks the summary reports as final_*.
USAGE_KEYS = ("usage_fraction", "perplexity", "codes_used", "dead_codes", "per_sample_entropy",
              "batch_entropy", "bit_balance_mad")
# Validation columns the summary reports as final_* when the task's evaluation produced them.
EXTRA_VAL_KEYS = ("val_ssim", "val_usage_fraction", "val_codes_used", "val_perplexity", "val_tokens",
                  "val_tokens_per_code", "val_usage_ceiling", "val_rfid", "val_rfvd",
                  *(f"{k}_{part}" for part in VIDEO_PARTS for k in ("val_usage_fraction", "val_codes_used",
                                                                     "val_perplexity", "val_tokens_per_code",
                                                                     "val_usage_ceiling")),
                  # a token prior's (experiments.tasks.prior)
                  "val_bits_per_token", "val_bits_per_image", "sample_codes_used", "sample_usage_fraction",
                  "sample_kl", "val_gfid")
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
    alarms: list[str] = field(default_factory=list)  # the monitor's collapse alarms so far, one line each (lfq.alarms)

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
        self.alarms += [describe_alarm(r) for r in rows if r.get("kind") == "alarm"]
        train_rows = [r for r in rows if r.get("kind", "quantizer") == "quantizer" and r.get("mode") == "train"]
        if train_rows:
            last = max(r["step"] for r in train_rows)
            self.last_quantizer = [r for r in train_rows if r["step"] == last]

    def note_validation(self, step: int, val: Row, unreadable_files: int) -> None:
        self.last_val = val
        self.unreadable_files = unreadable_files
        if "val_mse" not in val:  # a task without reconstructions (a prior): no best MSE
            return
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
        if self.alarms:  # the first MAX_SUMMARY_ALARMS collapse alarms, and how many there were
            summary["alarms"] = self.alarms[:MAX_SUMMARY_ALARMS]
            summary["alarm_count"] = len(self.alarms)
        summary.update({f"final_{k}": v for k, v in mean_usage(self.last_quantizer).items()})
        return summary


def mean_usage(rows: list[Row]) -> dict[str, float | None]:
    """Mean over layers and codebooks of monitor rows, per USAGE_KEYS column (None where no row has a number)."""
    out: dict[str, float | None] = {}
    for key in USAGE_KEYS:
        values = [float(r[key]) for r in rows if r.get(key) is not None and not math.isnan(float(r[key]))]
        out[key] = sum(values) / len(values) if values else None
    return out


# --- one attempt ----------------------------------------------------------------------

class NonFiniteLoss(RuntimeError):
    """The (rank-averaged) loss of a step is NaN or inf: the run ends as 'failed'."""


class NoMonitor:
    """The monitor of a task without a quantizer (``HAS_QUANTIZER = False``): nothing to watch."""

    def set_step(self, step: int) -> None:
        pass

    def snapshot(self) -> None:
        pass

    def flush(self) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def detach(self, flush: bool = True, snapshot: bool = True) -> None:
        pass


class Training:
    """One attempt at a run, in the order ``experiments.train`` calls it: built here, then
    :meth:`restore`, :meth:`start`, each step (:meth:`step`, :meth:`log_train`, :meth:`validate`,
    :meth:`save_checkpoint`), then :meth:`finish` or :meth:`fail`, and always :meth:`close`.
    ``state`` is what the run has reached (:class:`TrainState`).

    A tokenizer task's model returns a ``ModelOutput`` and has a quantizer, which the monitor watches
    and the schedules set. A task with ``HAS_QUANTIZER = False`` (a prior) brings its own hooks:
    ``train_loss(net, batch)`` (its ``LOSS_KEYS``, the first minimised) and ``evaluate(...)``."""

    def __init__(self, config: Config, task: Any, runtime: Runtime, rd: RunDir, rows: slice):
        self.config, self.runtime, self.rd, self.rows = config, runtime, rd, rows
        self.run_id, self.device = config.run_id, runtime.device
        self.world, self.main = ddp.world_size(), ddp.is_main()
        self.task = task
        self.quantized = getattr(task, "HAS_QUANTIZER", True)
        self.loss_keys = getattr(task, "LOSS_KEYS", LOSS_KEYS)
        self.state = TrainState()
        self.batches: Batches | None = None  # train() makes them: where the checkpoint's step says
        torch.manual_seed(config.seed)  # model init and LFQ's token subsets draw from the global RNG
        self.data_rng = torch.Generator().manual_seed(config.seed)
        self.dataset = (task.build_dataset(config, rd.path) if getattr(task, "DATASET_IN_RUN_FOLDER", False)
                        else task.build_dataset(config))
        self.model = task.build_model(config).to(self.device)
        # DDP averages gradients over the ranks; the checkpoint holds the bare model's state.
        net = self.model if self.world == 1 else DistributedDataParallel(
            self.model, device_ids=[self.device] if self.device.type == "cuda" else None)
        self.net = runtime.compile(net)
        o = config.optim
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2),
                                           weight_decay=o.weight_decay)
        self.scaler = runtime.grad_scaler()
        # LPIPS and the adversarial game, when the loss section asks for them (their RNG draws come last)
        self.objective = Objective(config, self.model, self.device, world=self.world,
                                   grad_scaler=runtime.grad_scaler, autocast=runtime.autocast)
        self.metrics = metrics = JsonlSink(rd.metrics)
        state = self.state  # one object for the whole attempt: restore() loads the checkpoint's into it

        def sink(rows: list[dict[str, Any]]) -> None:  # a closure, not a bound method: no cycle through the monitor
            metrics(rows)
            state.note_quantizer_rows(rows)  # the summary's final utilization: the last step the monitor reported

        lg = config.logging
        self.monitor = LFQMonitor(self.model, sink=sink, log_every=lg.log_every,
                                  usage_window=config.monitor.usage_window, dead_after=config.monitor.dead_after,
                                  histogram_every=lg.histogram_every, histogram_sink=JsonlSink(rd.histograms),
                                  diagnostics_every=lg.diagnostics_every) if self.quantized else NoMonitor()

    def restore(self, checkpoint: dict[str, Any] | None) -> None:
        """Model, optimiser, RNGs, monitor and state from ``checkpoint``; the logs cut back to its step."""
        if checkpoint is not None:
            self.model.load_state_dict(checkpoint["model"])
            self.optimizer.load_state_dict(checkpoint["optimizer"])  # moves its state to the parameters' device
            if checkpoint.get("scaler"):
                self.scaler.load_state_dict(checkpoint["scaler"])
            by_rank = checkpoint.get("torch_rng_by_rank")  # LFQ's token subsets differ per rank
            torch.set_rng_state(by_rank[ddp.rank()] if by_rank and len(by_rank) == self.world
                                else checkpoint["torch_rng"])
            cuda_rng = checkpoint.get("cuda_rng_by_rank")  # LFQ draws subsets on the tokens' device
            if self.device.type == "cuda" and cuda_rng and len(cuda_rng) == self.world:
                torch.cuda.set_rng_state(cuda_rng[ddp.rank()])
            self.data_rng.set_state(checkpoint["data_rng"])
            self.monitor.load_state_dict(checkpoint["monitor"])
            self.objective.load_state_dict(checkpoint.get("objective"))
            self.state.load(checkpoint["progress"])
            if self.main:
                print(f"[{self.run_id}] resuming from the checkpoint of step {self.state.step}", flush=True)
        if self.main:  # rows past the checkpoint (or all rows, with none) will be written again from here
            truncate_jsonl(self.rd.metrics, self.state.step)
            truncate_jsonl(self.rd.histograms, self.state.step)
        ddp.barrier()  # every rank starts from the same folder

    def start(self) -> None:
        """Ready to train from the step after ``state.step``: this rank's batches from there, the
        rFID and rFVD extractors if the config asks for them, the throughput clock."""
        config = self.config
        self.batches = Batches(self.dataset, config, self.device, self.state.step, self.rows, self.data_rng,
                               self.run_id)
        if self.main and hasattr(self.dataset, "describe"):
            print(f"[{self.run_id}] data: {self.dataset.describe()}", flush=True)
        self.fid = self.fvd = None
        if config.eval.rfid_weights:
            self.fid = FrechetDistance(inception_extractor(config.eval.rfid_weights), self.device)
        if config.eval.fvd_weights:
            from experiments.video_fvd import i3d_extractor

            self.fvd = FrechetDistance(i3d_extractor(config.eval.fvd_weights), self.device)
        self.throughput = Throughput(config.data.batch_size)

    def step(self, step: int) -> tuple[float, dict[str, float], torch.Tensor]:
        """One optimiser step; (lr, the scheduled values, the losses ``[loss, recon, aux]`` averaged over ranks).
        NonFiniteLoss, on every rank, before the update, if the loss is NaN or inf."""
        config, model, optimizer, scaler = self.config, self.model, self.optimizer, self.scaler
        lr = lr_at(step, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        scheduled = values_at(step, config) if self.quantized else {}
        if self.quantized:
            apply_schedules(model, scheduled)
        self.monitor.set_step(step)
        with self.throughput.waiting_for_data():
            x = self.batches.train()  # this rank's shard, on the device
        out = None
        if self.quantized:
            with self.runtime.autocast():
                out = self.net(x)
            recon_loss = reconstruction_loss(out.recon, x, config)
            loss = recon_loss + out.aux_loss.float()
            if self.objective.active:  # LPIPS and the generator's adversarial term
                loss = loss + self.objective.generator_loss(step, x, out.recon, recon_loss)
            logged = torch.stack([loss, recon_loss, out.aux_loss.float()]).detach()
        else:
            with self.runtime.autocast():
                terms = self.task.train_loss(self.net, x).float()
            loss, logged = terms[0], terms.detach()
        if self.world > 1:  # the global batch's means; a NaN on any rank is a NaN on all
            logged = ddp.all_sum(logged) / self.world
        if not torch.isfinite(logged[0]):
            parts = ", ".join(f"{k} {v:.4g}" for k, v in zip(self.loss_keys[1:], logged.tolist()[1:], strict=True))
            raise NonFiniteLoss(f"non-finite loss {logged[0].item()} at step {step}" + (f" ({parts})" if parts else ""))
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if config.optim.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        if self.objective.active:  # the discriminator's update, on the same schedule's shape
            self.objective.discriminator_step(step, x, out.recon, lr / config.optim.lr)
        self.throughput.step_done()
        if self.throughput.tokens_per_sample is None and out is None:
            self.throughput.tokens_per_sample = x[0].numel()  # a prior's batch: rows of tokens
        if self.throughput.tokens_per_sample is None:
            q = model.quantizer
            self.throughput.tokens_per_sample = out.indices[0].numel() // (q.num_codebooks if q.keep_num_codebooks_dim
                                                                            else 1)
        return lr, scheduled, logged

    def log_train(self, step: int, lr: float, scheduled: dict[str, float], logged: torch.Tensor) -> None:
        """The step's ``kind="train"`` row: losses, lr, scheduled values, timings."""
        self.state.last_train = dict(zip(self.loss_keys, logged.tolist(), strict=True))
        objective = self.objective.logged()  # on every rank: under DDP it averages over them
        self.runtime.synchronize()  # the interval's queued work is done: its time is its time
        timing = self.throughput.row(self.runtime.max_memory_mb())
        if self.main:
            self.metrics([{"kind": "train", "step": step, "lr": lr, **self.state.last_train, **objective, **scheduled,
                           **timing}])

    def validate(self, step: int) -> None:
        """The whole validation set (sharded over the ranks); its ``kind="val"`` row; the best so far."""
        dataset = self.dataset
        if not self.quantized:  # the task's own validation; at the last step it may also sample
            val = self.task.evaluate(self.model, self.batches.val(), device=self.device, config=self.config,
                                     dataset=dataset, run_dir=self.rd.path, final=step == self.config.schedule.steps,
                                     main=self.main, autocast=self.runtime.autocast, fid=self.fid)
        else:
            val = evaluate(self.model, self.batches.val(), device=self.device,
                           value_range=dataset_value_range(dataset), is_image=getattr(dataset, "is_image", False),
                           autocast=self.runtime.autocast, fid=self.fid, fvd=self.fvd)
        if self.main:
            self.metrics([{"kind": "val", "step": step, **val}])
        self.state.note_validation(step, val, len(self.batches.unreadable))
        self.state.small_images = len(self.batches.small)

    def save_checkpoint(self, step: int) -> None:
        """``checkpoint.pt`` (rank 0) with every rank's RNG state, after the monitor's rows up to ``step``."""
        self.monitor.flush()  # rows up to this step are on disk before the checkpoint says so
        monitor_state = self.monitor.state_dict()  # on every rank: its flush joins the collective
        rng_by_rank = ddp.all_gather(torch.get_rng_state()) if self.world > 1 else None
        cuda_rng = ddp.all_gather(torch.cuda.get_rng_state()) if self.device.type == "cuda" else None
        if self.main:
            scaler, objective = self.scaler, self.objective.state_dict()
            self.rd.save_checkpoint({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                                     "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                                     "torch_rng": torch.get_rng_state(), "torch_rng_by_rank": rng_by_rank,
                                     "cuda_rng_by_rank": cuda_rng,
                                     "data_rng": self.data_rng.get_state(), "monitor": monitor_state,
                                     "progress": self.state.to_dict(), "run_id": self.run_id, "step": step,
                                     **({"objective": objective} if objective is not None else {})})
        ddp.barrier()  # no rank moves on (or dies) before the checkpoint exists

    def finish(self) -> dict[str, Any]:
        """``summary.json`` (status done), then ``DONE``; every rank returns rank 0's summary."""
        summary = None
        if self.main:
            summary = {**self.state.summary(self.run_id, self.config, "done", ""), **self.data_record()}
            self.rd.write_summary(summary)
            self.rd.mark_done()  # last: a folder with DONE is complete
        return ddp.broadcast(summary)  # rank 0's: the others' wall times and monitor rows differ

    def alarm_reason(self) -> str:
        """With ``monitor.stop_on_alarm``, the first collapse alarm as a failure reason, '' when none has
        fired (or the field is off); the same on every rank (rank 0's sink sees the alarms: broadcast)."""
        if not self.config.monitor.stop_on_alarm:
            return ""
        reason = f"collapse alarm: {self.state.alarms[0]}" if self.main and self.state.alarms else ""
        return ddp.broadcast(reason)

    def fail(self, reason: str) -> dict[str, Any]:
        """``summary.json`` with status failed and ``reason`` (the logs flushed first); rank 0's summary."""
        self.monitor.flush()
        summary = None
        if self.main:
            summary = {**self.state.summary(self.run_id, self.config, "failed", reason), **self.data_record()}
            self.rd.write_summary(summary)
        return ddp.broadcast(summary)

    def data_record(self) -> dict[str, Any]:
        """What the run read, for summary.json and config.json: the fingerprint of ``data.root``
        (``experiments.image_folder.fingerprint``) and the validation images used; {} for data in memory."""
        record = getattr(self.dataset, "record", None)
        return record() if record is not None else {}

    def close(self) -> None:
        """The monitor's hooks off the model, and the data loader's workers stopped (they hold a copy
        of the run lock's file while they live), even while a traceback still refers to this attempt."""
        # Under DDP no flush here: an erroring rank must not enter a collective the others may
        # never join (the rows it drops are past the checkpoint and rewritten on resume).
        # No final snapshot here: the run ended with one (train), or it stopped and resumes from a
        # checkpoint whose state still holds those counts.
        self.monitor.detach(flush=self.world == 1, snapshot=False)
        self.batches = None


# --- what the run prints ------------------------------------------------------------

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
    if summary.get("final_val_bits_per_image") is not None:  # a token prior
        parts.append(f"val_bits_per_image={number(summary['final_val_bits_per_image'], 1)}")
        if summary.get("final_sample_usage_fraction") is not None:
            parts.append(f"sample_usage={number(summary['final_sample_usage_fraction'], 3)}")
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
