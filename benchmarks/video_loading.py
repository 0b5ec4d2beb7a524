"""Is video decoding ever the bottleneck? The video task on a folder of generated 10-second mp4 files.

    python benchmarks/video_loading.py                    # 1,000 files, 2 workers; results/benchmarks/video_loading.csv
    python benchmarks/video_loading.py --videos 100 --steps 40     # quicker

Generates the folder once (cached; ``--folder``): 256 x 256 H.264 files (libx264, yuv420p,
25 fps, a keyframe every 25 frames), 10 seconds each, of a textured background panning under
moving squares with a little noise. Then trains ``experiments/configs/video.yaml`` (the tiny causal
3D tokenizer) on it with ``data.root`` set, for each worker count asked, and reads the throughput
columns of the run's ``metrics.jsonl``: ``data_wait_s`` (time the step waited for its batch) over
``step_time_s``. The target is a wait of at most 5 % of the step with 2 workers. It also measures
the loader alone (clips per second, no training) for the same settings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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

OUT = REPO / "results" / "benchmarks" / "video_loading.csv"
CONFIG = REPO / "experiments" / "configs" / "video.yaml"
FPS, SECONDS = 25, 10


def write_video(path: Path, seed: int, side: int = 256) -> None:
    import av
    from PIL import Image

    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (8, 16, 3), dtype=np.uint8)
    texture = np.asarray(Image.fromarray(coarse).resize((2 * side, side), Image.Resampling.BICUBIC))
    squares = [(rng.uniform(0, side, 2), rng.uniform(-3, 3, 2), rng.integers(0, 256, 3), int(rng.integers(16, 64)))
               for _ in range(3)]
    tmp = path.with_name(f".{path.name}.tmp.mp4")
    with av.open(str(tmp), "w") as container:
        stream = container.add_stream("libx264", rate=FPS, options={"preset": "veryfast", "g": str(FPS)})
        stream.width = stream.height = side
        stream.pix_fmt = "yuv420p"
        for t in range(FPS * SECONDS):
            shift = int(t * side / (FPS * SECONDS))
            frame = texture[:, shift:shift + side].copy()
            for start, velocity, colour, size in squares:
                x, y = ((start + velocity * t) % (side - size)).astype(int)
                frame[y:y + size, x:x + size] = colour
            frame = np.clip(frame + rng.normal(0, 4, frame.shape), 0, 255).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    tmp.replace(path)


def make_folder(folder: Path, count: int) -> tuple[Path, float]:
    """The folder, and the seconds this call spent generating (0 when it was cached)."""
    stamp = folder / f".complete-{count}"
    if stamp.exists():
        return folder, 0.0
    t0 = time.perf_counter()
    for i in range(count):
        path = folder / f"class{i % 20:02d}" / f"video{i:04d}.mp4"
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        write_video(path, i)
        if (i + 1) % 50 == 0:
            rate = (time.perf_counter() - t0) / (i + 1)
            print(f"generated {i + 1}/{count} videos ({rate:.2f} s each)", flush=True)
    stamp.touch()
    return folder, time.perf_counter() - t0


def overrides(folder: Path, workers: int, steps: int, batch: int) -> list[str]:
    return [f"data.root={folder}", f"data.batch_size={batch}", f"runtime.num_workers={workers}",
            f"schedule.steps={steps}", f"schedule.val_every={steps}", f"schedule.checkpoint_every={steps}",
            "logging.log_every=10", "data.val_size=16"]


def loader_only(folder: Path, workers: int, batch: int, batches: int) -> float:
    """Clips per second of the training loader alone."""
    import torch

    from experiments.config import load_config
    from experiments.tasks.video import FolderVideos

    config = load_config(CONFIG, overrides(folder, workers, batches, batch))
    data = FolderVideos(config)
    it = iter(data.train_loader(config, torch.device("cpu"), 0, slice(None)))
    next(it)  # workers up
    t0 = time.perf_counter()
    n = sum(len(next(it)[0]) for _ in range(batches - 1))
    return n / (time.perf_counter() - t0)


def train(folder: Path, workers: int, steps: int, batch: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "experiments.train", str(CONFIG), *overrides(folder, workers, steps, batch),
               "--out", out, "--threads", str(threads)]
        subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
        (run_dir,) = [p for p in Path(out).iterdir() if p.is_dir()]
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r.get("kind") == "train"][1:]  # the first interval holds start-up
    step = statistics.median(r["step_time_s"] for r in train_rows)
    wait = statistics.median(r["data_wait_s"] for r in train_rows)
    return {"step_time_s": round(step, 4), "data_wait_s": round(wait, 5), "wait_share": round(wait / step, 4)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=1000)
    parser.add_argument("--folder", type=Path, default=Path(tempfile.gettempdir()) / "lfq-suite-videos")
    parser.add_argument("--workers", default="2", help="comma-separated worker counts")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the training process")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--note", default="", help="a remark kept in the CSV's note column")
    args = parser.parse_args(argv)
    if args.videos < 10 or args.steps < 30:
        parser.error("--videos must be >= 10 and --steps >= 30 (the first interval is dropped)")
    folder, generated_s = make_folder(args.folder / str(args.videos), args.videos)
    if generated_s:
        print(f"generated {args.videos} videos in {generated_s:.0f} s", flush=True)
    load = os.getloadavg()[0]
    rows = []
    for workers in (int(w) for w in args.workers.split(",")):
        row = {"videos": args.videos, "seconds_each": SECONDS, "side_px": 256, "workers": workers,
               "batch": args.batch, "frames": 9, "resolution": 32, "threads": args.threads,
               "machine": f"{platform.machine()} {os.cpu_count()} CPUs", "load_1min_before": round(load, 2),
               "loader_clips_per_s": round(loader_only(folder, workers, args.batch, 20), 2),
               **train(folder, workers, args.steps, args.batch, args.threads)}
        row["needed_clips_per_s"] = round(args.batch / row["step_time_s"], 2)
        row["load_1min_after"] = round(os.getloadavg()[0], 2)
        row["generation_s"] = round(generated_s, 1)  # 0: the folder was already there
        row["note"] = args.note
        rows.append(row)
        print(row, flush=True)
    atomic_write_csv(args.out, rows)
    print(f"\n{'workers':>7} {'step s':>8} {'wait s':>8} {'wait %':>7} {'loader clips/s':>15} {'needed clips/s':>15}")
    for r in rows:
        print(f"{r['workers']:>7} {r['step_time_s']:>8} {r['data_wait_s']:>8} {100 * r['wait_share']:>6.1f}% "
              f"{r['loader_clips_per_s']:>15} {r['needed_clips_per_s']:>15}")
    print(f"wrote {args.out} (machine: {os.cpu_count()} CPUs, load {load:.2f} before)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
