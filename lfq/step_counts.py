"""What the monitor keeps per watched layer and step before any statistic, the raw counts: which
modules are watched (``is_quantizer``, ``LayerSpec``), what one (layer, mode) accumulates during a
step (``StepCounts``: code counts, loss sums, latent sums), their sum over data-parallel ranks
(``all_reduce_counts``), and what a closed step hands to ``lfq.records`` (``ClosedStep``,
``Snapshot``); see docs/monitor.md ("Inside the monitor").
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lfq.adapters import Adapter, BinaryLatent, adapter_for
from lfq.latent_stats import dependence_sums, latent_sums, weighted_gram

MODES = ("train", "eval")
LOSS_FIELDS = ("per_sample_entropy", "batch_entropy", "commitment", "aux_loss")

# (step, layer, mode, codebook_size, bits, counts, pair_mi): a histogram snapshot waiting for the
# next flush; pair_mi = (diagnostic step, (c, d, d) mutual information between bits, (c, groups)
# entropies of the groups of the group bound) or None.
Snapshot = tuple[int, str, str, int, "int | None", Tensor, "tuple[int, Tensor, Tensor] | None"]


def is_quantizer(module: nn.Module) -> bool:
    """A module the monitor watches by itself (``lfq.adapters.adapter_for``)."""
    return adapter_for(module) is not None


@dataclass(frozen=True)
class LayerSpec:
    name: str  # the module path, or lfq.monitor.ROOT_LAYER for the model itself
    module: nn.Module
    adapter: Adapter
    codebook_size: int
    num_codebooks: int
    bits: int | None  # bits per index, for the bit statistics; None: indices are not bit strings

    @classmethod
    def describe(cls, name: str, module: nn.Module, adapter: Adapter | None = None) -> LayerSpec:
        """The spec of a watched module; ValueError if the monitor cannot watch it."""
        adapter = adapter if adapter is not None else adapter_for(module)
        if adapter is None:
            raise ValueError(f"{name}: {type(module).__name__} is not a quantizer the monitor knows; pass an adapter")
        size, books = int(adapter.codebook_size), int(adapter.num_codebooks)
        if size < 1 or books < 1:
            raise ValueError(f"{name}: codebook_size and num_codebooks must be >= 1, got {size} and {books}")
        if books > 1 and getattr(adapter, "keep_num_codebooks_dim", True) is False:
            raise ValueError(
                f"{name}: num_codebooks={books} with keep_num_codebooks_dim=False leaves no codebook "
                f"axis on the indices; the monitor needs keep_num_codebooks_dim=True"
            )
        bits = adapter.bits
        if bits is not None and 2**bits != size:
            raise ValueError(f"{name}: an adapter with bits={bits} needs codebook_size = 2**bits, got {size}")
        return cls(name, module, adapter, size, books, bits)


@dataclass
class StepCounts:
    """What one (layer, mode) accumulated during the current step, on the layer's device.
    ``counts`` (c, K) sums kept tokens over the step's passes; ``loss_sum`` (4, c) sums each
    of ``LOSS_FIELDS`` over the ``loss_passes[i]`` passes that reported it. On diagnostic steps
    ``latent`` (len(LATENT_FIELDS), c) sums the binary latent's statistics over
    ``latent_passes`` passes, ``gram`` (c, 2**a, 2**b) its batch distribution's sum (up to
    ``lfq.entropy.EXACT_MAX_BITS`` bits) and ``dependence`` the sums behind the bits' total
    correlation, pairwise mutual information and group bound (``lfq.latent_stats``);
    ``local_batch`` (c,) is set when the step closes under torch.distributed: this rank's exact
    batch entropy divided by the world size, summed over ranks with the rest.
    """

    counts: Tensor
    loss_sum: Tensor
    loss_passes: list[int] = field(default_factory=lambda: [0] * len(LOSS_FIELDS))
    forward_passes: int = 0
    latent: Tensor | None = None
    gram: Tensor | None = None
    latent_passes: int = 0
    dependence: Tensor | None = None
    local_batch: Tensor | None = None

    @classmethod
    def zeros(cls, spec: LayerSpec, device: torch.device) -> StepCounts:
        # Outside inference mode: these are written in place after any validation pass.
        with torch.inference_mode(False):
            return cls(
                counts=torch.zeros(spec.num_codebooks, spec.codebook_size, dtype=torch.long, device=device),
                loss_sum=torch.zeros(len(LOSS_FIELDS), spec.num_codebooks, dtype=torch.float32, device=device),
            )

    def reset(self) -> None:
        self.counts.zero_()
        self.loss_sum.zero_()
        self.loss_passes = [0] * len(LOSS_FIELDS)
        self.forward_passes = 0
        self.latent, self.gram, self.latent_passes = None, None, 0
        self.dependence, self.local_batch = None, None

    def add_latent(self, latent: BinaryLatent, weight: Tensor, entropies: bool) -> None:
        """Accumulate a pass's latent statistics (``weight`` (N,): 1 = kept token, 0 = masked);
        ``entropies``: also the per-sample entropy sum (the quantizer does not report it). The
        exact batch distribution is summed either way: the total correlation needs it."""
        sums = latent_sums(latent, weight, entropies=entropies)
        self.latent = sums if self.latent is None else self.latent.add_(sums)
        gram = weighted_gram(latent, weight)
        if gram is not None:
            self.gram = gram if self.gram is None else self.gram.add_(gram)
        dependence = dependence_sums(latent, weight)
        self.dependence = dependence if self.dependence is None else self.dependence.add_(dependence)
        self.latent_passes += 1


@dataclass
class ClosedStep:
    """One closed step of one (layer, mode): host metadata and a flat float32 device tensor of
    raw sums (see ``CodeUsage.close``), turned into records at the next flush."""

    step: int
    spec: LayerSpec
    mode: str
    loss_passes: list[int]
    forward_passes: int
    latent_passes: int
    sums: Tensor


def scatter_counts(counts: Tensor, spec: LayerSpec, idx: Tensor, weight: Tensor) -> None:
    """Add ``weight`` (tokens, c) at ``idx`` (tokens, c) into ``counts`` (c, K), in place."""
    flat = idx
    if spec.num_codebooks > 1:
        flat = idx + torch.arange(spec.num_codebooks, device=idx.device) * spec.codebook_size
    # scatter_add_, not bincount: CUDA bincount reads the largest index back to the host.
    counts.view(-1).scatter_add_(0, flat.reshape(-1), weight.reshape(-1))


def all_reduce_counts(counts: list[Tensor]) -> None:
    """Sum code counts over the ranks of the default process group, in place: one all_reduce per
    device for all of them (per step, not per layer). No host sync: on NCCL it is enqueued on
    the stream. Every rank must pass the same shapes in the same order, so the layouts agree.
    Only counts are reduced: every usage statistic derives from them, bit balance included."""
    by_device: dict[torch.device, list[Tensor]] = {}
    for c in counts:
        by_device.setdefault(c.device, []).append(c)
    for group in by_device.values():
        if len(group) == 1:
            dist.all_reduce(group[0])
            continue
        flat = torch.cat([c.reshape(-1) for c in group])
        dist.all_reduce(flat)
        for c, reduced in zip(group, flat.split([c.numel() for c in group]), strict=True):
            c.copy_(reduced.view_as(c))
