"""Submit a sweep: only the runs that are not done and not already queued or running, each validated
before anything is submitted, as submitit job arrays; running it again is always safe
(docs/slurm.md, "Submitting").

    python -m slurm.submit experiments/sweeps/demo.yaml                      # local, throttled
    python -m slurm.submit experiments/sweeps/gamma_frac.yaml --cluster slurm --profile gpu-example
    python -m slurm.submit SWEEP.yaml --cluster slurm --time 30 --array-parallelism 8 scale=smoke
    python -m slurm.submit SWEEP.yaml --cluster slurm --tasks 2 --cpus 1   # each run: 2 DDP ranks (gloo)
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit
import yaml

from common.cli import OneLineParser, fail, guarded
from experiments.config import ConfigError
from experiments.files import append_jsonl
from experiments.image_folder import Fingerprints
from experiments.resources import check_resources
from experiments.run_dir import RunDirError, check_writable, set_aside
from experiments.sweep import RunSpec, Sweep, SweepError, expand, load_sweep
from experiments.tasks import get_task
from experiments.train import data_change_of
from slurm.job import RunJob
from slurm.local import LocalPool, machine_cpus, machine_mem_gb, pool_size
from slurm.profiles import ProfileError, resolve_resources
from slurm.state import SweepFolder, run_states, wait_for

CLUSTERS = ("local", "debug", "slurm")
DEFAULT_MAX_ARRAY_SIZE = 1001  # SLURM's default
LOCAL_TIMEOUT_MIN = 60 * 24 * 365  # the local pool runs until its runs are done; runs have no time limit
Log = Callable[[str], None]


class SubmitError(RuntimeError):
    """The submission was refused (by us or by the scheduler); nothing was recorded as submitted."""


@dataclass
class SubmitResult:
    sweep: str
    folder: Path  # results/<sweep>
    cluster: str
    submitted: list[str] = field(default_factory=list)  # run ids
    done: list[str] = field(default_factory=list)  # skipped: already DONE
    in_flight: list[str] = field(default_factory=list)  # skipped: queued or running
    job_ids: dict[str, str] = field(default_factory=dict)  # run id -> scheduler job id
    jobs: list[Any] = field(default_factory=list)  # submitit Job objects (for tests and --wait)
    submission_dir: Path | None = None


def max_array_size() -> int:
    """The cluster's MaxArraySize: array indices must stay below it."""
    try:
        out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return DEFAULT_MAX_ARRAY_SIZE
    m = re.search(r"^MaxArraySize\s*=\s*(\d+)", out, flags=re.MULTILINE)
    return int(m.group(1)) if m else DEFAULT_MAX_ARRAY_SIZE


