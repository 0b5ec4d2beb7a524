"""Code-usage statistics of one quantizer layer in one mode, kept on the layer's device.

``lfq.monitor`` owns the hooks and the step bookkeeping; this module owns which modules are
watched (``is_quantizer``, ``LayerSpec``) and the numbers: what a step accumulates
(``StepCounts``) and its sum over data-parallel ranks (``all_reduce_counts``), the state
that outlives a step (``CodeUsage``: last-used steps, histograms), the per-step statistics
computed from them with device ops only, and the conversion of a flush's row tensors into
flat records. The definitions of the columns
are in the ``lfq.monitor`` docstring.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lfq.quantizer import LFQ

MODES = ("train", "eval")
LOSS_FIELDS = ("per_sample_entropy", "batch_entropy", "commitment", "aux_loss")
STAT_FIELDS = LOSS_FIELDS + (
    "codes_used", "perplexity", "usage_fraction", "dead_codes", "bit_balance_mad", "tokens", "forward_passes",
)
RECORD_COLUMNS = ("step", "layer", "codebook", "kind", "mode", "codebook_size") + STAT_FIELDS
NEVER = -(2**62)  # last_used of a code never seen: below any step minus any window

# (step, layer, mode, codebook_size, counts): a histogram snapshot waiting for the next flush.
Snapshot = tuple[int, str, str, int, Tensor]


def is_quantizer(module: nn.Module) -> bool:
    """An ``lfq.LFQ``, or a module that duck-types the quantizer protocol (module docstring)."""
    if isinstance(module, LFQ):
        return True
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


@dataclass(frozen=True)
class LayerSpec:
    name: str  # the module path, or lfq.monitor.ROOT_LAYER for the model itself
    module: nn.Module
    codebook_size: int
    num_codebooks: int
    keep_num_codebooks_dim: bool
    bits: int | None  # bits per index, for bit balance; None: indices are not bit strings

    @classmethod
    def describe(cls, name: str, module: nn.Module) -> LayerSpec:
        """The spec of a module that ``is_quantizer``; ValueError if the monitor cannot watch it."""
        size, books = int(module.codebook_size), int(module.num_codebooks)
        if size < 1 or books < 1:
            raise ValueError(f"{name}: codebook_size and num_codebooks must be >= 1, got {size} and {books}")
        if books > 1 and not module.keep_num_codebooks_dim:
            raise ValueError(
                f"{name}: num_codebooks={books} with keep_num_codebooks_dim=False leaves no codebook "
                f"axis on the indices; the monitor needs keep_num_codebooks_dim=True"
            )
        bits = int(module.codebook_dim) if isinstance(module, LFQ) else None
        return cls(name, module, size, books, bool(module.keep_num_codebooks_dim), bits)


@dataclass
class StepCounts:
    """What one (layer, mode) accumulated during the current step, on the layer's device.

    ``counts`` (c, K) sums kept tokens over the step's passes; ``loss_sum`` (4, c) sums each
    of ``LOSS_FIELDS`` over the ``loss_passes[i]`` passes that reported it.
    """

    counts: Tensor
    loss_sum: Tensor
    loss_passes: list[int] = field(default_factory=lambda: [0] * len(LOSS_FIELDS))
    forward_passes: int = 0

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


@dataclass
class ClosedStep:
    """One closed step of one (layer, mode): host metadata and a flat float32 device tensor of
    raw sums (see ``CodeUsage.close``), turned into records at the next flush."""

    step: int
    spec: LayerSpec
    mode: str
    loss_passes: list[int]
    forward_passes: int
    sums: Tensor


def _bit_tables(bits: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(2**h, h) and (2**l, l) 0/1 tables of the bits of the high h and low l = bits - h bits."""
    high = bits // 2

    def table(n: int) -> Tensor:
        return ((torch.arange(2**n, device=device)[:, None] >> torch.arange(n, device=device)) & 1).float()

    with torch.inference_mode(False):
        return table(high), table(bits - high)


