"""One LFQ training step (forward + backward with the loss): ours in each entropy mode,
the oracle (vector-quantize-pytorch 1.14.12) and the newest vector-quantize-pytorch, plain
and spherical (BSQ, ``spherical=True``: the "-spherical" impls).

    python benchmarks/lfq_step.py            # 2^10..2^20 codes x {4096, 65536} tokens, all impls
    python benchmarks/lfq_step.py --quick    # 2^10, 2^14, 2^18 codes, 4096 tokens, 3 repeats

Every case runs in a fresh subprocess, so peak memory is that case's alone: on CPU the
growth of peak RSS (getrusage) over the RSS after setup, on CUDA max_memory_allocated.
A case whose estimated memory is above --mem-budget-gb is reported as skipped with the
estimate, not run; an OOM or a timeout is reported, not crashed on. The newest upstream
is pip-installed (no deps, pure-python deps added) into the git-ignored .upstream/ and
imported from there through PYTHONPATH. Rows are merged into results/benchmarks/
lfq_step.csv (replacing rows of the same impl, size, tokens, device, threads), written
atomically, and plotted to lfq_step.png.
"""

from __future__ import annotations

import argparse
import csv
import importlib.metadata
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
UPSTREAM_DIR = REPO / ".upstream" / "vqp-latest"
OUT_DIR = REPO / "results" / "benchmarks"
# impl name -> (implementation, entropy mode, spherical); "ours-*" is lfq.LFQ.
IMPLS = {
    "ours-exact": ("ours", "exact", False),
    "ours-group": ("ours", "group", False),
    "ours-reference": ("ours", "reference", False),
    "oracle": ("oracle", "reference", False),
    "upstream": ("upstream", "reference", False),
    "ours-clamped": ("ours", "clamped", False),
    "ours-exact-spherical": ("ours", "exact", True),
    "ours-clamped-spherical": ("ours", "clamped", True),
    "upstream-spherical": ("upstream", "reference", True),
}
COLUMNS = [
    "impl", "mode", "impl_version", "codebook_size", "log2_codebook_size", "tokens", "median_s",
    "min_s", "repeats", "peak_mem_mb", "status", "device", "device_name", "torch_version",
    "threads", "omp_wait_policy", "load_avg_1m", "timestamp",
]
# Dense implementations hold about 8 float32 copies of the (N, 2**d) softmax in a training
# step (4096 tokens x 2**14 codes on CPU: 1.8 GB RSS growth measured here, 2.2 GB in the
# spec); the estimate errs high because skipping is cheap and swapping a shared host is not.
DENSE_COPIES = 8.5
MAX_REPEATS, MIN_TIMED_S, SLOW_CASE_S = 30, 1.0, 30.0
LOSS_KWARGS = dict(entropy_loss_weight=0.1, commitment_loss_weight=0.25, diversity_gamma=1.0)


# ------------------------------------------------------------------ child: one case


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_case(spec: dict) -> dict:
    """Build the module, time `repeats` steps after one warm-up, measure peak memory."""
    import torch

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    impl, mode, spherical = IMPLS[spec["impl"]]
    num_bits = spec["log2_codebook_size"]
    flags = dict(spherical=True) if spherical else {}
    if impl == "ours":
        from lfq import LFQ

        module = LFQ(codebook_size=2**num_bits, entropy_mode=mode, **LOSS_KWARGS, **flags)
        version = "local"
    else:  # PYTHONPATH picks the oracle (venv) or the newest upstream (.upstream/)
        from vector_quantize_pytorch import LFQ

        module = LFQ(codebook_size=2**num_bits, **LOSS_KWARGS, **flags)
        version = importlib.metadata.version("vector-quantize-pytorch")
    module = module.to(device).train()
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(1, spec["tokens"], num_bits, device=device, generator=gen).requires_grad_()

    def step() -> None:
        out = module(x)
        (out.quantized.square().mean() + out.entropy_aux_loss).backward()
        x.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize()

    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _rss_mb()
    times: list[float] = []
    try:
        step()  # warm-up: the first step pays one-off costs (allocator, kernels, warnings)
        while True:
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
            # Fast cases get more samples (a median robust to a shared machine), slow
            # dense cases stop at 3 so the suite finishes.
            if len(times) >= MAX_REPEATS or (len(times) >= 3 and sum(times) >= SLOW_CASE_S):
                break
            if len(times) >= spec["repeats"] and sum(times) >= MIN_TIMED_S:
                break
    except (RuntimeError, MemoryError) as err:
        if "out of memory" in str(err).lower() or isinstance(err, MemoryError) or "alloc" in str(err).lower():
            return {"status": f"skipped: out of memory ({str(err).splitlines()[0][:80]})", "impl_version": version}
        raise
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = max(0.0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base)
    return {"status": "ok", "median_s": statistics.median(times), "min_s": min(times),
            "repeats": len(times), "peak_mem_mb": peak, "impl_version": version}


