"""Kind ``fsq``: finite scalar quantization (:class:`experiments.baselines.FSQ`, arXiv 2309.15505), its
levels given or derived from the codebook size."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from experiments.baselines import FSQ
from experiments.quantizers import QuantizerConfig
from experiments.sections import ConfigError, check

# FSQ paper (arXiv 2309.15505), Table 1: the levels it recommends for each target size.
FSQ_PAPER_LEVELS: dict[int, tuple[int, ...]] = {
    2**8: (8, 6, 5), 2**10: (8, 5, 5, 5), 2**12: (7, 5, 5, 5, 5), 2**14: (8, 8, 8, 6, 5), 2**16: (8, 8, 8, 5, 5, 5),
}


@dataclass(frozen=True)
class FSQConfig(QuantizerConfig):
    kind: str = "fsq"
    fsq_levels: tuple[int, ...] | None = None  # None = derived from codebook_size (default_fsq_levels)

    def validate(self) -> None:
        super().validate()
        if self.fsq_levels is not None:
            check(len(self.fsq_levels) >= 1 and all(level >= 2 for level in self.fsq_levels),
                  "quantizer.fsq_levels", self.fsq_levels, "must be a non-empty list of ints >= 2")
        else:
            default_fsq_levels(self.codebook_size)

    def resolved_fsq_levels(self) -> tuple[int, ...]:
        return self.fsq_levels if self.fsq_levels is not None else default_fsq_levels(self.codebook_size)


def default_fsq_levels(codebook_size: int) -> tuple[int, ...]:
    """The paper's levels for its sizes; otherwise levels of 8, 4, 2 whose product is the size."""
    if codebook_size in FSQ_PAPER_LEVELS:
        return FSQ_PAPER_LEVELS[codebook_size]
    bits = round(math.log2(codebook_size))
    if 2**bits != codebook_size:
        raise ConfigError(
            f"quantizer.codebook_size={codebook_size!r} is invalid for kind='fsq' without "
            f"quantizer.fsq_levels: give a power of two or explicit quantizer.fsq_levels"
        )
    levels = [8] * (bits // 3) + {0: [], 1: [2], 2: [4]}[bits % 3]
    return tuple(sorted(levels, reverse=True))


CONFIG = FSQConfig


def build(cfg: FSQConfig, latent_dim: int | None) -> nn.Module:
    return FSQ(dim=latent_dim, levels=cfg.resolved_fsq_levels(), num_codebooks=cfg.num_codebooks)
