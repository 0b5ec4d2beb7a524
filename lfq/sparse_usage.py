"""Code usage of codebooks past ``SPARSE_ABOVE`` codes (up to 2**62, Infinity's bitwise vocabularies),
where a (codebooks, K) table does not fit: ``SparseCodeUsage`` keeps each step's int64 codes on the
device until the next flush and then counts them exactly by sorting (``torch.unique``), gathered over
data-parallel ranks; the usage window is a sorted set of (code, last step) pairs; per-bit counts are
summed per step as for small codebooks. ``dead_codes`` is not defined there (NaN): the window's
``codes_used_window`` is; docs/monitor.md ("Vocabularies past 2^24").
"""

from __future__ import annotations

import functools
import math
import sys
from dataclasses import dataclass, field
from typing import Any, NamedTuple

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


def stash_codes(steps: list[list[tuple[Tensor, Tensor]]], books: int,
                distributed: bool) -> list[tuple[Tensor, Tensor]]:
    """Per codebook, the codes of every kept token of each step's passes and the step's position in
    ``steps`` (in step order), over every rank when ``distributed`` (one gather for the whole stash)."""
    passes = [(idx, weight, t) for t, step in enumerate(steps) for idx, weight in step]
    if passes:  # one filter for the whole stash, not one per step
        idx = torch.cat([idx for idx, _, _ in passes])  # (N, c)
        keep = torch.cat([weight for _, weight, _ in passes]) > 0
        position = torch.repeat_interleave(torch.tensor([t for _, _, t in passes]),
                                           torch.tensor([len(idx) for idx, _, _ in passes])).to(idx.device)
        pairs = torch.stack([idx, torch.arange(books, device=idx.device).expand_as(idx),
                             position.unsqueeze(1).expand_as(idx)]).reshape(3, -1)
        if not bool(keep.all()):  # settling syncs anyway; masks are often absent
            pairs = pairs[:, keep.reshape(-1)]
    else:
        pairs = torch.zeros(3, 0, dtype=torch.long)
    if distributed:  # rank by rank: back into step order
        pairs = torch.stack([gather_ranks(row.contiguous()) for row in pairs])
        pairs = pairs[:, torch.argsort(pairs[2], stable=True)]
    if books == 1:
        return [(pairs[0], pairs[2])]
    return [(pairs[0][pairs[1] == b], pairs[2][pairs[1] == b]) for b in range(books)]


def bit_counts(codes: Tensor, group: Tensor, groups: int, bits: int, weights: Tensor | None = None) -> Tensor:
    """(groups, bits) int64: per group (a stashed step), the codes in ``codes`` (n,) with each bit
    set, most significant first, each counted ``weights`` (n,) times if given (a histogram's
    counts; exact up to 2^53 in all); ``group`` (n,) says whose each code is. One histogram per
    byte of the codes (n entries each, not n x bits; read through a byte view of the int64 codes
    on little-endian machines), then each byte value's bits, in one product (exact in float64)."""
    width = (bits + 7) // 8
    codes = codes.long().contiguous()
    code_bytes = codes.view(torch.uint8).view(-1, 8) if sys.byteorder == "little" else None
    base = group.to(torch.int32) * 256  # int32: half the memory traffic of int64 indices
    weights = None if weights is None else weights.double()
    hist = torch.stack([torch.bincount(base + (code_bytes[:, j] if code_bytes is not None else (codes >> 8 * j) & 255),
                                       weights, minlength=groups * 256) for j in range(width)])  # (bytes, groups * 256)
    per_bit = hist.view(width, groups, 256).double() @ _byte_bits(codes.device)  # (bytes, groups, 8)
    return per_bit.transpose(0, 1).reshape(groups, 8 * width)[:, :bits].flip(-1).long()  # from least significant first


@functools.lru_cache(maxsize=8)
def _byte_bits(device: torch.device) -> Tensor:
    """(256, 8) float64: the bits of each byte value, least significant first."""
    return ((torch.arange(256, device=device).unsqueeze(-1) >> torch.arange(8, device=device)) & 1).double()


