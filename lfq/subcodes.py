"""The factorised sub-code distributions behind lfq.entropy's fast kernels.

The 2**d codes' distribution of a token is the outer product of its distributions over
the 2**a high and 2**b low sub-codes (P_A, P_B). This module builds them, sums
``P_A^T P_B`` over tokens with a hand-written backward (:func:`subcode_gram`), and finds
the reference's clamped per-token entropy from the sub-codes at or above the clamp
(:func:`clamped_per_token`). :mod:`lfq.entropy` turns these into entropy terms.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

# Working memory per chunk of tokens in subcode_gram (P_A, P_B, their gradients).
CHUNK_BYTES = 128 * 2**20


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
        if torch.compiler.is_compiling():  # dynamo cannot trace a non-contiguous out=: same values, one temp
            probs[..., width : 2 * width] = probs[..., :width] * p1[..., bit : bit + 1]
        else:
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


def clamped_per_token(logits: Tensor, eps: float, chunk_tokens: int | None = None) -> Tensor:
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
