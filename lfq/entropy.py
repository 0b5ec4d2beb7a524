"""Entropy kernels behind LFQ's auxiliary loss.

Each kernel takes the pre-activation tokens that survive the mask and the
``frac_per_sample_entropy`` subset, shaped ``(N, c, d)`` (N tokens, c codebooks,
d bits), and returns :class:`EntropyTerms`. The quantizer chooses a kernel by
name (``entropy_mode``); nothing else in :mod:`lfq` knows how they compute.

``"reference"`` is the dense computation of ``vector-quantize-pytorch`` 1.14.12:
a softmax over all ``2**d`` codes for every token and ``-p * log(clamp(p, 1e-5))``.
It is kept for bit-level compatibility with published numbers; it needs
``O(N * 2**d)`` memory.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor

REFERENCE_LOG_CLAMP = 1e-5


class EntropyTerms(NamedTuple):
    """Entropies in nats. Scalars are the means over codebooks."""

    per_sample_entropy: Tensor  # scalar: mean over tokens and codebooks of H(p(code | token))
    batch_entropy: Tensor  # scalar: mean over codebooks of H(mean over tokens of p(code | token))
    per_sample_by_codebook: Tensor  # (c,)
    batch_by_codebook: Tensor  # (c,)


class EntropyInputs(NamedTuple):
    z: Tensor  # (N, c, d) float32 pre-activation tokens
    inv_temperature: float
    codebook_scale: float
    codebook: Tensor  # (2**d, d) float32, row j is the code of index j


EntropyKernel = Callable[[EntropyInputs], EntropyTerms]


def clamped_entropy(prob: Tensor, eps: float = REFERENCE_LOG_CLAMP) -> Tensor:
    """``-sum p log(max(p, eps))`` over the last axis, as the reference computes it."""
    return (-prob * prob.clamp(min=eps).log()).sum(dim=-1)


def reference_entropy(inputs: EntropyInputs) -> EntropyTerms:
    z, codebook = inputs.z, inputs.codebook
    # Same operations in the same order as the reference, so the numbers match bit for bit.
    distance = -2 * torch.einsum("... i d, j d -> ... i j", z, codebook)
    prob = (-distance * inputs.inv_temperature).softmax(dim=-1)  # (N, c, 2**d)
    per_token = clamped_entropy(prob)  # (N, c)
    avg_prob = prob.mean(dim=0)  # (c, 2**d)
    batch_by_codebook = clamped_entropy(avg_prob)  # (c,)
    return EntropyTerms(
        per_sample_entropy=per_token.mean(),
        batch_entropy=batch_by_codebook.mean(),
        per_sample_by_codebook=per_token.mean(dim=0),
        batch_by_codebook=batch_by_codebook,
    )


ENTROPY_KERNELS: dict[str, EntropyKernel] = {
    "reference": reference_entropy,
}


def sample_token_subset(num_tokens: int, frac: float, device: torch.device) -> Tensor | None:
    """Boolean mask of a uniformly random subset of ``int(num_tokens * frac)`` tokens.

    Draws from the default CPU generator exactly as the reference does, so a seeded run
    picks the same tokens. Unlike the reference, at least one token is kept (the
    reference returns NaN when ``int(num_tokens * frac) == 0``).
    """
    if frac >= 1.0:
        return None
    num_sampled = max(1, int(num_tokens * frac))
    keep = torch.randn(num_tokens).argsort(dim=-1) < num_sampled
    return keep.to(device)
