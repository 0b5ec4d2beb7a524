"""How long loading a sweep takes: 1,000 runs x 1,000 logged steps (issue 30: JSON lines only, cold <= 5 s, warm <= 1 s).

Writes synthetic run folders (docs/ARCHITECTURE.md layout) into a temp folder, then times
``analysis.load_runs`` and ``analysis.load_metrics`` with an empty cache ("cold") and with the
cache filled by the previous call ("warm"). Cold is measured twice: on finished runs as the
trainer leaves them (``metrics.parquet`` beside ``metrics.jsonl``, ``experiments.run_dir.
compact_metrics``) and on JSON logs alone (runs still going, or written before compaction
existed), parsed by Arrow's JSON reader. The OS page cache is warm in all: the cold numbers
measure parsing, not the disk. ``cpu_seconds`` (this process and the pool's
workers) is the work done, which unlike wall time does not grow when the machine is shared;
``load_avg_1min`` (taken after each row's measurement) says how shared it was.

    python benchmarks/load_runs.py [--runs 1000] [--steps 1000] [--out results/benchmarks/load_runs.csv]
"""

from __future__ import annotations

import json
import os
import platform
import random
import resource
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pandas as pd
import pyarrow as pa

import analysis
from common.cli import OneLineParser, fail, guarded
from experiments.files import atomic_write
from experiments.run_dir import COMPACT_METRICS, RunDirError, check_writable, compact_metrics

# Distinct metrics files written round-robin: parsing cost is what matters, not uniqueness.
N_TEMPLATES = 8


def metrics_text(steps: int, rng: random.Random, val_every: int = 50) -> str:
    """One quantizer row and one train row per step, a val row every ``val_every`` steps."""
    lines = []
    for step in range(steps):
        usage = rng.random()
        lines.append(json.dumps({
            "step": step, "kind": "quantizer", "layer": "quantizer", "codebook": 0, "mode": "train",
            "codebook_size": 1024, "per_sample_entropy": rng.random(), "batch_entropy": 6.9 * usage,
            "commitment": rng.random() / 10, "aux_loss": rng.random() / 100, "codes_used": int(usage * 1024),
            "perplexity": usage * 900, "usage_fraction": usage, "dead_codes": 1024 - int(usage * 1024),
            "bit_balance_mad": float("nan") if step % 7 == 0 else rng.random(),
        }))
        lines.append(json.dumps({"step": step, "kind": "train", "loss": rng.random(), "recon_loss": rng.random(),
                                 "aux_loss": rng.random() / 100, "lr": 1e-3}))
        if step % val_every == 0:
            lines.append(json.dumps({"step": step, "kind": "val", "val_mse": rng.random(), "val_psnr": 20 + rng.random()}))
    return "\n".join(lines) + "\n"