# ------------------------------------------------------------ parent: orchestration


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(0)
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "unknown CPU"
    return f"{model} ({os.cpu_count()} cores)"


def estimate_gb(impl: str, num_bits: int, tokens: int) -> float:
    """Rough peak memory of one step, from the kernels' working sets (see lfq.entropy)."""
    _, mode, _ = IMPLS[impl]
    codes = 2**num_bits
    if mode == "reference":
        return (DENSE_COPIES * tokens * codes * 4 + 100e6) / 1e9
    from lfq.entropy import GROUP_MAX_BITS
    from lfq.subcodes import default_chunk_tokens, subcode_split

    group = min(num_bits, GROUP_MAX_BITS) if mode == "group" else num_bits
    high, low = subcode_split(group)
    chunk = min(tokens, default_chunk_tokens(1, group, 4))
    # "clamped" adds the per-token clamp effect: about 10 sub-code-sized copies per chunk.
    factors = (16 if mode == "clamped" else 6) * chunk * (2**high + 2**low) * 4
    return (factors + 10 * 2**group * 4 + 40 * tokens * num_bits * 4 + 50e6) / 1e9


def ensure_upstream(target: Path) -> tuple[str | None, str]:
    """Install the newest vector-quantize-pytorch (and missing pure-python deps) into target.

    Returns (version, "") or (None, why it is unavailable).
    """
    from packaging.requirements import Requirement

    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target)]
    try:
        if not list(target.glob("vector_quantize_pytorch-*.dist-info")):
            print(f"installing the newest vector-quantize-pytorch into {target} ...", flush=True)
            subprocess.run([*pip, "vector-quantize-pytorch"], check=True, capture_output=True, timeout=300)
        pending, seen = ["vector-quantize-pytorch"], set()
        while pending:  # walk Requires-Dist, installing what the venv does not satisfy
            name = pending.pop()
            seen.add(name)
            dist = next(importlib.metadata.distributions(name=name, path=[str(target)]), None)
            for line in (dist.requires or []) if dist else []:
                req = Requirement(line)
                if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                    continue
                if req.name in seen or req.name == "torch":
                    continue
                try:
                    installed = importlib.metadata.version(req.name)
                    if installed in req.specifier or not req.specifier:
                        continue
                except importlib.metadata.PackageNotFoundError:
                    pass
                if not list(target.glob(f"{req.name.replace('-', '_')}-*.dist-info")):
                    subprocess.run([*pip, str(req)], check=True, capture_output=True, timeout=300)
                pending.append(req.name)
        probe = subprocess.run(
            [sys.executable, "-c", "import importlib.metadata as m, vector_quantize_pytorch as v; "
             "v.LFQ; print(m.version('vector-quantize-pytorch'))"],
            env={**os.environ, "PYTHONPATH": str(target)}, capture_output=True, text=True, timeout=120,
        )
        if probe.returncode != 0:
            return None, f"unavailable: import failed ({probe.stderr.strip().splitlines()[-1][:100]})"
        return probe.stdout.strip(), ""
    except (subprocess.SubprocessError, OSError) as err:
        return None, f"unavailable: install failed ({type(err).__name__})"


def launch(spec: dict, timeout_s: float, upstream: Path | None, omp_wait_policy: str) -> dict:
    env = dict(os.environ)
    if omp_wait_policy != "default":
        env["OMP_WAIT_POLICY"] = omp_wait_policy.upper()
    if upstream is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(upstream), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"status": f"timeout: over {timeout_s:.0f} s"}
    if proc.returncode != 0:
        if proc.returncode < 0:
            return {"status": f"failed: killed by signal {-proc.returncode} (out of memory?)"}
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"status": f"failed: {tail[:120]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def write_csv(rows: list[dict], path: Path, fresh: bool) -> list[dict]:
    """Merge with the existing file (same impl/size/tokens/device/threads replaced), atomically.

    The device's name is part of the key: rows measured on another machine are kept beside
    this one's, not replaced by them.
    """
    key = lambda r: (r["impl"], str(r["log2_codebook_size"]), str(r["tokens"]), r["device"],  # noqa: E731
                     r["device_name"], str(r["threads"]))
    merged = {}
    if path.exists() and not fresh:
        with path.open() as f:
            merged = {key(r): r for r in csv.DictReader(f)}
    merged.update({key(r): r for r in rows})
    out = sorted(merged.values(), key=lambda r: (r["device"], r["impl"], int(r["tokens"]), int(r["log2_codebook_size"])))
    from experiments.files import atomic_write_csv  # here: the child processes never need it

    atomic_write_csv(path, out, COLUMNS, extrasaction="ignore")
    return out


