"""The token prior of task ``prior``: a small decoder-only transformer over the raster order of a
tokenizer's codes (class-unconditional, a learned start token, learned positions) with one of three
output heads over K = 2^d codes: ``full`` (one softmax over K), ``factorized`` (the code's bits split
into sub-tokens predicted in turn, Open-MAGVIT2's asymmetric token factorization) and ``bitwise``
(d independent bit logits, as Infinity); docs/training.md ("Token prior") gives the heads and presets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PRESETS = {"tiny": {"width": 128, "layers": 4, "attention_heads": 4},
           "base": {"width": 512, "layers": 12, "attention_heads": 8}}


def code_bits(codes: Tensor, bits: int) -> Tensor:
    """(...) int codes -> (..., bits) in {0, 1}, most significant bit first: lfq.LFQ's order (its
    ``mask`` is 2^(d-1), ..., 1, so bit j of a code is its j-th binary digit from the left); for a
    VQ or FSQ code it is the index's binary digits."""
    shifts = torch.arange(bits - 1, -1, -1, device=codes.device)
    return (codes[..., None].long() >> shifts) & 1


def bits_to_code(bits: Tensor) -> Tensor:
    """The inverse of :func:`code_bits`: (..., d) in {0, 1} -> (...) int64."""
    weights = 2 ** torch.arange(bits.shape[-1] - 1, -1, -1, device=bits.device)
    return (bits.long() * weights).sum(-1)


def split_code(codes: Tensor, factors: tuple[int, ...]) -> list[Tensor]:
    """The sub-tokens of ``codes``: the first ``factors[0]`` bits (most significant first), then the next..."""
    out, below = [], sum(factors)
    for f in factors:
        below -= f
        out.append((codes.long() >> below) & ((1 << f) - 1))
    return out


def join_code(subs: list[Tensor], factors: tuple[int, ...]) -> Tensor:
    code = torch.zeros_like(subs[0])
    for sub, f in zip(subs, factors, strict=True):
        code = (code << f) | sub
    return code


class FullHead(nn.Module):
    """One softmax over the K codes."""

    def __init__(self, width: int, codebook_size: int):
        super().__init__()
        self.out = nn.Linear(width, codebook_size)

    def log_prob(self, h: Tensor, codes: Tensor) -> Tensor:
        return F.log_softmax(self.out(h).float(), -1).gather(-1, codes.long()[..., None])[..., 0]

    def sample(self, h: Tensor, g: torch.Generator) -> Tensor:
        probs = F.softmax(self.out(h).float(), -1)
        return torch.multinomial(probs, 1, generator=g)[..., 0]


class BitwiseHead(nn.Module):
    """d independent Bernoulli bits: log p(code) = sum_j log sigmoid(+-l_j); normalised over 2^d codes
    because it is a product of d normalised two-way distributions."""

    def __init__(self, width: int, bits: int):
        super().__init__()
        self.bits = bits
        self.out = nn.Linear(width, bits)

    def log_prob(self, h: Tensor, codes: Tensor) -> Tensor:
        sign = code_bits(codes, self.bits).float() * 2 - 1
        return F.logsigmoid(sign * self.out(h).float()).sum(-1)

    def sample(self, h: Tensor, g: torch.Generator) -> Tensor:
        p = torch.sigmoid(self.out(h).float())
        return bits_to_code(torch.bernoulli(p, generator=g))


class FactorizedHead(nn.Module):
    """The code as sub-tokens of ``factors`` bits, sub-token i predicted from the position's state plus
    the embeddings of sub-tokens 0..i-1 (a residual MLP mixes them, zero at initialisation).

    Open-MAGVIT2 (src/Open_MAGVIT2/modules/transformer/gpt.py) runs a small intra-token transformer of
    2 to 4 blocks over [state, embedding of sub-token 0] with one linear head per sub-token, its
    2^18-code models split as factorized_bits [6, 12]; this head keeps the same chain rule
    p(code) = prod_i p(sub_i | state, sub_<i) with a cheaper conditioner. One factor of d bits is the
    full head."""

    def __init__(self, width: int, factors: tuple[int, ...]):
        super().__init__()
        self.factors = factors
        self.outs = nn.ModuleList(nn.Linear(width, 2**f) for f in factors)
        self.embeds = nn.ModuleList(nn.Embedding(2**f, width) for f in factors[:-1])
        self.mixers = nn.ModuleList(nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU(),
                                                  nn.Linear(width, width)) for _ in factors[1:])
        for mixer in self.mixers:
            nn.init.zeros_(mixer[-1].weight)
            nn.init.zeros_(mixer[-1].bias)

    def _logits(self, h: Tensor, context: Tensor | None, i: int) -> tuple[Tensor, Tensor]:
        c = h if context is None else context
        if i > 0:
            c = c + self.mixers[i - 1](c)
        return self.outs[i](c).float(), c

    def log_prob(self, h: Tensor, codes: Tensor) -> Tensor:
        subs = split_code(codes, self.factors)
        total, context = h.new_zeros(h.shape[:-1], dtype=torch.float32), h
        for i, sub in enumerate(subs):
            logits, _ = self._logits(h, context, i)
            total = total + F.log_softmax(logits, -1).gather(-1, sub[..., None])[..., 0]
            if i < len(subs) - 1:
                context = context + self.embeds[i](sub)
        return total

    def sample(self, h: Tensor, g: torch.Generator) -> Tensor:
        subs, context = [], h
        for i in range(len(self.factors)):
            logits, _ = self._logits(h, context, i)
            sub = torch.multinomial(F.softmax(logits, -1).reshape(-1, logits.shape[-1]), 1, generator=g)
            sub = sub.reshape(logits.shape[:-1])
            subs.append(sub)
            if i < len(self.factors) - 1:
                context = context + self.embeds[i](sub)
        return join_code(subs, self.factors)


