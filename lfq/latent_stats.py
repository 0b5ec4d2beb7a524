"""The monitor's statistics of a binary latent (device ops, no grad, no host sync): for a
:class:`lfq.adapters.BinaryLatent` and per-token weights, :func:`latent_sums` gives per codebook the
sums the diagnostic columns are ratios of (saturation: ``|f z| > SATURATION_LOGIT``) and
:func:`weighted_gram` the sum over tokens of ``w * P_A^T P_B``, whose entropy is the exact batch
entropy; see docs/monitor.md ("Diagnostics of binary codes") and docs/entropy.md.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from lfq.adapters import BinaryLatent
from lfq.entropy import EXACT_MAX_BITS, binary_entropy_from_logits, entropy_from_gram
from lfq.subcodes import bit_table, flush_floor, subcode_probs, subcode_split

SATURATION_RATIO = 1e-4
# p (1 - p) = SATURATION_RATIO / 4 at p = (1 - sqrt(1 - SATURATION_RATIO)) / 2; x = logit(1 - p).
_P = (1 - math.sqrt(1 - SATURATION_RATIO)) / 2
SATURATION_LOGIT = math.log((1 - _P) / _P)
# Rows of latent_sums: kept tokens, sum of per-token entropies (nats), saturated token-bits,
# sum of |z| over token-bits, sum of (z - sign(z) m)^2 over token-bits.
LATENT_FIELDS = ("latent_tokens", "per_sample_sum", "saturated_sum", "abs_z_sum", "commitment_sum")
GRAM_BYTES = 64 * 2**20  # working memory per chunk of tokens in weighted_gram
# Bits per group of the group bound, batch_entropy_group_bound: the groups of 9 bits of bsq-vit's
# batch entropy (issue 34; LFQ_SPEC "Group bound"), the approximation whose cost the column shows.
GROUP_BITS = 9


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
    """(c, N, k) bit logits -> (c, N, 2**k) distribution over the k-bit sub-codes, MSB first
    (lfq.subcodes' builder, the quantizer's own)."""
    return subcode_probs(torch.sigmoid(logits), torch.sigmoid(-logits))


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


def dependence_sums(latent: BinaryLatent, weight: Tensor, group_bits: int = GROUP_BITS) -> Tensor:
    """(c, (d + 1)**2 + sum_g 2**g) float64 sums behind the dependence statistics: per codebook
    ``sum_n w_n q_n q_n^T`` with ``q_n = (p_n1, ..., p_nd, 1)`` (``p`` the bit probabilities;
    the last row and column hold the sums of ``p`` and of the weights), then, per contiguous group
    of ``group_bits`` bits (MSB first), ``sum_n w_n`` times the token's distribution over the
    group's sub-codes. Additive over passes and ranks, like :func:`latent_sums`."""
    z = latent.z
    books, bits = z.shape[1], z.shape[2]
    logits = (z * latent.logit_scale).double().transpose(0, 1)  # (c, N, d)
    w = weight.to(torch.float64).reshape(1, -1, 1)
    q = torch.cat([torch.sigmoid(logits), torch.ones_like(logits[..., :1])], dim=-1)  # (c, N, d + 1)
    parts = [torch.bmm((q * w).transpose(1, 2), q).reshape(books, -1)]
    log_p0 = F.logsigmoid(-logits)  # once for every group (on a few strided columns it is slower)
    for start in range(0, bits, group_bits):
        # A group's batch distribution through the factorisation: P_A^T diag(w) P_B over its high and
        # low halves (2 N 2**g flops), flattened MSB first, not N 2**g probabilities built one by one.
        stop = min(start + group_bits, bits)
        high = start + subcode_split(stop - start)[0]
        prob_a = _block_probs(logits, log_p0, start, high) * w if high > start else w.expand(books, -1, 1)
        parts.append(torch.bmm(prob_a.transpose(1, 2), _block_probs(logits, log_p0, high, stop)).reshape(books, -1))
    return torch.cat(parts, dim=-1)


