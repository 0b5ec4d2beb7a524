"""Entropy kernels behind LFQ's auxiliary loss, one per ``entropy_mode`` (``ENTROPY_KERNELS``:
reference, exact, group, clamped, open_magvit2), each taking the kept tokens' pre-activations
``(N, c, d)`` and returning :class:`EntropyTerms` in the dtype of ``z``; the derivation of the
factorised kernels (independent bits, ``P_A^T P_B / N``, the clamped per-token sum) is
docs/entropy.md, the sub-code machinery :mod:`lfq.subcodes`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from lfq import subcodes
from lfq.subcodes import subcode_gram

REFERENCE_LOG_CLAMP = 1e-5
# Open-MAGVIT2 adds this inside the log of its batch entropy.
OPEN_MAGVIT2_LOG_EPS = 1e-5

# Largest exact codebook. The batch distribution is a 2**d vector per codebook; the
# entropy and its backward hold about 8 such vectors (gram, gradient, avg, log,
# products): at 2**24 that is 8 * 64 MiB = 0.5 GiB in float32 per codebook, and the
# three products cost 6 * N * 2**24 flops (0.4 TFLOP at 4096 tokens, seconds on a CPU).
# At 2**26 it would be 2 GiB and 4x the time, too much for a loss term.
EXACT_MAX_BITS = 24
# Group size of the "group" kernel: 2**16-code groups are cheap (N * 2**16 work each)
# and as large as possible keeps the upper bound tight.
GROUP_MAX_BITS = 16


class EntropyTerms(NamedTuple):
    """Entropies in nats. Scalars are the means over codebooks."""

    per_sample_entropy: Tensor  # scalar: mean over tokens and codebooks of H(p(code | token))
    batch_entropy: Tensor  # scalar: mean over codebooks of H(mean over tokens of p(code | token))
    per_sample_by_codebook: Tensor  # (c,)
    batch_by_codebook: Tensor  # (c,)


class EntropyInputs(NamedTuple):
    z: Tensor  # (N, c, d) pre-activation tokens (on the sphere: normalised), masked-out ones included
    inv_temperature: float
    codebook_scale: float  # magnitude of a code coordinate: s, or s / sqrt(d) on the sphere
    codebook: Tensor  # (2**d, d), row j is the code of index j
    # (N,) bool, True = the token counts (mask and frac subset applied); None = all count.
    # The reference kernel needs the unselected rows: it selects after its softmax, as
    # the reference does, so its matrix product has the reference's shape and rounding.
    keep: Tensor | None = None
    # Distributed: all-reduce (SUM, differentiable) of a flat tensor across ranks. When
    # set, kernels reduce SUMS over tokens and the token count, then divide: the terms
    # are those of the global batch. None = this process's tokens only.
    reduce: Callable[[Tensor], Tensor] | None = None


EntropyKernel = Callable[[EntropyInputs], EntropyTerms]


def clamped_entropy(prob: Tensor, eps: float = REFERENCE_LOG_CLAMP) -> Tensor:
    """``-sum p log(max(p, eps))`` over the last axis, as the reference computes it."""
    return (-prob * prob.clamp(min=eps).log()).sum(dim=-1)


def reference_entropy(inputs: EntropyInputs) -> EntropyTerms:
    z, codebook = inputs.z, inputs.codebook
    # Same operations in the same order as the reference, so the numbers match bit for bit.
    distance = -2 * torch.einsum("... i d, j d -> ... i j", z, codebook)
    prob = (-distance * inputs.inv_temperature).softmax(dim=-1)  # (N, c, 2**d)
    if inputs.keep is not None:
        prob = prob[inputs.keep]
    per_token = clamped_entropy(prob)  # (N, c)
    if inputs.reduce is None:
        avg_prob = prob.mean(dim=0)  # (c, 2**d)
        return _terms(per_token, clamped_entropy(avg_prob))
    per_sample_sum, prob_sum, count = reduce_sums(inputs.reduce, prob.shape[0], per_token.sum(dim=0), prob.sum(dim=0))
    return _terms_from_sums(per_sample_sum, clamped_entropy(prob_sum / count), count)


class AllReduceSum(torch.autograd.Function):
    """Differentiable all-reduce (SUM) across the default process group.
    Backward all-reduces the incoming gradients too: every rank's loss holds the same
    global term, so the gradient reaching a rank's tokens is the sum over ranks, and
    DDP's averaging of parameter gradients then divides that sum by the world size,
    leaving exactly the single-process gradient on the concatenated batch.
    """

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:  # type: ignore[override]
        import torch.distributed as dist

        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        return AllReduceSum.apply(grad)


def reduce_sums(reduce: Callable[[Tensor], Tensor], count: int, *sums: Tensor) -> tuple[Tensor, ...]:
    """All-reduce ``sums`` and the token ``count`` in one collective; returns (*sums, count).
    The global count is clamped at 1 so that a global batch without tokens gives zero
    terms (all sums are 0) rather than 0 / 0.
    """
    flat = torch.cat([t.reshape(-1) for t in sums] + [sums[0].new_full((1,), float(count))])
    flat = reduce(flat)
    out, start = [], 0
    for t in sums:
        out.append(flat[start : start + t.numel()].reshape(t.shape))
        start += t.numel()
    return (*out, flat[-1].clamp(min=1))


def _terms_from_sums(per_sample_sum: Tensor, batch_by_codebook: Tensor, count: Tensor) -> EntropyTerms:
    per_sample_by_codebook = per_sample_sum / count
    return EntropyTerms(
        per_sample_entropy=per_sample_by_codebook.mean(),
        batch_entropy=batch_by_codebook.mean(),
        per_sample_by_codebook=per_sample_by_codebook,
        batch_by_codebook=batch_by_codebook,
    )


def _terms(per_token: Tensor, batch_by_codebook: Tensor) -> EntropyTerms:
    return EntropyTerms(
        per_sample_entropy=per_token.mean(),
        batch_entropy=batch_by_codebook.mean(),
        per_sample_by_codebook=per_token.mean(dim=0),
        batch_by_codebook=batch_by_codebook,
    )


# ---------------------------------------------------------------- factorised kernels


def _checked_tokens(inputs: EntropyInputs) -> EntropyInputs:
    """Validated inputs with the kept rows selected (factorised kernels select first)."""
    z = inputs.z
    if z.ndim != 3 or not z.is_floating_point():
        raise ValueError(
            f"entropy kernels take z of shape (tokens, codebooks, bits) and a floating dtype, "
            f"got shape {tuple(z.shape)} and dtype {z.dtype}"
        )
    if inputs.keep is not None:
        inputs = inputs._replace(z=z[inputs.keep], keep=None)
    # A rank may hold no tokens in a distributed batch; it still joins the all-reduce.
    if inputs.z.shape[0] == 0 and inputs.reduce is None:
        raise ValueError("entropy kernels need at least one token (z has 0 rows); skip the loss instead")
    return inputs


def bit_logits(inputs: EntropyInputs) -> Tensor:
    """Log-odds of each bit being +s: ``4 * tau * s * z``, shape (N, c, d)."""
    return inputs.z * (4.0 * inputs.inv_temperature * inputs.codebook_scale)


def binary_entropy_from_logits(logits: Tensor) -> Tensor:
    """Elementwise ``H_b(sigmoid(l))``, without clamp or log(0).
    Written as ``p1 * (-log p1) + p0 * (-log p0)`` with both logs from logsigmoid: every
    term is >= 0, so a saturated bit's tiny entropy keeps its relative precision (the
    shorter ``softplus(l) - l * sigmoid(l)`` loses it to cancellation).
    """
    return -(torch.sigmoid(logits) * F.logsigmoid(logits) + torch.sigmoid(-logits) * F.logsigmoid(-logits))


def entropy_from_gram(gram: Tensor, num_tokens: Tensor | float) -> Tensor:
    """Entropy (nats) of ``gram / num_tokens`` per codebook, (c, 2**a, 2**b) -> (c,).
    No clamp: ``0 log 0 = 0``, and the gradient there is 0 rather than inf * 0 = NaN
    (``where`` sends no gradient through the masked branch). 0 is the limit: a code's
    gradient contribution scales like avg * log(avg).
    """
    avg = gram.flatten(1) / num_tokens
    positive = avg > 0
    safe = torch.where(positive, avg, torch.ones_like(avg))
    return -(avg * safe.log()).sum(dim=-1)


def clamped_entropy_from_gram(gram: Tensor, num_tokens: Tensor | float) -> Tensor:
    """The reference's ``-sum a log(max(a, 1e-5))`` of ``a = gram / num_tokens``, (c,)."""
    return clamped_entropy(gram.flatten(1) / num_tokens)


