"""Entropy kernels behind LFQ's auxiliary loss.

Each kernel takes the pre-activation tokens that survive the mask and the
``frac_per_sample_entropy`` subset, shaped ``(N, c, d)`` (N tokens, c codebooks,
d bits), and returns :class:`EntropyTerms`. The quantizer chooses a kernel by
name (``entropy_mode``); nothing else in :mod:`lfq` knows how they compute.
Kernels are dtype-generic: they compute in the dtype of ``z``.

``"reference"`` is the dense computation of ``vector-quantize-pytorch`` 1.14.12:
a softmax over all ``2**d`` codes for every token and ``-p * log(clamp(p, 1e-5))``.
It is kept for bit-level compatibility with published numbers; it needs
``O(N * 2**d)`` memory.

``"exact"`` uses that the softmax over the codes ``{-s, +s}**d`` with logits
``2 * tau * z . c`` is a product of independent bits, ``P(bit i) = sigmoid(4 tau s z_i)``:

- per-sample entropy = sum of the bits' binary entropies, O(N d), no clamp;
- batch distribution: with the bits split into a high block of ``a`` and a low block of
  ``b = d - a`` bits, ``avg_prob.reshape(2**a, 2**b) = P_A^T P_B / N`` where the rows of
  P_A (P_B) are each token's distribution over the high (low) sub-codes. One product
  of ``2 N 2**d`` flops and ``N (2**a + 2**b) + 2**d`` memory, tokens in chunks.

The batch entropy is computed in two steps, :func:`subcode_gram` (the SUM of
``P_A^T P_B`` over tokens) and :func:`entropy_from_gram` (divide by the token count,
take the entropy), so that a distributed caller can all-reduce the sum and the count
in between; averaging per-rank entropies or means would be wrong.

``"group"`` is for codebooks too large for a ``2**d`` vector: the batch entropy is
replaced by the sum of the batch entropies of groups of at most ``GROUP_MAX_BITS``
bits, an UPPER bound (entropy is subadditive), as BSQ (arXiv 2406.07548) does.
``"exact"`` switches to it, with a warning, above ``2**EXACT_MAX_BITS`` codes.

``"clamped"`` is the reference's numbers with the exact kernel's memory: the batch term
is ``-sum a log(max(a, 1e-5))`` of the same ``a = P_A^T P_B / N``, and the per-sample
term is ``-log eps + sum over codes with p >= eps of p (log eps - log p)``, found per
token without the 2**d vector from the sub-codes at or above eps (see
:func:`clamped_per_token`). It exists to measure what the clamp does to training at
codebook sizes the reference cannot run.

``"open_magvit2"`` is Open-MAGVIT2's batch term ``-sum a log(a + 1e-5)`` (per codebook),
with the exact per-sample term (their ``log_softmax(logits / T + eps)`` is exact: a
constant inside a log-softmax cancels).

The factorised kernels only need the bits' logits ``4 tau s z_i``, with ``s`` the
magnitude of a code coordinate; on the sphere (BSQ) the quantizer passes the normalised
inputs and ``s / sqrt(d)``, and everything above holds unchanged.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

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
# Working memory per chunk of tokens in subcode_gram (P_A, P_B, their gradients).
CHUNK_BYTES = 128 * 2**20


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


def subcode_split(num_bits: int) -> tuple[int, int]:
    """(a, b): high and low block sizes. The product costs 2 N 2**d flops for any split;
    balanced blocks minimise the N (2**a + 2**b) memory and build work."""
    high = num_bits // 2
    return high, num_bits - high


def _bit_table(num_bits: int, like: Tensor) -> Tensor:
    """(2**k, k) 0/1 matrix, row j = the bits of j, most significant first (index order)."""
    codes = torch.arange(2**num_bits, device=like.device)
    shifts = torch.arange(num_bits - 1, -1, -1, device=like.device)
    return ((codes[:, None] >> shifts) & 1).to(like.dtype)


def flush_floor(dtype: torch.dtype) -> float:
    """Probabilities below this are set to 0 in the factors (P_A, P_B, the bits).

    Without it, unsaturated but confident tokens (typical on the sphere, where the logits
    are 4 tau s u_i / sqrt(d)) fill the factors with subnormal floats, and x86 arithmetic
    on subnormals is 10-100x slower: measured 9x on a whole step at 2**14 codes. The floor
    is tiny**(1/3), so products of up to three factors stay normal; the mass it drops is
    under 2**(d/2) * floor per token (float32: 2**-42 per sub-code, ~1e-10 at 2**18 codes,
    far below float32's resolution; float64: 2**-340).
    """
    return torch.finfo(dtype).tiny ** (1 / 3)


def _subcode_probs(p1: Tensor, p0: Tensor) -> Tensor:
    """(c, C, k) bit probabilities -> (c, C, 2**k) distribution over k-bit sub-codes.

    Built in place in one buffer, least significant bit first: after a step the first m
    columns hold the distribution of the bits seen so far, and the next bit doubles it
    to ``[P * p0, P * p1]`` (that bit becomes the most significant). 2**k multiplies by a
    per-row scalar, no exp of a large tensor and no broadcast over a size-2 axis. Values
    under :func:`flush_floor` are set to 0 after every step, so none is ever subnormal.
    """
    num_bits = p1.shape[-1]
    floor = flush_floor(p1.dtype)
    probs = p1.new_empty(*p1.shape[:-1], 2**num_bits)
    probs[..., :1] = 1
    for step, bit in enumerate(range(num_bits - 1, -1, -1)):
        width = 2**step
        torch.mul(probs[..., :width], p1[..., bit : bit + 1], out=probs[..., width : 2 * width])
        probs[..., :width].mul_(p0[..., bit : bit + 1])
        F.threshold_(probs[..., : 2 * width], floor, 0.0)
    return probs


def _chunk_factors(logits: Tensor, high_bits: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Bit probabilities and P_A, P_B of a chunk of (C, c, d) logits, codebook axis first."""
    logits = logits.transpose(0, 1).contiguous()  # (c, C, d)
    p1, p0 = torch.sigmoid(logits), torch.sigmoid(-logits)  # p0 directly: 1 - p1 rounds to 0
    floor = flush_floor(logits.dtype)
    p1, p0 = F.threshold_(p1, floor, 0.0), F.threshold_(p0, floor, 0.0)
    prob_a = _subcode_probs(p1[..., :high_bits], p0[..., :high_bits])
    prob_b = _subcode_probs(p1[..., high_bits:], p0[..., high_bits:])
    return p1, p0, prob_a, prob_b


def _bit_logit_grad(weighted: Tensor, table: Tensor, p1: Tensor, p0: Tensor) -> Tensor:
    """Gradient wrt the block's logits given ``weighted = dL/dP * P`` (c, C, 2**k).

    d log P(j) / d l_i = bit_i(j) - p_i, so the gradient is
    p0_i * (sum of weighted over codes with bit i on) - p1_i * (sum over codes with it off).
    Summing the two sets separately (rather than total - on) keeps a saturated bit's
    tiny gradient from being the difference of two large numbers.
    """
    k = table.shape[1]
    on_off = weighted @ torch.cat((table, 1 - table), dim=1)  # (c, C, 2k)
    return p0 * on_off[..., :k] - p1 * on_off[..., k:]


class _SubcodeGram(torch.autograd.Function):
    """sum over tokens of P_A^T P_B, (N, c, d) logits -> (c, 2**a, 2**b).

    With several chunks only the logits are saved and P_A, P_B are rebuilt chunk by
    chunk in backward, so memory stays at one chunk's factors plus the 2**d output
    however many tokens. With one chunk the factors are kept: that fits the same
    budget and saves rebuilding (and re-faulting) them.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, high_bits: int, chunk_tokens: int) -> Tensor:  # type: ignore[override]
        num_tokens = logits.shape[0]
        gram = None
        for start in range(0, num_tokens, chunk_tokens):
            factors = _chunk_factors(logits[start : start + chunk_tokens], high_bits)
            if gram is None:
                gram = torch.bmm(factors[2].transpose(1, 2), factors[3])
            else:
                gram.baddbmm_(factors[2].transpose(1, 2), factors[3])
        if num_tokens <= chunk_tokens:
            ctx.save_for_backward(logits, *factors)
        else:
            ctx.save_for_backward(logits)
        ctx.high_bits, ctx.chunk_tokens = high_bits, chunk_tokens
        return gram

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_gram: Tensor) -> tuple[Tensor | None, None, None]:  # type: ignore[override]
        if not ctx.needs_input_grad[0]:
            return None, None, None
        logits, *saved_factors = ctx.saved_tensors
        high, chunk = ctx.high_bits, ctx.chunk_tokens
        table_a, table_b = _bit_table(high, logits), _bit_table(logits.shape[2] - high, logits)
        grad_t = grad_gram.transpose(1, 2)
        grad_logits = torch.empty_like(logits)
        for start in range(0, logits.shape[0], chunk):
            factors = saved_factors or _chunk_factors(logits[start : start + chunk], high)
            p1, p0, prob_a, prob_b = factors
            weighted_a = torch.bmm(prob_b, grad_t).mul_(prob_a)  # dL/dP_A * P_A
            weighted_b = torch.bmm(prob_a, grad_gram).mul_(prob_b)
            grad_a = _bit_logit_grad(weighted_a, table_a, p1[..., :high], p0[..., :high])
            grad_b = _bit_logit_grad(weighted_b, table_b, p1[..., high:], p0[..., high:])
            grad_logits[start : start + chunk] = torch.cat((grad_a, grad_b), dim=-1).transpose(0, 1)
        return grad_logits, None, None


def default_chunk_tokens(num_codebooks: int, num_bits: int, itemsize: int) -> int:
    """Tokens per chunk so that one chunk's factors and their gradients fit CHUNK_BYTES."""
    high, low = subcode_split(num_bits)
    # P_A, P_B, the two product outputs, the build's last intermediates: about 6 copies.
    per_token = 6 * num_codebooks * (2**high + 2**low) * itemsize
    return max(256, CHUNK_BYTES // per_token)


def subcode_gram(logits: Tensor, chunk_tokens: int | None = None) -> Tensor:
    """Differentiable ``sum_n P_A[n]^T P_B[n]`` per codebook, (N, c, d) -> (c, 2**a, 2**b).

    Divided by the token count and flattened, it is the batch distribution over the 2**d
    codes in index order (the high block holds the most significant bits).
    """
    if chunk_tokens is None:
        chunk_tokens = default_chunk_tokens(logits.shape[1], logits.shape[2], logits.element_size())
    if not (isinstance(chunk_tokens, int) and chunk_tokens >= 1):
        raise ValueError(f"chunk_tokens must be an int >= 1 (or None for automatic), got {chunk_tokens!r}")
    high, low = subcode_split(logits.shape[2])
    if logits.shape[0] == 0:  # no tokens on this rank: a zero sum, still in the graph
        return logits.new_zeros(logits.shape[1], 2**high, 2**low) + logits.sum() * 0
    return _SubcodeGram.apply(logits, high, chunk_tokens)


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


def _subcode_log_probs(logits: Tensor) -> Tensor:
    """(M, k) bit logits -> (M, 2**k) log-probabilities of the k-bit sub-codes, index order.

    Sums of log-sigmoids (all <= 0, so no cancellation), finite where the probabilities
    themselves underflow to 0.
    """
    table = _bit_table(logits.shape[-1], logits)  # (2**k, k)
    on, off = F.logsigmoid(logits), F.logsigmoid(-logits)
    return on @ table.T + off @ (1 - table).T


def _top_subcodes(logits: Tensor, log_eps: float) -> tuple[Tensor, Tensor]:
    """Indices of each row's sub-codes with probability >= eps, and a mask of them, (M, k).

    k is the most any row has (0 when none has any). Found densely but without gradient,
    in the logits' dtype: the choice only decides which terms are summed.
    """
    with torch.no_grad():
        over = _subcode_log_probs(logits) >= log_eps
        k = int(over.sum(dim=-1).max()) if over.shape[0] else 0  # a rank may hold no tokens
        index = over.to(torch.uint8).topk(k, dim=-1).indices if k else over.new_zeros(over.shape[0], 0, dtype=torch.long)
        return index, over.gather(-1, index)


def _selected_log_probs(logits: Tensor, index: Tensor) -> Tensor:
    """log P of the sub-codes ``index`` (M, k), from (M, bits) float64 logits, differentiable.

    Few sub-codes: from their bits, (M, k, bits). Many: all 2**bits by two matrix
    products, then gathered, which costs the same whatever k.
    """
    num_bits = logits.shape[-1]
    if index.shape[1] * num_bits > 2**num_bits:
        return _subcode_log_probs(logits).gather(-1, index)
    bits = _bit_table(num_bits, logits)[index]  # (M, k, bits)
    on, off = F.logsigmoid(logits)[:, None, :], F.logsigmoid(-logits)[:, None, :]
    return (bits * on + (1 - bits) * off).sum(dim=-1)


def _clamped_token_entropy(logits: Tensor, high_bits: int, eps: float) -> Tensor:
    """Per token, the reference's ``-sum_j p_j log(max(p_j, eps))``, (M, d) logits -> (M,).

    With L = log eps, every code under the clamp contributes ``-p L`` and the rest
    ``-p log p``; as the probabilities sum to 1,

        H_clamped = -L + sum over codes with p >= eps of p (L - log p),

    which needs only the codes at or above eps (at most 1 / eps of them, usually a few).
    p = P_A[a] P_B[b] is at or above eps only if both factors are, so only those sub-codes
    are kept (k per row, the most any row has); for a kept a the b with
    log P_B[b] >= L - log P_A[a] are a suffix of the kept b sorted: suffix sums and one
    searchsorted. The kept terms are computed in float64, whatever the input dtype: the
    result is a small difference when nearly all mass is above eps (confident tokens),
    and float64 keeps it to ~1e-12. The choice of terms is piecewise constant in the
    input and carries no gradient; the clamped entropy is continuous across it.
    """
    log_eps = math.log(eps)
    index_a, keep_a = _top_subcodes(logits[:, :high_bits], log_eps)
    index_b, keep_b = _top_subcodes(logits[:, high_bits:], log_eps)
    flat = logits.double()
    clamped = flat.new_full(flat.shape[:1], -log_eps) + flat.sum(dim=-1) * 0
    if index_a.shape[1] == 0 or index_b.shape[1] == 0:  # no code reaches eps: all are clamped
        return clamped
    log_a = _selected_log_probs(flat[:, :high_bits], index_a)
    log_b = _selected_log_probs(flat[:, high_bits:], index_b)
    weight_a = keep_a * log_a.clamp(min=log_eps).exp()
    log_b, order = log_b.masked_fill(~keep_b, -math.inf).sort(dim=-1)  # ascending, for searchsorted
    prob_b = keep_b.gather(-1, order) * log_b.clamp(min=log_eps).exp()
    plogp_b = prob_b * log_b.clamp(min=log_eps)
    zero = prob_b.new_zeros(prob_b.shape[0], 1)
    suffix_1 = torch.cat((prob_b.flip(-1).cumsum(dim=-1).flip(-1), zero), dim=-1)
    suffix_2 = torch.cat((plogp_b.flip(-1).cumsum(dim=-1).flip(-1), zero), dim=-1)
    first = torch.searchsorted(log_b.detach().contiguous(), (log_eps - log_a).detach().contiguous())
    above_1, above_2 = suffix_1.gather(-1, first), suffix_2.gather(-1, first)
    return clamped + (weight_a * ((log_eps - log_a) * above_1 - above_2)).sum(dim=-1)


def clamped_per_token(logits: Tensor, chunk_tokens: int | None = None, eps: float = REFERENCE_LOG_CLAMP) -> Tensor:
    """The reference's clamped per-token entropy ``-sum_j p_j log(max(p_j, eps))``, (N, c).

    O(N 2**(d/2) d) work and memory (see :func:`_clamped_token_entropy`); tokens in
    chunks, each recomputed in backward (checkpointed) when there are several.
    """
    num_tokens, num_codebooks, num_bits = logits.shape
    high, _ = subcode_split(num_bits)
    if chunk_tokens is None:
        # float64 inside: twice the bytes per sub-code.
        chunk_tokens = default_chunk_tokens(num_codebooks, num_bits, 8)

    def chunk_entropy(chunk: Tensor) -> Tensor:
        return _clamped_token_entropy(chunk.reshape(-1, num_bits), high, eps).reshape(chunk.shape[:2])

    if num_tokens <= chunk_tokens:
        per_token = chunk_entropy(logits)
    else:
        per_token = torch.cat([checkpoint(chunk_entropy, logits[start : start + chunk_tokens], use_reentrant=False)
                               for start in range(0, num_tokens, chunk_tokens)])
    return per_token.to(logits.dtype)


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