def write_sweep(root: Path, runs: int, steps: int) -> int:
    """``runs`` finished run folders under ``root``, compacted as the trainer does; returns the bytes of
    metrics written."""
    rng = random.Random(0)
    templates = [metrics_text(steps, rng) for _ in range(N_TEMPLATES)]
    total = 0
    for i in range(runs):
        gamma, frac, seed = [0.0, 0.25, 0.5, 1.0, 2.0][i % 5], [0.25, 0.5, 1.0][(i // 5) % 3], i // 15
        run_id = f"run{i:05d}"
        run_dir = root / "bench" / run_id
        run_dir.mkdir(parents=True)
        config = {"name": "bench", "task": "synthetic", "seed": seed, "scale": "full",
                  "quantizer": {"kind": "lfq", "codebook_size": 1024, "diversity_gamma": gamma,
                                "frac_per_sample_entropy": frac},
                  "schedule": {"steps": steps}, "run_id": run_id}
        (run_dir / "config.json").write_text(json.dumps(config))
        text = templates[i % N_TEMPLATES]
        (run_dir / "metrics.jsonl").write_text(text)
        if i < N_TEMPLATES:
            compact_metrics(run_dir)
        else:  # the same rows: a copy of the compaction of the same text (its metadata is the text's size)
            shutil.copyfile(root / "bench" / f"run{i % N_TEMPLATES:05d}" / COMPACT_METRICS, run_dir / COMPACT_METRICS)
        total += len(text)
        summary = {"run_id": run_id, "status": "done", "reason": None, "step": steps, "wall_time_s": 1.0,
                   "final_usage_fraction": rng.random(), "final_val_mse": rng.random()}
        (run_dir / "summary.json").write_text(json.dumps(summary))
        (run_dir / "DONE").write_text("")
    return total


def cpu_seconds() -> float:
    """CPU time of this process and its reaped children (the pool's workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - start, out


def write_csv_atomic(frame: pd.DataFrame, target: Path) -> None:
    atomic_write(target, lambda f: frame.to_csv(f, index=False))


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python benchmarks/load_runs.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of each warm measurement (median)")
    parser.add_argument("--cold-repeats", type=int, default=1, help="timed repeats of the cold load (each parses everything)")
    parser.add_argument("--out", type=Path, default=Path("results/benchmarks/load_runs.csv"))
    args = parser.parse_args(argv)
    for name in ("runs", "steps", "repeats", "cold_repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
    if args.out.is_dir():
        parser.error(f"--out {args.out}: give a .csv file path, e.g. results/benchmarks/load_runs.csv")
    try:  # before minutes of work: the table must be writable
        check_writable(args.out.parent, "--out")
    except RunDirError as e:
        return fail(e)

    work = Path(tempfile.mkdtemp(prefix="lfq-load-bench-"))
    try:
        t_write, nbytes = timed(write_sweep, work / "results", args.runs, args.steps)
        print(f"wrote {args.runs} runs x {args.steps} steps ({nbytes / 1e6:.0f} MB of metrics) in {t_write:.1f} s")
        results, cache = work / "results", work / "cache"
        rows = []
        warnings.simplefilter("error", analysis.LoadWarning)  # the synthetic sweep must load cleanly

        def measure(label: str, state: str, fn) -> None:
            times, cpu = [], []
            repeats = args.cold_repeats if state == "cold" else args.repeats
            for _ in range(repeats):
                if state == "cold":
                    shutil.rmtree(cache, ignore_errors=True)
                cpu_start = cpu_seconds()
                seconds, out = fn()
                times.append(seconds)
                cpu.append(cpu_seconds() - cpu_start)
            rows.append({"what": label, "cache": state, "runs": args.runs, "steps": args.steps,
                         "rows": len(out), "seconds_median": statistics.median(times),
                         "seconds_min": min(times), "cpu_seconds_median": statistics.median(cpu),
                         "repeats": repeats, "load_avg_1min": round(os.getloadavg()[0], 2)})

        def runs_then_metrics(workers: int | None = None):
            start = time.perf_counter()
            runs = analysis.load_runs(results)
            metrics = analysis.load_metrics(runs, cache=cache, workers=workers)
            return time.perf_counter() - start, metrics

        def without_compaction() -> None:
            for path in results.glob(f"bench/*/{COMPACT_METRICS}"):
                path.rename(path.with_name(".metrics.parquet.aside"))

        pool = min(8, os.cpu_count() or 1)  # what load_metrics uses by default for this many files
        measure("load_runs", "n/a", lambda: timed(analysis.load_runs, results))
        measure("load_runs + load_metrics, finished runs (metrics.parquet), 1 thread", "cold",
                lambda: runs_then_metrics(workers=1))
        measure(f"load_runs + load_metrics, finished runs (metrics.parquet), {pool} threads (default)", "cold",
                runs_then_metrics)
        measure("load_runs + load_metrics, finished runs (metrics.parquet)", "warm", runs_then_metrics)
        without_compaction()
        measure("load_runs + load_metrics, JSON only, 1 thread", "cold", lambda: runs_then_metrics(workers=1))
        measure(f"load_runs + load_metrics, JSON only, {pool} threads (default)", "cold", runs_then_metrics)
        measure(f"load_runs + load_metrics, JSON only, {pool} processes", "cold",
                lambda: runs_then_metrics(workers=pool))
        measure("load_runs + load_metrics, JSON only", "warm", runs_then_metrics)
        measure("load_metrics kinds=quantizer, JSON only", "warm",
                lambda: timed(analysis.load_metrics, results, kinds=["quantizer"], cache=cache))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    table = pd.DataFrame(rows)
    table["python"] = platform.python_version()
    table["pandas"] = pd.__version__
    table["cpus"] = os.cpu_count()
    table["torch_threads_env"] = os.environ.get("OMP_NUM_THREADS", "")
    table["arrow_cpu_count"] = pa.cpu_count()
    # The machine may be shared: the 1-minute load average says how contended each row's timings were.
    table = table[[c for c in table if c != "load_avg_1min"] + ["load_avg_1min"]]
    print(table.drop(columns=["python", "pandas"]).to_string(index=False, float_format="%.2f"))
    write_csv_atomic(table, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(guarded(main))
