"""The monitor's statistics of a binary latent (device ops, no grad, no host sync): for a
:class:`lfq.adapters.BinaryLatent` and per-token weights, :func:`latent_sums` gives per codebook the
sums the diagnostic columns are ratios of (saturation: ``|f z| > SATURATION_LOGIT``) and
:func:`weighted_gram` the sum over tokens of ``w * P_A^T P_B``, whose entropy is the exact batch
entropy; see docs/monitor.md ("Diagnostics of binary codes") and docs/entropy.md.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lfq.adapters import BinaryLatent
from lfq.entropy import EXACT_MAX_BITS, binary_entropy_from_logits, entropy_from_gram
from lfq.subcodes import subcode_split

SATURATION_RATIO = 1e-4
# p (1 - p) = SATURATION_RATIO / 4 at p = (1 - sqrt(1 - SATURATION_RATIO)) / 2; x = logit(1 - p).
_P = (1 - math.sqrt(1 - SATURATION_RATIO)) / 2
SATURATION_LOGIT = math.log((1 - _P) / _P)
# Rows of latent_sums: kept tokens, sum of per-token entropies (nats), saturated token-bits,
# sum of |z| over token-bits, sum of (z - sign(z) m)^2 over token-bits.
LATENT_FIELDS = ("latent_tokens", "per_sample_sum", "saturated_sum", "abs_z_sum", "commitment_sum")
GRAM_BYTES = 64 * 2**20  # working memory per chunk of tokens in weighted_gram


def latent_sums(latent: BinaryLatent, weight: Tensor, entropies: bool = True) -> Tensor:
    """(len(LATENT_FIELDS), c) float32 sums over the tokens weighted by ``weight`` (N,);
    ``entropies=False`` leaves the per-sample entropy sum at 0 (for quantizers that report it)."""
    z = latent.z
    w = weight.to(dtype=z.dtype).reshape(-1, 1)  # (N, 1)
    logits = z * latent.logit_scale
    per_token = binary_entropy_from_logits(logits).sum(-1) if entropies else z.new_zeros(z.shape[:2])  # (N, c)
    saturated = (logits.abs() > SATURATION_LOGIT).sum(-1).to(z.dtype)
    magnitude = z.abs()
    commitment = (magnitude - latent.code_magnitude).square().sum(-1)  # |z - sign(z) m| = ||z| - m|
    rows = [w.expand(-1, z.shape[1]), per_token * w, saturated * w, magnitude.sum(-1) * w, commitment * w]
    return torch.stack([r.sum(0) for r in rows]).float()


def _subcode_probs(logits: Tensor) -> Tensor:
    """(c, N, k) bit logits -> (c, N, 2**k) distribution over the k-bit sub-codes, MSB first."""
    p1, p0 = torch.sigmoid(logits), torch.sigmoid(-logits)
    probs = torch.ones_like(logits[..., :1])
    for bit in range(logits.shape[-1]):  # each new bit is the least significant so far
        probs = torch.stack((probs * p0[..., bit : bit + 1], probs * p1[..., bit : bit + 1]), dim=-1).flatten(-2)
    return probs


def weighted_gram(latent: BinaryLatent, weight: Tensor) -> Tensor | None:
    """sum_n w_n P_A[n]^T P_B[n] per codebook, (c, 2**a, 2**b) float32; None above 2**EXACT_MAX_BITS codes."""
    bits = latent.z.shape[-1]
    if bits > EXACT_MAX_BITS:
        return None
    high, low = subcode_split(bits)
    logits = (latent.z * latent.logit_scale).float().transpose(0, 1)  # (c, N, d)
    w = weight.to(torch.float32).reshape(1, -1, 1)
    books, tokens = logits.shape[0], logits.shape[1]
    chunk = max(256, GRAM_BYTES // (4 * books * (2**high + 2**low) * 3))
    gram = logits.new_zeros(books, 2**high, 2**low)
    for start in range(0, tokens, chunk):
        part = logits[:, start : start + chunk]
        prob_a = _subcode_probs(part[..., :high]) * w[:, start : start + chunk]
        gram.baddbmm_(prob_a.transpose(1, 2), _subcode_probs(part[..., high:]))
    return gram


def gram_entropy(gram: Tensor, tokens: Tensor) -> Tensor:
    """Entropy (nats) of each codebook's batch distribution ``gram / tokens``, (c,); NaN without tokens."""
    return entropy_from_gram(gram, tokens.clamp(min=1).reshape(-1, 1)).masked_fill(tokens <= 0, math.nan)


__all__ = ["SATURATION_LOGIT", "SATURATION_RATIO", "LATENT_FIELDS", "latent_sums", "weighted_gram",
           "gram_entropy"]
