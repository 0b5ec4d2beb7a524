"""Code-usage statistics of one quantizer layer in one mode, kept on the layer's device: the state
that outlives a step (``CodeUsage``: last-used steps, histograms) and the per-step statistics
computed from it with device ops only; how it fits with the monitor's other modules is in
docs/monitor.md ("Inside the monitor").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lfq.latent_stats import LATENT_FIELDS, dependence_stats, gram_entropy
from lfq.step_counts import LOSS_FIELDS, MODES, ClosedStep, LayerSpec, StepCounts, scatter_counts

NEVER = -(2**62)  # last_used of a code never seen: below any step minus any window
# Small codebooks (c * K codes up to this) close their steps in batches: a closed step is only
# stashed (a few ops), and its statistics are computed with the next ones at the next flush or
# snapshot, or every BATCH_MAX_STEPS steps, over a (steps, c, K) stack. At small codebooks the
# fixed cost of each op is the whole cost, so ~25 ops per step become ~25 per batch. Larger
# codebooks close every step at once (their ops cost bandwidth, and a stack would cost memory).
BATCH_MAX_CODES = 2**14
BATCH_MAX_STEPS = 64
# Columns of CodeUsage._latent_part: LATENT_FIELDS, batch entropy, local batch entropy, sum of
# bit entropies, largest pairwise mutual information, group bound.
LATENT_WIDTH = len(LATENT_FIELDS) + 5


def _bit_tables(bits: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(2**h, h) and (2**l, l) 0/1 tables of the high h and low l = bits - h bits, MSB first."""
    high = bits // 2

    def table(n: int) -> Tensor:
        shifts = torch.arange(n - 1, -1, -1, device=device)
        return ((torch.arange(2**n, device=device)[:, None] >> shifts) & 1).float()

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

    bit_last_set: Tensor | None = None  # (c, d) int64: the last step each bit was 1 in some kept token
    bit_last_clear: Tensor | None = None  # (c, d) int64: ... was 0 in some kept token
    _full_table: Tensor | None = None  # (K, d) bits of every index, built on first use (CPU)
    pending: list[tuple[int, StepCounts]] = field(default_factory=list)  # stashed closed steps
    # Batched closing: BATCH_MAX_STEPS rows of counts (T, c, K) and loss sums (T, 4, c) that the
    # steps of a batch accumulate into, so that closing a step allocates nothing.
    _rows: tuple[Tensor, Tensor] | None = None
    # (c, d, d) pairwise mutual information between bits of the last diagnostic step since the
    # last snapshot, that step, and its (c, groups) exact entropies of the groups of the group bound:
    # the snapshot rows carry them (``bit_pair_mi``, ``batch_entropy_groups``).
    pair_mi: tuple[int, Tensor, Tensor] | None = None

    @classmethod
    def new(cls, spec: LayerSpec, device: torch.device, first_step: int, snapshots: bool) -> CodeUsage:
        shape = (spec.num_codebooks, spec.codebook_size)
        with torch.inference_mode(False):
            bit_shape = (spec.num_codebooks, spec.bits or 0)
            return cls(
                first_step=first_step,
                last_used=torch.full(shape, NEVER, dtype=torch.long, device=device),
                histogram=torch.zeros(shape, dtype=torch.long, device=device),
                since_snapshot=torch.zeros(shape, dtype=torch.long, device=device) if snapshots else None,
                touched_since_snapshot=False,
                step=StepCounts.zeros(spec, device),
                bit_tables=None if spec.bits is None else _bit_tables(spec.bits, device),
                bit_last_set=None if spec.bits is None else torch.full(bit_shape, NEVER, dtype=torch.long, device=device),
                bit_last_clear=None if spec.bits is None else torch.full(bit_shape, NEVER, dtype=torch.long, device=device),
            )

    @property
    def device(self) -> torch.device:
        return self.last_used.device

    def to(self, device: torch.device) -> None:
        """Move every tensor (state loaded on the CPU, or a model moved between steps)."""
        for obj, names in ((self, ("last_used", "histogram", "since_snapshot", "bit_last_set", "bit_last_clear")),
                           (self.step, ("counts", "loss_sum", "latent", "gram", "dependence", "local_batch"))):
            for name in names:
                value = getattr(obj, name)
                if value is not None:
                    setattr(obj, name, value.to(device))
        if self.bit_tables is not None:
            self.bit_tables = (self.bit_tables[0].to(device), self.bit_tables[1].to(device))
        self._full_table = None
        for _, acc in self.pending:  # now copies apart from the rows: settle stacks them anyway
            for name in ("counts", "loss_sum", "latent", "gram", "dependence", "local_batch"):
                if getattr(acc, name) is not None:
                    setattr(acc, name, getattr(acc, name).to(device))
        if self._rows is not None:
            self._rows = (self._rows[0].to(device), self._rows[1].to(device))

    def add_tokens(self, spec: LayerSpec, idx: Tensor, weight: Tensor) -> None:
        """Count ``idx`` (tokens, c) weighted by ``weight`` (tokens, c): 1 = kept, 0 = masked."""
        scatter_counts(self.step.counts, spec, idx, weight)
        self.step.forward_passes += 1
        self.touched_since_snapshot = True

    def close(self, spec: LayerSpec, mode: str, step: int, usage_window: int, dead_after: int,
              summarize: bool = True, batched: bool = True) -> list[ClosedStep]:
        """Close the current step: small codebooks stash it (``BATCH_MAX_CODES``; ``batched``
        False: never) and return the steps settled now (usually none); others fold it into the
        state at once."""
        if batched and spec.num_codebooks * spec.codebook_size <= BATCH_MAX_CODES:
            self.pending.append((step, self.step))
            if len(self.pending) >= BATCH_MAX_STEPS:
                return self.settle(spec, mode, usage_window, dead_after, summarize)
            self.step = self._row(spec, len(self.pending))
            return []
        closed = self._close_now(spec, mode, step, usage_window, dead_after, summarize)
        return [] if closed is None else [closed]

    def settle(self, spec: LayerSpec, mode: str, usage_window: int, dead_after: int,
               summarize: bool = True) -> list[ClosedStep]:
        """Fold every stashed step into the state, in one batch; their ClosedSteps (none when
        ``summarize`` is False). The same numbers as closing each step at once."""
        if not self.pending:
            return []
        pending, self.pending = self.pending, []
        steps = [p[0] for p in pending]
        books = spec.num_codebooks
        at = torch.tensor(steps, dtype=torch.long)
        # Pinned and non_blocking: a copy from pageable memory would wait for the stream.
        at = (at.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda"
              else at.to(self.device)).view(-1, 1, 1)  # (T, 1, 1)
        counts = torch.stack([acc.counts for _, acc in pending])  # (T, c, K), a copy
        losses = torch.stack([acc.loss_sum.t() for _, acc in pending])
        latents = torch.stack([self._latent_part(acc, step) for step, acc in pending])
        if self._rows is not None:  # rows up to the open step's are stacked (or empty): start again at row 0
            used_rows = min(len(pending) + 1, BATCH_MAX_STEPS)
            for rows in self._rows:
                rows[:used_rows].zero_()
            self.step = self._row(spec, 0)
        self.histogram.add_(counts.sum(0))
        if self.since_snapshot is not None:
            self.since_snapshot.add_(counts.sum(0))
        used = counts > 0
        # Last use as of each step: the running max over the batch of the steps that used a code.
        last_used = torch.maximum(torch.where(used, at, NEVER).cummax(0).values, self.last_used)
        self.last_used.copy_(last_used[-1])
        as_float = counts.float()
        tokens = as_float.sum(-1, keepdim=True)  # (T, c, 1)
        bit_set = None
        if self.bit_tables is not None:
            bit_set = self._bit_counts(spec, as_float.view(-1, spec.codebook_size)).view(len(steps), books, -1)
            last_set = torch.maximum(torch.where(bit_set > 0, at, NEVER).cummax(0).values, self.bit_last_set)
            last_clear = torch.maximum(torch.where(bit_set < tokens, at, NEVER).cummax(0).values, self.bit_last_clear)
            self.bit_last_set.copy_(last_set[-1])
            self.bit_last_clear.copy_(last_clear[-1])
        if not summarize:
            return []

        # Steps are increasing, so those too early to count dead codes are a prefix.
        early = sum(s - dead_after < self.first_step - 1 for s in steps)
        dead = (last_used <= at - dead_after).sum(-1, keepdim=True)
        dead[:early] = 0
        parts = [
            losses,
            used.sum(-1, keepdim=True),
            tokens,
            torch.special.xlogy(as_float, as_float).sum(-1, keepdim=True),
            (last_used > at - usage_window).sum(-1, keepdim=True),
            dead,
            latents,
        ]
        if bit_set is not None:
            stuck = (torch.minimum(last_set, last_clear) <= at - dead_after).sum(-1, keepdim=True)
            stuck[:early] = 0
            parts += [stuck, bit_set]
        else:
            parts.append(as_float.new_zeros(len(steps), books, 1))
        sums = torch.cat(parts, dim=-1)
        return [ClosedStep(step, spec, mode, list(acc.loss_passes), acc.forward_passes, acc.latent_passes, sums[t])
                for t, (step, acc) in enumerate(pending)]

    def _row(self, spec: LayerSpec, index: int) -> StepCounts:
        """Empty StepCounts on row ``index`` of the batch buffers (allocated on first use)."""
        if self._rows is None:
            books, size = spec.num_codebooks, spec.codebook_size
            with torch.inference_mode(False):
                self._rows = (torch.zeros(BATCH_MAX_STEPS, books, size, dtype=torch.long, device=self.device),
                              torch.zeros(BATCH_MAX_STEPS, len(LOSS_FIELDS), books, device=self.device))
        return StepCounts(counts=self._rows[0][index], loss_sum=self._rows[1][index])

    def _latent_part(self, acc: StepCounts, step: int) -> Tensor:
        """(c, LATENT_WIDTH): the latent sums, the exact batch entropy of the latent's batch
        distribution (NaN above 2**EXACT_MAX_BITS codes), its mean over ranks of each rank's own
        (= the batch entropy in one process), and ``dependence_stats``: the sum of the bits'
        entropies, the largest pairwise mutual information and the group bound; zeros on steps
        without a latent."""
        if acc.latent is None:
            return self._zeros(LATENT_WIDTH)
        batch = gram_entropy(acc.gram, acc.latent[0]).unsqueeze(-1) if acc.gram is not None \
            else self._zeros(1).fill_(math.nan)
        local = batch if acc.local_batch is None else acc.local_batch.float().unsqueeze(-1)
        if acc.dependence is None:
            dependence = self._zeros(3).fill_(math.nan)
        else:
            dependence, mi, groups = dependence_stats(acc.dependence, self.bit_last_set.shape[1])
            self.pair_mi = (step, mi, groups)
        return torch.cat([acc.latent.t(), batch, local, dependence], dim=-1)

    def _close_now(self, spec: LayerSpec, mode: str, step: int, usage_window: int, dead_after: int,
                   summarize: bool = True) -> ClosedStep | None:
        """Fold the step's counts into the state and keep its raw sums for the next flush.
        ``summarize=False`` (ranks other than 0, whose records go nowhere) only folds the
        counts into the state and returns None.
        Only device ops, few of them, none reading back: everything that divides or takes a
        log of a sum is left to the host at flush time (``step_records``). The sums, each per
        codebook (``SUM_LAYOUT``): loss_sum (4), codes used, tokens, sum of n log n over the
        codes' counts n, codes used in the window, dead codes, the latent sums
        (``LATENT_FIELDS``), the batch entropy of the latent's batch distribution, dead bits,
        and tokens with each bit set (most significant first).
        """
        acc = self.step
        counts = acc.counts
        self.histogram.add_(counts)
        if self.since_snapshot is not None:
            self.since_snapshot.add_(counts)
        used = counts > 0
        self.last_used.masked_fill_(used, step)
        if not summarize and self.bit_tables is None:
            acc.reset()
            return None
        as_float = counts.float()
        tokens = as_float.sum(-1, keepdim=True)
        bit_set = None
        if self.bit_tables is not None:
            bit_set = self._bit_counts(spec, as_float)  # (c, d)
            self.bit_last_set.masked_fill_(bit_set > 0, step)
            self.bit_last_clear.masked_fill_(bit_set < tokens, step)
        if not summarize:
            acc.reset()
            return None

        # Few ops, each over (c, K) at most: at small codebooks each op's fixed cost is the cost.
        threshold = step - dead_after
        dead_counted = threshold >= self.first_step - 1  # never-used codes count as last used at first_step - 1
        parts = [
            acc.loss_sum.t(),
            used.sum(-1, keepdim=True),
            tokens,
            torch.special.xlogy(as_float, as_float).sum(-1, keepdim=True),
            (self.last_used > step - usage_window).sum(-1, keepdim=True),
            (self.last_used <= threshold).sum(-1, keepdim=True) if dead_counted else self._zeros(1),
        ]
        parts.append(self._latent_part(acc, step))
        if bit_set is not None:
            stuck = torch.minimum(self.bit_last_set, self.bit_last_clear) <= threshold
            parts += [stuck.sum(-1, keepdim=True) if dead_counted else self._zeros(1), bit_set]
        else:
            parts.append(self._zeros(1))
        closed = ClosedStep(step, spec, mode, list(acc.loss_passes), acc.forward_passes, acc.latent_passes,
                            torch.cat(parts, dim=-1))
        acc.reset()
        return closed

    def _zeros(self, width: int) -> Tensor:
        """(c, width) float zeros: a new tensor (it is kept until the flush), cheap to make."""
        return self.step.loss_sum.new_zeros(self.step.loss_sum.shape[1], width)

    def _bit_counts(self, spec: LayerSpec, as_float: Tensor) -> Tensor:
        """Tokens with each bit set, (c, d), from the step's code counts (c, K)."""
        high_table, low_table = self.bit_tables
        if as_float.device.type == "cpu" and spec.codebook_size <= 2**16:
            # One matrix product with the (K, d) bit table (at most 4 MiB): fewest ops.
            if self._full_table is None or self._full_table.device != as_float.device:
                index_bits = torch.cat([high_table.repeat_interleave(low_table.shape[0], 0),
                                        low_table.repeat(high_table.shape[0], 1)], dim=1)
                self._full_table = index_bits
            return as_float @ self._full_table
        # Split an index into its high and low bits and sum the counts over the other half
        # (O(K)), then weight the ~sqrt(K) half-counts by their bits. Multiply-and-sum, not
        # matmul: cuBLAS refuses to run under torch.use_deterministic_algorithms without
        # CUBLAS_WORKSPACE_CONFIG.
        by_halves = as_float.view(spec.num_codebooks, high_table.shape[0], low_table.shape[0])
        return torch.cat([(by_halves.sum(2).unsqueeze(-1) * high_table).sum(1),
                          (by_halves.sum(1).unsqueeze(-1) * low_table).sum(1)], dim=-1)

    def take_snapshot(self) -> Tensor | None:
        """The counts since the previous snapshot (None if untouched), and start a new one.
        Call ``settle`` first: stashed steps are not in it yet."""
        if self.since_snapshot is None or not self.touched_since_snapshot:
            return None
        counts = self.since_snapshot
        self.since_snapshot = torch.zeros_like(counts)
        self.touched_since_snapshot = False
        return counts

    def state(self) -> dict[str, Any]:
        if self.pending:
            raise RuntimeError("CodeUsage.state() with stashed steps: settle them first (LFQMonitor.flush does)")
        return {
            "first_step": self.first_step,
            "last_used": self.last_used.cpu().clone(),
            "histogram": self.histogram.cpu().clone(),
            "since_snapshot": None if self.since_snapshot is None else self.since_snapshot.cpu().clone(),
            "touched_since_snapshot": self.touched_since_snapshot,
            "bit_last_set": None if self.bit_last_set is None else self.bit_last_set.cpu().clone(),
            "bit_last_clear": None if self.bit_last_clear is None else self.bit_last_clear.cpu().clone(),
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
        for name in ("bit_last_set", "bit_last_clear"):  # absent from states saved before dead bits
            if getattr(usage, name) is not None and saved.get(name) is not None:
                getattr(usage, name).copy_(saved[name])
        return usage