@dataclass
class CodeUsage:
    """The state of one (layer, mode) that outlives a step, plus the current step's counts."""

    first_step: int  # the first step this (layer, mode) was seen; never-used codes date from it
    last_used: Tensor  # (c, K) int64: the last step each code was used, NEVER if never
    histogram: Tensor  # (c, K) int64: cumulative counts over closed steps
    since_snapshot: Tensor | None  # (c, K) int64: counts since the last snapshot; None: no snapshots
    touched_since_snapshot: bool
    step: StepCounts
    bit_tables: tuple[Tensor, Tensor] | None  # bits of the high and low halves of an index

    @classmethod
    def new(cls, spec: LayerSpec, device: torch.device, first_step: int, snapshots: bool) -> CodeUsage:
        shape = (spec.num_codebooks, spec.codebook_size)
        with torch.inference_mode(False):
            return cls(
                first_step=first_step,
                last_used=torch.full(shape, NEVER, dtype=torch.long, device=device),
                histogram=torch.zeros(shape, dtype=torch.long, device=device),
                since_snapshot=torch.zeros(shape, dtype=torch.long, device=device) if snapshots else None,
                touched_since_snapshot=False,
                step=StepCounts.zeros(spec, device),
                bit_tables=None if spec.bits is None else _bit_tables(spec.bits, device),
            )

    @property
    def device(self) -> torch.device:
        return self.last_used.device

    def to(self, device: torch.device) -> None:
        """Move every tensor (state loaded on the CPU, or a model moved between steps)."""
        for obj, names in ((self, ("last_used", "histogram", "since_snapshot")),
                           (self.step, ("counts", "loss_sum"))):
            for name in names:
                value = getattr(obj, name)
                if value is not None:
                    setattr(obj, name, value.to(device))
        if self.bit_tables is not None:
            self.bit_tables = (self.bit_tables[0].to(device), self.bit_tables[1].to(device))

    def add_tokens(self, spec: LayerSpec, idx: Tensor, weight: Tensor) -> None:
        """Count ``idx`` (tokens, c) weighted by ``weight`` (tokens, c): 1 = kept, 0 = masked."""
        flat = idx
        if spec.num_codebooks > 1:
            flat = idx + torch.arange(spec.num_codebooks, device=idx.device) * spec.codebook_size
        # scatter_add_, not bincount: CUDA bincount reads the largest index back to the host.
        self.step.counts.view(-1).scatter_add_(0, flat.reshape(-1), weight.reshape(-1))
        self.step.forward_passes += 1
        self.touched_since_snapshot = True

    def close(self, spec: LayerSpec, mode: str, step: int, usage_window: int, dead_after: int,
              summarize: bool = True) -> ClosedStep | None:
        """Fold the step's counts into the state and keep its raw sums for the next flush.

        ``summarize=False`` (ranks other than 0, whose records go nowhere) only folds the
        counts into the state and returns None.

        Only device ops, few of them, none reading back: everything that divides or takes a
        log of a sum is left to the host at flush time (``step_records``). The sums,
        each per codebook: loss_sum (4), codes used, tokens, sum of n log n over the codes'
        counts n, codes used in the window, dead codes, and tokens with each bit set (high
        bits first, then low).
        """
        acc = self.step
        counts = acc.counts
        self.histogram.add_(counts)
        if self.since_snapshot is not None:
            self.since_snapshot.add_(counts)
        used = counts > 0
        self.last_used.masked_fill_(used, step)
        if not summarize:
            acc.reset()
            return None

        as_float = counts.float()
        parts = [
            acc.loss_sum.t(),
            used.sum(-1, keepdim=True),
            as_float.sum(-1, keepdim=True),
            torch.special.xlogy(as_float, as_float).sum(-1, keepdim=True),
            (self.last_used > step - usage_window).sum(-1, keepdim=True),
        ]
        threshold = step - dead_after
        if threshold >= self.first_step - 1:  # never-used codes count as last used at first_step - 1
            parts.append((self.last_used <= threshold).sum(-1, keepdim=True))
        else:
            parts.append(torch.zeros_like(parts[1]))
        if self.bit_tables is not None:
            # Tokens with each bit set, from the histogram: split an index into its high and
            # low bits and sum the counts over the other half (O(K)), then weight the ~sqrt(K)
            # half-counts by their bits. Multiply-and-sum, not matmul: cuBLAS refuses to run
            # under torch.use_deterministic_algorithms without CUBLAS_WORKSPACE_CONFIG.
            high_table, low_table = self.bit_tables
            by_halves = as_float.view(spec.num_codebooks, high_table.shape[0], low_table.shape[0])
            parts += [(by_halves.sum(2).unsqueeze(-1) * high_table).sum(1),
                      (by_halves.sum(1).unsqueeze(-1) * low_table).sum(1)]
        closed = ClosedStep(step, spec, mode, list(acc.loss_passes), acc.forward_passes, torch.cat(parts, dim=-1).float())
        acc.reset()
        return closed

    def take_snapshot(self) -> Tensor | None:
        """The counts since the previous snapshot (None if untouched), and start a new one."""
        if self.since_snapshot is None or not self.touched_since_snapshot:
            return None
        counts = self.since_snapshot
        self.since_snapshot = torch.zeros_like(counts)
        self.touched_since_snapshot = False
        return counts

    def state(self) -> dict[str, Any]:
        return {
            "first_step": self.first_step,
            "last_used": self.last_used.cpu().clone(),
            "histogram": self.histogram.cpu().clone(),
            "since_snapshot": None if self.since_snapshot is None else self.since_snapshot.cpu().clone(),
            "touched_since_snapshot": self.touched_since_snapshot,
        }

    @classmethod
    def from_state(cls, spec: LayerSpec, mode: str, saved: dict[str, Any], snapshots: bool) -> CodeUsage:
        shape = (spec.num_codebooks, spec.codebook_size)
        if mode not in MODES or tuple(saved["last_used"].shape) != shape:
            raise ValueError(
                f"state of layer {spec.name!r} mode {mode!r} has shape {tuple(saved['last_used'].shape)}; "
                f"expected mode 'train' or 'eval' and (num_codebooks, codebook_size) = {shape}"
            )
        usage = cls.new(spec, saved["last_used"].device, int(saved["first_step"]), snapshots)
        usage.last_used.copy_(saved["last_used"])
        usage.histogram.copy_(saved["histogram"])
        if usage.since_snapshot is not None and saved["since_snapshot"] is not None:
            usage.since_snapshot.copy_(saved["since_snapshot"])
        usage.touched_since_snapshot = bool(saved["touched_since_snapshot"])
        return usage


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