def plot(rows: list[dict], path: Path, device: str, name: str, threads: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["device"] == device and r["device_name"] == name
            and str(r["threads"]) == str(threads) and r["status"] == "ok"]
    if not rows:
        return
    fig, axes = plt.subplots(1, 2, figsize=(14, 6))
    colors = dict(zip(IMPLS, ["tab:green", "tab:olive", "tab:gray", "tab:red", "tab:purple", "tab:orange",
                              "tab:cyan", "tab:brown", "tab:pink"], strict=True))
    series = sorted({(r["impl"], int(r["tokens"])) for r in rows})
    for impl, tokens in series:
        pts = sorted((int(r["log2_codebook_size"]), float(r["median_s"]), float(r["peak_mem_mb"]))
                     for r in rows if r["impl"] == impl and int(r["tokens"]) == tokens)
        version = next(r["impl_version"] for r in rows if r["impl"] == impl)
        label = f"{impl} ({version}), {tokens} tokens" if not impl.startswith("ours") else f"{impl}, {tokens} tokens"
        style = dict(color=colors[impl], ls="-" if tokens == 4096 else "--", marker="o" if tokens == 4096 else "s")
        if impl == "oracle":  # hollow and larger: the upstream points often sit on top of it
            style.update(markerfacecolor="none", markersize=11, markeredgewidth=1.5)
        for ax, col in zip(axes, (1, 2), strict=True):
            ax.plot([2**p[0] for p in pts], [max(p[col], 1e-4) for p in pts], label=label, **style)
    for ax, ylabel, target in zip(axes, ("median step time (s)", "peak memory growth (MB)"), (0.1, 1024), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("codebook size (codes per codebook)")
        ax.set_ylabel(ylabel)
        ax.axhline(target, color="black", lw=0.8, ls=":")
        ax.text(2**18, target * 1.12, "target at 2^18, 4096 tokens", fontsize=8, ha="center")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_title("one training step (forward + backward)")
    axes[1].set_title("peak memory of the step")
    meta = next(r for r in rows)
    fig.suptitle(f"LFQ step on {meta['device_name']}, torch {meta['torch_version']}, "
                 f"{meta['threads']} threads (missing points: skipped, see CSV)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=9)
    fig.tight_layout(rect=(0, 0.14, 1, 0.95))
    from experiments.files import atomic_write

    atomic_write(path, lambda f: fig.savefig(f, dpi=110, format="png"), mode="wb")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10, 12, 14, 16, 18, 20], help="log2 codebook sizes")
    p.add_argument("--tokens", type=int, nargs="+", default=[4096, 65536])
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=list(IMPLS))
    p.add_argument("--repeats", type=int, default=5,
                   help="least timed steps per case after one warm-up (more, up to 30, until 1 s is timed; "
                        "3 for cases slower than 10 s)")
    p.add_argument("--timeout", type=float, default=240.0, help="seconds per case")
    p.add_argument("--mem-budget-gb", type=float, default=None,
                   help="skip cases estimated above this (default: min(8, half the available memory))")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--omp-wait-policy", choices=["passive", "active", "default"], default="passive",
                   help="OMP_WAIT_POLICY of the cases. passive (default): idle OpenMP threads sleep instead "
                        "of spinning; on a shared, oversubscribed CPU spinning made 2-thread steps 5-10x "
                        "slower. default: leave the environment as it is")
    p.add_argument("--quick", action="store_true", help="2^10, 2^14, 2^18 codes, 4096 tokens, 3 repeats")
    p.add_argument("--fresh", action="store_true", help="overwrite the CSV instead of merging")
    p.add_argument("--out-dir", type=Path, default=OUT_DIR)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.tokens, args.repeats = [10, 14, 18], [4096], 3
    bad = [s for s in args.sizes if not 1 <= s <= 30]
    if bad or any(t < 1 for t in args.tokens) or args.repeats < 1:
        p.error(f"sizes are log2 codebook sizes in 1..30 (got {args.sizes}), tokens and repeats >= 1")
    return args


