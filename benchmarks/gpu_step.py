"""GPU benchmark: the LFQ training step from 2^10 to 2^24 codes, and a tokenizer training step at 2^18.

    python benchmarks/gpu_step.py                      # on a CUDA machine; writes results/benchmarks/gpu_step.csv
    python benchmarks/gpu_step.py --device cpu --smoke # the same code paths at toy sizes (CI)

Part 1, ``lfq_step`` rows: forward + backward of ``lfq.LFQ`` (``entropy_mode="exact"``: impl
``ours``; ``"clamped"``: impl ``clamped``), of the
1.14.12 oracle and of the newest upstream (both dense: they build an N x 2^d softmax, so most
points do not fit; a point whose dense tensor would exceed the device's memory is recorded as
``skipped: needs X GB`` without being run, and a real out-of-memory is recorded as ``oom``).
Codes 2^10 .. 2^24, tokens 4,096 / 65,536 / 262,144, dim = log2(codes).

Part 2, ``tokenizer_step`` rows: one optimiser step of the images task's ``base`` tokenizer at
128 px, 2^18 codes, batch 32, bf16 (no discriminator), on batches the task's own loader reads
from a generated folder of 64 PNG images, eager and with torch.compile: time, images/s, peak
memory, and the share of the step spent in the quantizer (1 - the time of the same step with
the quantizer passed through). The CSV is rewritten after each part, and a part that fails is
a row saying why, so a later failure loses nothing.

Times are medians of CUDA-event timings after warm-up; the steps with and without the quantizer
alternate, so a change of load or clock falls on both. Memory is the peak allocated.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

OUT = REPO / "results" / "benchmarks" / "gpu_step.csv"
DENSE = ("oracle", "upstream")  # build the N x 2^d softmax
FIELDS = ["part", "impl", "codes", "tokens", "status", "median_ms", "peak_mb", "quantizer_share", "images_per_s",
          "device", "torch", "cuda", "note"]


def _timer(device: torch.device):
    if device.type == "cuda":
        def measure(fn) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            return start.elapsed_time(end)
    else:
        def measure(fn) -> float:
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1000
    return measure


def _peak_mb(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")


def _reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _quantizer(impl: str, codes: int):
    bits = round(math.log2(codes))
    if impl in ("ours", "clamped"):
        from lfq import LFQ

        return LFQ(codebook_size=codes, dim=bits, entropy_mode="exact" if impl == "ours" else "clamped")
    if impl == "oracle":
        from vector_quantize_pytorch import LFQ as OracleLFQ

        return OracleLFQ(codebook_size=codes, dim=bits)
    from upstream_vqp import load_latest

    return load_latest().LFQ(codebook_size=codes, dim=bits)


def lfq_rows(device: torch.device, codes_list: list[int], tokens_list: list[int], impls: list[str],
             repeats: int) -> list[dict]:
    measure, rows = _timer(device), []
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 8 * 2**30
    for impl in impls:
        for codes in codes_list:
            for tokens in tokens_list:
                row = {"part": "lfq_step", "impl": impl, "codes": codes, "tokens": tokens}
                dense_bytes = tokens * codes * 4 * 3  # logits, probabilities and their gradient
                if impl in DENSE and dense_bytes > free:
                    rows.append({**row, "status": f"skipped: needs {dense_bytes / 2**30:.0f} GB"})
                    print(rows[-1], flush=True)
                    continue
                try:
                    _reset(device)
                    q = _quantizer(impl, codes).to(device).train()
                    bits = round(math.log2(codes))
                    x = torch.randn(1, tokens, bits, device=device, requires_grad=True)

                    def step(q=q, x=x):
                        out = q(x)
                        loss = out[2] if isinstance(out, tuple) else out.entropy_aux_loss
                        loss.backward()

                    for _ in range(2):
                        step()
                    times = [measure(step) for _ in range(repeats)]
                    rows.append({**row, "status": "ok", "median_ms": round(statistics.median(times), 3),
                                 "peak_mb": round(_peak_mb(device), 1)})
                except torch.OutOfMemoryError:
                    rows.append({**row, "status": "oom"})
                finally:
                    q = x = None
                print(rows[-1], flush=True)
    return rows


def image_folder(root: Path, count: int, side: int) -> Path:
    """``count`` generated PNG images (smooth colour fields under random rectangles), once."""
    import numpy as np
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        path = root / f"image{i:04d}.png"
        if path.exists():
            continue
        coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        image = np.asarray(Image.fromarray(coarse).resize((side, side), Image.Resampling.BICUBIC)).copy()
        for _ in range(4):
            x, y = rng.integers(0, side - side // 4, 2)
            image[y:y + side // 4, x:x + side // 4] = rng.integers(0, 256, 3)
        tmp = path.with_name(f".{path.name}.tmp.png")
        Image.fromarray(image).save(tmp)
        tmp.replace(path)
    return root


class _PassThrough(torch.nn.Module):
    """The quantizer's place without its work: the latent through, no loss, no codes."""

    def forward(self, z, inv_temperature=None):
        from types import SimpleNamespace

        return SimpleNamespace(quantized=z, entropy_aux_loss=z.new_zeros(()), indices=None)


