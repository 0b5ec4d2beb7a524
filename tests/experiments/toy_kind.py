"""A toy quantizer kind, ``sign``: each latent channel becomes one bit, +-``sign_scale``, straight through.

What a new kind is: this one module plus its line in ``experiments.quantizers.QUANTIZERS``
(``tests/experiments/test_exp_plugins.py`` adds the line); it defines ``CONFIG``, ``build`` and
``memory``, and its module follows the protocol ``lfq.monitor`` watches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from experiments.quantizers import QuantizerConfig
from experiments.sections import check, is_power_of_two, new_field
from lfq import CodebookStats, Return


@dataclass(frozen=True)
class SignConfig(QuantizerConfig):
    kind: str = "sign"
    sign_scale: float = new_field(1.0)  # the value of a set bit (new_field: no other kind's run id changes)

    def validate(self) -> None:
        super().validate()
        check(is_power_of_two(self.codebook_size), "quantizer.codebook_size", self.codebook_size,
              "must be a power of two for kind='sign' (one channel per bit)")
        check(self.sign_scale > 0, "quantizer.sign_scale", self.sign_scale, "must be > 0")


class Sign(nn.Module):
    def __init__(self, *, dim: int | None, codebook_size: int, scale: float):
        super().__init__()
        bits = int(math.log2(codebook_size))
        self.dim, self.codebook_size, self.scale = dim or bits, codebook_size, scale
        self.num_codebooks, self.keep_num_codebooks_dim = 1, False
        self.project_in = nn.Linear(self.dim, bits) if self.dim != bits else nn.Identity()
        self.project_out = nn.Linear(bits, self.dim) if self.dim != bits else nn.Identity()
        self.register_buffer("_weights", 2 ** torch.arange(bits - 1, -1, -1), persistent=False)
        self.last_stats: CodebookStats | None = None

    def forward(self, x: Tensor, inv_temperature: float | None = None) -> Return:
        z = self.project_in(x)  # (b, n, bits)
        signs = torch.where(z > 0, self.scale, -self.scale)
        quantized = z + (signs - z).detach()
        indices = ((z > 0).long() * self._weights).sum(-1)
        commitment = (z - signs).pow(2).mean().detach()[None]
        self.last_stats = CodebookStats(per_sample_entropy=None, batch_entropy=None, commitment=commitment,
                                        aux_loss=torch.zeros_like(commitment)) if self.training else None
        return Return(self.project_out(quantized), indices, z.new_zeros(()))


CONFIG = SignConfig


def build(cfg: SignConfig, latent_dim: int | None) -> nn.Module:
    return Sign(dim=latent_dim, codebook_size=cfg.codebook_size, scale=cfg.sign_scale)


def memory(cfg: SignConfig, tokens: int) -> dict[str, int]:
    """Bytes the kind certainly needs (experiments.resources): its bit weights."""
    return {"quantizer.codebook_size: the sign kind's bit weights": 8 * int(math.log2(cfg.codebook_size))}
