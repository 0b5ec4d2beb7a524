"""Is data loading ever the bottleneck? The images task on a folder of generated 256-px JPEGs.

    python benchmarks/data_loading.py                 # 10,000 JPEGs, 2 workers; results/benchmarks/data_loading.csv
    python benchmarks/data_loading.py --images 500 --steps 40   # quicker

Generates the folder once (smooth random colour fields with noise, so the JPEGs have natural
sizes, about 10-20 KB), then trains ``experiments/configs/images.yaml`` on it with
``data.root`` set, for each worker count asked, and reads the throughput columns of the run's
``metrics.jsonl``: ``data_wait_s`` (time the step waited for its batch) over ``step_time_s``.
The target is a wait of at most 5 % of the step with 2 workers. It also measures the loader
alone (images per second, no training) for the same settings.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from experiments.files import atomic_write_csv  # noqa: E402

OUT = REPO / "results" / "benchmarks" / "data_loading.csv"


def make_folder(folder: Path, count: int, size: int = 256) -> Path:
    from PIL import Image

    stamp = folder / f".complete-{count}-{size}"
    if stamp.exists():
        return folder
    rng = np.random.default_rng(0)
    for i in range(count):
        path = folder / f"class{i % 100:03d}" / f"img{i:05d}.jpg"
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        image = np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC), dtype=np.int16)
        image = np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(path, quality=90)
        if (i + 1) % 2000 == 0:
            print(f"generated {i + 1}/{count} JPEGs", flush=True)
    stamp.touch()
    return folder


def loader_only(folder: Path, workers: int, resolution: int, batch: int, batches: int) -> float:
    """Images per second of the training loader alone."""
    import torch

    from experiments.config import load_config
    from experiments.tasks.images import FolderImages

    config = load_config(REPO / "experiments" / "configs" / "images.yaml",
                         [f"data.root={folder}", f"data.resolution={resolution}", f"data.batch_size={batch}",
                          f"runtime.num_workers={workers}", f"schedule.steps={batches}"])
    data = FolderImages(config)
    it = iter(data.train_loader(config, torch.device("cpu"), 0, slice(None)))
    next(it)  # workers up
    t0 = time.perf_counter()
    n = sum(len(next(it)[0]) for _ in range(batches - 1))
    return n / (time.perf_counter() - t0)


def train(folder: Path, workers: int, steps: int, resolution: int, batch: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "experiments.train", str(REPO / "experiments" / "configs" / "images.yaml"),
               f"data.root={folder}", f"data.resolution={resolution}", f"data.batch_size={batch}",
               f"runtime.num_workers={workers}", f"schedule.steps={steps}", f"schedule.val_every={steps}",
               "logging.log_every=10", "data.val_size=64", "--out", out, "--threads", str(threads)]
        subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
        (run_dir,) = [p for p in Path(out).iterdir() if p.is_dir()]
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r.get("kind") == "train"][1:]  # the first interval holds start-up
    step = statistics.median(r["step_time_s"] for r in train_rows)
    wait = statistics.median(r["data_wait_s"] for r in train_rows)
    return {"step_time_s": round(step, 4), "data_wait_s": round(wait, 5), "wait_share": round(wait / step, 4)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--folder", type=Path, default=Path(tempfile.gettempdir()) / "lfq-suite-jpegs")
    parser.add_argument("--workers", default="0,2", help="comma-separated worker counts")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the training process")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    if args.images < 10 or args.steps < 30:
        parser.error("--images must be >= 10 and --steps >= 30 (the first interval is dropped)")
    folder = make_folder(args.folder / str(args.images), args.images)
    load = os.getloadavg()[0]
    rows = []
    for workers in (int(w) for w in args.workers.split(",")):
        row = {"images": args.images, "workers": workers, "resolution": args.resolution, "batch": args.batch,
               "threads": args.threads, "load_1min_before": round(load, 2),
               "loader_images_per_s": round(loader_only(folder, workers, args.resolution, args.batch, 30), 1),
               **train(folder, workers, args.steps, args.resolution, args.batch, args.threads)}
        row["needed_images_per_s"] = round(args.batch / row["step_time_s"], 1)
        rows.append(row)
        print(row, flush=True)
    atomic_write_csv(args.out, rows)
    print(f"\n{'workers':>7} {'step s':>8} {'wait s':>8} {'wait %':>7} {'loader img/s':>13} {'needed img/s':>13}")
    for r in rows:
        print(f"{r['workers']:>7} {r['step_time_s']:>8} {r['data_wait_s']:>8} {100 * r['wait_share']:>6.1f}% "
              f"{r['loader_images_per_s']:>13} {r['needed_images_per_s']:>13}")
    print(f"wrote {args.out} (machine: {os.cpu_count()} CPUs, load {load:.2f} before)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
