"""Overhead of LFQMonitor on the training step of a small conv autoencoder with an LFQ bottleneck.

    .venv/bin/python benchmarks/monitor_overhead.py            # CPU, ~2 minutes
    .venv/bin/python benchmarks/monitor_overhead.py --device cuda

Times trials of ``--steps`` training steps (forward, MSE + LFQ aux loss, backward, Adam)
without a monitor, with ``log_every=50`` and with ``log_every=1``, writing records to a
JSON-lines file as a run would. The configurations are interleaved, rotating their order
each repeat, so that load from other processes hits all of them alike; the overhead is the
median over repeats of (trial time / the same repeat's no-monitor trial time) - 1, in wall
time and in this process's CPU time (steadier when other processes load the machine).
Target: <= 3 % at log_every=50. Writes results/benchmarks/monitor_overhead.csv atomically.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from experiments.run_dir import atomic_write
from lfq import LFQ, JsonlSink, LFQMonitor

OUT = Path(__file__).resolve().parents[1] / "results" / "benchmarks" / "monitor_overhead.csv"
CONFIGS: dict[str, int | None] = {"none": None, "log_every=50": 50, "log_every=1": 1}


class ConvAutoencoder(nn.Module):
    """32x32 RGB -> 8x8 grid of 10-bit LFQ codes (1024-code codebook) -> 32x32 RGB."""

    def __init__(self, bits: int = 10, width: int = 32) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(3, width, 4, 2, 1), nn.GELU(),
            nn.Conv2d(width, 2 * width, 4, 2, 1), nn.GELU(),
            nn.Conv2d(2 * width, bits, 1),
        )
        self.quantizer = LFQ(dim=bits, codebook_size=2**bits)
        self.decoder = nn.Sequential(
            nn.Conv2d(bits, 2 * width, 1), nn.GELU(),
            nn.ConvTranspose2d(2 * width, width, 4, 2, 1), nn.GELU(),
            nn.ConvTranspose2d(width, 3, 4, 2, 1),
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        quantized, _, aux_loss = self.quantizer(self.encoder(x))
        return self.decoder(quantized), aux_loss


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_trial(model: nn.Module, optimizer: torch.optim.Optimizer, batches: list[torch.Tensor],
               steps: int, log_every: int | None, log_dir: Path) -> tuple[float, float]:
    """Wall-clock and process CPU seconds per training step over ``steps`` steps, the monitor's
    final flush included. CPU time is what this process used, so it is less sensitive to other
    processes on a shared machine (but does not see time spent waiting on fsync)."""
    monitor = None
    if log_every is not None:
        path = log_dir / f"metrics_{log_every}.jsonl"
        path.unlink(missing_ok=True)
        monitor = LFQMonitor(model, JsonlSink(path), log_every=log_every)
    device = batches[0].device
    _sync(device)
    start, start_cpu = time.perf_counter(), time.process_time()
    for step in range(steps):
        x = batches[step % len(batches)]
        reconstruction, aux_loss = model(x)
        loss = F.mse_loss(reconstruction, x) + aux_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if monitor is not None:
        monitor.detach()
    _sync(device)
    return (time.perf_counter() - start) / steps, (time.process_time() - start_cpu) / steps


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model_name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model_name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"cpu ({model_name}, {torch.get_num_threads()} threads)"


def write_csv_atomically(rows: list[dict[str, object]], path: Path) -> None:
    def write(f) -> None:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    atomic_write(path, write)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="training steps per trial")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved trials per configuration")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1: steadier on a shared machine)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    if args.steps < 1 or args.repeats < 1:
        raise ValueError(f"--steps and --repeats must be >= 1, got {args.steps} and {args.repeats}")

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = ConvAutoencoder().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    batches = [torch.rand(args.batch, 3, 32, 32, device=device) for _ in range(4)]
    load_before = os.getloadavg()[0]

    seconds: dict[str, list[float]] = {name: [] for name in CONFIGS}
    cpu_seconds: dict[str, list[float]] = {name: [] for name in CONFIGS}
    with tempfile.TemporaryDirectory() as log_dir:
        for log_every in CONFIGS.values():  # warm-up: allocator, kernels, file system
            time_trial(model, optimizer, batches, max(10, args.steps // 5), log_every, Path(log_dir))
        names = list(CONFIGS)
        for repeat in range(args.repeats):
            order = names[repeat % len(names):] + names[: repeat % len(names)]
            for name in order:
                wall, cpu = time_trial(model, optimizer, batches, args.steps, CONFIGS[name], Path(log_dir))
                seconds[name].append(wall)
                cpu_seconds[name].append(cpu)
    load_after = os.getloadavg()[0]

    def overhead_pct(times: dict[str, list[float]], name: str) -> float:
        ratios = [t / b for t, b in zip(times[name], times["none"], strict=True)]
        return round(100 * (statistics.median(ratios) - 1), 2)

    rows: list[dict[str, object]] = []
    for name, log_every in CONFIGS.items():
        rows.append({
            "config": name,
            "log_every": "" if log_every is None else log_every,
            "median_step_ms": round(1e3 * statistics.median(seconds[name]), 3),
            "min_step_ms": round(1e3 * min(seconds[name]), 3),
            "overhead_pct": overhead_pct(seconds, name),
            "median_cpu_step_ms": round(1e3 * statistics.median(cpu_seconds[name]), 3),
            "cpu_overhead_pct": overhead_pct(cpu_seconds, name),
            "steps_per_trial": args.steps,
            "repeats": args.repeats,
            "batch": args.batch,
            "codebook_size": model.quantizer.codebook_size,
            "device": device_name(device),
            "torch": torch.__version__,
            "load_avg_1m_before": round(load_before, 2),
            "load_avg_1m_after": round(load_after, 2),
        })
    write_csv_atomically(rows, args.out)

    print(f"{'config':<14}{'wall ms/step':>14}{'overhead':>10}{'cpu ms/step':>13}{'cpu overhead':>14}")
    for row in rows:
        print(f"{row['config']:<14}{row['median_step_ms']:>14.3f}{row['overhead_pct']:>9.2f}%"
              f"{row['median_cpu_step_ms']:>13.3f}{row['cpu_overhead_pct']:>13.2f}%")
    print(f"device: {rows[0]['device']}; load average {load_before:.2f} -> {load_after:.2f}; wrote {args.out}")


if __name__ == "__main__":
    main()
