"""Lookup-Free Quantization (LFQ, MAGVIT-v2, https://arxiv.org/abs/2310.05737): each of the d
channels of a codebook is quantized to {-s, +s} and an entropy penalty (low per-token, high batch
entropy) pushes the model to use all 2**d codes. API, defaults and numbers are those of
``vector-quantize-pytorch`` 1.14.12 plus the newest upstream's flags (``spherical``: BSQ,
https://arxiv.org/abs/2406.07548); docs/quantizer.md is the manual and lists what differs, and why.
"""

from __future__ import annotations

from collections import namedtuple
from math import ceil, log2

import torch
import torch.nn.functional as F
from einops import pack, rearrange, unpack
from torch import Tensor, nn

from lfq.entropy import (
    DENSE_BATCH_MODES,
    ENTROPY_KERNELS,
    EXACT_MAX_BITS,
    EntropyInputs,
    EntropyTerms,
)
from lfq.quantizer_parts import (
    commitment_loss,
    distributed_reduce,
    entropy_rows,
    is_power_of_two,
    linear_f32,
)

Return = namedtuple("Return", ["quantized", "indices", "entropy_aux_loss"])
LossBreakdown = namedtuple("LossBreakdown", ["per_sample_entropy", "batch_entropy", "commitment"])

# Per-codebook terms of the last forward pass, detached; read by lfq.monitor.
CodebookStats = namedtuple(
    "CodebookStats", ["per_sample_entropy", "batch_entropy", "commitment", "aux_loss"]
)

DEFAULT_ENTROPY_MODE = "exact"
# Largest codebook: indices are int64 (bit 63 is the sign; 2**62 keeps every sum of two in range).
MAX_CODEBOOK_BITS = 62


