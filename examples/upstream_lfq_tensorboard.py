"""Train a small conv tokenizer with the newest vector-quantize-pytorch LFQ, watched by LFQMonitor,
logging to TensorBoard (and JSON lines).

    python examples/upstream_lfq_tensorboard.py --steps 300 --log-dir runs/upstream_lfq
    tensorboard --logdir runs/upstream_lfq

Your own training loop is unchanged; the monitor adds three lines (marked below). It finds the
upstream LFQ inside the model, computes the exact entropies, saturation and code usage from the
latent every ``--log-every`` steps, and counts codes every step. In this repository the newest
upstream lives in .upstream/vqp-latest (``make upstream``); elsewhere pip's
``vector-quantize-pytorch`` is used.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
if (REPO / ".upstream" / "vqp-latest").is_dir():
    sys.path.insert(0, str(REPO / ".upstream" / "vqp-latest"))
sys.path.insert(0, str(REPO))
from vector_quantize_pytorch import LFQ  # noqa: E402

from lfq import JsonlSink, LFQMonitor, Tee, TensorBoardSink  # noqa: E402


class Tokenizer(nn.Module):
    """32x32 RGB -> 8x8 grid of codes -> 32x32 RGB."""

    def __init__(self, bits: int, width: int = 32) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(3, width, 4, 2, 1), nn.GELU(), nn.Conv2d(width, bits, 4, 2, 1))
        self.quantizer = LFQ(dim=bits, codebook_size=2**bits, entropy_loss_weight=0.1, commitment_loss_weight=0.25)
        self.decoder = nn.Sequential(nn.ConvTranspose2d(bits, width, 4, 2, 1), nn.GELU(),
                                     nn.ConvTranspose2d(width, 3, 4, 2, 1))

    def forward(self, images: torch.Tensor):
        quantized, _, aux_loss = self.quantizer(self.encoder(images), inv_temperature=10.0)
        return self.decoder(quantized), aux_loss


def smooth_images(batch: int, generator: torch.Generator) -> torch.Tensor:
    """Blobs: low-resolution noise upsampled to 32x32, in [0, 1]."""
    coarse = torch.rand(batch, 3, 4, 4, generator=generator)
    return F.interpolate(coarse, size=32, mode="bilinear", align_corners=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--bits", type=int, default=10, help="log2 of the codebook size")
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--log-dir", type=Path, default=Path("runs/upstream_lfq"))
    args = parser.parse_args()

    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = Tokenizer(args.bits)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    tensorboard = TensorBoardSink(args.log_dir)  # 1
    monitor = LFQMonitor(  # 2
        model, sink=Tee(tensorboard, JsonlSink(args.log_dir / "metrics.jsonl")), log_every=args.log_every,
        histogram_every=args.log_every, histogram_sink=Tee(tensorboard, JsonlSink(args.log_dir / "histograms.jsonl")))
    for step in range(args.steps):
        monitor.set_step(step)  # optional: without it every training forward of the model is a step
        images = smooth_images(32, generator)
        reconstruction, aux_loss = model(images)
        loss = F.mse_loss(reconstruction, images) + aux_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    validation = monitor.evaluate([smooth_images(64, generator) for _ in range(4)], log=True)
    monitor.detach()  # 3: flushes the last records
    tensorboard.close()
    print(f"validation usage: {validation.usage_fraction():.3f} of {2**args.bits} codes; "
          f"tensorboard --logdir {args.log_dir}")


if __name__ == "__main__":
    main()
