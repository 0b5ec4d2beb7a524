"""The baselines LFQ is compared with: a VQ-VAE vector quantizer and FSQ (``experiments.quantizers``
registers them as the kinds ``vq`` and ``fsq``).

Both follow the protocol :mod:`lfq.monitor` watches, so code usage is measured the same way as
for LFQ: attributes ``dim``, ``codebook_size``, ``num_codebooks``, ``keep_num_codebooks_dim`` and
``last_stats`` (``lfq.CodebookStats`` of per-codebook detached tensors after a training forward,
``None`` in eval), and a forward ``(x, inv_temperature=...)`` returning ``lfq.Return``. Inputs are
``(b, n, dim)`` tokens or channel-first ``(b, dim, *spatial)`` feature maps, as for LFQ.
"""

from __future__ import annotations

import math

import torch
from einops import pack, rearrange, unpack
from torch import Tensor, nn

from lfq import CodebookStats, Return


class _TokenQuantizer(nn.Module):
    """Shared plumbing: optional projections, channel-first inputs, codebook axis of the indices."""

    def __init__(self, *, dim: int | None, codebook_dims: int, num_codebooks: int):
        super().__init__()
        self.dim = dim if dim is not None else codebook_dims
        self.num_codebooks = num_codebooks
        self.keep_num_codebooks_dim = num_codebooks > 1
        projected = self.dim != codebook_dims
        self.project_in = nn.Linear(self.dim, codebook_dims) if projected else nn.Identity()
        self.project_out = nn.Linear(codebook_dims, self.dim) if projected else nn.Identity()
        self.last_stats: CodebookStats | None = None

    def quantize_tokens(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """z: (b, n, c, d) -> quantized (b, n, c, d), indices (b, n, c), aux loss (scalar)."""
        raise NotImplementedError

    def forward(self, x: Tensor, inv_temperature: float | None = None) -> Return:
        # inv_temperature is LFQ's; accepted so that the tasks call every quantizer alike.
        channel_first = x.ndim >= 4
        if channel_first:
            x = rearrange(x, "b d ... -> b ... d")
            x, ps = pack([x], "b * d")
        if x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"expected (batch, tokens, {self.dim}) or (batch, {self.dim}, *spatial), "
                             f"got {tuple(x.shape)}")
        z = rearrange(self.project_in(x), "b n (c d) -> b n c d", c=self.num_codebooks)
        quantized, indices, aux_loss = self.quantize_tokens(z)
        out = self.project_out(rearrange(quantized, "b n c d -> b n (c d)"))
        if channel_first:
            out = rearrange(unpack(out, ps, "b * d")[0], "b ... d -> b d ...")
            indices = unpack(indices, ps, "b * c")[0]
        if not self.keep_num_codebooks_dim:
            indices = indices[..., 0]
        return Return(out, indices, aux_loss)


