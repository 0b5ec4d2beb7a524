"""Our LFQ in a LightningModule, watched by LFQMonitorCallback, logging to TensorBoard.

    python examples/lightning_lfq.py --steps 300 --log-dir runs/lightning_lfq
    tensorboard --logdir runs/lightning_lfq

The callback attaches the monitor to the module, follows ``trainer.global_step``, logs through
the trainer's loggers and measures each validation epoch's code usage (``val_usage_fraction``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import lightning
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lfq import LFQ  # noqa: E402
from lfq.integrations.lightning import LFQMonitorCallback  # noqa: E402


class Tokenizer(lightning.LightningModule):
    def __init__(self, bits: int = 10, width: int = 32) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(3, width, 4, 2, 1), nn.GELU(), nn.Conv2d(width, bits, 4, 2, 1))
        self.quantizer = LFQ(dim=bits, codebook_size=2**bits)
        self.decoder = nn.Sequential(nn.ConvTranspose2d(bits, width, 4, 2, 1), nn.GELU(),
                                     nn.ConvTranspose2d(width, 3, 4, 2, 1))

    def forward(self, images: torch.Tensor):
        quantized, _, aux_loss = self.quantizer(self.encoder(images), inv_temperature=10.0)
        return self.decoder(quantized), aux_loss

    def training_step(self, batch, batch_idx):
        (images,) = batch
        reconstruction, aux_loss = self(images)
        loss = F.mse_loss(reconstruction, images) + aux_loss
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        (images,) = batch
        self.log("val_mse", F.mse_loss(self(images)[0], images))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def smooth_images(n: int, seed: int) -> TensorDataset:
    coarse = torch.rand(n, 3, 4, 4, generator=torch.Generator().manual_seed(seed))
    return TensorDataset(F.interpolate(coarse, size=32, mode="bilinear", align_corners=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--log-dir", type=Path, default=Path("runs/lightning_lfq"))
    args = parser.parse_args()

    torch.manual_seed(0)
    trainer = lightning.Trainer(
        max_steps=args.steps, accelerator="cpu", logger=TensorBoardLogger(args.log_dir, name="tokenizer"),
        callbacks=[LFQMonitorCallback(log_every=args.log_every, histogram_every=args.log_every)],
        val_check_interval=min(args.steps, 100), check_val_every_n_epoch=None, log_every_n_steps=args.log_every,
        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Tokenizer(), DataLoader(smooth_images(2048, 0), batch_size=32, shuffle=True),
                DataLoader(smooth_images(256, 1), batch_size=64))
    print(f"validation usage: {trainer.callback_metrics['val_usage_fraction'].item():.3f}; "
          f"tensorboard --logdir {args.log_dir}")


if __name__ == "__main__":
    main()
