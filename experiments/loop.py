"""The training loop of one attempt at a run (:class:`Training`), step by step.

``experiments.train.run`` checks the run folder and holds its lock; this module builds the model,
optimiser and monitor, restores them from the checkpoint, trains, validates, checkpoints and ends
the run. What the run has reached lives in :class:`experiments.train_state.TrainState`; the
data-parallel rules are in ``experiments.train``'s docstring.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from experiments import distributed as ddp
from experiments import schedules
from experiments.batches import Batches, dataset_value_range
from experiments.config import Config
from experiments.evaluation import FrechetDistance, evaluate, inception_extractor
from experiments.run_dir import RunDir, truncate_jsonl
from experiments.runtime import Runtime, Throughput
from experiments.train_state import LOSS_KEYS, TrainState, progress_printer
from lfq.monitor import LFQMonitor
from lfq.sinks import JsonlSink


class NonFiniteLoss(RuntimeError):
    """The (rank-averaged) loss of a step is NaN or inf: the run ends as 'failed'."""


def lr_at(step: int, config: Config) -> float:
    """Linear warmup to ``optim.lr``, then cosine decay to ``optim.min_lr`` at the last step."""
    o, steps = config.optim, config.schedule.steps
    if step <= o.warmup_steps:
        return o.lr * step / o.warmup_steps
    progress = (step - o.warmup_steps) / max(1, steps - o.warmup_steps)
    return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1 + math.cos(math.pi * progress))


def reconstruction_loss(recon: torch.Tensor, x: torch.Tensor, config: Config) -> torch.Tensor:
    """The loss section's weighted terms, in float32. Perceptual and adversarial terms go here."""
    recon, x = recon.float(), x.float()
    loss = recon.new_zeros(())
    if config.loss.l2_weight:
        loss = loss + config.loss.l2_weight * F.mse_loss(recon, x)
    if config.loss.l1_weight:
        loss = loss + config.loss.l1_weight * F.l1_loss(recon, x)
    return loss