def tokenizer_rows(device: torch.device, smoke: bool, repeats: int, compiled: bool, folder: Path) -> list[dict]:
    """One optimiser step of the images task's tokenizer (no discriminator) on batches read from a
    generated image folder by the task's own loader: time, images/s, peak memory, and the share of
    the step spent in the quantizer (1 - the same step with the quantizer passed through), eager
    or with encoder, quantizer and decoder each under torch.compile."""
    from experiments.config import load_config
    from experiments.tasks.images import FolderImages, build_model, to_model_input

    overrides = ["data.resolution=32", "model.preset=tiny", "quantizer.codebook_size=1024", "data.batch_size=4"] \
        if smoke else ["data.batch_size=32"]
    config = load_config(REPO / "experiments" / "configs" / "imagenet128.yaml",
                         [*overrides, f"data.root={folder}", "runtime.num_workers=2"])
    batches = []
    for batch, _ in FolderImages(config).train_loader(config, device, 0, slice(None)):
        batches.append(to_model_input(batch).to(device))
        if len(batches) == 4:
            break
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    measure = _timer(device)

    def stepper(model: torch.nn.Module):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        calls = [0]

        def step():
            x = batches[calls[0] % len(batches)]
            calls[0] += 1
            with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
                q = model.quantizer(model.encoder(x), inv_temperature=100.0)
                recon = model.decoder(q.quantized)
            loss = (recon.float() - x).abs().mean() + q.entropy_aux_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        for _ in range(3):  # warm-up (and compilation)
            step()
        return step

    def built(quantizer: bool) -> torch.nn.Module:
        torch.manual_seed(0)
        model = build_model(config).to(device)
        if not quantizer:
            model.quantizer = _PassThrough()
        if compiled:
            for name in ("encoder", "quantizer", "decoder"):
                setattr(model, name, torch.compile(getattr(model, name)))
        return model

    full = stepper(built(True))
    _reset(device)
    full()
    peak = _peak_mb(device)  # a step of the full model alone: the bare one is built after this
    bare = stepper(built(False))
    # Interleaved, so that a change of load (or clock) during the run falls on both alike.
    pairs = [(measure(full), measure(bare)) for _ in range(repeats)]
    full_ms = statistics.median(f for f, _ in pairs)
    bare_ms = statistics.median(b for _, b in pairs)
    batch = config.data.batch_size
    return [{"part": "tokenizer_step", "impl": "ours (compiled)" if compiled else "ours", "codes": config.quantizer.codebook_size,
             "tokens": batch * (config.data.resolution // config.model.downsample) ** 2,
             "status": "ok", "median_ms": round(full_ms, 3), "peak_mb": round(peak, 1),
             "quantizer_share": round(1 - bare_ms / full_ms, 4), "images_per_s": round(1000 * batch / full_ms, 1),
             "note": f"{config.model.preset} model, {config.data.resolution} px, batch {batch}, "
                     f"{'bf16 autocast' if dtype == torch.bfloat16 else 'fp32'}, no discriminator; "
                     f"without the quantizer {bare_ms:.3f} ms"}]


def write_rows(rows: list[dict], path: Path) -> None:
    """Every row so far, atomically (after each part: a later failure loses nothing)."""
    from experiments.files import atomic_write_csv

    atomic_write_csv(path, rows, FIELDS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--smoke", action="store_true", help="toy sizes: checks the script, measures nothing useful")
    parser.add_argument("--out", type=Path, default=OUT, help=f"CSV to write (default {OUT.relative_to(REPO)})")
    parser.add_argument("--impls", default="ours,clamped,oracle,upstream",
                        help="comma-separated: ours (exact), clamped (ours, entropy_mode='clamped'), oracle, upstream")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--folder", type=Path, default=Path(tempfile.gettempdir()) / "lfq-suite-gpu-images",
                        help="where the tokenizer step's generated images are written (once)")
    parser.add_argument("--no-compile", action="store_true", help="the tokenizer step in eager mode only")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_step: no CUDA device is visible; run it on a GPU machine, or with --device cpu --smoke",
              file=sys.stderr)
        return 2
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats}: must be >= 1")
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # the exact mode's numbers, not TF32's
    codes = [2**10, 2**12] if args.smoke else [2**b for b in (10, 12, 14, 16, 18, 20, 22, 24)]
    tokens = [256, 1024] if args.smoke else [4096, 65536, 262144]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    versions = {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda or ""}
    rows = [{**r, **versions} for r in lfq_rows(device, codes, tokens, args.impls.split(","), args.repeats)]
    write_rows(rows, args.out)
    folder = image_folder(args.folder, 64, 32 if args.smoke else 128)
    failed = 0
    for compiled in [False] if args.no_compile else [False, True]:
        try:
            rows += [{**r, **versions} for r in tokenizer_rows(device, args.smoke, args.repeats, compiled, folder)]
        except Exception as error:  # recorded, and the other mode still runs
            failed = 1
            rows.append({"part": "tokenizer_step", "impl": "ours (compiled)" if compiled else "ours",
                         "status": f"error: {type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}",
                         **versions})
            print(f"gpu_step: the tokenizer step ({'compiled' if compiled else 'eager'}) failed: {error!r}", file=sys.stderr)
        write_rows(rows, args.out)
    width = max(len(r["impl"]) for r in rows)
    print(f"\n{'part':15} {'impl':{width}} {'codes':>9} {'tokens':>7} {'ms':>9} {'MB':>9}  status")
    for r in rows:
        print(f"{r['part']:15} {r['impl']:{width}} {r['codes']:>9} {r['tokens']:>7} {r.get('median_ms', ''):>9} "
              f"{r.get('peak_mb', ''):>9}  {r['status']} {r.get('quantizer_share', '') or ''}")
    print(f"wrote {args.out}")
    return failed


if __name__ == "__main__":
    sys.exit(main())
