"""Code usage of codebooks past ``SPARSE_ABOVE`` codes (up to 2**62, Infinity's bitwise vocabularies),
where a (codebooks, K) table does not fit: ``SparseCodeUsage`` keeps each step's int64 codes on the
device until the next flush and then counts them exactly by sorting (``torch.unique``), gathered over
data-parallel ranks; the usage window is a sorted set of (code, last step) pairs; per-bit counts are
summed per step as for small codebooks. ``dead_codes`` is not defined there (NaN): the window's
``codes_used_window`` is; docs/monitor.md ("Vocabularies past 2^24").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lfq.code_usage import BATCH_MAX_STEPS, NEVER, CodeUsage
from lfq.step_counts import LOSS_FIELDS, ClosedStep, LayerSpec, StepCounts

# Codebooks larger than this are counted sparsely. At 2**24 a dense table of last-used steps,
# histogram and snapshot is 3 x 128 MiB per codebook; past it, sorting a step's codes is cheaper.
SPARSE_ABOVE = 2**24


def gather_ranks(t: Tensor) -> Tensor:
    """The concatenation over the ranks of the default process group of a 1-D tensor whose length
    differs per rank (two collectives: the lengths, then padded data); ``t`` itself without one."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    world = dist.get_world_size()
    size = torch.tensor([t.numel()], dtype=torch.long, device=t.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    lengths = [int(s) for s in sizes]
    padded = t.new_zeros(max(lengths))
    padded[: t.numel()] = t
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, lengths, strict=True)])


def kept_codes(passes: list[tuple[Tensor, Tensor]], books: int, distributed: bool) -> list[Tensor]:
    """Per codebook, the codes of every kept token of ``passes`` ((idx, weight) pairs, (N, c)
    each; weight 0 = dropped), over every rank when ``distributed``; one gather for all codebooks."""
    if passes:
        idx = torch.cat([i for i, _ in passes])
        keep = torch.cat([w for _, w in passes]) > 0
    else:
        idx = torch.zeros(0, books, dtype=torch.long)
        keep = torch.zeros(0, books, dtype=torch.bool)
    book = torch.arange(books, device=idx.device).expand_as(idx)
    flat = torch.stack([idx[keep], book[keep]])  # (2, kept)
    if distributed:
        flat = _gather_pairs(flat)
    return [flat[0][flat[1] == b] for b in range(books)]


def _gather_pairs(flat: Tensor) -> Tensor:
    """(2, n) per rank -> (2, total): rows gathered separately, so each rank's pairs stay aligned."""
    return torch.stack([gather_ranks(flat[0].contiguous()), gather_ranks(flat[1].contiguous())])