def _block_probs(logits: Tensor, log_p0: Tensor, start: int, stop: int) -> Tensor:
    """(c, N, 2**k) distribution over the codes of bits ``start:stop`` (k of them, MSB first) of
    (c, N, d) float64 bit logits, ``log_p0`` their log sigmoid(-x), as
    exp(sum_j log sigmoid(-x_j) + x . bits(code)): log sigmoid(x) - log sigmoid(-x) = x, so
    a code's log probability is one product with the bit table (a few bits: a small matmul and
    an exp, where building the columns one bit at a time is ~2**k strided passes). Values under
    :func:`lfq.subcodes.flush_floor` are 0, as in the builder, and exp never makes a subnormal
    (x86 arithmetic on them is 10-100x slower)."""
    logits, base = logits[..., start:stop], log_p0[..., start:stop].sum(-1, keepdim=True)
    table = bit_table(stop - start, logits).T.expand(logits.shape[0], -1, -1)  # (c, k, 2**k)
    floor = flush_floor(logits.dtype)  # exp of a log probability under log(floor) - 1: below the floor, not subnormal
    log_probs = torch.baddbmm(base, logits, table).clamp_(min=math.log(floor) - 1)
    return F.threshold_(log_probs.exp_(), floor, 0.0)


def _entropy_nats(prob: Tensor) -> Tensor:
    """Entropy over the last axis, ``0 log 0 = 0``; negative rounding residue counts as 0."""
    prob = prob.clamp(min=0)
    return -torch.special.xlogy(prob, prob).sum(-1)


def dependence_stats(sums: Tensor, bits: int, group_bits: int = GROUP_BITS) -> tuple[Tensor, Tensor, Tensor]:
    """From :func:`dependence_sums`: ``(c, 3)`` float32 [sum over bits of the entropy of the
    batch's mean bit probability, max over bit pairs i != j of their mutual information, sum
    over groups of each group's exact batch entropy (the group bound)], the ``(c, d, d)``
    float64 pairwise mutual information (nats; diagonal 0) and the ``(c, groups)`` float64 exact
    batch entropy of each group. The mutual information is that of the
    batch distribution: bits i and j of a code drawn by picking a kept token at random and then
    its code from ``prod_k Bernoulli(p_k)``. NaN without tokens; no host sync."""
    books, width = sums.shape[0], bits + 1
    moments = sums[:, : width * width].reshape(books, width, width)
    tokens = moments[:, bits, bits].clamp(min=1e-300).reshape(-1, 1, 1)
    both = moments[:, :bits, :bits] / tokens  # P(bit i = 1 and bit j = 1)
    ones = moments[:, :bits, bits] / tokens[..., 0]  # P(bit i = 1), (c, d)
    one_i, one_j = ones.unsqueeze(-1), ones.unsqueeze(-2)
    joint = torch.stack([both, one_i - both, one_j - both, 1 - one_i - one_j + both], dim=-1)
    bit_h = _entropy_nats(torch.stack([ones, 1 - ones], dim=-1))  # (c, d)
    mi = (bit_h.unsqueeze(-1) + bit_h.unsqueeze(-2) - _entropy_nats(joint)).clamp(min=0)
    mi = mi * (1 - torch.eye(bits, dtype=mi.dtype, device=mi.device))
    pair_max = mi.flatten(1).max(-1).values if bits > 1 else mi.new_full((books,), math.nan)
    groups, start = [], width * width
    for first in range(0, bits, group_bits):
        size = 2 ** min(group_bits, bits - first)
        groups.append(_entropy_nats(sums[:, start : start + size] / tokens[:, 0]))
        start += size
    by_group = torch.stack(groups, dim=-1)
    empty = moments[:, bits, bits] <= 0
    stats = torch.stack([bit_h.sum(-1), pair_max, by_group.sum(-1)], dim=-1).masked_fill(empty.unsqueeze(-1), math.nan)
    return stats.float(), mi, by_group


def gram_entropy(gram: Tensor, tokens: Tensor) -> Tensor:
    """Entropy (nats) of each codebook's batch distribution ``gram / tokens``, (c,); NaN without tokens."""
    return entropy_from_gram(gram, tokens.clamp(min=1).reshape(-1, 1)).masked_fill(tokens <= 0, math.nan)


__all__ = ["SATURATION_LOGIT", "SATURATION_RATIO", "LATENT_FIELDS", "GROUP_BITS", "latent_sums", "weighted_gram",
           "gram_entropy", "dependence_sums", "dependence_stats"]