class Block(nn.Module):
    """Pre-norm causal self-attention and MLP."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: Tensor, cache: list[Tensor] | None = None) -> Tensor:
        """(b, n, width) -> (b, n, width). With ``cache`` (a list, empty at the first position), x
        is the one next position (n = 1): it attends to the keys and values the cache holds of the
        earlier positions and to its own, which are appended to the cache."""
        b, n, w = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        if cache is not None:
            if n != 1:
                raise ValueError(f"a cached pass takes one position at a time, got {n}")
            if cache:
                k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)
            cache[:] = [k, v]
        a = F.scaled_dot_product_attention(q, k, v, is_causal=cache is None)
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, w))
        return x + self.mlp(self.norm2(x))


@dataclass(frozen=True)
class PriorShape:
    codebook_size: int  # K
    length: int  # tokens per image (raster order)
    head: str = "full"
    factors: tuple[int, ...] | None = None  # factorized: bits per sub-token (sum = log2 K); None = halves
    width: int = 128
    layers: int = 4
    attention_heads: int = 4

    @property
    def bits(self) -> int:
        return max(1, math.ceil(math.log2(self.codebook_size)))

    def resolved_factors(self) -> tuple[int, ...]:
        if self.factors is not None:
            return tuple(self.factors)
        d = self.bits
        return (d - d // 2, d // 2) if d > 1 else (1,)

    def problem(self) -> str:
        """'' or what is wrong with this shape (a one-line reason for a ConfigError)."""
        if self.head != "full" and 2**self.bits != self.codebook_size:
            return (f"model.head={self.head!r} predicts bits, so it needs a power-of-two codebook; the tokenizer "
                    f"has {self.codebook_size} codes: use model.head=full")
        if self.head == "factorized" and sum(self.resolved_factors()) != self.bits:
            return (f"model.factors={list(self.resolved_factors())} must add up to the code's {self.bits} bits "
                    f"(log2 of {self.codebook_size} codes), e.g. [{self.bits - self.bits // 2}, {self.bits // 2}]")
        if self.width % self.attention_heads:
            return (f"model.width={self.width} is not a multiple of model.attention_heads={self.attention_heads}")
        return ""


def make_head(shape: PriorShape) -> nn.Module:
    if shape.head == "full":
        return FullHead(shape.width, shape.codebook_size)
    if shape.head == "bitwise":
        return BitwiseHead(shape.width, shape.bits)
    return FactorizedHead(shape.width, shape.resolved_factors())


class TokenPrior(nn.Module):
    """p(tokens) = prod_t p(token_t | tokens_<t); the input embedding matches the head (a code's
    embedding, the sum of its sub-tokens', or a linear map of its +-1 bits)."""

    def __init__(self, shape: PriorShape):
        super().__init__()
        problem = shape.problem()
        if problem:
            raise ValueError(problem)
        self.shape = shape
        w = shape.width
        if shape.head == "full":
            self.embed = nn.Embedding(shape.codebook_size, w)
        elif shape.head == "factorized":
            self.embed_subs = nn.ModuleList(nn.Embedding(2**f, w) for f in shape.resolved_factors())
        else:
            self.embed_bits = nn.Linear(shape.bits, w)
        self.start = nn.Parameter(torch.randn(w) * 0.02)
        self.position = nn.Parameter(torch.randn(shape.length, w) * 0.02)
        self.blocks = nn.ModuleList(Block(w, shape.attention_heads) for _ in range(shape.layers))
        self.norm = nn.LayerNorm(w)
        self.head = make_head(shape)

    def embed_codes(self, codes: Tensor) -> Tensor:
        s = self.shape
        if s.head == "full":
            return self.embed(codes.long())
        if s.head == "factorized":
            subs = split_code(codes, s.resolved_factors())
            return sum(e(sub) for e, sub in zip(self.embed_subs, subs, strict=True))
        return self.embed_bits(code_bits(codes, s.bits).to(self.embed_bits.weight.dtype) * 2 - 1)

    def hidden(self, codes: Tensor) -> Tensor:
        """(b, n) codes -> (b, n + 1, width) states: state t predicts token t (state n: the next one)."""
        b, n = codes.shape
        x = torch.cat([self.start.expand(b, 1, -1), self.embed_codes(codes)], 1) + self.position[:n + 1]
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, codes: Tensor) -> Tensor:
        """(b, L) codes -> (b, L) log p(token_t | tokens_<t) in nats."""
        h = self.hidden(codes[:, :-1])
        return self.head.log_prob(h, codes)

    @torch.no_grad()
    def sample(self, count: int, g: torch.Generator) -> Tensor:
        """``count`` token sequences at temperature 1, drawn with ``g`` (on the model's device), one
        position at a time with each block's keys and values cached: the states of
        :meth:`hidden` (up to rounding) at L passes over one position, not L over up to L."""
        caches: list[list[Tensor]] = [[] for _ in self.blocks]
        x = (self.start + self.position[0]).expand(count, 1, -1)  # the start token, at position 0
        codes = []
        for t in range(self.shape.length):
            for block, cache in zip(self.blocks, caches, strict=True):
                x = block(x, cache)
            codes.append(self.head.sample(self.norm(x[:, 0]), g))
            if t + 1 < self.shape.length:
                x = self.embed_codes(codes[-1][:, None]) + self.position[t + 1]
        return torch.stack(codes, 1)