def default_budget_gb(device: str) -> float:
    if device.startswith("cuda"):
        import torch

        return 0.9 * torch.cuda.get_device_properties(0).total_memory / 1e9
    with open("/proc/meminfo") as f:
        available = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable")) * 1024
    return min(8.0, 0.5 * available / 1e9)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(run_case(json.loads(args.child))))
        return
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    budget = args.mem_budget_gb or default_budget_gb(device)
    name, threads = device_name(device), args.threads or torch.get_num_threads()
    print(f"device: {name}; torch {torch.__version__}; {threads} threads; memory budget {budget:.1f} GB; "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    upstream_version, upstream_why = (None, "")
    if any(IMPLS[impl][0] == "upstream" for impl in args.impls):
        upstream_version, upstream_why = ensure_upstream(UPSTREAM_DIR)
        print(f"upstream: {upstream_version or upstream_why}", flush=True)

    cases = [(impl, s, t) for t in args.tokens for s in args.sizes for impl in args.impls]
    rows = []
    for i, (impl, num_bits, tokens) in enumerate(cases, 1):
        row = {"impl": impl, "mode": IMPLS[impl][1], "codebook_size": 2**num_bits, "log2_codebook_size": num_bits,
               "tokens": tokens, "device": device, "device_name": name, "torch_version": torch.__version__,
               "threads": threads, "omp_wait_policy": args.omp_wait_policy, "load_avg_1m": f"{os.getloadavg()[0]:.2f}",
               "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "impl_version": upstream_version if IMPLS[impl][0] == "upstream" else None}
        need = estimate_gb(impl, num_bits, tokens)
        if IMPLS[impl][0] == "upstream" and upstream_version is None:
            row["status"] = upstream_why
        elif need > budget:
            row["status"] = f"skipped: would need {need:.1f} GB (budget {budget:.1f} GB)"
        else:
            spec = {"impl": impl, "log2_codebook_size": num_bits, "tokens": tokens, "repeats": args.repeats,
                    "device": device, "threads": args.threads}
            upstream = UPSTREAM_DIR if IMPLS[impl][0] == "upstream" else None
            row.update(launch(spec, args.timeout, upstream, args.omp_wait_policy))
        rows.append(row)
        shown = (f"{row['median_s'] * 1e3:9.1f} ms {row['peak_mem_mb']:8.0f} MB" if row["status"] == "ok"
                 else row["status"])
        print(f"[{i:3d}/{len(cases)}] {impl:15s} 2^{num_bits:<2d} {tokens:6d} tokens  {shown}", flush=True)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    merged = write_csv(rows, args.out_dir / "lfq_step.csv", args.fresh)
    plot(merged, args.out_dir / "lfq_step.png", device, name, threads)
    print_table(rows)
    print(f"wrote {args.out_dir / 'lfq_step.csv'} and {args.out_dir / 'lfq_step.png'}")


def print_table(rows: list[dict]) -> None:
    print(f"\n{'impl':15s} {'codes':>7s} {'tokens':>6s} {'median':>10s} {'peak MB':>8s}  status")
    for r in rows:
        ok = r["status"] == "ok"
        time_s = f"{r['median_s'] * 1e3:8.1f}ms" if ok else "-"
        mem = f"{r['peak_mem_mb']:8.0f}" if ok else "-"
        print(f"{r['impl']:15s} {'2^' + str(r['log2_codebook_size']):>7s} {r['tokens']:6d} {time_s:>10s} {mem:>8s}  "
              f"{'ok' if ok else r['status']}")
    by_key = {(r["impl"], r["log2_codebook_size"], r["tokens"]): r for r in rows if r["status"] == "ok"}
    for (impl, bits, tokens), r in sorted(by_key.items()):
        other = {"ours-exact": "oracle", "ours-exact-spherical": "upstream-spherical"}.get(impl)
        ref = by_key.get((other, bits, tokens))
        if ref:
            print(f"speed-up of {impl} over {other} at 2^{bits}, {tokens} tokens: "
                  f"{ref['median_s'] / r['median_s']:.0f}x")


if __name__ == "__main__":
    main()