def open_magvit2_entropy_from_gram(gram: Tensor, num_tokens: Tensor | float) -> Tensor:
    """Open-MAGVIT2's ``-sum a log(a + 1e-5)`` of ``a = gram / num_tokens``, (c,)."""
    avg = gram.flatten(1) / num_tokens
    return -(avg * (avg + OPEN_MAGVIT2_LOG_EPS).log()).sum(dim=-1)


def exact_per_token(logits: Tensor) -> Tensor:
    """Each token's entropy over the 2**d codes, (N, c, d) logits -> (N, c)."""
    return binary_entropy_from_logits(logits).sum(dim=-1)


def clamped_per_token(logits: Tensor, chunk_tokens: int | None = None, eps: float = REFERENCE_LOG_CLAMP) -> Tensor:
    """The reference's clamped per-token entropy ``-sum_j p_j log(max(p_j, eps))``, (N, c)."""
    return subcodes.clamped_per_token(logits, eps, chunk_tokens)


def _factorised_terms(
    inputs: EntropyInputs,
    logits: Tensor,
    groups: list[tuple[int, int]],
    chunk_tokens: int | None,
    per_token_fn: Callable[[Tensor], Tensor] = exact_per_token,
    batch_fn: Callable[[Tensor, Tensor | float], Tensor] = entropy_from_gram,
) -> EntropyTerms:
    """Per-sample entropy and the sum over bit groups of the groups' batch entropies."""
    per_token = per_token_fn(logits)  # (N, c)
    grams = [subcode_gram(logits[..., start:stop], chunk_tokens) for start, stop in groups]
    if inputs.reduce is None:
        count: Tensor | int = logits.shape[0]
        return _terms(per_token, sum(batch_fn(g, count) for g in grams))
    per_sample_sum, *grams, count = reduce_sums(inputs.reduce, logits.shape[0], per_token.sum(dim=0), *grams)
    return _terms_from_sums(per_sample_sum, sum(batch_fn(g, count) for g in grams), count)


