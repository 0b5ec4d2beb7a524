"""The token prior's three output heads (experiments/prior_model.py) at 2^10..2^18 codes: the time of
one forward and backward pass of the head and its loss (the negative log-likelihood of the targets)
from fixed transformer states, and its peak memory; the rest of the transformer is the same for
every head and left out.

    python benchmarks/prior_heads.py                 # 2^10, 2^12, ..., 2^18 codes, 1024 tokens, width 512
    python benchmarks/prior_heads.py --quick         # 2^10, 2^14, 2^18, 256 tokens, 3 repeats

Every case runs in a fresh subprocess, so its peak memory is its own: on a CPU the growth of the peak
RSS (VmHWM, reset after setup through /proc/self/clear_refs; else getrusage's lifetime peak) over the
RSS after setup (states, targets, the head's parameters and a first backward through a small layer). Rows go to
results/benchmarks/prior_heads.csv (written atomically) with the machine, torch's threads and the
1-minute load average, which says how contended the timings were on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "results" / "benchmarks" / "prior_heads.csv"
HEADS = ("full", "factorized", "bitwise")


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _reset_peak() -> bool:
    """Reset the process's peak RSS (VmHWM) to its current RSS (Linux's clear_refs 5); False if refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def one_case(head: str, bits: int, tokens: int, width: int, repeats: int) -> dict:
    """Runs in the child: build, warm up, time ``repeats`` steps."""
    import torch

    from experiments.prior_model import PriorShape, make_head

    torch.manual_seed(0)
    shape = PriorShape(codebook_size=2**bits, length=1, head=head, width=width)
    module = make_head(shape)
    h = torch.randn(tokens, width, requires_grad=True)
    codes = torch.randint(2**bits, (tokens,))
    params = sum(p.numel() for p in module.parameters())

    def step() -> None:
        module.zero_grad(set_to_none=True)
        h.grad = None
        loss = -module.log_prob(h, codes).mean()
        loss.backward()

    # The first backward through a Linear of these shapes sets up autograd's and the BLAS's buffers
    # (~55 MB here): done once on a 2-output layer, so the head's peak is its own.
    probe = torch.nn.Linear(width, 2)
    torch.log_softmax(probe(h), -1).sum().backward()
    h.grad = None
    reset = _reset_peak()  # else the peak of the imports, freed since, would count
    base = _status_kb("VmRSS") * 1024
    step()  # warm-up; also the peak of the first allocation
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = (_status_kb("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    return {"head": head, "codes": 2**bits, "bits": bits, "factors": "-".join(map(str, shape.resolved_factors()))
            if head == "factorized" else "", "tokens": tokens, "width": width, "head_params": params,
            "step_ms_median": round(1000 * statistics.median(times), 3), "step_ms_min": round(1000 * min(times), 3),
            "peak_mb_over_setup": round(max(0, peak - base) / 2**20, 1),
            # the arithmetic floor: the float32 logits of the step (K, the sub-tokens' or d per token)
            "logits_mb": round(tokens * {"full": 2**bits, "bitwise": bits}.get(
                head, sum(2**f for f in shape.resolved_factors())) * 4 / 2**20, 2), "repeats": repeats}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2^10, 2^14, 2^18 codes, 256 tokens, 3 repeats")
    parser.add_argument("--tokens", type=int, default=None, help="tokens per step (default 1024; --quick 256)")
    parser.add_argument("--width", type=int, default=512, help="the transformer's width (default 512, preset base)")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per case (default 5; --quick 3)")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # the child's JSON arguments
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(one_case(**json.loads(args.case))))
        return 0
    tokens = args.tokens or (256 if args.quick else 1024)
    repeats = args.repeats or (3 if args.quick else 5)
    sizes = (10, 14, 18) if args.quick else (10, 12, 14, 16, 18)
    import pandas as pd
    import torch

    from experiments.files import atomic_write

    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONPATH": str(REPO)}
    rows = []
    for bits in sizes:
        for head in HEADS:
            case = {"head": head, "bits": bits, "tokens": tokens, "width": args.width, "repeats": repeats}
            load = os.getloadavg()[0]
            done = subprocess.run([sys.executable, __file__, "--case", json.dumps(case)], env=env,
                                  capture_output=True, text=True, timeout=1800)
            if done.returncode != 0:
                print(f"{head} 2^{bits}: failed: {done.stderr.strip().splitlines()[-1:]}", flush=True)
                continue
            row = json.loads(done.stdout.strip().splitlines()[-1])
            row.update({"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                        "torch": torch.__version__, "threads": env["OMP_NUM_THREADS"], "load_avg_1min": round(load, 2)})
            rows.append(row)
            print(f"{head:>10} 2^{bits}: {row['step_ms_median']:.1f} ms, {row['peak_mb_over_setup']:.0f} MB", flush=True)
    table = pd.DataFrame(rows)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(OUT, lambda f: table.to_csv(f, index=False))
    print(table.to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
