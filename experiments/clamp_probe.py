"""What the reference's 1e-5 clamp does to the diversity (batch-entropy) term, measured directly for
random LFQ inputs over codebook sizes, inverse temperatures and token counts, without training
(issue 8, claim 4); the method is in docs/experiments.md, the results in results/README.md.

    python -m experiments.clamp_probe                     # full grid, seeds 0 1 2 (~8 min on one thread)
    python -m experiments.clamp_probe --quick --out /tmp/probe
    python -m analysis.report --redraw --out /tmp/probe      # its figure, claim4_probe.png/.svg
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from lfq.entropy import REFERENCE_LOG_CLAMP, clamped_entropy, entropy_from_gram
from lfq.subcodes import subcode_gram

DEFAULT_OUT = Path("results/ablations/clamp_probe")
FULL_GRID = {"bits": (10, 14, 16, 17, 18), "inv_temperature": (100.0, 10.0, 1.0),
             "tokens": (4096, 65536, 262144)}
QUICK_GRID = {"bits": (8, 12), "inv_temperature": (100.0, 1.0), "tokens": (256, 2048)}
COLUMNS = ("bits", "codebook_size", "inv_temperature", "tokens", "seed", "eps", "codes_in_use",
           "clamped_mass", "batch_entropy_exact", "batch_entropy_reference", "entropy_gap",
           "grad_cosine", "grad_norm_ratio", "seconds")


def _check(name: str, value: object, ok: bool, want: str) -> None:
    if not ok:
        raise ValueError(f"{name} must be {want}, got {value!r}")


def batch_entropies(z: Tensor, inv_temperature: float, eps: float = REFERENCE_LOG_CLAMP
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """(exact, reference) batch entropy summed over codebooks, and the batch distribution
    (c, 2**d), of ``(N, c, d)`` inputs with codebook scale 1; both entropies differentiable."""
    gram = subcode_gram(z * (4.0 * inv_temperature))  # bit log-odds 4 tau s z, s = 1
    avg = gram.flatten(1) / z.shape[0]
    return entropy_from_gram(gram, z.shape[0]).sum(), clamped_entropy(avg, eps).sum(), avg


def probe_case(bits: int, inv_temperature: float, tokens: int, *, seed: int = 0,
               eps: float = REFERENCE_LOG_CLAMP, dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """One grid point: exact vs clamped batch entropy of ``tokens`` random inputs over ``2**bits``
    codes (codebook scale 1). Returns a row of ``COLUMNS``."""
    _check("bits", bits, isinstance(bits, int) and 1 <= bits <= 24, "an int in 1..24 (2**bits codes)")
    _check("tokens", tokens, isinstance(tokens, int) and tokens >= 1, "an int >= 1")
    _check("inv_temperature", inv_temperature, inv_temperature > 0, "> 0")
    _check("eps", eps, 0 < eps < 1, "in (0, 1)")
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(tokens, 1, bits, generator=generator, dtype=dtype).requires_grad_(True)
    exact, reference, avg = batch_entropies(z, inv_temperature, eps)
    (grad_exact,) = torch.autograd.grad(exact, z, retain_graph=True)
    (grad_reference,) = torch.autograd.grad(reference, z)
    with torch.no_grad():
        weights = 2 ** torch.arange(bits - 1, -1, -1)
        in_use = torch.unique(((z[:, 0] > 0).long() * weights).sum(dim=1)).numel()
        grad_exact, grad_reference = grad_exact.double(), grad_reference.double()  # sums over 1e6+ terms
        norm_exact, norm_reference = grad_exact.norm(), grad_reference.norm()
        cosine = (grad_exact * grad_reference).sum() / (norm_exact * norm_reference)
        row = {
            "bits": bits, "codebook_size": 2**bits, "inv_temperature": float(inv_temperature),
            "tokens": tokens, "seed": seed, "eps": eps, "codes_in_use": in_use,
            "clamped_mass": float(avg[avg < eps].sum()),
            "batch_entropy_exact": float(exact), "batch_entropy_reference": float(reference),
            "entropy_gap": float(exact - reference),
            "grad_cosine": float(cosine), "grad_norm_ratio": float(norm_reference / norm_exact),
        }
    row["seconds"] = time.perf_counter() - start
    return row


def run_grid(bits: Sequence[int], inv_temperatures: Sequence[float], tokens: Sequence[int], *,
             seeds: Sequence[int] = (0,), log=print) -> list[dict[str, float]]:
    """Every combination for every seed (fresh random inputs each), cheapest first; one plain
    progress line per case (batch-log friendly)."""
    cases = sorted(((b, t, n, s) for b in bits for t in inv_temperatures for n in tokens for s in seeds),
                   key=lambda c: (c[0] + math.log2(c[2]), c))
    _check("seeds", list(seeds), len(seeds) >= 1 and len(set(seeds)) == len(seeds), "distinct, at least one")
    for b, t, n, _ in cases:  # validate the whole grid before computing any of it
        _check("bits", b, isinstance(b, int) and 1 <= b <= 24, "ints in 1..24")
        _check("tokens", n, isinstance(n, int) and n >= 1, "ints >= 1")
        _check("inv_temperature", t, t > 0, "> 0")
    rows = []
    for i, (b, t, n, s) in enumerate(cases, 1):
        row = probe_case(b, t, n, seed=s)
        rows.append(row)
        log(f"[clamp_probe] {i}/{len(cases)} 2^{b} codes, tau {t:g}, {n} tokens, seed {s}: clamped mass "
            f"{row['clamped_mass']:.3f}, gradient cosine {row['grad_cosine']:.4f} ({row['seconds']:.1f} s)")
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m experiments.clamp_probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"default: {DEFAULT_OUT}")
    parser.add_argument("--quick", action="store_true", help="a small grid (seconds), for checks")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="random inputs per grid point (default: 0 1 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    import pandas as pd  # the CLI's dependencies; probe_case needs torch only

    from experiments.files import atomic_write

    torch.set_num_threads(args.threads)
    grid = QUICK_GRID if args.quick else FULL_GRID
    try:
        rows = run_grid(grid["bits"], grid["inv_temperature"], grid["tokens"], seeds=args.seeds)
    except ValueError as err:
        parser.error(str(err))
    table = pd.DataFrame(rows, columns=list(COLUMNS)).sort_values(["inv_temperature", "bits", "tokens", "seed"],
                                                                ascending=[False, True, True, True])
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out / "probe.csv", lambda f: table.to_csv(f, index=False, float_format="%.6g"))
    command = shlex.join(["python", "-m", "experiments.clamp_probe", *argv])
    note = f"{command}\n# torch {torch.__version__}, {args.threads} thread(s)\n"
    atomic_write(args.out / "command.txt", lambda f: f.write(note))
    print(table.drop(columns=["eps", "codebook_size"]).to_string(index=False))
    # the figure is analysis's (experiments imports lfq only; analysis reads the CSV)
    print(f"wrote {args.out}/probe.csv, command.txt; draw it with: python -m analysis.report --redraw --out {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