class FlushCounts(NamedTuple):
    used: Tensor  # (T,) distinct codes per step
    n_log_n: Tensor  # (T,) float64 sum over a step's codes of n log n (n: the code's tokens that step)
    in_window: Tensor  # (T,) codes used in (s - usage_window, s]
    window: tuple[Tensor, Tensor]  # the codes used in the last ``horizon`` steps and their last use
    counts: tuple[Tensor, Tensor, Tensor]  # per (code, stashed step): the code, its tokens, the step's position


def flush_counts(codes: Tensor, position: Tensor, steps: Tensor, window: tuple[Tensor, Tensor],
                 usage_window: int, horizon: int) -> FlushCounts:
    """The usage of the stashed steps ``steps`` (increasing; ``codes`` (n,) with ``position`` (n,)
    the index of their step, in step order) after the ``window`` state (codes, last use), from one
    sort by (code, step) (:func:`_runs`). A code used at u and next at u' is in the window for s in
    [u, min(u', u + usage_window)): each such interval adds 1 to the steps it covers, counted with
    a difference array over the T stashed steps (no per-entry search: u + usage_window maps to a
    step position through a table over the few distinct u)."""
    old_codes, old_last = window
    total, device = len(steps), codes.device
    base = int(old_last.min()) if old_last.numel() else int(steps[0])
    offset = int(old_last.max()) - base + 1 if old_last.numel() else 0  # -(the lowest tag)
    # One int64 tag per entry: >= 0 the stashed step's position, < 0 a window entry last used at base - 1 - tag.
    run_code, run_tag, run_count = _runs(torch.cat([old_codes, codes]), torch.cat([base - 1 - old_last, position]),
                                         lowest_tag=-offset, highest_tag=total - 1)
    # Per tag (offset to start at 0: a slot), through small tables: the step of the use, and the
    # step position where it leaves the window unless the code comes back first (the first step
    # >= its step + usage_window).
    slot = run_tag + offset
    last_step = int(steps[-1])
    at_of_tag = torch.cat([torch.arange(base, base + offset, device=device).flip(0), steps])
    leaves_of_tag = torch.searchsorted(steps, at_of_tag + usage_window)
    run_at, leaves = at_of_tag.index_select(0, slot), leaves_of_tag.index_select(0, slot)
    run_pos = run_tag.clamp(min=0)  # window entries: 0, they are older than every stashed step
    last = torch.ones_like(run_code, dtype=torch.bool)  # each code's last use
    torch.ne(run_code[1:], run_code[:-1], out=last[:-1])
    # A code that comes back leaves at its next use (adding T where it does not: leaves are <= T).
    leaves[:-1].clamp_(max=torch.add(run_pos[1:], last[:-1], alpha=total))
    covered = torch.bincount(run_pos, minlength=total + 1) - torch.bincount(leaves, minlength=total + 1)
    in_window = torch.cumsum(covered, 0)[:total]
    used = torch.bincount(slot, minlength=offset + total)[offset:]  # window entries: slots below offset
    repeated = _flat_nonzero(run_count > 1)  # n log n is 0 for the rest (all window entries among them)
    weight = run_count.index_select(0, repeated).double()
    n_log_n = torch.zeros(total, dtype=torch.float64, device=device).index_add_(
        0, run_tag.index_select(0, repeated), weight * weight.log())
    keep = _flat_nonzero(last & (run_at > last_step - horizon))
    stashed = _flat_nonzero(run_tag >= 0)
    return FlushCounts(used, n_log_n, in_window, (run_code.index_select(0, keep), run_at.index_select(0, keep)),
                       tuple(t.index_select(0, stashed) for t in (run_code, run_count, run_tag)))


