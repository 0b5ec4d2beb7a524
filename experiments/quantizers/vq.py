"""Kind ``vq``: a VQ-VAE codebook (:class:`experiments.baselines.VectorQuantizer`), the baseline with
k-means / random-sample initialisation and dead-code replacement."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from experiments.baselines import VectorQuantizer
from experiments.quantizers import QuantizerConfig
from experiments.sections import check, check_choice, new_field


@dataclass(frozen=True)
class VQConfig(QuantizerConfig):
    kind: str = "vq"
    codebook_loss_weight: float = 1.0  # weight of ||sg(z) - e||^2 that moves the codes
    vq_code_dim: int | None = None  # channels per code; None = ceil(log2(codebook_size)), as LFQ
    vq_init: str = new_field("uniform")  # uniform | random_sample | kmeans (on the first training batch)
    vq_dead_code_threshold: float = new_field(0.0)  # replace codes whose EMA count per batch falls below

    def validate(self) -> None:
        super().validate()
        check(self.codebook_loss_weight >= 0, "quantizer.codebook_loss_weight", self.codebook_loss_weight,
              "must be >= 0")
        check(self.vq_code_dim is None or self.vq_code_dim >= 1, "quantizer.vq_code_dim", self.vq_code_dim,
              "must be >= 1 or null")
        check_choice("quantizer.vq_init", self.vq_init, VectorQuantizer.INITS)
        check(self.vq_dead_code_threshold >= 0, "quantizer.vq_dead_code_threshold", self.vq_dead_code_threshold,
              "must be >= 0 (0 disables dead-code replacement)")


CONFIG = VQConfig


def build(cfg: VQConfig, latent_dim: int | None) -> nn.Module:
    return VectorQuantizer(
        dim=latent_dim,
        codebook_size=cfg.codebook_size,
        code_dim=cfg.vq_code_dim or math.ceil(math.log2(cfg.codebook_size)),
        num_codebooks=cfg.num_codebooks,
        commitment_loss_weight=cfg.commitment_loss_weight,
        codebook_loss_weight=cfg.codebook_loss_weight,
        init=cfg.vq_init,
        dead_code_threshold=cfg.vq_dead_code_threshold,
    )


def memory(cfg: VQConfig, tokens: int) -> dict[str, int]:
    """The VQ codebook, its gradient and AdamW's two moments, float32."""
    dim = cfg.vq_code_dim or max(1, math.ceil(math.log2(cfg.codebook_size)))
    return {"quantizer.codebook_size: the VQ codebook, its gradient and AdamW state":
            4 * cfg.num_codebooks * cfg.codebook_size * dim * 4}