class LFQ(nn.Module):
    def __init__(
        self,
        *,
        dim: int | None = None,  # input channels; defaults to log2(codebook_size) * num_codebooks
        codebook_size: int | None = None,  # codes per codebook, a power of 2; defaults to 2**dim
        entropy_loss_weight: float = 0.1,  # weight of (per-sample entropy - gamma * batch entropy)
        commitment_loss_weight: float = 0.25,  # weight of mean (z - q)^2
        diversity_gamma: float = 1.0,  # weight of the batch entropy inside the entropy loss
        straight_through_activation: nn.Module | None = None,  # applied before straight-through
        num_codebooks: int = 1,  # the channels are split into this many independent codebooks
        keep_num_codebooks_dim: bool | None = None,  # keep the codebook axis of the indices
        codebook_scale: float = 1.0,  # codes are {-s, +s}; residual LFQ halves s per layer
        frac_per_sample_entropy: float = 1.0,  # < 1: entropies from a random subset of tokens
        entropy_mode: str = DEFAULT_ENTROPY_MODE,  # which lfq.entropy kernel computes the entropies
        distributed: bool | None = None,  # global-batch terms under torch.distributed; None = when initialised
        # The newest upstream's flags (same names and meaning):
        spherical: bool = False,  # BSQ: inputs and codes on the sphere of radius s, codes +-s / sqrt(d)
        soft_clamp_input_value: float | None = None,  # v: inputs become v * tanh(x / v) before quantizing
        channel_first: bool | None = None,  # channels on axis 1; None = for >= 4-D input only
        force_quantization_f32: bool = True,  # accepted; quantization and entropy are always float32 here
        experimental_softplus_entropy_loss: bool = False,  # entropy loss -> softplus(loss + offset)
        entropy_loss_offset: float = 5.0,  # the offset of the softplus above
        has_projections: bool | None = None,  # force (or forbid) project_in/out; None = when dim differs
        projection_has_bias: bool = True,  # bias of project_in and project_out
    ):
        super().__init__()

        if dim is None and codebook_size is None:
            raise ValueError("LFQ needs dim or codebook_size (or both); got neither")
        if codebook_size is not None and not (
            isinstance(codebook_size, int) and is_power_of_two(codebook_size)
        ):
            suggestion = 2 ** max(1, ceil(log2(codebook_size))) if isinstance(codebook_size, (int, float)) and codebook_size > 0 else 2
            raise ValueError(
                f"codebook_size must be a power of 2 and at least 2 (lookup-free codes are "
                f"d bits), got {codebook_size!r}; the nearest valid size above is {suggestion}"
            )
        if dim is not None and not (isinstance(dim, int) and dim >= 1):
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if not (isinstance(num_codebooks, int) and num_codebooks >= 1):
            raise ValueError(f"num_codebooks must be an int >= 1, got {num_codebooks!r}")
        if not (0.0 < frac_per_sample_entropy <= 1.0):
            raise ValueError(
                f"frac_per_sample_entropy must be in (0, 1], got {frac_per_sample_entropy!r}"
            )
        if not codebook_scale > 0:
            raise ValueError(f"codebook_scale must be > 0, got {codebook_scale!r}")
        if distributed not in (None, True, False):
            raise ValueError(f"distributed must be None (automatic), True or False, got {distributed!r}")
        if entropy_mode not in ENTROPY_KERNELS:
            raise ValueError(
                f"entropy_mode must be one of {sorted(ENTROPY_KERNELS)}, got {entropy_mode!r}"
            )
        for name, value in (("spherical", spherical), ("force_quantization_f32", force_quantization_f32),
                            ("experimental_softplus_entropy_loss", experimental_softplus_entropy_loss),
                            ("projection_has_bias", projection_has_bias)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be True or False, got {value!r}")
        for name, value in (("channel_first", channel_first), ("has_projections", has_projections)):
            if value not in (None, True, False):
                raise ValueError(f"{name} must be None (automatic), True or False, got {value!r}")
        if soft_clamp_input_value is not None and not (
            isinstance(soft_clamp_input_value, (int, float)) and soft_clamp_input_value >= codebook_scale
        ):
            raise ValueError(
                f"soft_clamp_input_value must be None or a number >= codebook_scale ({codebook_scale}), so that "
                f"the clamped inputs can reach the codes; got {soft_clamp_input_value!r}"
            )

        codebook_size = codebook_size if codebook_size is not None else 2**dim
        codebook_dim = codebook_size.bit_length() - 1
        if codebook_dim > MAX_CODEBOOK_BITS:
            raise ValueError(
                f"codebook_size must be at most 2**{MAX_CODEBOOK_BITS} (indices are int64), got 2**{codebook_dim}; "
                f"split the bits into more codebooks (num_codebooks)"
            )
        codebook_dims = codebook_dim * num_codebooks
        dim = dim if dim is not None else codebook_dims
        if entropy_mode in DENSE_BATCH_MODES and codebook_dim > EXACT_MAX_BITS:
            raise ValueError(
                f"entropy_mode={entropy_mode!r} supports up to 2**{EXACT_MAX_BITS} codes per codebook, got "
                f"codebook_size=2**{codebook_dim}; use 'exact' or 'group', or split into more codebooks"
            )
        if has_projections is False and dim != codebook_dims:
            raise ValueError(
                f"has_projections=False needs dim == log2(codebook_size) * num_codebooks = {codebook_dims}, "
                f"got dim={dim}; leave has_projections None to project {dim} -> {codebook_dims}"
            )

        if keep_num_codebooks_dim is None:
            keep_num_codebooks_dim = num_codebooks > 1
        if num_codebooks > 1 and not keep_num_codebooks_dim:
            raise ValueError(
                f"keep_num_codebooks_dim=False is only valid with one codebook; with "
                f"num_codebooks={num_codebooks} the indices need their codebook axis "
                f"(pass keep_num_codebooks_dim=True or leave it None)"
            )

        self.has_projections = has_projections if has_projections is not None else dim != codebook_dims
        self.project_in = (nn.Linear(dim, codebook_dims, bias=projection_has_bias)
                           if self.has_projections else nn.Identity())
        self.project_out = (nn.Linear(codebook_dims, dim, bias=projection_has_bias)
                            if self.has_projections else nn.Identity())

        self.dim = dim
        self.codebook_size = codebook_size
        self.codebook_dim = codebook_dim
        self.num_codebooks = num_codebooks
        self.keep_num_codebooks_dim = keep_num_codebooks_dim
        self.activation = straight_through_activation if straight_through_activation is not None else nn.Identity()
        self.frac_per_sample_entropy = frac_per_sample_entropy
        self.diversity_gamma = diversity_gamma
        self.entropy_loss_weight = entropy_loss_weight
        self.codebook_scale = codebook_scale
        self.commitment_loss_weight = commitment_loss_weight
        self.entropy_mode = entropy_mode
        self.distributed = distributed
        self.spherical = spherical
        self.soft_clamp_input_value = soft_clamp_input_value
        self.channel_first = channel_first
        self.force_quantization_f32 = force_quantization_f32
        self.experimental_softplus_entropy_loss = experimental_softplus_entropy_loss
        self.entropy_loss_offset = entropy_loss_offset

        # Bit i of an index is channel i, most significant first. Persistent, as in the
        # reference, so that state dicts load both ways.
        self.register_buffer("mask", 2 ** torch.arange(codebook_dim - 1, -1, -1))
        self.register_buffer("zero", torch.tensor(0.0), persistent=False)
        # The (K, d) codebook only the dense kernels read; past 2**EXACT_MAX_BITS codes it would not fit,
        # and no kernel that runs there needs it: an empty (0, d) buffer keeps the dtype.
        all_codes = torch.arange(codebook_size if codebook_dim <= EXACT_MAX_BITS else 0)
        bits = ((all_codes[..., None].int() & self.mask) != 0).float()
        self.register_buffer("codebook", self.bits_to_codes(bits), persistent=False)

        self.last_stats: CodebookStats | None = None

    def bits_to_codes(self, bits: Tensor) -> Tensor:
        return bits * self.codebook_scale * 2 - self.codebook_scale

    def _to_sphere(self, t: Tensor) -> Tensor:
        """BSQ: onto the sphere of radius codebook_scale, per codebook (identity when not spherical)."""
        return F.normalize(t, dim=-1) * self.codebook_scale if self.spherical else t

    @property
    def dtype(self) -> torch.dtype:
        return self.codebook.dtype

    def _codebook_f32(self) -> Tensor:
        if self.codebook.dtype == torch.float32:
            return self.codebook
        bits = ((torch.arange(self.codebook.shape[0], device=self.mask.device)[..., None].int() & self.mask) != 0)
        return self.bits_to_codes(bits.float())

    def indices_to_codes(self, indices: Tensor, project_out: bool = True) -> Tensor:
        """Codes of ``indices`` (the inverse of ``forward``'s indices), channel-first for images/video."""
        is_img_or_video = indices.ndim >= (3 + int(self.keep_num_codebooks_dim))
        transpose = self.channel_first if self.channel_first is not None else is_img_or_video
        if not self.keep_num_codebooks_dim:
            indices = rearrange(indices, "... -> ... 1")
        as_int = indices[..., None].int() if self.codebook_dim <= 31 else indices[..., None].long()
        bits = ((as_int & self.mask) != 0).to(self.dtype)
        codes = rearrange(self._to_sphere(self.bits_to_codes(bits)), "... c d -> ... (c d)")
        if project_out:
            codes = self.project_out(codes)
        if transpose:
            codes = rearrange(codes, "b ... d -> b d ...")
        return codes

    def _channels_on_axis_1(self, x: Tensor) -> bool:
        return self.channel_first if self.channel_first is not None else x.ndim >= 4

    def _check_input(self, x: Tensor) -> None:
        if x.ndim < 3:
            raise ValueError(
                f"LFQ expects (batch, tokens, {self.dim}) or channel-first (batch, {self.dim}, "
                f"*spatial) input, got shape {tuple(x.shape)}"
            )
        channel_axis_1 = self._channels_on_axis_1(x)
        channels = x.shape[1] if channel_axis_1 else x.shape[-1]
        if channels != self.dim:
            where = "axis 1 (channel-first)" if channel_axis_1 else "the last axis"
            raise ValueError(
                f"expected {self.dim} channels on {where}, got {channels} in shape {tuple(x.shape)}"
            )

    @staticmethod
    def _flatten_mask(mask: Tensor, batch: int, spatial: tuple[int, ...], num_tokens: int) -> tuple[Tensor, Tensor | None]:
        """(token mask (b, n), per-sample mask (b,) or None) from a token, spatial or per-sample mask."""
        if mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor (True = keep the token), got dtype {mask.dtype}")
        if tuple(mask.shape) == (batch, num_tokens):
            return mask, None
        if len(spatial) > 1 and tuple(mask.shape) == (batch, *spatial):
            return mask.reshape(batch, num_tokens), None
        if tuple(mask.shape) == (batch,):  # one flag per sample, as 1.14.12 accepts
            return mask[:, None].expand(batch, num_tokens), mask
        expected = f"({batch}, {num_tokens})"
        if len(spatial) > 1:
            expected += f" or {(batch, *spatial)}"
        raise ValueError(
            f"mask must have shape {expected} (batch, tokens) or ({batch},) (one flag per sample), "
            f"got {tuple(mask.shape)}"
        )

    def forward(
        self,
        x: Tensor,
        inv_temperature: float = 100.0,
        return_loss_breakdown: bool = False,
        mask: Tensor | None = None,
    ):
        """
        x: (b, n, dim) tokens, or channel-first (b, dim, *spatial) images and video
        (``channel_first`` overrides: True = (b, dim, ...) for 3-D too, False = channels last).
        mask: bool, True = counts in the losses: (b, n) tokens (spatial shapes allowed), or
        (b,) whole samples.
        Einstein notation: b batch, n tokens, c codebooks, d bits per codebook.
        """
        self._check_input(x)
        input_dtype = x.dtype
        with torch.autocast(device_type=x.device.type, enabled=False):
            quantized, indices, aux_loss, breakdown = self._forward_f32(x.float(), inv_temperature, mask)
        if input_dtype.is_floating_point and input_dtype != torch.float32:
            quantized = quantized.to(input_dtype)

        ret = Return(quantized, indices, aux_loss)
        if not return_loss_breakdown:
            return ret
        return ret, breakdown

    def _forward_f32(self, x: Tensor, inv_temperature: float, mask: Tensor | None):
        transpose = self._channels_on_axis_1(x)
        packed = transpose or x.ndim >= 4
        if transpose:
            spatial = tuple(x.shape[2:])
            x = rearrange(x, "b d ... -> b ... d")
        else:
            spatial = tuple(x.shape[1:-1])
        if packed:
            x, ps = pack([x], "b * d")
        sample_mask = None
        if mask is not None:
            mask, sample_mask = self._flatten_mask(mask, x.shape[0], spatial, x.shape[1])

        x = linear_f32(self.project_in, x)
        if self.soft_clamp_input_value is not None:
            x = (x / self.soft_clamp_input_value).tanh() * self.soft_clamp_input_value
        # z: what is quantized and enters the losses (on the sphere, the normalised input).
        z = self._to_sphere(rearrange(x, "b n (c d) -> b n c d", c=self.num_codebooks))

        codebook_value = torch.ones_like(z) * self.codebook_scale
        quantized = torch.where(z > 0, codebook_value, -codebook_value)
        quantized = self._to_sphere(quantized)

        if self.training:
            x = self.activation(z)
            x = x + (quantized - x).detach()
        else:
            x = quantized

        if self.codebook_dim <= 31:
            indices = ((x > 0).int() * self.mask.int()).sum(dim=-1)  # (b, n, c), int64 (the sum promotes)
        else:  # int32 would overflow
            indices = ((x > 0).long() * self.mask).sum(dim=-1)

        if self.training:
            terms, commit_loss, commit_by_codebook = self._losses(z, quantized, inv_temperature, mask, sample_mask)
            entropy_aux_loss = terms.per_sample_entropy - self.diversity_gamma * terms.batch_entropy
            if self.experimental_softplus_entropy_loss:
                entropy_aux_loss = F.softplus(entropy_aux_loss + self.entropy_loss_offset)
        else:
            terms, commit_loss, commit_by_codebook = None, self.zero.float(), None
            entropy_aux_loss = commit_loss

        x = rearrange(x, "b n c d -> b n (c d)")
        x = linear_f32(self.project_out, x)
        if packed:
            x = unpack(x, ps, "b * d")[0]
            indices = unpack(indices, ps, "b * c")[0]
        if transpose:
            x = rearrange(x, "b ... d -> b d ...")
        if not self.keep_num_codebooks_dim:
            indices = rearrange(indices, "... 1 -> ...")

        aux_loss = entropy_aux_loss * self.entropy_loss_weight + commit_loss * self.commitment_loss_weight

        if terms is None:
            breakdown = LossBreakdown(commit_loss, commit_loss, commit_loss)
            self.last_stats = None
        else:
            breakdown = LossBreakdown(terms.per_sample_entropy, terms.batch_entropy, commit_loss)
            with torch.no_grad():
                ent_by_codebook = terms.per_sample_by_codebook - self.diversity_gamma * terms.batch_by_codebook
                if self.experimental_softplus_entropy_loss:
                    # The softplus acts on the mean over codebooks, so no codebook owns a share
                    # of it: each keeps its difference from the mean, and their mean is the loss.
                    ent_by_codebook = ent_by_codebook - ent_by_codebook.mean() + entropy_aux_loss.detach()
                self.last_stats = CodebookStats(
                    per_sample_entropy=terms.per_sample_by_codebook.detach(),
                    batch_entropy=terms.batch_by_codebook.detach(),
                    commitment=commit_by_codebook,
                    aux_loss=(ent_by_codebook * self.entropy_loss_weight
                              + commit_by_codebook * self.commitment_loss_weight),
                )
        return x, indices, aux_loss, breakdown

    def _losses(self, z: Tensor, quantized: Tensor, inv_temperature: float, mask: Tensor | None,
                sample_mask: Tensor | None):
        reduce = distributed_reduce(self.distributed)
        batch, num_tokens = z.shape[:2]
        tokens = rearrange(z, "b n c d -> (b n) c d")
        keep = entropy_rows(self.frac_per_sample_entropy, mask, sample_mask, batch, num_tokens, tokens.device)
        num_entropy = tokens.shape[0] if keep is None else int(keep.sum())
        if num_entropy == 0 and reduce is None:
            # Nothing to take the entropies over (every token masked out, or a subset of
            # int(N * frac) == 0): zero terms, where the reference returns NaN. (Under
            # torch.distributed the rank still joins the collectives, with zero sums.)
            zeros = z.new_zeros(self.num_codebooks)
            zero = z.sum() * 0
            terms = EntropyTerms(zero, zero, zeros, zeros)
        else:
            code = self.codebook_scale / self.codebook_dim**0.5 if self.spherical else self.codebook_scale
            kernel = ENTROPY_KERNELS[self.entropy_mode]
            terms = kernel(EntropyInputs(tokens, float(inv_temperature), float(code),
                                         self._to_sphere(self._codebook_f32()), keep=keep, reduce=reduce))

        commit, commit_by_codebook = commitment_loss(z, quantized, mask, reduce, self.num_codebooks,
                                                     self.codebook_dim)
        return terms, commit, commit_by_codebook

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, codebook_size={self.codebook_size}, num_codebooks={self.num_codebooks}, "
            f"entropy_mode={self.entropy_mode!r}, frac_per_sample_entropy={self.frac_per_sample_entropy}"
            + (", spherical=True" if self.spherical else "")
        )
