"""Train one config in its run folder; resume from the folder's checkpoint; never re-run a DONE folder.

    python -m experiments.train experiments/configs/synthetic.yaml quantizer.diversity_gamma=2 scale=smoke

A run is a pure function of its (resolved) config: the same config and seed give the same
metrics, and a run killed at any point and started again ends with the same summary as one
that was never interrupted (only ``wall_time_s`` differs). The loop below is shared by every
task; a task (``experiments/tasks/``) only builds the dataset and the model.

Data parallel (inside an initialised process group of W > 1 ranks; ``experiments.distributed``):
- every rank draws the whole global batch of ``data.batch_size`` from the same data RNG and
  trains on its contiguous 1/W of it, so the ranks' shards together are exactly the
  single-process batch (batch_size must divide by W: ValueError otherwise). Equal shards and
  local means: DDP's gradient average of the local-mean reconstruction losses is the
  gradient of the global mean; ``lfq.LFQ``'s entropy and commitment terms are global
  already and need no scaling. Results match one process up to float summation order;
- the logged losses are means over the ranks (one all_reduce per step, which also makes the
  non-finite check agree on every rank, so no rank is left waiting in a collective);
- validation is sharded (``tensor_split`` of the validation set) and the squared errors are
  summed over the ranks; every rank runs eval passes, as the monitor's collective needs;
- rank 0 alone writes the run folder (config, metrics, checkpoint, summary, DONE); the
  checkpoint holds every rank's torch RNG state, a barrier follows each save, and every rank
  resumes from the same file. Every rank returns rank 0's summary.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from experiments import distributed as ddp
from experiments import schedules
from experiments.cli import OneLineParser, fail, guarded
from experiments.config import Config, ConfigError, load_config
from experiments.evaluation import FrechetDistance, evaluate, inception_extractor
from experiments.resources import check_resources
from experiments.run_dir import (
    RunDir,
    RunDirError,
    claimed,
    prepare_run_folder,
    restart,
    run_status,
    truncate_jsonl,
)
from experiments.runtime import Runtime, Throughput
from experiments.tasks import get_task
from lfq.monitor import JsonlSink, LFQMonitor

VAL_BATCH = 256
# Columns of kind="train" rows that measure the machine, not the run: they differ between two
# runs of one config (and across a resume), everything else is identical.
TIMING_KEYS = ("step_time_s", "samples_per_s", "tokens_per_s", "data_wait_s", "max_memory_mb")
USAGE_KEYS = ("usage_fraction", "perplexity", "codes_used", "dead_codes", "per_sample_entropy",
              "batch_entropy", "bit_balance_mad")


class NonFiniteLoss(RuntimeError):
    pass


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


class Batches:
    """This rank's training batches on the device, and its share of the validation set.

    In-memory datasets move to the device once and draw with the run's data generator; file
    datasets come through a DataLoader whose order is a function of the seed and the step.
    Files that cannot be read are reported once each, on the main rank.
    """

    def __init__(self, dataset: Any, config: Config, device: torch.device, start: int, rows: slice,
                 data_rng: torch.Generator, run_id: str):
        self.dataset, self.config, self.device, self.rows, self.data_rng = dataset, config, device, rows, data_rng
        self.run_id, self.unreadable = run_id, set()
        self.from_files = hasattr(dataset, "train_loader")
        if self.from_files:
            self._to_input = dataset.to_model_input
            self._train = iter(dataset.train_loader(config, device, start, rows))
            self._val = dataset.val_loader(config, device, ddp.rank(), ddp.world_size(), VAL_BATCH)
        elif hasattr(dataset, "to"):
            dataset.to(device)

    def _report(self, reasons: list[str]) -> None:
        for reason in reasons:
            if reason not in self.unreadable:
                self.unreadable.add(reason)
                print(f"[{self.run_id}] skipping an unreadable image: {reason}", flush=True)

    def _from_loader(self, item: tuple[torch.Tensor, list[str]]) -> torch.Tensor:
        crops, bad = item
        self._report(bad)
        return self._to_input(crops.to(self.device, non_blocking=True))

    def train(self) -> torch.Tensor:
        if self.from_files:
            return self._from_loader(next(self._train))
        return self.dataset.train_batch(self.data_rng, self.config.data.batch_size)[self.rows].to(self.device)

    def val(self) -> Any:
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


def _mean_usage(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """Mean over layers and codebooks of the latest training-mode monitor rows."""
    out: dict[str, float | None] = {}
    for key in USAGE_KEYS:
        values = [float(r[key]) for r in rows if r.get(key) is not None and not math.isnan(float(r[key]))]
        out[key] = sum(values) / len(values) if values else None
    return out


def _summary(run_id: str, config: Config, progress: dict[str, Any], status: str, reason: str) -> dict[str, Any]:
    last_val, last_train = progress["last_val"] or {}, progress["last_train"] or {}
    summary = {
        "run_id": run_id, "name": config.name, "task": config.task, "status": status, "reason": reason,
        "step": progress["step"], "steps": config.schedule.steps, "wall_time_s": round(progress["wall_time_s"], 3),
        "final_val_mse": last_val.get("val_mse"), "final_val_psnr": last_val.get("val_psnr"),
        "best_val_mse": progress["best_val_mse"], "best_val_psnr": progress["best_val_psnr"],
        "best_val_step": progress["best_val_step"],
        "final_train_loss": last_train.get("loss"), "final_recon_loss": last_train.get("recon_loss"),
        "final_aux_loss": last_train.get("aux_loss"),
    }
    for key in ("val_ssim", "val_usage_fraction", "val_codes_used", "val_perplexity", "val_tokens", "val_rfid"):
        if key in last_val:  # utilization over every validation token, and the image metrics
            summary[f"final_{key}"] = last_val[key]
    if progress.get("unreadable_files"):
        summary["unreadable_files"] = progress["unreadable_files"]
    summary.update({f"final_{k}": v for k, v in _mean_usage(progress["last_quantizer"]).items()})
    return summary


def _progress_printer(config: Config, run_id: str, start: int) -> Callable[[int, float, float], None]:
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


def preflight(config: Config) -> tuple[Runtime, Any]:
    """Everything that can be refused before a run folder exists: the device and precision this
    machine can give (RuntimeConfigError), the task's data (e.g. a missing ``data.root``)."""
    runtime = Runtime.resolve(config.runtime)
    task = get_task(config.task)
    if hasattr(task, "check"):
        task.check(config)
    return runtime, task