def merge_counts(codes: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """Sorted distinct codes and their summed counts."""
    unique, inverse = torch.unique(codes, return_inverse=True)
    return unique, torch.zeros_like(unique).scatter_add_(0, inverse, counts)


@dataclass
class SparseCodeUsage(CodeUsage):
    """``CodeUsage`` of a codebook past ``SPARSE_ABOVE`` codes. ``step.counts`` is (c, d + 1): tokens with
    each bit set, then kept tokens (all-reduced with the small codebooks' counts); the step's codes
    wait in ``passes`` and closed steps in ``stash`` until ``settle`` (every flush or snapshot, or
    ``BATCH_MAX_STEPS`` steps), which syncs the host. ``window[b]``: (codes, last step) of codebook b's
    codes used within the last max(usage_window, dead_after) steps; ``snapshot[b]``: (codes, counts)
    since the last snapshot."""

    passes: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    stash: list[tuple[int, StepCounts, list[tuple[Tensor, Tensor]]]] = field(default_factory=list)
    window: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    snapshot: list[tuple[Tensor, Tensor]] | None = None
    distributed: bool = False

    @classmethod
    def new(cls, spec: LayerSpec, device: torch.device, first_step: int, snapshots: bool) -> SparseCodeUsage:
        books, bits = spec.num_codebooks, spec.bits or 0
        with torch.inference_mode(False):
            empty = torch.zeros(books, 0, dtype=torch.long, device=device)
            codes = torch.zeros(0, dtype=torch.long, device=device)
            return cls(
                first_step=first_step, last_used=empty, histogram=empty, since_snapshot=None,
                touched_since_snapshot=False, step=cls._new_step(spec, device), bit_tables=None,
                bit_last_set=None if spec.bits is None else torch.full((books, bits), NEVER, dtype=torch.long, device=device),
                bit_last_clear=None if spec.bits is None else torch.full((books, bits), NEVER, dtype=torch.long, device=device),
                window=[(codes, codes) for _ in range(books)],
                snapshot=[(codes, codes) for _ in range(books)] if snapshots else None,
            )

    @staticmethod
    def _new_step(spec: LayerSpec, device: torch.device) -> StepCounts:
        with torch.inference_mode(False):
            return StepCounts(counts=torch.zeros(spec.num_codebooks, (spec.bits or 0) + 1, dtype=torch.long, device=device),
                              loss_sum=torch.zeros(len(LOSS_FIELDS), spec.num_codebooks, device=device))

    @property
    def device(self) -> torch.device:
        return self.step.counts.device

    def to(self, device: torch.device) -> None:
        super().to(device)
        self.window = [(c.to(device), s.to(device)) for c, s in self.window]
        if self.snapshot is not None:
            self.snapshot = [(c.to(device), n.to(device)) for c, n in self.snapshot]
        self.passes = [(i.to(device), w.to(device)) for i, w in self.passes]

    def add_tokens(self, spec: LayerSpec, idx: Tensor, weight: Tensor) -> None:
        """Keep ``idx`` (tokens, c) for the flush; add the kept tokens' bit counts (device ops only)."""
        counts = self.step.counts
        if spec.bits:
            shifts = torch.arange(spec.bits - 1, -1, -1, device=idx.device)
            counts[:, :-1].add_((((idx.unsqueeze(-1) >> shifts) & 1) * weight.unsqueeze(-1)).sum(0))
        counts[:, -1].add_(weight.sum(0))
        self.passes.append((idx, weight))
        self.step.forward_passes += 1
        self.touched_since_snapshot = True

    def close(self, spec: LayerSpec, mode: str, step: int, usage_window: int, dead_after: int,
              summarize: bool = True, batched: bool = True) -> list[ClosedStep]:
        """Stash the step (no host sync); settle when ``BATCH_MAX_STEPS`` are waiting."""
        self.stash.append((step, self.step, self.passes))
        self.step, self.passes = self._new_step(spec, self.device), []
        if len(self.stash) >= BATCH_MAX_STEPS:
            return self.settle(spec, mode, usage_window, dead_after, summarize)
        return []

    def settle(self, spec: LayerSpec, mode: str, usage_window: int, dead_after: int,
               summarize: bool = True) -> list[ClosedStep]:
        """Count the stashed steps' codes exactly (sorting; over every rank), update the window and
        the snapshot, and return their ClosedSteps (none when ``summarize`` is False)."""
        if not self.stash:
            return []
        stash, self.stash = self.stash, []
        books, bits = spec.num_codebooks, spec.bits or 0
        horizon = max(usage_window, dead_after)
        closed: list[ClosedStep] = []
        for step, acc, passes in stash:
            per_book = kept_codes(passes, books, self.distributed)
            used, n_log_n, in_window = [], [], []
            for b, codes in enumerate(per_book):
                unique, counts = torch.unique(codes, return_counts=True)
                used.append(float(unique.numel()))
                n_log_n.append(float(torch.special.xlogy(counts.double(), counts.double()).sum()))
                window_codes, window_last = self.window[b]
                merged, inverse = torch.unique(torch.cat([window_codes, unique]), return_inverse=True)
                last = torch.full_like(merged, NEVER).scatter_reduce_(
                    0, inverse, torch.cat([window_last, torch.full_like(unique, step)]), "amax")
                alive = last > step - horizon
                self.window[b] = (merged[alive], last[alive])
                in_window.append(float((last > step - usage_window).sum()))
                if self.snapshot is not None:
                    old_codes, old_counts = self.snapshot[b]
                    self.snapshot[b] = merge_counts(torch.cat([old_codes, unique]), torch.cat([old_counts, counts]))
            counts = acc.counts.float()  # (c, d + 1): bits set, then tokens (all-reduced)
            tokens, bit_set = counts[:, -1:], counts[:, :-1]
            threshold = step - dead_after
            dead_counted = threshold >= self.first_step - 1
            dead_bits = self._zeros(1)
            if self.bit_last_set is not None:
                self.bit_last_set.masked_fill_(bit_set > 0, step)
                self.bit_last_clear.masked_fill_(bit_set < tokens, step)
                if dead_counted:
                    stuck = torch.minimum(self.bit_last_set, self.bit_last_clear) <= threshold
                    dead_bits = stuck.sum(-1, keepdim=True).float()
            if not summarize:
                continue
            column = torch.tensor([used, tokens[:, 0].tolist(), n_log_n, in_window,
                                   [math.nan] * books], dtype=torch.float32, device=self.device).t()
            parts = [acc.loss_sum.t(), column, self._latent_part(acc, step), dead_bits]
            if bits:
                parts.append(bit_set)
            closed.append(ClosedStep(step, spec, mode, list(acc.loss_passes), acc.forward_passes,
                                     acc.latent_passes, torch.cat(parts, dim=-1)))
        return closed

    def take_snapshot(self) -> list[tuple[Tensor, Tensor]] | None:  # type: ignore[override]
        """Per codebook (codes, counts) since the previous snapshot (None if untouched)."""
        if self.snapshot is None or not self.touched_since_snapshot:
            return None
        taken = self.snapshot
        empty = torch.zeros(0, dtype=torch.long, device=self.device)
        self.snapshot = [(empty, empty) for _ in taken]
        self.touched_since_snapshot = False
        return taken

    def state(self) -> dict[str, Any]:
        if self.stash or self.passes:
            raise RuntimeError("SparseCodeUsage.state() with unsettled steps: settle them first (LFQMonitor.flush does)")
        return {
            "sparse": True,
            "first_step": self.first_step,
            "window": [(c.cpu().clone(), s.cpu().clone()) for c, s in self.window],
            "snapshot": None if self.snapshot is None else [(c.cpu().clone(), n.cpu().clone()) for c, n in self.snapshot],
            "touched_since_snapshot": self.touched_since_snapshot,
            "bit_last_set": None if self.bit_last_set is None else self.bit_last_set.cpu().clone(),
            "bit_last_clear": None if self.bit_last_clear is None else self.bit_last_clear.cpu().clone(),
        }

    @classmethod
    def from_state(cls, spec: LayerSpec, mode: str, saved: dict[str, Any], snapshots: bool) -> SparseCodeUsage:
        if not saved.get("sparse") or len(saved["window"]) != spec.num_codebooks:
            raise ValueError(f"state of layer {spec.name!r} mode {mode!r} is not that of a sparse codebook of "
                             f"{spec.num_codebooks} codebook(s) of {spec.codebook_size} codes")
        usage = cls.new(spec, torch.device("cpu"), int(saved["first_step"]), snapshots)
        usage.window = [(c.clone(), s.clone()) for c, s in saved["window"]]
        if usage.snapshot is not None and saved["snapshot"] is not None:
            usage.snapshot = [(c.clone(), n.clone()) for c, n in saved["snapshot"]]
        usage.touched_since_snapshot = bool(saved["touched_since_snapshot"])
        for name in ("bit_last_set", "bit_last_clear"):
            if getattr(usage, name) is not None and saved.get(name) is not None:
                getattr(usage, name).copy_(saved[name])
        return usage
