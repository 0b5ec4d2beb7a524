"""Train one config in its run folder: :func:`run` builds, restores, loops, validates and finishes,
read top to bottom, with the pieces it drives in ``experiments.loop``, and never re-runs a DONE
folder; docs/training.md ("How a run trains") gives the resume and data-parallel rules.

    python -m experiments.train experiments/configs/synthetic.yaml quantizer.diversity_gamma=2 scale=smoke
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

import torch

from common.cli import OneLineParser, fail, guarded
from experiments import distributed as ddp
from experiments.config import Config, ConfigError, load_config
from experiments.files import append_jsonl, read_json
from experiments.image_folder import Fingerprints, data_change
from experiments.loop import NonFiniteLoss, Training, TrainState, end_line, progress_printer
from experiments.objective import check_objective
from experiments.provenance import environment
from experiments.resources import check_resources
from experiments.run_dir import RunDir, RunDirError, prepare_run_folder, run_status
from experiments.run_lock import hold_run_lock, read_lock_holder, restart
from experiments.runtime import Runtime
from experiments.tasks import get_task

# Columns of kind="train" rows that measure the machine, not the run: they differ between two
# runs of one config (and across a resume), everything else is identical.
TIMING_KEYS = ("step_time_s", "samples_per_s", "tokens_per_s", "data_wait_s", "max_memory_mb")


class Prepared(NamedTuple):
    """What :func:`preflight` resolved: this process's runtime, the task's module and the config
    that runs (a task's ``resolve_inputs`` may make a path in it absolute; never its run id)."""

    runtime: Runtime
    task: ModuleType
    config: Config


def preflight(config: Config, run_dir: Path | str | None = None) -> Prepared:
    """Everything that can be refused before a run folder exists: the device and precision this
    machine can give (RuntimeConfigError), the task's data (e.g. a missing ``data.root``, or a prior's
    ``data.tokenizer_run`` that is no finished tokenizer: looked up beside ``run_dir``'s results root)."""
    runtime = Runtime.resolve(config.runtime)
    task = get_task(config.task)
    if hasattr(task, "resolve_inputs"):
        config = task.resolve_inputs(config, Path(run_dir) if run_dir is not None else None)
    if hasattr(task, "check"):
        task.check(config)
    check_objective(config, task)
    return Prepared(runtime, task, config)


def run(config: Config, run_dir: Path | str, *, on_step: Callable[[int], None] | None = None,
        num_threads: int | None = None, prepared: Prepared | None = None) -> dict[str, Any]:
    """Run ``config`` in ``run_dir`` to the end and return its summary (every rank: rank 0's).

    Holds the run's lock (``experiments.run_lock.hold_run_lock``, rank 0) throughout: RunLocked if
    another process trains this folder. Returns the existing summary of a DONE folder (read only,
    not even locked); resumes from ``checkpoint.pt`` if there is one. CorruptRun if a file it would
    resume from (or a DONE folder's summary) cannot be trusted; nothing is written then. A NaN or
    inf loss ends the run as 'failed' (returned); any other exception is recorded as 'failed' in
    ``summary.json`` and propagates. ``on_step(step)`` follows every completed step (tests kill a
    run with it); ``prepared``: the :func:`preflight` the caller already did (the CLI), else done here.

    ``num_threads``: torch's intra-op threads during the run; None leaves the caller's setting
    (slurm.job sets it from SLURM_CPUS_PER_TASK). The CLI passes 1: these models are small, a
    second thread buys little, parallel runs that each take every core run an order of
    magnitude slower, and a fixed count keeps float reductions the same on every machine of one CPU
    ISA (across ISAs they differ: ``experiments.provenance``).
    """
    runtime, task, config = prepared if prepared is not None else preflight(config.resolved(), run_dir)  # a
    # ConfigError leaves no folder
    rows = _shard_rows(config, runtime.device)  # a world that does not fit the config, before the lock
    rd = RunDir(run_dir)
    with contextlib.ExitStack() as stack:
        if run_status(run_dir) != "done":
            stack.enter_context(hold_run_lock(run_dir, ddp.is_main(), ddp.broadcast))

        # the folder: a finished run's summary, or the checkpoint to resume from (None: from the start)
        done, checkpoint = _open_folder(config, rd)
        if done is not None:
            return done
        previous = (rd.read_config() or {}) if checkpoint is not None else {}  # what the attempt before read
        _start_folder(config, rd, runtime.device)

        t_start = time.perf_counter()  # the attempt's wall time counts its setup too
        training: Training | None = None
        with _reproducible(runtime.device, num_threads):
            runtime.apply()
            try:
                # build
                training = Training(config, task, runtime, rd, rows)
                _record_data(config, rd, training.data_record(), previous)
                # restore
                training.restore(checkpoint)
                state = training.state
                _record_environment(rd, runtime.device, state.step)
                # loop
                training.start()
                steps, wall_before = config.schedule.steps, state.wall_time_s
                show = progress_printer(config, config.run_id, state.step)
                for step in range(state.step + 1, steps + 1):
                    lr, scheduled, losses = training.step(step)
                    state.step, last = step, step == steps
                    if step % config.logging.log_every == 0 or last:
                        training.log_train(step, lr, scheduled, losses)
                        reason = training.alarm_reason()  # monitor.stop_on_alarm: the first collapse alarm
                        if reason:
                            return training.fail(reason)
                    # validate
                    if step % config.schedule.val_every == 0 or last:
                        training.validate(step)
                    state.wall_time_s = wall_before + time.perf_counter() - t_start
                    if last and step % config.logging.histogram_every != 0:
                        # The run's final histogram snapshot (before the checkpoint, whose state must know
                        # it was sent). Not when the periodic one came at step - 1 (steps count from 1 here,
                        # the monitor's snapshots follow steps s with (s + 1) % histogram_every == 0): a
                        # snapshot of one step would replace the last full one as the run's final distribution.
                        training.monitor.snapshot()
                    if step % config.schedule.checkpoint_every == 0 or last:
                        training.save_checkpoint(step)
                    if ddp.is_main():
                        show(step, float(losses[0]), lr)
                    if on_step is not None:
                        on_step(step)
                # finish
                return training.finish()
            except NonFiniteLoss as e:  # raised on every rank at once (the check reads the reduced loss)
                return training.fail(str(e))
            except Exception as e:
                if ddp.is_main():
                    state = training.state if training is not None else TrainState()
                    summary = state.summary(config.run_id, config, "failed", f"{type(e).__name__}: {e}")
                    summary["error"] = "".join(traceback.format_exception(e)[-8:])
                    rd.write_summary(summary)
                raise
            finally:
                if training is not None:
                    training.close()


def _shard_rows(config: Config, device: torch.device) -> slice:
    """This rank's rows of the global batch; ValueError unless the world size fits the config,
    ConfigError for NCCL without a GPU per rank."""
    world = ddp.world_size()
    if ddp.is_distributed() and ddp.backend() == "nccl" and device.type != "cuda":
        raise ConfigError(f"runtime.device={config.runtime.device!r} resolved to {device}, but this process group "
                          f"uses NCCL, which needs one GPU per rank: use runtime.device=auto or cuda")
    rows = ddp.shard(config.data.batch_size, world, ddp.rank())  # ValueError unless W divides the batch
    if config.data.val_size < world:
        raise ValueError(f"data.val_size={config.data.val_size} is smaller than the world size {world}: "
                         f"every rank needs a validation shard")
    return rows


def _open_folder(config: Config, rd: RunDir) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(the summary of a finished run, None) or (None, the checkpoint to resume from, None to start afresh).

    Reads only: ConfigError if the folder holds another run, CorruptRun if what it would resume
    from (or a DONE folder) cannot be trusted.
    """
    run_id = config.run_id
    existing = rd.read_config()
    if existing is not None and existing.get("run_id", run_id) != run_id:  # no run_id: corrupt (below)
        raise ConfigError(f"{rd.path} holds run {existing.get('run_id')!r}, not {run_id!r}: "
                          f"use a fresh folder (the default is <out>/<run_id>)")
    done = rd.finished_summary()  # CorruptRun for a DONE folder that is not whole
    if done is not None:
        return done, None
    checkpoint = rd.load_checkpoint(run_id)  # weights_only; CorruptRun names the file and --restart
    if checkpoint is not None:  # every row up to its step, or CorruptRun naming the gap
        rd.verify_logs(checkpoint, {"train": config.logging.log_every, "val": config.schedule.val_every})
    return None, checkpoint


def _start_folder(config: Config, rd: RunDir, device: torch.device) -> None:
    """The first writes of an attempt (rank 0): ``config.json``, and no stale summary."""
    if ddp.is_main():
        rd.path.mkdir(parents=True, exist_ok=True)
        rd.write_config(config.to_dict(), config.run_id)
        rd.summary.unlink(missing_ok=True)  # a stale 'failed' from an earlier attempt; rewritten at the end
    if device.type == "cuda":  # deterministic cuBLAS; must be set before its first use
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def _record_data(config: Config, rd: RunDir, record: dict[str, Any], previous: dict[str, Any]) -> None:
    """config.json again, with what the run reads beside the config (rank 0): the fingerprint of
    ``data.root`` and the validation images used. Outside the config's keys, so the run id and the
    config itself are unchanged; a run on data in memory records nothing. A resumed run whose folder
    changed since its previous attempt says so: it goes on with the folder as it is now."""
    if not record or not ddp.is_main():
        return
    change = data_change(previous, record)
    if change:
        print(f"[{config.run_id}] warning: data.root changed since the previous attempt of this run ({change}); "
              f"resuming on the folder as it is now", flush=True)
    rd.write_config({**config.to_dict(), **record}, config.run_id)


def _record_environment(rd: RunDir, device: torch.device, step: int) -> None:
    """One row per attempt in ``environment.jsonl`` (rank 0), never truncated: where each part of the run computed."""
    if ddp.is_main():
        holder = read_lock_holder(rd.path)  # ours: it names the job that holds the run
        append_jsonl(rd.environment, [environment(device, step=step, world_size=ddp.world_size(),
                                                  job_id=str(holder.get("job_id") or "") or None)])


def data_change_of(config: Config, run_dir: Path | str, fingerprints: Fingerprints) -> str:
    """'' unless the finished run in ``run_dir`` recorded a fingerprint of its ``data.root`` in
    config.json and the folder differs now; else what changed (for the warning before it is
    skipped as done). ``fingerprints`` computes each root once per command."""
    check = getattr(get_task(config.task), "data_change_since", None)
    if check is None:
        return ""
    return check(config, read_json(Path(run_dir) / "config.json") or {}, fingerprints)


@contextlib.contextmanager
def _reproducible(device: torch.device, num_threads: int | None) -> Iterator[None]:
    """Deterministic algorithms and ``num_threads`` intra-op threads for the block; the caller's settings after."""
    deterministic, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    # On CUDA some kernels (scatter_add_ of the code counts) have no deterministic version:
    # warn there instead of failing; the CPU path stays strict and bit-reproducible.
    torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
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
        config = load_config(args.config, explicit=args.overrides)  # they win over scale=smoke
        run_dir = prepare_run_folder(args.out, config)  # checked, not made
        prepared = preflight(config.resolved(), run_dir)  # once per run: run() takes it
        check_resources(prepared.config)  # a run that cannot fit is refused before its folder exists
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
                if not args.restart and run_status(run_dir) == "done":
                    change = data_change_of(config.resolved(), run_dir, Fingerprints())
                    if change:
                        print(f"warning: {run_dir} is done and is not run again, but its data.root changed since: "
                              f"{change}. To train on the folder as it is now: --restart (the old folder goes to "
                              f"{run_dir.parent / '_sweep' / 'trash'}/, not deleted), or a new name=... or --out "
                              f"(a new folder beside the old)", flush=True)
            summary = run(config, run_dir, num_threads=args.threads, prepared=prepared)
        except RunDirError as e:  # locked by another process, or corrupt: nothing was written
            return fail(e)
        if ddp.is_main():
            print(end_line(summary), flush=True)
    return 0 if summary.get("status") == "done" else 1


if __name__ == "__main__":
    sys.exit(guarded(main))
