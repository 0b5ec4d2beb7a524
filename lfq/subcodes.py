"""The factorised sub-code distributions behind lfq.entropy's fast kernels: a token's distribution
over the 2**d codes is the outer product of those over the 2**a high and 2**b low sub-codes
(P_A, P_B); this module builds them, sums ``P_A^T P_B`` over tokens with a hand-written backward
(:func:`subcode_gram`) and finds the reference's clamped per-token entropy from the sub-codes at
or above the clamp (:func:`clamped_per_token`). The derivation is docs/entropy.md.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

# Working memory per chunk of tokens in subcode_gram (P_A, P_B, their gradients).
CHUNK_BYTES = 128 * 2**20
# The clamped per-token entropy keeps its kept sub-codes for backward up to this size (confident
# tokens keep a few each: then nothing is rebuilt), else rebuilds them chunk by chunk.
SAVED_BYTES = 32 * 2**20


def subcode_split(num_bits: int) -> tuple[int, int]:
    """(a, b): high and low block sizes. The product costs 2 N 2**d flops for any split;
    balanced blocks minimise the N (2**a + 2**b) memory and build work."""
    high = num_bits // 2
    return high, num_bits - high


def bit_table(num_bits: int, like: Tensor) -> Tensor:
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


def subcode_probs(p1: Tensor, p0: Tensor) -> Tensor:
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
    prob_a = subcode_probs(p1[..., :high_bits], p0[..., :high_bits])
    prob_b = subcode_probs(p1[..., high_bits:], p0[..., high_bits:])
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
        table_a, table_b = bit_table(high, logits), bit_table(logits.shape[2] - high, logits)
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


def _flip_costs(bits: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A block's (M, k) bit logits -> what its sub-codes' log-probabilities are made of.
    Returns, in float64 (indices int64): the log-probability of the block's most probable
    sub-code (M,), the bits' flip costs ``|l_i|`` in ascending order (M, k), the index
    weight ``2**(k-1-i)`` of the bit each cost belongs to (M, k), and that sub-code's index
    (M,). The most probable sub-code takes every bit at its likely value; flipping bit i
    multiplies its probability by ``exp(-|l_i|)`` (``log sigmoid(-x) = log sigmoid(x) - x``),
    so the sub-code reached by flipping a set S of bits has log-probability that maximum
    minus the sum of the costs in S: no 2**k vector is needed to find the probable ones.
    """
    logits = bits.double()
    weight = 2 ** torch.arange(logits.shape[1] - 1, -1, -1, device=logits.device)  # most significant first
    best = ((logits > 0).long() * weight).sum(dim=-1)
    cost, order = logits.abs().sort(dim=-1)
    return F.logsigmoid(cost).sum(dim=-1), cost, weight[order], best


def _kept_subcodes(flips: tuple[Tensor, Tensor, Tensor, Tensor], num_flips: int, floor: Tensor, *, sort: bool
                   ) -> tuple[Tensor, Tensor]:
    """One block's sub-codes with log-probability >= ``floor`` (M,): float64 values (M, w),
    ``-inf`` where not kept, and their indices (M, w) (``sort``: most probable first,
    trimmed to the widest row's count).
    The candidates are the 2**num_flips sub-codes reached by flipping any subset of each
    row's ``num_flips`` cheapest bits (:func:`_flip_costs`); the caller chooses num_flips so
    that no dearer bit can be flipped above the floor. Values and choice come from the
    same float64 numbers, so they agree.
    """
    log_max, cost, weight, best = flips
    table = bit_table(num_flips, cost).T  # (num_flips, 2**num_flips): column j flips the bits of j
    values = log_max[:, None] - cost[:, :num_flips] @ table
    index = best[:, None] ^ (weight[:, :num_flips].to(cost.dtype) @ table).long()  # exact: sums of powers of 2
    values = values.masked_fill(values < floor[:, None], -math.inf)
    if not sort:
        return values, index
    values, order = values.sort(dim=-1, descending=True)
    width = int(torch.isfinite(values).sum(dim=-1).max()) if values.shape[0] else 0
    return values[:, :width].contiguous(), index.gather(-1, order[:, :width])  # copies: the rest is freed


def _row_groups(count: Tensor, width: int) -> list[tuple[Tensor | None, int]]:
    """Rows grouped by how many sub-codes they keep (or a bound on it), (rows or None for all,
    the group's most), in groups of at most 16, 64, 256, ... sub-codes: a few unsure tokens
    then widen only their own group, not the chunk (a confident token keeps a few sub-codes,
    a near-uniform one nearly all). Rows with a count of 0 are in no group."""
    most = int(count.max()) if count.numel() else 0
    if most == 0:
        return []
    if most <= 16:
        some = count > 0
        return [(None if bool(some.all()) else torch.nonzero(some).flatten(), most)]
    groups, low = [], 0
    for high in (16, 64, 256, width):
        if high > low:
            rows = torch.nonzero((count > low) & (count <= high)).flatten()
            if rows.numel():
                groups.append((rows, int(count[rows].max())))
        low = max(low, high)
        if high >= most:
            break
    return groups