@contextlib.contextmanager
def sweep_lock(folder: SweepFolder) -> Iterator[None]:
    """Two submits of one sweep at the same moment take turns: check-then-record is one step."""
    folder.meta.mkdir(parents=True, exist_ok=True)
    with open(folder.meta / "submit.lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + f"-{time.time_ns() % 10**6:06d}"


def _chunks(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def _run_jobs(todo: Sequence[RunSpec], root: Path, threads: int | None) -> list[RunJob]:
    return [RunJob(spec.config.to_dict(), str(root / spec.run_id), threads) for spec in todo]


def slurm_executor(subdir: Path, params: dict[str, Any], *, name: str,
                   array_parallelism: int | None = None) -> submitit.AutoExecutor:
    """The executor that sbatches the runs: one job per run, ``tasks_per_node`` tasks (DDP ranks) each.

    ``array_parallelism`` (runs of one array at once) wins over the resources' own.
    """
    params = dict(params)
    cap = int(params.pop("slurm_array_parallelism", 64))
    # how many timeouts/preemptions a run may requeue after (submitit's default: 3); a constructor argument
    requeues = int(params.pop("slurm_max_num_timeout", 3))
    try:
        executor = submitit.AutoExecutor(folder=subdir / "%j", cluster="slurm", slurm_max_num_timeout=requeues)
    except RuntimeError as e:
        raise SubmitError(f"--cluster slurm: {e} (srun is not on PATH). Use --cluster local, or start the "
                          f"local test cluster: bash slurm/local-cluster.sh install && bash slurm/local-cluster.sh start"
                          ) from None
    try:
        executor.update_parameters(name=name, slurm_array_parallelism=array_parallelism or cap, **params)
    except (NameError, ValueError, AssertionError) as e:
        raise SubmitError(f"submitit rejected the resources {params}: {e}") from None
    return executor


def refuse_multi_task(cluster: str, params: dict[str, Any]) -> None:
    """Only SLURM starts the several processes of a data-parallel run; the local pool and debug run one."""
    tasks, nodes = int(params.get("tasks_per_node") or 1), int(params.get("nodes") or 1)
    if cluster != "slurm" and tasks * nodes > 1:
        why = f"tasks={tasks}" + (f" (from gpus={params['gpus_per_node']})" if params.get("gpus_per_node") else "")
        raise SubmitError(
            f"--cluster {cluster}: each run asks for {tasks * nodes} processes ({why}, nodes={nodes}), a "
            f"data-parallel run, which only --cluster slurm starts (one srun task per rank). Use --cluster slurm, "
            f"or --tasks 1 (and at most --gpus 1) to train each run in one process on the same global batch")


def refuse_local_overreach(cluster: str, params: dict[str, Any]) -> None:
    """--cluster local runs on this machine: a request larger than it is refused before anything is written."""
    if cluster != "local":
        return
    cpus = int(params.get("cpus_per_task", 1))
    if cpus > machine_cpus():
        raise SubmitError(f"--cluster local: each run asks for {cpus} cpus but this machine has {machine_cpus()}; "
                          f"lower --cpus (or the profile's 'cpus')")
    mem = params.get("mem_gb")
    if mem and mem > machine_mem_gb():
        raise SubmitError(f"--cluster local: each run asks for {mem:g} GB but this machine has {machine_mem_gb():.1f} GB; "
                          f"lower --mem (or the profile's 'memory')")


def _submit_slurm(todo: Sequence[RunSpec], folder: SweepFolder, subdir: Path, params: dict[str, Any],
                  name: str, log: Log) -> tuple[list[Any], str]:
    """(the jobs submitted, in the order of ``todo``; an error if sbatch refused an array, else '')."""
    cap = int(params.get("slurm_array_parallelism", 64))
    chunk = max(1, max_array_size())
    parts = _chunks(list(todo), chunk)
    # the cap is for the whole sweep: split it between the arrays when MaxArraySize forces several
    per_array = max(1, cap // len(parts))
    executor = slurm_executor(subdir, params, name=name, array_parallelism=per_array)
    jobs: list[Any] = []
    for i, part in enumerate(parts):
        try:
            jobs += executor.submit_array(_run_jobs(part, folder.root, params.get("cpus_per_task")))
        except Exception as e:  # submitit wraps sbatch's stderr in FailedJobError / FailedSubmissionError
            lines = [ln.strip() for ln in str(e).splitlines() if "error" in ln.lower()] or [str(e).strip()]
            already = f" ({len(jobs)} runs in earlier arrays were submitted)" if jobs else ""
            asked = {k: params[k] for k in ("tasks_per_node", "cpus_per_task", "mem_gb", "gpus_per_node",
                                            "slurm_partition", "timeout_min", "slurm_constraint") if k in params}
            # the arrays before it are queued: the caller records them before it raises this
            return jobs, (f"sbatch refused the job array {i + 1}/{len(parts)}{already}: {' | '.join(lines)}\n"
                          f"  requested per run: {asked}\n  lower the request (--tasks, --cpus, --mem, --gpus, --time) "
                          f"or choose another --partition/--profile that has such nodes")
        log(f"[submit] array {jobs[-1].job_id.split('_')[0]}: {len(part)} runs, at most {per_array} at once")
    return jobs, ""


def _submit_local(todo: Sequence[RunSpec], folder: SweepFolder, subdir: Path, params: dict[str, Any],
                  log: Log) -> tuple[Any, int]:
    cpus, mem = int(params.get("cpus_per_task", 1)), params.get("mem_gb")
    workers = pool_size(len(todo), cpus, params.get("slurm_array_parallelism"), mem)
    executor = submitit.AutoExecutor(folder=subdir, cluster="local")
    # trap: Ctrl-C on `submit --wait` only stops the waiting; the sweep is stopped by `kill <job pid>` (LocalPool).
    # exec: the pool must not hold the submitter's stdout, or `submit | tee` would wait for the sweep
    detach = f"exec </dev/null >>{shlex.quote(str(subdir / 'controller.log'))} 2>&1"
    executor.update_parameters(timeout_min=LOCAL_TIMEOUT_MIN, local_setup=["trap '' INT", detach])
    pool = LocalPool([(spec.config.to_dict(), str(folder.root / spec.run_id)) for spec in todo],
                     workers=workers, cpus_per_run=cpus, log_dir=str(subdir / "runs"),
                     pool_lock=str(subdir / "pool.lock"))
    job = executor.submit(pool)
    log(f"[submit] local pool (pid {job.job_id}): {len(todo)} runs, {workers} at a time, {cpus} cpu(s) each "
        f"(machine: {machine_cpus()} cpus); log {job.paths.stdout}; stop them with: kill {job.job_id}")
    return job, workers


def warn_changed_data(done: Sequence[RunSpec], folder: SweepFolder, log: Log) -> None:
    """One warning per ``data.root`` whose done runs (skipped) recorded a fingerprint that the folder no
    longer matches, with how to re-run them. Each root is walked and stat'ed once however many runs
    read it (``experiments.image_folder.Fingerprints``); runs without ``data.root`` cost nothing."""
    fingerprints = Fingerprints()
    changed: dict[str, list[tuple[str, str]]] = {}
    for spec in done:
        change = data_change_of(spec.config.resolved(), folder.root / spec.run_id, fingerprints)
        if change:
            changed.setdefault(str(spec.config.data.root), []).append((spec.run_id, change))
    for root, found in changed.items():
        ids = " ".join(run_id for run_id, _ in found)
        log(f"[submit] warning: data.root={root} changed since {len(found)} done run(s) read it ({found[0][1]}); "
            f"they are skipped as done: {ids}. To train them on the folder as it is now: --force (their old "
            f"folders go to {folder.meta / 'trash'}/, not deleted; with --only RUN_ID for some), or a new "
            f"name=... (a new sweep folder beside the old)")


def check_results_root(results: str | Path, write: bool = True) -> Path:
    """The results root, resolved; SubmitError if it is a file (or, to write, cannot be created)."""
    root = Path(results)
    if root.exists() and not root.is_dir():
        raise SubmitError(f"--results {root} is a file, not a folder; give the folder that holds the sweep folders")
    if write:
        try:
            check_writable(root, "--results")
        except RunDirError as e:
            raise SubmitError(str(e)) from None
    return root.resolve()


def _memory_limit(cluster: str, params: dict[str, Any]) -> tuple[int | None, str]:
    """What a run may use: the requested memory if any, else this machine's (local, debug) or no limit."""
    if params.get("mem_gb"):
        return int(float(params["mem_gb"]) * 2**30), f"the requested --mem {params['mem_gb']:g} GB"
    if cluster == "slurm":
        return 2**62, "the cluster"  # its nodes are unknown here; sbatch refuses what none has
    return None, "this machine"


def submit_sweep(sweep: Sweep | str | Path, *, cluster: str = "local", results: str | Path = "results",
                 overrides: Sequence[str] = (), dry_run: bool = False, force: bool = False,
                 only: Sequence[str] | None = None, profile: str | None = None,
                 resources: dict[str, Any] | None = None, log: Log = print, command: str | None = None
                 ) -> SubmitResult:
    """Validate every run of the sweep, then submit the ones that are neither DONE nor in flight."""
    if not isinstance(sweep, Sweep):
        sweep = load_sweep(sweep)
    runs = expand(sweep, overrides)  # raises SweepError naming every bad run and field
    if only:
        known = {r.run_id for r in runs}
        unknown = sorted(set(only) - known)
        if unknown:
            raise SubmitError(f"--only: run id(s) {unknown} are not in sweep {sweep.name!r} "
                              f"(with overrides {list(overrides)}); its runs: {sorted(known)}")
        runs = [r for r in runs if r.run_id in set(only)]
    return submit_runs(sweep.name, runs, sweep.resources, cluster=cluster, results=results, overrides=overrides,
                       dry_run=dry_run, force=force, profile=profile, resources=resources, log=log, command=command)


def missing_inputs(runs: Sequence[RunSpec], sweep_folder: Path) -> list[str]:
    """What each run's task needs beside its config and cannot find (a prior's ``data.tokenizer_run``,
    looked up beside the results root), as ``run_id (point): reason`` lines; [] when all is there."""
    problems = []
    for spec in runs:
        task = get_task(spec.config.task)
        if hasattr(task, "resolve_inputs"):
            try:
                task.resolve_inputs(spec.config.resolved(), sweep_folder / spec.run_id)
            except ConfigError as e:
                problems.append(f"{spec.run_id} ({spec.label()}): {e}")
    return problems


def submit_runs(name: str, runs: Sequence[RunSpec], sweep_resources: dict[str, Any], *, cluster: str = "local",
                results: str | Path = "results", overrides: Sequence[str] = (), dry_run: bool = False,
                force: bool = False, profile: str | None = None, resources: dict[str, Any] | None = None,
                log: Log = print, command: str | None = None) -> SubmitResult:
    """Submit those of ``runs`` (validated configs of sweep ``name``) that are neither DONE nor in flight.
    ``command``: the command line that asked for them, recorded with each run in ``_sweep/jobs.jsonl``."""
    if cluster not in CLUSTERS:
        raise SubmitError(f"unknown cluster {cluster!r}; choose one of {list(CLUSTERS)}")
    profile_name, params = resolve_resources(sweep_resources, profile, resources)
    refuse_multi_task(cluster, params)  # before anything is written
    refuse_local_overreach(cluster, params)
    # absolute: jobs may start in another working directory (a cluster's --chdir, a login node's $HOME)
    for spec in runs:  # refused before anything is written: a run that cannot fit never reaches a queue
        check_resources(spec.config, *_memory_limit(cluster, params))
    folder = SweepFolder(check_results_root(results, write=not dry_run) / name)
    result = SubmitResult(sweep=name, folder=folder.root, cluster=cluster)
    missing = missing_inputs(runs, folder.root)  # e.g. a prior's tokenizer run that is not finished yet
    if missing and not dry_run:
        raise SubmitError(f"{len(missing)} of {len(runs)} runs cannot start; nothing was submitted:\n  "
                          + "\n  ".join(missing[:10]) + (f"\n  ... and {len(missing) - 10} more" if len(missing) > 10 else ""))
    for line in missing:
        log(f"[submit] would be refused: {line}")

    # a dry run only reads: it takes no lock and creates nothing
    with sweep_lock(folder) if not dry_run else contextlib.nullcontext():
        states = {s.run_id: s for s in run_states(folder, [r.run_id for r in runs])}
        todo: list[RunSpec] = []
        corrupt: list[RunSpec] = []
        for spec in runs:
            state = states[spec.run_id].state
            if state in ("pending", "running"):
                result.in_flight.append(spec.run_id)  # never twice, --force or not
            elif state == "done" and not force:
                result.done.append(spec.run_id)
            else:
                todo.append(spec)
                if state == "corrupt":
                    corrupt.append(spec)
                    log(f"[submit] {spec.run_id} is corrupt ({states[spec.run_id].detail}): its folder goes to "
                        f"{folder.meta / 'trash'}/ and the run starts over")
        warn_changed_data([spec for spec in runs if spec.run_id in set(result.done)], folder, log)
        log(f"[submit] sweep {name!r}: {len(runs)} runs ({len(result.done)} done, {len(result.in_flight)} "
            f"queued or running, {len(todo)} to submit) -> {folder.root} [cluster {cluster}, profile "
            f"{profile_name}: {params}]")
        if dry_run:
            for spec in todo:
                log(f"  would submit {spec.run_id}  {spec.label()}")
            return result
        folder.add_runs({r.run_id: {"index": i, "point": dict(r.point), "overrides": list(overrides),
                                    "config": r.config.to_dict()} for i, r in enumerate(runs)},
                        {"name": name, "resources": dict(sweep_resources)})
        if not todo:
            log("[submit] nothing to submit")
            return result
        stamp = _stamp()
        # start from scratch, keeping the old folders aside rather than deleting results
        for spec in todo if force else corrupt:
            if (folder.root / spec.run_id).exists():
                set_aside(folder.root / spec.run_id)
        subdir = folder.submissions / stamp  # fresh: SLURM job ids restart at 1 on a new cluster
        result.submission_dir = subdir
        now = time.time()
        records: list[dict[str, Any]] = []
        error = ""
        if cluster == "slurm":
            jobs, error = _submit_slurm(todo, folder, subdir, dict(params), name, log)
            result.jobs = jobs
            todo = todo[:len(jobs)]
            records = [{"run_id": spec.run_id, "cluster": cluster, "job_id": job.job_id,
                        "folder": str(job.paths.folder), "time": now} for spec, job in zip(todo, jobs, strict=True)]
        elif cluster == "local":
            job, _ = _submit_local(todo, folder, subdir, params, log)
            result.jobs = [job]
            records = [{"run_id": spec.run_id, "cluster": cluster, "job_id": job.job_id, "folder": str(subdir),
                        "pool_lock": str(subdir / "pool.lock"), "time": now} for spec in todo]
        else:
            executor = submitit.AutoExecutor(folder=subdir, cluster="debug")
            jobs = [executor.submit(job) for job in _run_jobs(todo, folder.root, None)]
            result.jobs = jobs
            records = [{"run_id": spec.run_id, "cluster": cluster, "job_id": job.job_id, "folder": str(subdir),
                        "time": now} for spec, job in zip(todo, jobs, strict=True)]
        if records:  # recorded before debug runs, so status sees them
            if command is not None:  # how the run was made, for analysis (it reads this file, not the sweep file)
                records = [{**r, "command": command} for r in records]
            append_jsonl(folder.jobs_jsonl, records, sort_keys=True)
        result.submitted = [spec.run_id for spec in todo]
        result.job_ids = {r["run_id"]: r["job_id"] for r in records}
        if error:
            raise SubmitError(error)

    if cluster == "debug":  # in-process, one after the other, outside the sweep lock
        for i, (spec, job) in enumerate(zip(todo, result.jobs, strict=True)):
            log(f"[submit] debug {i + 1}/{len(todo)}: {spec.run_id} {spec.label()}")
            summary = job.result()
            log(f"[submit] debug {spec.run_id}: {summary.get('status')} {summary.get('reason') or ''}".rstrip())
    else:
        log(f"[submit] submitted {len(todo)} runs; follow with: python -m slurm.status {folder.root}")
    return result


def resource_args(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("time", "gpus", "tasks", "cpus", "partition", "account", "qos", "constraint", "array_parallelism"):
        if getattr(args, key) is not None:
            out[key] = getattr(args, key)
    if args.mem is not None:
        out["memory"] = args.mem
    if args.setup:
        out["setup"] = args.setup
    for item in args.resource or ():
        key, sep, raw = item.partition("=")
        if not sep:
            raise SubmitError(f"--resource {item!r} must look like KEY=VALUE, e.g. slurm_exclude=node3")
        out[key] = yaml.safe_load(raw)
    return out


def add_submit_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by slurm.submit and slurm.status --resubmit."""
    parser.add_argument("--cluster", choices=CLUSTERS, default="local",
                        help="local: this machine, throttled to its CPUs (default); slurm: sbatch job arrays; "
                             "debug: in-process, one run after the other")
    parser.add_argument("--results", type=Path, default=Path("results"), help="results root (default: results)")
    parser.add_argument("--profile", help="cluster profile in slurm/profiles/ (default: the sweep's, else 'default')")
    parser.add_argument("--wait", action="store_true", help="follow the sweep until no run is queued or running")
    res = parser.add_argument_group("resource overrides (win over the sweep's resources and the profile)")
    res.add_argument("--time", help="minutes, or [D-]HH:MM:SS")
    res.add_argument("--gpus", type=int, help="GPUs per run")
    res.add_argument("--tasks", type=int,
                     help="processes per run, one DDP rank each (default: --gpus when > 1); --cluster slurm only")
    res.add_argument("--cpus", type=int, help="CPUs per task (also its torch threads)")
    res.add_argument("--mem", help="memory per run in GB, or 512M / 16G")
    res.add_argument("--partition")
    res.add_argument("--account")
    res.add_argument("--qos")
    res.add_argument("--constraint")
    res.add_argument("--array-parallelism", type=int, help="runs of this sweep at once")
    res.add_argument("--setup", action="append", help="a shell line run before each job (repeatable)")
    res.add_argument("--resource", action="append", metavar="KEY=VALUE",
                     help="any submitit parameter verbatim, e.g. slurm_exclude=node3 (repeatable)")


def split_overrides(only: list[str] | None, overrides: list[str]) -> tuple[list[str] | None, list[str]]:
    """``--only a b key=v``: argparse cannot tell run ids from trailing overrides; '=' can."""
    if only is None:
        return None, overrides
    return [x for x in only if "=" not in x], [*overrides, *(x for x in only if "=" in x)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m slurm.submit", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("sweep", type=Path, help="sweep file, e.g. experiments/sweeps/demo.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides for every run, e.g. scale=smoke")
    parser.add_argument("--dry-run", action="store_true", help="validate and list what would be submitted")
    parser.add_argument("--force", action="store_true",
                        help="start the selected runs from scratch, DONE ones included (old folders go to _sweep/trash)")
    parser.add_argument("--only", nargs="+", metavar="RUN_ID", help="submit only these runs")
    add_submit_options(parser)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_intermixed_args(argv)
    only, overrides = split_overrides(args.only, args.overrides)
    try:
        result = submit_sweep(args.sweep, cluster=args.cluster, results=args.results, overrides=overrides,
                              dry_run=args.dry_run, force=args.force, only=only, profile=args.profile,
                              resources=resource_args(args),
                              command=shlex.join(["python", "-m", "slurm.submit", *argv]))
    except (SweepError, ConfigError, ProfileError, SubmitError) as e:
        return fail(e)
    if args.wait and not args.dry_run and args.cluster != "debug":
        counts = wait_for(SweepFolder(result.folder), [*result.submitted, *result.in_flight, *result.done])
        return 0 if counts["failed"] + counts["cancelled"] + counts["missing"] == 0 else 1
    return 0


if __name__ == "__main__":
    sys.exit(guarded(main))
