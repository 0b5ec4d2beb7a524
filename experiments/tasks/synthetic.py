"""Task ``synthetic``: an MLP autoencoder with a quantizer bottleneck on a Gaussian mixture.

Seconds per run on a CPU: the unit of the fast tests. Each example is one token: the encoder
maps a point of ``[0, 1]^input_dim`` to one latent vector, the quantizer turns it into a code,
the decoder reconstructs the point. With ``num_clusters`` mixture components and a codebook of
``codebook_size`` codes, how many codes survive training is the question.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from experiments.config import Config
from experiments.quantizers import build_quantizer
from experiments.tasks import ModelOutput


class GaussianMixture:
    """Fixed by ``data.mixture_seed``: the centres and the validation set never depend on the run seed."""

    def __init__(self, config: Config):
        d = config.data
        g = torch.Generator().manual_seed(d.mixture_seed)
        self.centers = torch.rand(d.num_clusters, d.input_dim, generator=g) * 0.8 + 0.1
        self.std = d.cluster_std
        self.val = self._sample(g, d.val_size)

    def _sample(self, g: torch.Generator, n: int) -> Tensor:
        which = torch.randint(len(self.centers), (n,), generator=g)
        return self.centers[which] + self.std * torch.randn(n, self.centers.shape[1], generator=g)

    def train_batch(self, g: torch.Generator, batch_size: int) -> Tensor:
        return self._sample(g, batch_size)


def build_dataset(config: Config) -> GaussianMixture:
    return GaussianMixture(config)


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.GELU())
    return nn.Sequential(*layers)


class MLPAutoencoder(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        m, q = config.model, config.quantizer
        self.quantizer = build_quantizer(q, m.latent_dim)
        self.inv_temperature = q.inv_temperature
        hidden = [m.hidden_dim] * m.depth
        self.encoder = _mlp([config.data.input_dim, *hidden, self.quantizer.dim])
        self.decoder = _mlp([self.quantizer.dim, *hidden, config.data.input_dim])

    def forward(self, x: Tensor) -> ModelOutput:
        z = self.encoder(x)[:, None, :]  # (b, 1 token, d)
        q = self.quantizer(z, inv_temperature=self.inv_temperature)
        return ModelOutput(self.decoder(q.quantized[:, 0]), q.entropy_aux_loss, q.indices)


def build_model(config: Config) -> nn.Module:
    return MLPAutoencoder(config)


def memory(config: Config) -> tuple[dict[str, int], int]:
    """Bytes a run certainly needs for its data (see experiments.resources), and tokens per batch."""
    d, m = config.data, config.model
    activations = d.batch_size * (d.input_dim + 2 * m.depth * m.hidden_dim) * 4
    return {"data.batch_size: one batch and its activations": activations,
            "data.val_size: the validation set": d.val_size * d.input_dim * 4}, d.batch_size