def _bit_sums(weight: Tensor, index: Tensor | None, num_bits: int) -> Tensor:
    """(M, bits): for each bit, the sum of ``weight`` over the kept sub-codes with that bit on."""
    table = bit_table(num_bits, weight)
    if index is None:  # all sub-codes, in index order
        return weight @ table
    if 4 * index.shape[1] < 2**num_bits:  # few: from their bits
        return torch.einsum("mk,mkb->mb", weight, table[index])
    return weight.new_zeros(weight.shape[0], 2**num_bits).scatter_(1, index, weight) @ table


def _held_bytes(single: tuple[Tensor | None, Tensor] | None, groups: list) -> int:
    """Bytes held by one chunk's kept sub-codes (what backward would otherwise rebuild)."""
    tensors = [t for _, ts in groups for t in ts if t is not None] + [t for t in (single or ()) if t is not None]
    return sum(t.untyped_storage().nbytes() for t in tensors)


class _ClampedTokenEntropy(torch.autograd.Function):
    """Per row of (M, d) logits, the reference's ``-sum_j p_j log(max(p_j, eps))``, (M,) float64,
    as ``-L + sum over codes with p >= eps of p (L - log p)`` (L = log eps) from the sub-codes a
    token can reach above eps by flipping its cheap bits (:func:`_flip_costs`,
    :func:`_kept_subcodes`, rows grouped by :func:`_row_groups`), with a written-out backward; the
    derivation is docs/entropy.md ("clamped"). The kept sub-codes are held for backward while they
    fit :data:`SAVED_BYTES`, else each chunk is rebuilt from the logits."""

    @staticmethod
    def _chunk(logits: Tensor, high_bits: int, log_eps: float
               ) -> tuple[tuple[Tensor | None, Tensor] | None, list[tuple[Tensor | None, tuple[Tensor, ...]]]]:
        """(the rows whose only code at or above eps is their most probable one, with its
        log-probability; or None), and per group of the other rows (rows None: all) the kept
        sub-codes of both blocks and the forward's sums. Rows where no code reaches eps (all
        clamped, constant) are in neither."""
        blocks = (logits[:, :high_bits], logits[:, high_bits:])
        flips = [_flip_costs(block) for block in blocks]
        # A code is at or above eps iff its flips, over both blocks, cost at most this budget;
        # the flippable bits of a block are then a prefix of its ascending costs.
        budget = flips[0][0] + flips[1][0] - log_eps
        flippable = torch.maximum(*((costs <= budget[:, None]).sum(dim=-1) for _, costs, _, _ in flips))
        count = torch.where(budget >= 0, 2**flippable, 0)  # candidates per block (a bound on the kept)
        # No bit can flip: the most probable code alone is kept (the common case when confident),
        # and its term needs no sub-codes at all.
        alone = count == 1
        single = None
        if bool(alone.any()):
            log_max = budget + log_eps
            if bool(alone.all()):
                single = (None, log_max)
            else:
                rows = torch.nonzero(alone).flatten()
                single = (rows, log_max[rows])
            count = count.masked_fill(alone, 0)
        groups = []
        for rows, k in _row_groups(count, 2 ** max(block.shape[1] for block in blocks)):
            if k == 0:
                continue
            num_flips = k.bit_length() - 1  # k is the group's largest power of 2
            part_a, part_b = (f if rows is None else tuple(t[rows] for t in f) for f in flips)
            # p_A p_B >= eps needs p_A >= eps / max p_B, and p_B >= eps / max p_A
            log_a, index_a = _kept_subcodes(part_a, min(num_flips, high_bits), log_eps - part_b[0], sort=False)
            log_b, index_b = _kept_subcodes(part_b, min(num_flips, logits.shape[1] - high_bits),
                                            log_eps - part_a[0], sort=True)
            if log_b.shape[1] == 0:  # in float64 no b of these rows reaches eps
                continue
            prob_b = log_b.exp()  # 0 where -inf
            plogp_b = torch.where(prob_b > 0, prob_b * log_b, 0.0)
            zero = prob_b.new_zeros(prob_b.shape[0], 1)
            count_a = torch.searchsorted((-log_b).contiguous(), (log_a - log_eps).contiguous(), right=True)
            above_1 = torch.cat((zero, prob_b.cumsum(dim=-1)), dim=-1).gather(-1, count_a)  # P_B over a's partners
            above_2 = torch.cat((zero, plogp_b.cumsum(dim=-1)), dim=-1).gather(-1, count_a)  # P_B log P_B
            groups.append((rows, (log_a, index_a, log_b, index_b, count_a, above_1, above_2)))
        return single, groups

    @staticmethod
    def forward(ctx, logits: Tensor, high_bits: int, eps: float, chunk_rows: int) -> Tensor:  # type: ignore[override]
        log_eps = math.log(eps)
        entropy = logits.new_full(logits.shape[:1], -log_eps, dtype=torch.float64)
        saved: list[list] | None = []  # every chunk's groups, while they fit SAVED_BYTES
        for start in range(0, logits.shape[0], chunk_rows):
            chunk = logits[start : start + chunk_rows]
            single, kept = _ClampedTokenEntropy._chunk(chunk, high_bits, log_eps)
            if saved is not None:
                saved.append((single, kept))
                held = sum(_held_bytes(one, groups) for one, groups in saved)
                if held > SAVED_BYTES:
                    saved = None
            out = entropy[start : start + chunk.shape[0]]
            if single is not None:  # p (L - log p) of the one kept code
                rows, log_p = single
                term = log_p.exp() * (log_eps - log_p)
                if rows is None:
                    out += term
                else:
                    out.index_add_(0, rows, term)
            for rows, (log_a, _, _, _, _, above_1, above_2) in kept:
                prob_a = log_a.exp()
                term = (prob_a * torch.where(prob_a > 0, (log_eps - log_a) * above_1 - above_2, 0.0)).sum(dim=-1)
                if rows is None:
                    out += term
                else:
                    out.index_add_(0, rows, term)
        ctx.save_for_backward(logits)
        ctx.kept = saved  # None: rebuilt chunk by chunk in backward
        ctx.high_bits, ctx.log_eps, ctx.chunk_rows = high_bits, log_eps, chunk_rows
        return entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, None, None, None]:  # type: ignore[override]
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        (logits,) = ctx.saved_tensors
        high, log_eps, chunk_rows = ctx.high_bits, ctx.log_eps, ctx.chunk_rows
        grad = torch.zeros_like(logits, dtype=torch.float64)
        for number, start in enumerate(range(0, logits.shape[0], chunk_rows)):
            chunk = logits[start : start + chunk_rows]
            single, kept = ctx.kept[number] if ctx.kept is not None else _ClampedTokenEntropy._chunk(chunk, high, log_eps)
            out = grad[start : start + chunk.shape[0]]
            if single is not None:  # w (bit_i - sigmoid(l_i)) with w = p (L - log p - 1), bit_i the likely value
                rows, log_p = single
                bits = (chunk if rows is None else chunk[rows]).double()
                weight = log_p.exp() * (log_eps - log_p - 1)
                part = weight[:, None] * bits.sign() * torch.sigmoid(-bits.abs())
                if rows is None:
                    out += part
                else:
                    out.index_add_(0, rows, part)
            for rows, (log_a, index_a, log_b, index_b, count_a, above_1, above_2) in kept:
                prob_a, prob_b = log_a.exp(), log_b.exp()
                weight_a = torch.where(prob_a > 0, prob_a * ((log_eps - log_a - 1) * above_1 - above_2), 0.0)
                # per b, the sums of P_A and P_A log P_A over the a whose prefix holds b (count_a > b's position)
                plogp_a = torch.where(prob_a > 0, prob_a * log_a, 0.0)
                hist = prob_a.new_zeros(prob_a.shape[0], 2, log_b.shape[1] + 1)
                hist[:, 0].scatter_add_(1, count_a, prob_a)
                hist[:, 1].scatter_add_(1, count_a, plogp_a)
                beyond = hist.flip(-1).cumsum(dim=-1).flip(-1)[..., 1:]  # over counts > position
                weight_b = torch.where(prob_b > 0, prob_b * ((log_eps - log_b - 1) * beyond[:, 0] - beyond[:, 1]), 0.0)
                bits = chunk if rows is None else chunk[rows]
                on = torch.cat((_bit_sums(weight_a, index_a, high), _bit_sums(weight_b, index_b, bits.shape[1] - high)),
                               dim=-1)
                part = on - torch.sigmoid(bits.double()) * weight_a.sum(dim=-1, keepdim=True)
                if rows is None:
                    out += part
                else:
                    out.index_add_(0, rows, part)
        ctx.kept = None
        return (grad * grad_out.double()[:, None]).to(logits.dtype), None, None, None