class VectorQuantizer(_TokenQuantizer):
    """Nearest-neighbour vector quantization with a learned codebook (VQ-VAE, arXiv 1711.00937),
    straight-through, with the optional k-means / random-sample ``init`` and dead-code replacement
    (``dead_code_threshold``) that give it the usual fair chance; its loss and options are in
    docs/training.md ("The VQ baseline")."""

    INITS = ("uniform", "random_sample", "kmeans")
    EMA_DECAY = 0.99
    KMEANS_ITERS = 10

    def __init__(self, *, dim: int | None = None, codebook_size: int, code_dim: int, num_codebooks: int = 1,
                 commitment_loss_weight: float = 0.25, codebook_loss_weight: float = 1.0, init: str = "uniform",
                 dead_code_threshold: float = 0.0):
        super().__init__(dim=dim, codebook_dims=code_dim * num_codebooks, num_codebooks=num_codebooks)
        if init not in self.INITS:
            raise ValueError(f"init={init!r} is unknown: expected one of {list(self.INITS)}")
        if dead_code_threshold < 0:
            raise ValueError(f"dead_code_threshold={dead_code_threshold} must be >= 0 (0 disables replacement)")
        self.codebook_size = codebook_size
        self.code_dim = code_dim
        self.commitment_loss_weight = commitment_loss_weight
        self.codebook_loss_weight = codebook_loss_weight
        self.init, self.dead_code_threshold = init, dead_code_threshold
        # The VQ-VAE reference initialisation, U(-1/K, 1/K).
        bound = 1.0 / codebook_size
        self.codebook = nn.Parameter(torch.empty(num_codebooks, codebook_size, code_dim).uniform_(-bound, bound))
        # In the state dict, so a resumed run neither re-initialises nor forgets the averages.
        self.register_buffer("initialised", torch.tensor(init == "uniform"))
        self.register_buffer("usage_ema", torch.full((num_codebooks, codebook_size), float(dead_code_threshold)))

    @torch.no_grad()
    def _sample_tokens(self, z: Tensor, k: int) -> Tensor:
        """(c, k, d) tokens of the batch drawn at random (with replacement when it has fewer than k)."""
        flat = z.detach().reshape(-1, self.num_codebooks, self.code_dim).transpose(0, 1)  # (c, N, d)
        n = flat.shape[1]
        pick = torch.randperm(n, device=z.device)[:k] if n >= k else torch.randint(n, (k,), device=z.device)
        return flat[:, pick].float()

    @torch.no_grad()
    def _initialise(self, z: Tensor) -> None:
        codes = self._sample_tokens(z, self.codebook_size)
        if self.init == "kmeans":
            flat = z.detach().reshape(-1, self.num_codebooks, self.code_dim).transpose(0, 1).float()
            for _ in range(self.KMEANS_ITERS):
                assign = torch.cdist(flat, codes).argmin(-1)  # (c, N)
                sums = torch.zeros_like(codes).scatter_add_(1, assign[..., None].expand_as(flat), flat)
                counts = torch.zeros(codes.shape[:2], device=z.device).scatter_add_(
                    1, assign, torch.ones_like(assign, dtype=torch.float32))
                codes = torch.where(counts[..., None] > 0, sums / counts.clamp(min=1)[..., None], codes)
        _broadcast(codes)
        self.codebook.copy_(codes.to(self.codebook.dtype))
        self.initialised.fill_(True)

    @torch.no_grad()
    def _replace_dead(self, z: Tensor, indices: Tensor) -> None:
        counts = torch.zeros(self.num_codebooks, self.codebook_size, device=z.device)
        for c in range(self.num_codebooks):
            counts[c].scatter_add_(0, indices[..., c].reshape(-1), torch.ones(indices[..., c].numel(),
                                                                             device=z.device))
        counts = _all_sum(counts)
        self.usage_ema.mul_(self.EMA_DECAY).add_(counts, alpha=1 - self.EMA_DECAY)
        dead = self.usage_ema < self.dead_code_threshold  # (c, K)
        if not bool(dead.any()):
            return
        fresh = self._sample_tokens(z, self.codebook_size)
        _broadcast(fresh)
        self.codebook.copy_(torch.where(dead[..., None], fresh.to(self.codebook.dtype), self.codebook))
        self.usage_ema.masked_fill_(dead, self.dead_code_threshold)

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """(..., c) or (...) indices -> (..., c * code_dim) codebook vectors, before project_out."""
        if not self.keep_num_codebooks_dim:
            indices = indices[..., None]
        codes = torch.stack([self.codebook[c][indices[..., c]] for c in range(self.num_codebooks)], dim=-2)
        return rearrange(codes, "... c d -> ... (c d)")

    def quantize_tokens(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if self.training and not bool(self.initialised):
            self._initialise(z)
        # The search needs no gradient: building the (tokens x codes) distances in the graph
        # kept several copies alive for backward (2.7 s a step at 2^16 codes on a CPU).
        # ||z||^2 is the same for every code, so it does not change the argmin.
        with torch.no_grad():
            score = torch.einsum("b n c d, c k d -> b n c k", z, self.codebook).mul_(-2)
            score.add_(self.codebook.pow(2).sum(-1)[None, None])
            indices = score.argmin(dim=-1)  # (b, n, c)
            del score
        codes = torch.stack([self.codebook[c][indices[..., c]] for c in range(self.num_codebooks)], dim=2)
        quantized = z + (codes - z).detach()
        if not self.training:
            self.last_stats = None
            return quantized, indices, z.new_zeros(())
        if self.dead_code_threshold > 0:  # after this pass's codes are taken: the loss uses them
            self._replace_dead(z, indices)
        commit = (z - codes.detach()).pow(2).mean(dim=(0, 1, 3))  # (c,)
        codebook = (z.detach() - codes).pow(2).mean(dim=(0, 1, 3))
        aux_by_codebook = self.commitment_loss_weight * commit + self.codebook_loss_weight * codebook
        self.last_stats = CodebookStats(
            per_sample_entropy=None, batch_entropy=None, commitment=commit.detach(), aux_loss=aux_by_codebook.detach()
        )
        return quantized, indices, aux_by_codebook.mean()


def _all_sum(t: Tensor) -> Tensor:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def _broadcast(t: Tensor) -> None:
    """Rank 0's values on every rank, in place (a no-op in one process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(t, src=0)


class FSQ(_TokenQuantizer):
    """Finite Scalar Quantization (Mentzer et al., arXiv 2309.15505).

    Channel i is bounded by a shifted tanh to ``levels[i]`` values, rounded (straight-through)
    and scaled to [-1, 1]. A code's index is its digits in mixed radix ``levels``, first channel
    least significant, as in the paper's code. There is no auxiliary loss;
    ``last_stats.commitment`` reports the rounding error, for comparison with the others.
    """

    def __init__(self, *, dim: int | None = None, levels: tuple[int, ...], num_codebooks: int = 1, eps: float = 1e-3):
        super().__init__(dim=dim, codebook_dims=len(levels) * num_codebooks, num_codebooks=num_codebooks)
        self.levels = tuple(levels)
        self.codebook_size = math.prod(self.levels)
        self.eps = eps
        levels_t = torch.tensor(self.levels, dtype=torch.float32)
        self.register_buffer("_levels", levels_t, persistent=False)
        self.register_buffer("_basis", torch.cumprod(torch.tensor([1, *self.levels[:-1]]), 0), persistent=False)

    def bound(self, z: Tensor) -> Tensor:
        half_l = (self._levels - 1) * (1 + self.eps) / 2
        offset = torch.where(self._levels % 2 == 0, 0.5, 0.0)  # even levels sit between integers
        shift = torch.atanh(offset / half_l)
        return torch.tanh(z + shift) * half_l - offset

    def quantize_tokens(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        bounded = self.bound(z)
        rounded = bounded + (bounded.round() - bounded).detach()
        half_width = self._levels // 2
        quantized = rounded / half_width
        # A NaN input casts to a huge negative digit; clamping keeps the indices valid for the
        # monitor's histograms while `quantized` stays NaN, so the trainer still sees a NaN loss.
        digits = (rounded.detach() + half_width).long().clamp_(min=0).minimum(self._levels.long() - 1)
        indices = (digits * self._basis).sum(dim=-1)
        if self.training:
            error = ((bounded - bounded.round()) / half_width).pow(2).mean(dim=(0, 1, 3)).detach()
            self.last_stats = CodebookStats(
                per_sample_entropy=None, batch_entropy=None, commitment=error, aux_loss=torch.zeros_like(error)
            )
        else:
            self.last_stats = None
        return quantized, indices, z.new_zeros(())

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """(..., c) or (...) indices -> (..., c * len(levels)) codes in [-1, 1], before project_out."""
        if not self.keep_num_codebooks_dim:
            indices = indices[..., None]
        digits = (indices[..., None] // self._basis) % self._levels.long()
        codes = (digits - self._levels // 2) / (self._levels // 2)
        return rearrange(codes, "... c d -> ... (c d)")
