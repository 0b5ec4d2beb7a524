"""Pieces of ``lfq.quantizer.LFQ`` that need none of its state, kept apart so that the module
reads as the quantizer: the bit order of indices (``reverse_bits``), the float32 projection,
the data-parallel reduction of the loss terms, which tokens the entropies are taken over, and
the commitment loss. The numbers are those of vector-quantize-pytorch 1.14.12 (``lfq.quantizer``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from lfq.entropy import AllReduceSum, reduce_sums, sample_token_subset


def reverse_bits(indices: Tensor, num_bits: int) -> Tensor:
    """Indices with their ``num_bits`` bits in the opposite order (an involution).
    Ours (and vector-quantize-pytorch's) give channel 0 the most significant bit;
    Open-MAGVIT2 gives channel i the weight ``2**i``: ``reverse_bits`` maps one to the other.
    """
    shifts = torch.arange(num_bits, device=indices.device)
    bits = (indices[..., None] >> shifts) & 1
    return (bits << shifts.flip(0)).sum(dim=-1).to(indices.dtype)


def is_power_of_two(n: int) -> bool:
    return n >= 2 and (n & (n - 1)) == 0


def linear_f32(layer: nn.Module, x: Tensor) -> Tensor:
    """Apply a projection in float32 whatever dtype the module was cast to."""
    if isinstance(layer, nn.Linear):
        bias = None if layer.bias is None else layer.bias.float()
        return F.linear(x, layer.weight.float(), bias)
    return layer(x)


def distributed_reduce(distributed: bool | None) -> Callable[..., Tensor] | None:
    """The all-reduce that makes the loss terms global, or None for this process only
    (``LFQ(distributed=...)``: None = when a process group of more than one rank exists)."""
    if distributed is False or not (dist.is_available() and dist.is_initialized()):
        if distributed is True:
            raise RuntimeError(
                "LFQ(distributed=True) needs an initialised torch.distributed process group "
                "(torch.distributed.init_process_group); pass distributed=None to use one only "
                "when it exists"
            )
        return None
    if dist.get_world_size() == 1:
        return None
    return AllReduceSum.apply


def entropy_rows(frac_per_sample_entropy: float, mask: Tensor | None, sample_mask: Tensor | None, batch: int,
                 num_tokens: int, device: torch.device) -> Tensor | None:
    """(b n,) bool: the tokens the entropies are computed over (None = all).
    The ``frac_per_sample_entropy`` subset is drawn as 1.14.12 draws it: over the kept
    tokens in order, or with a per-sample mask over the kept samples (whole samples are
    kept or dropped).
    """
    keep = None if mask is None else mask.reshape(-1)
    if frac_per_sample_entropy >= 1.0:
        return keep
    units = sample_mask if sample_mask is not None else keep
    num_units = (batch if sample_mask is not None else batch * num_tokens) if units is None else int(units.sum())
    subset = sample_token_subset(num_units, frac_per_sample_entropy, device)
    if units is not None:
        chosen = torch.zeros_like(units)
        chosen[units.nonzero().squeeze(1)[subset]] = True
        subset = chosen
    if sample_mask is not None:
        subset = subset[:, None].expand(batch, num_tokens).reshape(-1)
    return subset


def commitment_loss(z: Tensor, quantized: Tensor, mask: Tensor | None, reduce: Callable[..., Tensor] | None,
                    num_codebooks: int, codebook_dim: int) -> tuple[Tensor, Tensor]:
    """Mean ``(z - q)^2`` over the kept tokens of z, quantized (b, n, c, d), and its value per
    codebook (c,), detached; over every rank's tokens with ``reduce``. Zero when no token is kept."""
    batch, num_tokens = z.shape[:2]
    commit = F.mse_loss(z, quantized.detach(), reduction="none")
    commit = commit[mask] if mask is not None else commit
    num_kept = commit.shape[0] if mask is not None else batch * num_tokens
    if reduce is None:
        if num_kept == 0:
            zeros = z.new_zeros(num_codebooks)
            return z.sum() * 0, zeros
        with torch.no_grad():
            commit_by_codebook = commit.reshape(-1, num_codebooks, codebook_dim).mean(dim=(0, 2))
        return commit.mean(), commit_by_codebook
    sums, count = reduce_sums(reduce, num_kept, commit.reshape(-1, num_codebooks, codebook_dim).sum(dim=(0, 2)))
    commit_by_codebook = sums / (count * codebook_dim)
    return commit_by_codebook.mean(), commit_by_codebook.detach()