class Training:
    """One attempt at a run, in the order ``_run`` calls it: built here, then :meth:`restore`,
    :meth:`train` (each step: :meth:`step`, :meth:`log_train`, :meth:`validate`,
    :meth:`save_checkpoint`), then :meth:`finish` or :meth:`fail`, and always :meth:`close`.
    ``state`` is what the run has reached (:class:`experiments.train_state.TrainState`)."""

    def __init__(self, config: Config, task: Any, runtime: Runtime, rd: RunDir, rows: slice):
        self.config, self.runtime, self.rd, self.rows = config, runtime, rd, rows
        self.run_id, self.device = config.run_id, runtime.device
        self.world, self.main = ddp.world_size(), ddp.is_main()
        self.state = TrainState()
        self.batches: Batches | None = None  # train() makes them: where the checkpoint's step says
        torch.manual_seed(config.seed)  # model init and LFQ's token subsets draw from the global RNG
        self.data_rng = torch.Generator().manual_seed(config.seed)
        self.dataset = task.build_dataset(config)
        self.model = task.build_model(config).to(self.device)
        # DDP averages gradients over the ranks; the checkpoint holds the bare model's state.
        net = self.model if self.world == 1 else DistributedDataParallel(
            self.model, device_ids=[self.device] if self.device.type == "cuda" else None)
        self.net = runtime.compile(net)
        o = config.optim
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2),
                                           weight_decay=o.weight_decay)
        self.scaler = runtime.grad_scaler()
        self.metrics = metrics = JsonlSink(rd.metrics)
        state = self.state  # one object for the whole attempt: restore() loads the checkpoint's into it

        def sink(rows: list[dict[str, Any]]) -> None:  # a closure, not a bound method: no cycle through the monitor
            metrics(rows)
            state.note_quantizer_rows(rows)  # the summary's final utilization: the last step the monitor reported

        lg = config.logging
        self.monitor = LFQMonitor(self.model, sink=sink, log_every=lg.log_every,
                                  usage_window=config.monitor.usage_window, dead_after=config.monitor.dead_after,
                                  histogram_every=lg.histogram_every, histogram_sink=JsonlSink(rd.histograms),
                                  diagnostics_every=lg.diagnostics_every)

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
            self.state.load(checkpoint["progress"])
            if self.main:
                print(f"[{self.run_id}] resuming from the checkpoint of step {self.state.step}", flush=True)
        if self.main:  # rows past the checkpoint (or all rows, with none) will be written again from here
            truncate_jsonl(self.rd.metrics, self.state.step)
            truncate_jsonl(self.rd.histograms, self.state.step)
        ddp.barrier()  # every rank starts from the same folder

    def train(self, t_start: float, on_step: Callable[[int], None] | None) -> None:
        """From the step after ``state.step`` to the last; ``on_step(step)`` after each."""
        config, state = self.config, self.state
        steps, wall_before = config.schedule.steps, state.wall_time_s
        self.batches = Batches(self.dataset, config, self.device, state.step, self.rows, self.data_rng, self.run_id)
        if self.main and hasattr(self.dataset, "describe"):
            print(f"[{self.run_id}] data: {self.dataset.describe()}", flush=True)
        self.fid = None
        if config.eval.rfid_weights:
            self.fid = FrechetDistance(inception_extractor(config.eval.rfid_weights), self.device)
        self.throughput = Throughput(config.data.batch_size)
        show = progress_printer(config, self.run_id, state.step)
        for step in range(state.step + 1, steps + 1):
            lr, scheduled, logged = self.step(step)
            state.step = step
            last = step == steps
            if step % config.logging.log_every == 0 or last:
                self.log_train(step, lr, scheduled, logged)
            if step % config.schedule.val_every == 0 or last:
                self.validate(step)
            state.wall_time_s = wall_before + time.perf_counter() - t_start
            if last and step % config.logging.histogram_every != 0:
                # The run's final histogram snapshot (before the checkpoint, whose state must know it
                # was sent). Not when the periodic one came at step - 1 (steps count from 1 here, the
                # monitor's snapshots follow steps s with (s + 1) % histogram_every == 0): a snapshot
                # of one step would replace the last full one as the run's final distribution.
                self.monitor.snapshot()
            if step % config.schedule.checkpoint_every == 0 or last:
                self.save_checkpoint(step)
            if self.main:
                show(step, float(logged[0]), lr)
            if on_step is not None:
                on_step(step)

    def step(self, step: int) -> tuple[float, dict[str, float], torch.Tensor]:
        """One optimiser step; (lr, the scheduled values, the losses ``[loss, recon, aux]`` averaged over ranks).
        NonFiniteLoss, on every rank, before the update, if the loss is NaN or inf."""
        config, model, optimizer, scaler = self.config, self.model, self.optimizer, self.scaler
        lr = lr_at(step, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        scheduled = schedules.values_at(step, config)
        schedules.apply(model, scheduled)
        self.monitor.set_step(step)
        with self.throughput.waiting_for_data():
            x = self.batches.train()  # this rank's shard, on the device
        with self.runtime.autocast():
            out = self.net(x)
        recon_loss = reconstruction_loss(out.recon, x, config)
        loss = recon_loss + out.aux_loss.float()
        logged = torch.stack([loss, recon_loss, out.aux_loss.float()]).detach()
        if self.world > 1:  # the global batch's means; a NaN on any rank is a NaN on all
            logged = ddp.all_sum(logged) / self.world
        if not torch.isfinite(logged[0]):
            total, recon, aux = logged.tolist()
            raise NonFiniteLoss(f"non-finite loss {total} at step {step} (recon {recon:.4g}, aux {aux:.4g})")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if config.optim.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        self.throughput.step_done()
        if self.throughput.tokens_per_sample is None:
            q = model.quantizer
            self.throughput.tokens_per_sample = out.indices[0].numel() // (q.num_codebooks if q.keep_num_codebooks_dim
                                                                            else 1)
        return lr, scheduled, logged

    def log_train(self, step: int, lr: float, scheduled: dict[str, float], logged: torch.Tensor) -> None:
        """The step's ``kind="train"`` row: losses, lr, scheduled values, timings."""
        self.state.last_train = dict(zip(LOSS_KEYS, logged.tolist(), strict=True))
        self.runtime.synchronize()  # the interval's queued work is done: its time is its time
        timing = self.throughput.row(self.runtime.max_memory_mb())
        if self.main:
            self.metrics([{"kind": "train", "step": step, "lr": lr, **self.state.last_train, **scheduled, **timing}])

    def validate(self, step: int) -> None:
        """The whole validation set (sharded over the ranks); its ``kind="val"`` row; the best so far."""
        dataset = self.dataset
        val = evaluate(self.model, self.batches.val(), device=self.device, value_range=dataset_value_range(dataset),
                       is_image=getattr(dataset, "is_image", False), autocast=self.runtime.autocast, fid=self.fid)
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
            scaler = self.scaler
            self.rd.save_checkpoint({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                                     "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                                     "torch_rng": torch.get_rng_state(), "torch_rng_by_rank": rng_by_rank,
                                     "cuda_rng_by_rank": cuda_rng,
                                     "data_rng": self.data_rng.get_state(), "monitor": monitor_state,
                                     "progress": self.state.to_dict(), "run_id": self.run_id, "step": step})
        ddp.barrier()  # no rank moves on (or dies) before the checkpoint exists

    def finish(self) -> dict[str, Any]:
        """``summary.json`` (status done), then ``DONE``; every rank returns rank 0's summary."""
        summary = None
        if self.main:
            summary = {**self.state.summary(self.run_id, self.config, "done", ""), **self.data_record()}
            self.rd.write_summary(summary)
            self.rd.mark_done()  # last: a folder with DONE is complete
        return ddp.broadcast(summary)  # rank 0's: the others' wall times and monitor rows differ

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