def clamped_per_token(logits: Tensor, eps: float, chunk_tokens: int | None = None) -> Tensor:
    """The reference's clamped per-token entropy ``-sum_j p_j log(max(p_j, eps))``, (N, c).
    O(N (d + 2**u)) work and memory for tokens with u bits that can flip above the clamp
    (confident tokens: u of 0-2; near-uniform ones: up to d/2 per block, 2**(d/2) work; see
    :class:`_ClampedTokenEntropy`); tokens in chunks, each rebuilt in backward unless the
    kept sub-codes fit :data:`SAVED_BYTES`.
    """
    num_tokens, num_codebooks, num_bits = logits.shape
    high, _ = subcode_split(num_bits)
    if chunk_tokens is None:
        # float64 inside: twice the bytes per sub-code.
        chunk_tokens = default_chunk_tokens(num_codebooks, num_bits, 8)
    if not (isinstance(chunk_tokens, int) and chunk_tokens >= 1):
        raise ValueError(f"chunk_tokens must be an int >= 1 (or None for automatic), got {chunk_tokens!r}")
    flat = logits.reshape(-1, num_bits)
    per_token = _ClampedTokenEntropy.apply(flat, high, eps, chunk_tokens * num_codebooks)
    return per_token.reshape(num_tokens, num_codebooks).to(logits.dtype)
