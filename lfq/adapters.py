"""How the monitor reads a quantizer (its indices, mask, reported losses and, for binary codes,
its latent as a :class:`BinaryLatent` with ``P(bit i = +) = sigmoid(f * z_i)``): :func:`adapter_for`
picks the adapter of ``lfq.LFQ``, the newest vector-quantize-pytorch ``LFQ``/``FSQ``/``VectorQuantize``
(recognised by name, never imported) or the duck-typed protocol, and users pass a
:class:`BinaryAdapter` or an :class:`Adapter` subclass for anything else; docs/monitor.md ("Which
modules are watched") is the manual.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from lfq.quantizer import LFQ

Args = tuple[Any, ...]
Kwargs = dict[str, Any]


@dataclass(frozen=True)
class BinaryLatent:
    z: Tensor  # (tokens, c, d) float: the values whose signs are the bits, one row per index token
    logit_scale: float | Tensor  # f: P(bit = +) = sigmoid(f * z)
    code_magnitude: float  # |code_i|: the commitment is mean (z - sign(z) * m)^2


class Adapter:
    """How to read one kind of quantizer. Subclass it for a quantizer the monitor does not know.
    ``codebook_size`` and ``num_codebooks`` describe the indices; ``bits`` is the number of bits
    of a binary index (bit i = the i-th most significant), None when indices are not bit
    strings. ``reports_losses``: the quantizer reports per-sample/batch entropy and commitment
    itself (``losses``); otherwise the monitor computes them from ``latent`` when there is one.
    """

    codebook_size: int
    num_codebooks: int = 1
    bits: int | None = None
    reports_losses: bool = False

    def indices(self, module: nn.Module, args: Args, kwargs: Kwargs, output: Any) -> Tensor:
        """Indices of the forward pass: any shape with the codebooks on the last axis when there
        are several. Negative entries (masked or dropped tokens) are not counted."""
        found = _indices_of(output)
        if found is None:
            raise ValueError(
                f"{type(module).__name__}: the forward output has no .indices tensor (nor output[0].indices, "
                f"nor output[1]); got {type(output).__name__}. Pass an adapter that reads the indices"
            )
        return found

    def mask(self, module: nn.Module, args: Args, kwargs: Kwargs) -> Tensor | None:
        """Bool, one entry per token, True = the token counts; None = every token counts."""
        return kwargs.get("mask")

    def losses(self, module: nn.Module, output: Any) -> Any:
        """An object with per-codebook tensors ``per_sample_entropy``, ``batch_entropy``,
        ``commitment``, ``aux_loss`` (any may be missing or None), or None."""
        return None

    def latent_module(self, module: nn.Module) -> nn.Module | None:
        """A submodule whose forward output is the latent (hooked), or None."""
        return None

    def latent(self, module: nn.Module, args: Args, kwargs: Kwargs, captured: Tensor | None) -> BinaryLatent | None:
        """The binary latent of this pass (``captured``: the output of ``latent_module``, None if
        it did not run), or None when there is none."""
        return None


def _indices_of(output: Any) -> Tensor | None:
    if isinstance(getattr(output, "indices", None), Tensor):
        return output.indices
    if isinstance(output, (tuple, list)) and output:
        if isinstance(getattr(output[0], "indices", None), Tensor):  # (Return, LossBreakdown)
            return output[0].indices
        if len(output) > 1 and isinstance(output[1], Tensor) and not output[1].is_floating_point():
            return output[1]  # (quantized, indices, ...): FSQ, VectorQuantize, ResidualLFQ
    return None


class ProtocolAdapter(Adapter):
    """The duck-typed protocol of ``lfq.monitor``: ``codebook_size``, ``num_codebooks``,
    ``keep_num_codebooks_dim`` and ``last_stats`` (losses) on the module."""

    reports_losses = True

    def __init__(self, module: nn.Module) -> None:
        self.codebook_size, self.num_codebooks = int(module.codebook_size), int(module.num_codebooks)
        self.keep_num_codebooks_dim = bool(module.keep_num_codebooks_dim)

    def mask(self, module: nn.Module, args: Args, kwargs: Kwargs) -> Tensor | None:
        return kwargs.get("mask", args[3] if len(args) > 3 else None)  # LFQ's 4th positional argument

    def losses(self, module: nn.Module, output: Any) -> Any:
        return getattr(module, "last_stats", None)


class LFQAdapter(ProtocolAdapter):
    """``lfq.LFQ``: the protocol, plus the latent from ``project_in`` (or recomputed from the
    input when ``project_in`` is a Linear that LFQ applies without calling the module)."""

    def __init__(self, module: LFQ) -> None:
        super().__init__(module)
        self.bits = int(module.codebook_dim)

    def latent_module(self, module: nn.Module) -> nn.Module | None:
        return module.project_in

    def latent(self, module: nn.Module, args: Args, kwargs: Kwargs, captured: Tensor | None) -> BinaryLatent | None:
        tau = kwargs.get("inv_temperature", args[1] if len(args) > 1 else 100.0)
        z = captured
        if z is None:
            x = args[0] if args else kwargs["x"]
            if x.ndim >= 4:
                x = rearrange(x, "b d ... -> b (...) d")
            layer = module.project_in
            z = F.linear(x.float(), layer.weight.float(), None if layer.bias is None else layer.bias.float()) \
                if isinstance(layer, nn.Linear) else layer(x.float())
        return _binary_latent(z, self.num_codebooks, self.bits, tau, float(module.codebook_scale),
                              bool(getattr(module, "spherical", False)))


def _binary_latent(z: Tensor, books: int, bits: int, tau: Any, scale: float, spherical: bool) -> BinaryLatent:
    z = z.detach().float().reshape(-1, books, bits)
    if spherical:  # BSQ: z normalised per codebook and scaled by s; codes +-s / sqrt(d)
        z = F.normalize(z, dim=-1) * scale
        magnitude = scale / math.sqrt(bits)
    else:
        magnitude = scale
    return BinaryLatent(z, 4.0 * tau * magnitude, magnitude)


def _is_upstream(module: nn.Module, name: str) -> bool:
    cls = type(module)
    return cls.__name__ == name and cls.__module__.split(".")[0] == "vector_quantize_pytorch"


class UpstreamLFQAdapter(Adapter):
    """The newest ``vector-quantize-pytorch`` ``LFQ``: it keeps no per-codebook losses, so the
    monitor computes them from the latent: ``project_in``'s output, then the module's own soft
    clamp, orthogonal rotation and (spherical) L2 normalisation, as its forward applies them."""

    def __init__(self, module: nn.Module) -> None:
        self.codebook_size, self.num_codebooks = int(module.codebook_size), int(module.num_codebooks)
        self.bits = int(module.codebook_dim)

    def losses(self, module: nn.Module, output: Any) -> Any:
        ret = output[0] if isinstance(output, tuple) and isinstance(output[0], tuple) else output
        aux = getattr(ret, "entropy_aux_loss", None)
        return None if aux is None else _AuxOnly(aux.detach())

    def latent_module(self, module: nn.Module) -> nn.Module | None:
        return module.project_in

    def latent(self, module: nn.Module, args: Args, kwargs: Kwargs, captured: Tensor | None) -> BinaryLatent | None:
        if captured is None:
            return None
        tau = kwargs.get("inv_temperature", args[1] if len(args) > 1 else 100.0)
        z = captured.detach().float()
        clamp = getattr(module, "soft_clamp_input_value", None)
        if clamp is not None:
            z = (z / clamp).tanh() * clamp
        z = z.reshape(-1, self.num_codebooks, self.bits)
        if getattr(module, "orthogonal_rotation", False):
            z = z @ module.orthogonal_rot.float()
        return _binary_latent(z, self.num_codebooks, self.bits, tau, float(module.codebook_scale),
                              bool(getattr(module, "spherical", False)))


@dataclass(frozen=True)
class _AuxOnly:
    aux_loss: Tensor


class IndicesAdapter(Adapter):
    """Code usage from the indices alone (upstream ``FSQ``, ``VectorQuantize``)."""

    def __init__(self, codebook_size: int, num_codebooks: int = 1, tokens_per_index: int = 1) -> None:
        self.codebook_size, self.num_codebooks = int(codebook_size), int(num_codebooks)
        self.tokens_per_index = tokens_per_index  # VectorQuantize with shared multi-head codebooks

    def losses(self, module: nn.Module, output: Any) -> Any:
        if isinstance(output, tuple) and len(output) > 2 and isinstance(output[2], Tensor) and output[2].numel() == 1:
            return _AuxOnly(output[2].detach().reshape(()))  # VectorQuantize's weighted loss
        return None


class BinaryAdapter(Adapter):
    """A binary quantizer described in a few arguments (codes ``{-s, +s}^d`` per codebook, index
    bits most significant first).
    ``latent(module, args, kwargs) -> Tensor``: the pre-quantization latent, channels last
    ``(..., c * d)``; the default takes the first input, channels last, or channel-first when
    it has 4+ dims (images, video). ``indices(output) -> Tensor``: default ``output.indices``
    or ``output[1]``. ``inv_temperature``: a number, or ``(module, args, kwargs) -> number``.
    ``mask(args, kwargs)``: default the ``mask`` keyword. ``spherical``: BSQ (docs/monitor.md).
    """

    def __init__(
        self,
        codebook_size: int,
        *,
        num_codebooks: int = 1,
        inv_temperature: float | Callable[[nn.Module, Args, Kwargs], float] = 100.0,
        codebook_scale: float = 1.0,
        spherical: bool = False,
        latent: Callable[[nn.Module, Args, Kwargs], Tensor] | None = None,
        indices: Callable[[Any], Tensor] | None = None,
        mask: Callable[[Args, Kwargs], Tensor | None] | None = None,
    ) -> None:
        if not (isinstance(codebook_size, int) and codebook_size >= 2 and codebook_size & (codebook_size - 1) == 0):
            raise ValueError(f"BinaryAdapter: codebook_size must be a power of 2 >= 2 (2**bits), got {codebook_size!r}")
        if not (isinstance(num_codebooks, int) and num_codebooks >= 1):
            raise ValueError(f"BinaryAdapter: num_codebooks must be an int >= 1, got {num_codebooks!r}")
        if not codebook_scale > 0:
            raise ValueError(f"BinaryAdapter: codebook_scale must be > 0, got {codebook_scale!r}")
        self.codebook_size, self.num_codebooks = codebook_size, num_codebooks
        self.bits = codebook_size.bit_length() - 1
        self._tau, self._scale, self._spherical = inv_temperature, float(codebook_scale), bool(spherical)
        self._latent, self._indices, self._mask = latent, indices, mask

    def indices(self, module: nn.Module, args: Args, kwargs: Kwargs, output: Any) -> Tensor:
        return self._indices(output) if self._indices is not None else super().indices(module, args, kwargs, output)

    def mask(self, module: nn.Module, args: Args, kwargs: Kwargs) -> Tensor | None:
        return self._mask(args, kwargs) if self._mask is not None else kwargs.get("mask")

    def latent(self, module: nn.Module, args: Args, kwargs: Kwargs, captured: Tensor | None) -> BinaryLatent | None:
        if self._latent is not None:
            z = self._latent(module, args, kwargs)
        else:
            z = args[0] if args else next(v for v in kwargs.values() if isinstance(v, Tensor))
            if z.ndim >= 4:
                z = rearrange(z, "b d ... -> b (...) d")
        width = self.num_codebooks * self.bits
        if z.shape[-1] != width:
            raise ValueError(
                f"BinaryAdapter: the latent must have num_codebooks * bits = {width} channels last, got "
                f"shape {tuple(z.shape)}; pass latent=lambda module, args, kwargs: ... returning (..., {width})"
            )
        tau = self._tau(module, args, kwargs) if callable(self._tau) else self._tau
        return _binary_latent(z, self.num_codebooks, self.bits, tau, self._scale, self._spherical)


def _protocol(module: nn.Module) -> bool:
    # getattr with a default: nn.Module.__getattr__ raises for missing attributes.
    size = getattr(module, "codebook_size", None)
    books = getattr(module, "num_codebooks", None)
    keep = getattr(module, "keep_num_codebooks_dim", None)
    return (
        isinstance(size, int) and not isinstance(size, bool)
        and isinstance(books, int) and not isinstance(books, bool)
        and isinstance(keep, bool)
        and hasattr(module, "last_stats")
    )


def adapter_for(module: nn.Module) -> Adapter | None:
    """The built-in adapter of a module the monitor recognises, or None."""
    if isinstance(module, LFQ):
        return LFQAdapter(module)
    if _is_upstream(module, "LFQ"):
        return UpstreamLFQAdapter(module)
    if _is_upstream(module, "FSQ") and getattr(module, "return_indices", True):
        return IndicesAdapter(int(module.codebook_size), int(module.num_codebooks))
    if _is_upstream(module, "VectorQuantize"):
        heads, separate = int(module.heads), bool(module.separate_codebook_per_head)
        return IndicesAdapter(int(module.codebook_size), heads if separate else 1, 1 if separate else heads)
    if _protocol(module):
        return ProtocolAdapter(module)
    return None


def check_indices(name: str, adapter: Adapter, indices: Tensor) -> Tensor:
    """(tokens, c) int64 view of ``indices``; ValueError if the codebook axis is not where it must be."""
    books = adapter.num_codebooks
    tokens_per_index = getattr(adapter, "tokens_per_index", 1)
    if books > 1 and (indices.ndim < 1 or indices.shape[-1] != books):
        raise ValueError(
            f"{name}: with {books} codebooks the indices' last axis must be the codebooks, got indices "
            f"of shape {tuple(indices.shape)}"
        )
    if tokens_per_index > 1 and (indices.ndim < 1 or indices.shape[-1] != tokens_per_index):
        raise ValueError(f"{name}: expected {tokens_per_index} heads on the indices' last axis, got {tuple(indices.shape)}")
    flat = indices.reshape(-1, books)
    return flat if flat.dtype == torch.int64 else flat.long()


__all__ = ["Adapter", "BinaryAdapter", "BinaryLatent", "LFQAdapter", "UpstreamLFQAdapter", "IndicesAdapter",
           "ProtocolAdapter", "adapter_for", "check_indices"]