def _shard_rows(config: Config) -> slice:
    """This rank's rows of the global batch; ValueError unless the world size fits the config."""
    world = ddp.world_size()
    rows = ddp.shard(config.data.batch_size, world, ddp.rank())  # ValueError unless W divides the batch
    if config.data.val_size < world:
        raise ValueError(f"data.val_size={config.data.val_size} is smaller than the world size {world}: "
                         f"every rank needs a validation shard")
    return rows


def run(config: Config, run_dir: Path | str, *, on_step: Callable[[int], None] | None = None,
        num_threads: int | None = None) -> dict[str, Any]:
    """Run ``config`` in ``run_dir`` to the end and return its summary.

    Holds the run's claim (``experiments.run_dir.claimed``, rank 0) throughout: RunClaimed if
    another process trains this folder. CorruptRun if a file it would resume from (or a DONE
    folder's summary) cannot be trusted; nothing is written then.

    Resumes from ``checkpoint.pt`` if the folder has one; returns the existing summary without
    doing anything if it has ``DONE``. A NaN or inf loss ends the run with status 'failed'
    (returned, not raised); any exception is recorded as 'failed' in ``summary.json`` and then
    propagates. ``on_step(step)`` is called after every completed step (tests use it to kill
    a run mid-way).

    ``num_threads``: torch's intra-op threads during the run; None leaves the caller's setting
    (slurm.job sets it from SLURM_CPUS_PER_TASK). The CLI passes 1: these models are small, a
    second thread buys little, parallel runs that each take every core run an order of
    magnitude slower, and a fixed count keeps float reductions the same on every machine.
    """
    _shard_rows(config.resolved())  # a world size that does not fit the config is refused before the claim
    if run_status(run_dir) == "done":  # read-only: a finished folder is not even claimed
        return _run(config, run_dir, None, on_step=on_step, num_threads=num_threads)
    prepared = preflight(config.resolved())  # a ConfigError here leaves no folder behind
    with claimed(run_dir, ddp.is_main(), ddp.broadcast):
        return _run(config, run_dir, prepared, on_step=on_step, num_threads=num_threads)


