"""Kinds ``lfq`` and ``bsq``: :class:`lfq.LFQ`, on the hypercube or on the sphere (``spherical=True``,
BSQ, arXiv 2406.07548, with exact entropies); one config class, :class:`LFQConfig`, for both."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from experiments.quantizers import QuantizerConfig
from experiments.sections import check, check_choice, is_power_of_two
from lfq import LFQ
from lfq.entropy import ENTROPY_KERNELS


@dataclass(frozen=True)
class LFQConfig(QuantizerConfig):
    """lfq and bsq: lfq.LFQ's fields under its names and defaults, except ``entropy_mode``, which is
    ``"reference"`` here where ``lfq.LFQ`` defaults to ``"exact"``: the suite measures the reference
    implementation's behaviour (its dense, clamped entropy), and the default enters every run id, so
    changing it would rename every published run; a config asks for ``exact`` by name."""

    entropy_mode: str = "reference"
    diversity_gamma: float = 1.0
    frac_per_sample_entropy: float = 1.0
    codebook_scale: float = 1.0

    def validate(self) -> None:
        super().validate()
        check(is_power_of_two(self.codebook_size), "quantizer.codebook_size", self.codebook_size,
              f"must be a power of two >= 2 for kind={self.kind!r} (nearest: "
              f"{2 ** max(1, round(math.log2(max(self.codebook_size, 1))))})")
        check_choice("quantizer.entropy_mode", self.entropy_mode, sorted(ENTROPY_KERNELS))
        check(0.0 < self.frac_per_sample_entropy <= 1.0, "quantizer.frac_per_sample_entropy",
              self.frac_per_sample_entropy, "must be in (0, 1]")
        check(self.codebook_scale > 0, "quantizer.codebook_scale", self.codebook_scale, "must be > 0")
        check(self.diversity_gamma >= 0, "quantizer.diversity_gamma", self.diversity_gamma,
              "must be >= 0 (the weight of the batch entropy the entropy loss rewards; 0 leaves it out)")


CONFIG = LFQConfig


def build(cfg: LFQConfig, latent_dim: int | None) -> nn.Module:
    return LFQ(
        spherical=cfg.kind == "bsq",
        dim=latent_dim,
        codebook_size=cfg.codebook_size,
        num_codebooks=cfg.num_codebooks,
        keep_num_codebooks_dim=cfg.num_codebooks > 1,
        entropy_loss_weight=cfg.entropy_loss_weight,
        commitment_loss_weight=cfg.commitment_loss_weight,
        diversity_gamma=cfg.diversity_gamma,
        frac_per_sample_entropy=cfg.frac_per_sample_entropy,
        codebook_scale=cfg.codebook_scale,
        entropy_mode=cfg.entropy_mode,
    )


def memory(cfg: LFQConfig, tokens: int) -> dict[str, int]:
    """Bytes LFQ/BSQ certainly need (experiments.resources): the codebook buffer, and the dense
    tokens x codes softmax of the reference entropy."""
    bits = max(1, math.ceil(math.log2(cfg.codebook_size)))
    parts = {"quantizer.codebook_size: the LFQ codebook buffer": cfg.codebook_size * bits * 4}
    if cfg.entropy_mode == "reference":
        parts["quantizer.codebook_size x data.batch_size: the reference entropy's dense softmax"] = (
            tokens * cfg.codebook_size * cfg.num_codebooks * 4)
    return parts