def exact_entropy(inputs: EntropyInputs, *, chunk_tokens: int | None = None) -> EntropyTerms:
    """Exact, unclamped entropies from the bit factorisation (the default kernel).
    Above ``2**EXACT_MAX_BITS`` codes per codebook it warns and returns
    :func:`group_entropy`, whose batch entropy is an upper bound.
    """
    inputs = _checked_tokens(inputs)
    num_bits = inputs.z.shape[2]
    if num_bits > EXACT_MAX_BITS:
        warnings.warn(
            f"entropy_mode='exact' with 2**{num_bits} codes per codebook is above the exact limit "
            f"of 2**{EXACT_MAX_BITS} (a 2**d vector per codebook); using the 'group' kernel, whose "
            f"batch entropy is a sum over groups of <= {GROUP_MAX_BITS} bits: an UPPER BOUND on the "
            f"true batch entropy. Pass entropy_mode='group' to choose it explicitly.",
            stacklevel=2,
        )
        return group_entropy(inputs, chunk_tokens=chunk_tokens)
    return _factorised_terms(inputs, bit_logits(inputs), [(0, num_bits)], chunk_tokens)


def bit_groups(num_bits: int, group_bits: int) -> list[tuple[int, int]]:
    """Contiguous (start, stop) groups of at most ``group_bits`` bits, sizes within one."""
    if not (isinstance(group_bits, int) and group_bits >= 1):
        raise ValueError(f"group_bits must be an int >= 1, got {group_bits!r}")
    num_groups = math.ceil(num_bits / group_bits)
    bounds = [round(g * num_bits / num_groups) for g in range(num_groups + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def group_entropy(
    inputs: EntropyInputs, *, group_bits: int = GROUP_MAX_BITS, chunk_tokens: int | None = None
) -> EntropyTerms:
    """Exact per-sample entropy; batch entropy = sum of the groups' exact batch entropies.
    The sum is an upper bound on the batch entropy (equal with one group, or when the
    groups are independent under the batch distribution), so minimising the loss
    rewards it for something it may not have. Cost: N 2**group_bits per group.
    """
    inputs = _checked_tokens(inputs)
    groups = bit_groups(inputs.z.shape[2], group_bits)
    return _factorised_terms(inputs, bit_logits(inputs), groups, chunk_tokens)


def _check_dense_size(inputs: EntropyInputs, mode: str) -> None:
    num_bits = inputs.z.shape[2]
    if num_bits > EXACT_MAX_BITS:
        raise ValueError(
            f"entropy_mode={mode!r} needs the 2**d batch distribution and supports up to 2**{EXACT_MAX_BITS} "
            f"codes per codebook, got 2**{num_bits}; use entropy_mode='group' (an upper bound) or more codebooks"
        )


def clamped_entropy_kernel(inputs: EntropyInputs, *, chunk_tokens: int | None = None) -> EntropyTerms:
    """The reference's clamped per-sample and batch entropies from the factorisation.
    Equal to ``"reference"`` up to rounding (float64: ~1e-12 relative), at about the
    cost and memory of ``"exact"``; limited to 2**EXACT_MAX_BITS codes like it.
    """
    inputs = _checked_tokens(inputs)
    _check_dense_size(inputs, "clamped")
    num_bits = inputs.z.shape[2]

    def per_token(logits: Tensor) -> Tensor:
        return clamped_per_token(logits, chunk_tokens)

    return _factorised_terms(inputs, bit_logits(inputs), [(0, num_bits)], chunk_tokens,
                             per_token_fn=per_token, batch_fn=clamped_entropy_from_gram)


def open_magvit2_entropy(inputs: EntropyInputs, *, chunk_tokens: int | None = None) -> EntropyTerms:
    """Open-MAGVIT2's terms: exact per-sample entropy, batch ``-sum a log(a + 1e-5)``."""
    inputs = _checked_tokens(inputs)
    _check_dense_size(inputs, "open_magvit2")
    return _factorised_terms(inputs, bit_logits(inputs), [(0, inputs.z.shape[2])], chunk_tokens,
                             batch_fn=open_magvit2_entropy_from_gram)


ENTROPY_KERNELS: dict[str, EntropyKernel] = {
    "reference": reference_entropy,
    "exact": exact_entropy,
    "group": group_entropy,
    "clamped": clamped_entropy_kernel,
    "open_magvit2": open_magvit2_entropy,
}
# Modes whose batch term needs the 2**d vector (no fallback above 2**EXACT_MAX_BITS codes).
DENSE_BATCH_MODES = ("reference", "clamped", "open_magvit2")


def sample_token_subset(num_tokens: int, frac: float, device: torch.device) -> Tensor | None:
    """Boolean mask of a uniformly random subset of ``int(num_tokens * frac)`` rows.
    Draws from the default CPU generator exactly as the reference does, so a seeded run
    picks the same rows (tokens, or samples with a per-sample mask). The subset may be
    empty, as in the reference; the quantizer then gives zero entropy terms where the
    reference gives NaN (its gradients have no entropy part either).
    """
    if frac >= 1.0:
        return None
    num_sampled = int(num_tokens * frac)
    keep = torch.randn(num_tokens).argsort(dim=-1) < num_sampled
    return keep.to(device)