def _run(config: Config, run_dir: Path | str, prepared: tuple[Runtime, Any] | None, *,
         on_step: Callable[[int], None] | None = None, num_threads: int | None = None) -> dict[str, Any]:
    config = config.resolved()
    run_id = config.run_id
    runtime, task = prepared if prepared is not None else preflight(config)
    world, main, device = ddp.world_size(), ddp.is_main(), runtime.device
    if ddp.is_distributed() and ddp.backend() == "nccl" and device.type != "cuda":
        raise ConfigError(f"runtime.device={config.runtime.device!r} resolved to {device}, but this process group "
                          f"uses NCCL, which needs one GPU per rank: use runtime.device=auto or cuda")
    rows = _shard_rows(config)
    rd = RunDir(run_dir)
    existing = rd.read_config()
    if existing is not None and existing.get("run_id", run_id) != run_id:  # no run_id: corrupt (below)
        raise ConfigError(f"{rd.path} holds run {existing.get('run_id')!r}, not {run_id!r}: "
                          f"use a fresh folder (the default is <out>/<run_id>)")
    done = rd.finished_summary()  # CorruptRun for a DONE folder that is not whole
    if done is not None:
        return done
    checkpoint = rd.load_checkpoint(run_id)  # weights_only; CorruptRun names the file and --restart
    if checkpoint is not None:  # every row up to its step, or CorruptRun naming the gap
        rd.verify_logs(checkpoint, {"train": config.logging.log_every, "val": config.schedule.val_every})
    if main:
        rd.path.mkdir(parents=True, exist_ok=True)
        rd.write_config(config.to_dict(), run_id)
        rd.summary.unlink(missing_ok=True)  # a stale 'failed' from an earlier attempt; rewritten at the end
    if device.type == "cuda":  # deterministic cuBLAS; must be set before its first use
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

    t_start = time.perf_counter()
    progress: dict[str, Any] = {"step": 0, "wall_time_s": 0.0, "best_val_mse": None, "best_val_psnr": None,
                                "best_val_step": None, "last_val": None, "last_train": None, "last_quantizer": []}
    deterministic, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    # On CUDA some kernels (scatter_add_ of the code counts) have no deterministic version:
    # warn there instead of failing; the CPU path stays strict and bit-reproducible.
    torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    runtime.apply()
    monitor = None
    try:
        torch.manual_seed(config.seed)  # model init and LFQ's token subsets draw from the global RNG
        data_rng = torch.Generator().manual_seed(config.seed)
        dataset = task.build_dataset(config)
        model = task.build_model(config).to(device)
        # DDP averages gradients over the ranks; the checkpoint holds the bare model's state.
        net = model if world == 1 else DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None)
        net = runtime.compile(net)
        o = config.optim
        optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2),
                                      weight_decay=o.weight_decay)
        scaler = runtime.grad_scaler()

        metrics_sink = JsonlSink(rd.metrics)

        def sink(rows: list[dict[str, Any]]) -> None:
            metrics_sink(rows)
            train_rows = [r for r in rows if r.get("kind", "quantizer") == "quantizer" and r.get("mode") == "train"]
            if train_rows:  # the summary's final utilization: the last step the monitor reported
                last = max(r["step"] for r in train_rows)
                progress["last_quantizer"] = [r for r in train_rows if r["step"] == last]

        lg = config.logging
        monitor = LFQMonitor(model, sink=sink, log_every=lg.log_every, usage_window=config.monitor.usage_window,
                             dead_after=config.monitor.dead_after, histogram_every=lg.histogram_every,
                             histogram_sink=JsonlSink(rd.histograms), diagnostics_every=lg.diagnostics_every)

        if checkpoint is not None:
            model.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])  # moves its state to the parameters' device
            if checkpoint.get("scaler"):
                scaler.load_state_dict(checkpoint["scaler"])
            by_rank = checkpoint.get("torch_rng_by_rank")  # LFQ's token subsets differ per rank
            torch.set_rng_state(by_rank[ddp.rank()] if by_rank and len(by_rank) == world else checkpoint["torch_rng"])
            cuda_rng = checkpoint.get("cuda_rng_by_rank")  # LFQ draws subsets on the tokens' device
            if device.type == "cuda" and cuda_rng and len(cuda_rng) == world:
                torch.cuda.set_rng_state(cuda_rng[ddp.rank()])
            data_rng.set_state(checkpoint["data_rng"])
            monitor.load_state_dict(checkpoint["monitor"])
            progress = checkpoint["progress"]
            if main:
                print(f"[{run_id}] resuming from the checkpoint of step {progress['step']}", flush=True)
        if main:  # rows past the checkpoint (or all rows, with none) will be written again from here
            truncate_jsonl(rd.metrics, progress["step"])
            truncate_jsonl(rd.histograms, progress["step"])
        ddp.barrier()  # every rank starts from the same folder
        wall_before = progress["wall_time_s"]

        steps = config.schedule.steps
        batches = Batches(dataset, config, device, progress["step"], rows, data_rng, run_id)
        if main and hasattr(dataset, "describe"):
            print(f"[{run_id}] data: {dataset.describe()}", flush=True)
        fid = None
        if config.eval.rfid_weights:
            fid = FrechetDistance(inception_extractor(config.eval.rfid_weights), device)
        throughput = Throughput(config.data.batch_size)
        show = _progress_printer(config, run_id, progress["step"])
        for step in range(progress["step"] + 1, steps + 1):
            lr = lr_at(step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            scheduled = schedules.values_at(step, config)
            schedules.apply(model, scheduled)
            monitor.set_step(step)
            with throughput.waiting_for_data():
                x = batches.train()  # this rank's shard, on the device
            with runtime.autocast():
                out = net(x)
            recon_loss = reconstruction_loss(out.recon, x, config)
            loss = recon_loss + out.aux_loss.float()
            logged = torch.stack([loss, recon_loss, out.aux_loss.float()]).detach()
            if world > 1:  # the global batch's means; a NaN on any rank is a NaN on all
                logged = ddp.all_sum(logged) / world
            if not torch.isfinite(logged[0]):
                total, recon, aux = logged.tolist()
                raise NonFiniteLoss(f"non-finite loss {total} at step {step} (recon {recon:.4g}, aux {aux:.4g})")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if o.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            throughput.step_done()
            if throughput.tokens_per_sample is None:
                q = model.quantizer
                throughput.tokens_per_sample = out.indices[0].numel() // (q.num_codebooks if q.keep_num_codebooks_dim
                                                                           else 1)
            progress["step"] = step

            last = step == steps
            if step % lg.log_every == 0 or last:
                progress["last_train"] = dict(zip(("loss", "recon_loss", "aux_loss"), logged.tolist(), strict=True))
                runtime.synchronize()  # the interval's queued work is done: its time is its time
                timing = throughput.row(runtime.max_memory_mb())
                if main:
                    metrics_sink([{"kind": "train", "step": step, "lr": lr, **progress["last_train"], **scheduled,
                                   **timing}])
            if step % config.schedule.val_every == 0 or last:
                val = evaluate(model, batches.val(), device=device, value_range=dataset_value_range(dataset),
                               is_image=getattr(dataset, "is_image", False), autocast=runtime.autocast, fid=fid)
                if main:
                    metrics_sink([{"kind": "val", "step": step, **val}])
                progress["last_val"] = val
                progress["unreadable_files"] = len(batches.unreadable)
                if progress["best_val_mse"] is None or val["val_mse"] < progress["best_val_mse"]:
                    progress.update(best_val_mse=val["val_mse"], best_val_psnr=val["val_psnr"], best_val_step=step)
            progress["wall_time_s"] = wall_before + time.perf_counter() - t_start
            if step % config.schedule.checkpoint_every == 0 or last:
                monitor.flush()  # rows up to this step are on disk before the checkpoint says so
                monitor_state = monitor.state_dict()  # on every rank: its flush joins the collective
                rng_by_rank = ddp.all_gather(torch.get_rng_state()) if world > 1 else None
                cuda_rng = ddp.all_gather(torch.cuda.get_rng_state()) if device.type == "cuda" else None
                if main:
                    rd.save_checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                        "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                                        "torch_rng": torch.get_rng_state(), "torch_rng_by_rank": rng_by_rank,
                                        "cuda_rng_by_rank": cuda_rng,
                                        "data_rng": data_rng.get_state(), "monitor": monitor_state,
                                        "progress": progress, "run_id": run_id, "step": step})
                ddp.barrier()  # no rank moves on (or dies) before the checkpoint exists
            if main:
                show(step, float(logged[0]), lr)
            if on_step is not None:
                on_step(step)

        summary = None
        if main:
            summary = _summary(run_id, config, progress, "done", "")
            rd.write_summary(summary)
            rd.mark_done()  # last: a folder with DONE is complete
        return ddp.broadcast(summary)  # rank 0's: the others' wall times and monitor rows differ
    except NonFiniteLoss as e:  # raised on every rank at once (the check reads the reduced loss)
        if monitor is not None:
            monitor.flush()
        summary = None
        if main:
            summary = _summary(run_id, config, progress, "failed", str(e))
            rd.write_summary(summary)
        return ddp.broadcast(summary)
    except Exception as e:
        if main:
            summary = _summary(run_id, config, progress, "failed", f"{type(e).__name__}: {e}")
            summary["error"] = "".join(traceback.format_exception(e)[-8:])
            rd.write_summary(summary)
        raise
    finally:
        if monitor is not None:
            # Under DDP no flush here: an erroring rank must not enter a collective the others may
            # never join (the rows it drops are past the checkpoint and rewritten on resume).
            monitor.detach(flush=world == 1)
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(threads)