def _to_host(tensors: list[Tensor]) -> list[list[float]]:
    """Flatten and concatenate per device: one transfer per device for a whole flush."""
    by_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(i)
    out: list[list[float]] = [[] for _ in tensors]
    for positions in by_device.values():
        values = torch.cat([tensors[i].reshape(-1) for i in positions]).tolist()
        start = 0
        for i in positions:
            out[i] = values[start:start + tensors[i].numel()]
            start += tensors[i].numel()
    return out


def _stats(closed: ClosedStep, sums: list[float]) -> dict[str, float | int]:
    """One codebook's record columns from its raw sums (layout in ``CodeUsage.close``)."""
    losses, (used, tokens, n_log_n, in_window, dead), bit_set = sums[:4], sums[4:9], sums[9:]
    stats: dict[str, float | int] = {
        name: total / passes if passes else math.nan
        for name, total, passes in zip(LOSS_FIELDS, losses, closed.loss_passes, strict=True)
    }
    # Entropy of the histogram n_k / T: log T - sum(n_k log n_k) / T.
    stats["codes_used"] = int(used)
    stats["perplexity"] = math.exp(math.log(tokens) - n_log_n / tokens) if tokens > 0 else math.nan
    stats["usage_fraction"] = in_window / closed.spec.codebook_size
    stats["dead_codes"] = int(dead)
    if bit_set and tokens > 0:
        stats["bit_balance_mad"] = sum(abs(n / tokens - 0.5) for n in bit_set) / len(bit_set)
    else:
        stats["bit_balance_mad"] = math.nan
    stats["tokens"] = int(tokens)
    stats["forward_passes"] = closed.forward_passes
    return stats


def step_records(closed_steps: list[ClosedStep]) -> list[dict[str, Any]]:
    """Flat records, one per (step, layer, mode, codebook), columns in ``RECORD_COLUMNS`` order."""
    records: list[dict[str, Any]] = []
    for closed, values in zip(closed_steps, _to_host([c.sums for c in closed_steps]), strict=True):
        width = len(values) // closed.spec.num_codebooks
        for codebook in range(closed.spec.num_codebooks):
            record: dict[str, Any] = {
                "step": closed.step, "layer": closed.spec.name, "codebook": codebook, "kind": "quantizer",
                "mode": closed.mode, "codebook_size": closed.spec.codebook_size,
            }
            record.update(_stats(closed, values[codebook * width:(codebook + 1) * width]))
            records.append(record)
    return records


def snapshot_records(snapshots: list[Snapshot]) -> list[dict[str, Any]]:
    """Sparse histogram rows: the used codes and their counts, per codebook."""
    records: list[dict[str, Any]] = []
    for step, name, mode, size, counts in snapshots:
        counts = counts.cpu()
        for codebook in range(counts.shape[0]):
            codes = counts[codebook].nonzero().flatten()
            records.append({
                "step": step, "layer": name, "codebook": codebook, "codebook_size": size, "mode": mode,
                "codes": codes.tolist(), "counts": counts[codebook, codes].tolist(),
            })
    return records