def _runs(codes: Tensor, tags: Tensor, lowest_tag: int, highest_tag: int) -> tuple[Tensor, Tensor, Tensor]:
    """The distinct (code, tag) pairs of ``codes``, ``tags`` (n,) ordered by code, then tag, and how
    many times each occurs. When code and tag fit one int64 key (codes below 2**(63 - tag bits):
    2**54 codes for a few hundred steps of stash and window), one plain sort of the keys (by
    numpy's vectorised sort on the CPU, 3-5x faster than torch.sort on int64 there), else a stable
    sort of the codes (``tags`` must then be increasing within each code, as flush_counts' are)."""
    if codes.numel() == 0:
        return codes, tags, codes
    tag_bits = max(1, (highest_tag - lowest_tag).bit_length())
    packed = int(codes.max()) < 2 ** (63 - tag_bits)
    if packed:
        key = _sorted_values((codes << tag_bits) | (tags - lowest_tag))
        starts = torch.ones_like(key, dtype=torch.bool)  # the first entry of each (code, tag)
        torch.ne(key[1:], key[:-1], out=starts[1:])
    else:
        key, order = torch.sort(codes, stable=True)
        tags = tags.index_select(0, order)
        starts = torch.ones_like(key, dtype=torch.bool)
        starts[1:] = (key[1:] != key[:-1]) | (tags[1:] != tags[:-1])
    first = _flat_nonzero(starts)
    count = torch.diff(first, append=first.new_full((1,), codes.numel()))
    key = key.index_select(0, first)
    if packed:
        return key >> tag_bits, (key & (2**tag_bits - 1)) + lowest_tag, count
    return key, tags.index_select(0, first), count


def _flat_nonzero(mask: Tensor) -> Tensor:
    """The indices of ``mask``'s (n,) true entries, int64: torch.nonzero, or numpy's on the CPU
    (10x faster there, single-threaded: the flushes' other large cost after sorting)."""
    np = _numpy()
    if np is not None and mask.device.type == "cpu":
        return torch.from_numpy(np.flatnonzero(mask.numpy()).astype(np.int64, copy=False))
    return mask.nonzero().squeeze(1)


def _sorted_values(key: Tensor) -> Tensor:
    """``key`` (n,) int64 sorted (values only: equal keys are alike, so stability is moot)."""
    np = _numpy()
    if np is not None and key.device.type == "cpu":
        return torch.from_numpy(np.sort(key.numpy()))
    return torch.sort(key).values


def _numpy() -> Any:
    """numpy, if it is installed and this torch can share tensors with it, else None: an optional
    accelerator of the flush on the CPU (lfq needs only torch)."""
    try:
        import numpy
    except ImportError:
        return None
    try:
        torch.zeros(1).numpy()
    except RuntimeError:  # a numpy this torch was not built against
        return None
    return numpy


def kept_codes(passes: list[tuple[Tensor, Tensor]], books: int, distributed: bool) -> list[Tensor]:
    """Per codebook, the codes of every kept token of ``passes`` (one evaluation pass, say)."""
    return [codes for codes, _ in stash_codes([passes], books, distributed)]


