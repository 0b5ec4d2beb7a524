"""A toy task, ``line``: points on a segment of ``[0, 1]^input_dim``, one token each, through a linear
autoencoder with the configured quantizer.

What a new task is: this one module plus its line in ``experiments.tasks.TASKS``
(``tests/experiments/test_exp_plugins.py`` adds the line); it defines ``build_dataset``,
``build_model`` and ``memory``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from experiments.config import Config
from experiments.quantizers import build_quantizer
from experiments.tasks import ModelOutput


class Segment:
    """Points ``a + t (b - a)``, t uniform in [0, 1]; the validation set is fixed by ``data.mixture_seed``."""

    def __init__(self, config: Config):
        d = config.data
        g = torch.Generator().manual_seed(d.mixture_seed)
        self.a, self.b = torch.rand(2, d.input_dim, generator=g)
        self.val = self.train_batch(g, d.val_size)

    def train_batch(self, g: torch.Generator, batch_size: int) -> Tensor:
        t = torch.rand(batch_size, 1, generator=g)
        return self.a + t * (self.b - self.a)


class LinearAutoencoder(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        q = config.quantizer
        self.quantizer = build_quantizer(q, config.model.latent_dim)
        self.inv_temperature = q.inv_temperature
        self.encoder = nn.Linear(config.data.input_dim, self.quantizer.dim)
        self.decoder = nn.Linear(self.quantizer.dim, config.data.input_dim)

    def forward(self, x: Tensor) -> ModelOutput:
        q = self.quantizer(self.encoder(x)[:, None, :], inv_temperature=self.inv_temperature)
        return ModelOutput(self.decoder(q.quantized[:, 0]), q.entropy_aux_loss, q.indices)


def build_dataset(config: Config) -> Segment:
    return Segment(config)


def build_model(config: Config) -> nn.Module:
    return LinearAutoencoder(config)


def memory(config: Config) -> tuple[dict[str, int], int]:
    """Bytes a run certainly needs for its data (experiments.resources), and tokens per batch."""
    d = config.data
    return {"data.val_size: the line's validation points": d.val_size * d.input_dim * 4}, d.batch_size