def main(argv: Sequence[str] | None = None) -> int:
    parser = OneLineParser(
        prog="python -m experiments.train",
        description="Train one config in its run folder DIR/<run_id>.\n"
                    "Resumes from the folder's checkpoint.pt if there is one; does nothing if the\n"
                    "folder is DONE. Writes config.json, metrics.jsonl, histograms.jsonl,\n"
                    "checkpoint.pt, summary.json, then DONE. One process per run folder at a time.",
        epilog="example:\n  python -m experiments.train experiments/configs/synthetic.yaml "
               "quantizer.diversity_gamma=2 scale=smoke --out results/try\n\n"
               "exit status: 0 done, 1 failed (see summary.json), 2 bad config or arguments, a corrupt\n"
               "run folder (start it over with --restart) or a folder another process is training",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", type=Path, help="YAML config, e.g. experiments/configs/synthetic.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides parsed as YAML scalars, e.g. quantizer.codebook_size=512 "
                             "seed=1 scale=smoke (smoke shrinks the run to seconds)")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="parent of the run folder (default: results/<config name>)")
    parser.add_argument("--threads", type=int, default=1, metavar="N",
                        help="torch intra-op threads (default 1: the models are small; see run())")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resolved config and the run folder, train nothing")
    parser.add_argument("--restart", action="store_true",
                        help="start the run over: its folder (e.g. a corrupt checkpoint) is moved to "
                             "DIR/_sweep/trash/ first, never deleted")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads {args.threads}: must be >= 1")
    try:
        config = load_config(args.config, args.overrides)
        preflight(config.resolved())
        check_resources(config)  # a run that cannot fit is refused before its folder exists
        run_dir = prepare_run_folder(args.out, config)
    except (ConfigError, RunDirError) as e:
        return fail(e)
    if args.dry_run:
        import json

        print(json.dumps({**config.resolved().to_dict(), "run_id": config.run_id}, indent=2))
        print(f"run folder: {run_dir}")
        return 0
    with ddp.process_group():  # data parallel under torchrun (RANK, WORLD_SIZE, ... set); else a no-op
        try:
            refused = None
            if args.restart and ddp.is_main():
                try:
                    moved = restart(run_dir)
                    if moved is not None:
                        print(f"[restart] moved {run_dir} to {moved}", flush=True)
                except RunDirError as e:
                    refused = str(e)
            refused = ddp.broadcast(refused)  # every rank stops, or none
            if refused:
                return fail(refused)
            if ddp.is_main():
                print(f"run folder: {run_dir}", flush=True)
            summary = run(config, run_dir, num_threads=args.threads)
        except RunDirError as e:  # claimed by another process, or corrupt: nothing was written
            return fail(e)
        keys = ("status", "reason", "step", "wall_time_s", "final_val_mse", "final_val_psnr", "final_usage_fraction")
        if ddp.is_main():
            print(" ".join(f"{k}={summary.get(k)}" for k in keys if summary.get(k) not in (None, "")), flush=True)
    return 0 if summary.get("status") == "done" else 1


if __name__ == "__main__":
    sys.exit(guarded(main))