def merge_counts(codes: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """Sorted distinct codes and their summed counts."""
    unique, inverse = torch.unique(codes, return_inverse=True)
    return unique, torch.zeros_like(unique).scatter_add_(0, inverse, counts)


def sum_sorted_counts(codes: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`merge_counts` of ``codes`` already sorted (a flush's runs, a code once per step it
    was used in): one linear pass, no sort."""
    unique, inverse = torch.unique_consecutive(codes, return_inverse=True)
    return unique, torch.zeros_like(unique).scatter_add_(0, inverse, counts)


@dataclass
class DeferredSnapshot:
    """A snapshot asked for while steps wait in the stash: its (codes, counts) per codebook are
    found at the next settle (a flush), from the first ``cut`` stashed steps, so that asking
    does not sync the host. Resolved before the snapshot is sent."""

    cut: int
    value: list[tuple[Tensor, Tensor]] | None = None
    pair_mi: tuple[int, Tensor, Tensor] | None = None  # the last diagnostic step's, up to the cut


@dataclass
class SparseCodeUsage(CodeUsage):
    """``CodeUsage`` of a codebook past ``SPARSE_ABOVE`` codes. ``step.counts`` is (c, 1): kept tokens
    (all-reduced with the small codebooks' counts); the step's codes wait in ``passes`` and closed
    steps in ``stash`` until ``settle`` (every flush, or ``BATCH_MAX_STEPS`` steps), which syncs the
    host and counts the codes and their bits over every rank. ``window[b]``: (codes, last step) of codebook b's
    codes used within the last max(usage_window, dead_after) steps; ``snapshot[b]``: chunks of
    (codes, counts) since the last snapshot (each distinct and sorted), merged when it is taken; ``deferred``: snapshots asked
    for since the last settle, in order."""

    passes: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    stash: list[tuple[int, StepCounts, list[tuple[Tensor, Tensor]]]] = field(default_factory=list)
    window: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    snapshot: list[list[tuple[Tensor, Tensor]]] | None = None
    distributed: bool = False
    deferred: list[DeferredSnapshot] = field(default_factory=list)

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
                snapshot=[[] for _ in range(books)] if snapshots else None,
            )

    @staticmethod
    def _new_step(spec: LayerSpec, device: torch.device) -> StepCounts:
        with torch.inference_mode(False):
            return StepCounts(counts=torch.zeros(spec.num_codebooks, 1, dtype=torch.long, device=device),
                              loss_sum=torch.zeros(len(LOSS_FIELDS), spec.num_codebooks, device=device))

    @property
    def device(self) -> torch.device:
        return self.step.counts.device

    def to(self, device: torch.device) -> None:
        super().to(device)
        self.window = [(c.to(device), s.to(device)) for c, s in self.window]
        if self.snapshot is not None:
            self.snapshot = [[(c.to(device), n.to(device)) for c, n in chunks] for chunks in self.snapshot]
        self.passes = [(i.to(device), w.to(device)) for i, w in self.passes]

    def add_tokens(self, spec: LayerSpec, idx: Tensor, weight: Tensor) -> None:
        """Keep ``idx`` (tokens, c) for the flush and count the kept tokens (device ops only); the
        bits are counted from the codes when the step settles."""
        self.step.counts[:, 0].add_(weight.sum(0))
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
        the snapshot, and return their ClosedSteps (none when ``summarize`` is False). A few sorts
        over the window and the stash per flush, not per step (``window_counts``)."""
        if not self.stash:
            return []
        stash, self.stash = self.stash, []
        books, bits = spec.num_codebooks, spec.bits or 0
        steps = [step for step, _, _ in stash]
        at = torch.tensor(steps, dtype=torch.long, device=self.device)
        columns = []  # per codebook (T, 3): codes used, sum of n log n, codes used in the window
        bit_rows = []  # per codebook (T, d): tokens with each bit set
        for b, (codes, position) in enumerate(stash_codes([p for _, _, p in stash], books, self.distributed)):
            position = position.to(self.device)
            found = flush_counts(codes, position, at, self.window[b], usage_window, max(usage_window, dead_after))
            self.window[b] = found.window
            if self.snapshot is not None:
                self._add_to_snapshots(b, *found.counts)
            columns.append(torch.stack([found.used.double(), found.n_log_n, found.in_window.double()], -1).float())
            if bits:
                bit_rows.append(bit_counts(codes, position, len(stash), bits))
        deferred, self.deferred = self.deferred, []
        per_step = torch.stack(columns, 1)  # (T, c, 3)
        tokens = torch.stack([acc.counts for _, acc, _ in stash]).float()  # (T, c, 1), all-reduced
        at = at.view(-1, 1, 1)
        dead_bits = per_step.new_zeros(len(stash), books, 1)
        if bits:  # as CodeUsage.settle: each bit's last step set and clear, as of each step
            bit_set = torch.stack(bit_rows, 1).float()  # (T, c, d)
            last_set = torch.maximum(torch.where(bit_set > 0, at, NEVER).cummax(0).values, self.bit_last_set)
            last_clear = torch.maximum(torch.where(bit_set < tokens, at, NEVER).cummax(0).values, self.bit_last_clear)
            self.bit_last_set.copy_(last_set[-1])
            self.bit_last_clear.copy_(last_clear[-1])
            early = sum(step - dead_after < self.first_step - 1 for step in steps)  # too early: a prefix
            dead_bits = (torch.minimum(last_set, last_clear) <= at - dead_after).sum(-1, keepdim=True).float()
            dead_bits[:early] = 0
        if not summarize:
            return []
        latents = []
        for t, (step, acc, _) in enumerate(stash):
            latents.append(self._latent_part(acc, step))
            for snapshot in deferred:  # a diagnostic step up to a snapshot's cut belongs to it
                if snapshot.cut == t + 1 and self.pair_mi is not None:
                    snapshot.pair_mi, self.pair_mi = self.pair_mi, None
        parts = [torch.stack([acc.loss_sum.t() for _, acc, _ in stash]), per_step[..., :1], tokens, per_step[..., 1:],
                 per_step.new_full((len(stash), books, 1), math.nan), torch.stack(latents), dead_bits]
        if bits:
            parts.append(bit_set)
        sums = torch.cat(parts, dim=-1)
        return [ClosedStep(step, spec, mode, list(acc.loss_passes), acc.forward_passes, acc.latent_passes, sums[t])
                for t, (step, acc, _) in enumerate(stash)]

    def _add_to_snapshots(self, book: int, codes: Tensor, counts: Tensor, position: Tensor) -> None:
        """Hand codebook ``book``'s settled (code, step) runs to the deferred snapshots whose steps
        they are, and keep the rest for the next one."""
        if not self.deferred:
            self.snapshot[book].append(sum_sorted_counts(codes, counts))
            return
        start = 0
        for deferred in self.deferred:
            part = (position >= start) & (position < deferred.cut)
            chunks = self.snapshot[book] + [sum_sorted_counts(codes[part], counts[part])]
            self.snapshot[book] = []
            if deferred.value is None:
                deferred.value = []
            deferred.value.append(self._merged(chunks))
            start = deferred.cut
        rest = position >= start
        self.snapshot[book].append(sum_sorted_counts(codes[rest], counts[rest]))

    def take_snapshot(self, defer: bool = False) -> list[tuple[Tensor, Tensor]] | DeferredSnapshot | None:  # type: ignore[override]
        """Per codebook (codes, counts) since the previous snapshot (None if untouched); ``defer``
        with steps in the stash: a :class:`DeferredSnapshot` of the stash as it is, counted at the
        next settle instead of now (no host sync)."""
        if self.snapshot is None or not self.touched_since_snapshot:
            return None
        if defer and self.stash:
            self.touched_since_snapshot = False
            self.deferred.append(DeferredSnapshot(len(self.stash)))
            return self.deferred[-1]
        taken = [self._merged(chunks) for chunks in self.snapshot]
        self.snapshot = [[] for _ in taken]
        self.touched_since_snapshot = False
        return taken

    def _merged(self, chunks: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        if not chunks:
            empty = torch.zeros(0, dtype=torch.long, device=self.device)
            return empty, empty
        if len(chunks) == 1:  # each chunk holds distinct codes in order (sum_sorted_counts)
            return chunks[0]
        return merge_counts(torch.cat([c for c, _ in chunks]), torch.cat([n for _, n in chunks]))

    def state(self) -> dict[str, Any]:
        if self.stash or self.passes:
            raise RuntimeError("SparseCodeUsage.state() with unsettled steps: settle them first (LFQMonitor.flush does)")
        return {
            "sparse": True,
            "first_step": self.first_step,
            "window": [(c.cpu().clone(), s.cpu().clone()) for c, s in self.window],
            "snapshot": None if self.snapshot is None else [
                tuple(t.cpu().clone() for t in self._merged(chunks)) for chunks in self.snapshot],
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
            usage.snapshot = [[merge_counts(c.clone(), n.clone())] for c, n in saved["snapshot"]]  # sorted, distinct
        usage.touched_since_snapshot = bool(saved["touched_since_snapshot"])
        for name in ("bit_last_set", "bit_last_clear"):
            if getattr(usage, name) is not None and saved.get(name) is not None:
                getattr(usage, name).copy_(saved[name])
        return usage
