"""The records ``lfq.monitor`` writes, from what ``lfq.code_usage`` left on the device:
``step_records`` (``metrics.jsonl`` rows), ``snapshot_records`` (``histograms.jsonl`` rows) and
``evaluation_records`` (``LFQMonitor.evaluating``), with one device-to-host transfer per device
per flush. Their format is the contract ``analysis`` reads; every column is defined in
docs/records.md.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import Tensor

from lfq.sparse_usage import bit_counts
from lfq.step_counts import LOSS_FIELDS, ClosedStep, LayerSpec, Snapshot

STAT_FIELDS = LOSS_FIELDS + (
    "codes_used", "perplexity", "usage_fraction", "dead_codes", "bit_balance_mad", "tokens", "forward_passes",
    "bit_entropy", "dead_bits", "saturated_fraction", "mean_abs_z",
    # Issue 34: dependence between bits, the group bound's gap, per-rank entropy.
    "bit_total_correlation", "bit_total_correlation_hard", "bit_pair_mi_max", "batch_entropy_group_bound",
    "batch_entropy_local", "codes_used_window",
)
RECORD_COLUMNS = ("step", "layer", "codebook", "kind", "mode", "codebook_size") + STAT_FIELDS
# Per-bit columns follow, for binary quantizers: bit_frequency_<i>, then bit_entropy_<i>, i = 0..d-1.
BIT_FREQUENCY, BIT_ENTROPY = "bit_frequency_", "bit_entropy_"


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


@functools.lru_cache(maxsize=64)
def _bit_keys(bits: int) -> tuple[str, ...]:
    return tuple(f"{BIT_FREQUENCY}{i}" for i in range(bits)) + tuple(f"{BIT_ENTROPY}{i}" for i in range(bits))


def _bit_columns(sums: Tensor) -> Tensor:
    """(..., width) raw sums (layout in ``CodeUsage.close``) -> (..., 2 d + 2) float64: each bit's
    frequency (tokens with it set / tokens), its binary entropy (nats), their sum and the mean
    |frequency - 1/2|; NaN without tokens. Computed on the device for a whole flush at once."""
    sums = sums.double()
    tokens = sums[..., 5:6]
    q = (sums[..., 20:] / tokens).masked_fill(tokens <= 0, math.nan)
    entropy = -(torch.special.xlogy(q, q) + torch.special.xlogy(1 - q, 1 - q))
    return torch.cat([q, entropy, entropy.sum(-1, keepdim=True), (q - 0.5).abs().mean(-1, keepdim=True)], dim=-1)


def _stats(closed: ClosedStep, sums: list[float], bit_columns: list[float]) -> dict[str, float | int]:
    """One codebook's record columns from its raw sums (layout in ``CodeUsage.close``) and, for
    binary codes, its ``_bit_columns``."""
    losses, (used, tokens, n_log_n, in_window, dead) = sums[:4], sums[4:9]
    (latent_tokens, per_sample_sum, saturated, abs_z, commitment), latent_batch = sums[9:14], sums[14]
    local_batch, bit_entropy_sum, pair_mi_max, group_bound = sums[15:19]
    dead_bits, bits = sums[19], len(sums) - 20
    spec = closed.spec
    stats: dict[str, float | int] = {
        name: total / passes if passes else math.nan
        for name, total, passes in zip(LOSS_FIELDS, losses, closed.loss_passes, strict=True)
    }
    latent = closed.latent_passes > 0 and latent_tokens > 0
    token_bits = latent_tokens * (spec.bits or 1)
    if latent and not spec.adapter.reports_losses:  # computed here from the latent, exactly
        stats["per_sample_entropy"] = per_sample_sum / latent_tokens
        stats["batch_entropy"] = latent_batch
        stats["commitment"] = commitment / token_bits
    # Entropy of the histogram n_k / T: log T - sum(n_k log n_k) / T.
    stats["codes_used"] = int(used)
    stats["perplexity"] = math.exp(math.log(tokens) - n_log_n / tokens) if tokens > 0 else math.nan
    stats["usage_fraction"] = in_window / spec.codebook_size
    stats["dead_codes"] = int(dead) if dead == dead else math.nan  # NaN past lfq.sparse_usage.SPARSE_ABOVE codes
    entropies_sum, mad = (bit_columns[2 * bits], bit_columns[2 * bits + 1]) if bits else (math.nan, math.nan)
    stats["bit_balance_mad"] = mad
    stats["tokens"] = int(tokens)
    stats["forward_passes"] = closed.forward_passes
    stats["bit_entropy"] = entropies_sum / bits if bits else math.nan
    stats["dead_bits"] = int(dead_bits) if bits else math.nan
    stats["saturated_fraction"] = saturated / token_bits if latent else math.nan
    stats["mean_abs_z"] = abs_z / token_bits if latent else math.nan
    # Total correlation: sum of the bits' entropies minus the joint entropy (soft: of the latent's
    # exact batch distribution, diagnostic steps; hard: of the step's code histogram, every step).
    binary = latent and spec.bits is not None
    stats["bit_total_correlation"] = bit_entropy_sum - latent_batch if binary else math.nan
    histogram_entropy = math.log(tokens) - n_log_n / tokens if tokens > 0 else math.nan
    stats["bit_total_correlation_hard"] = entropies_sum - histogram_entropy if bits else math.nan
    stats["bit_pair_mi_max"] = pair_mi_max if binary else math.nan
    stats["batch_entropy_group_bound"] = group_bound if binary else math.nan
    stats["batch_entropy_local"] = local_batch if binary else math.nan
    stats["codes_used_window"] = int(in_window)
    if bits:
        stats.update(zip(_bit_keys(bits), bit_columns[: 2 * bits], strict=True))
    return stats


def step_records(closed_steps: list[ClosedStep]) -> list[dict[str, Any]]:
    """Flat records, one per (step, layer, mode, codebook), columns in ``RECORD_COLUMNS`` order."""
    bit_columns = [c.sums.new_zeros(0) for c in closed_steps]
    alike: dict[tuple[torch.Size, torch.device], list[int]] = {}
    for i, closed in enumerate(closed_steps):
        if closed.sums.shape[-1] > 20:  # binary codes: per-bit columns, for all steps of one shape at once
            alike.setdefault((closed.sums.shape, closed.sums.device), []).append(i)
    for indices in alike.values():
        columns = _bit_columns(torch.stack([closed_steps[i].sums for i in indices]))
        for i, row in zip(indices, columns, strict=True):
            bit_columns[i] = row
    host = _to_host([c.sums for c in closed_steps] + bit_columns)
    records: list[dict[str, Any]] = []
    for closed, values, bit_values in zip(closed_steps, host[:len(closed_steps)], host[len(closed_steps):], strict=True):
        books = closed.spec.num_codebooks
        width, bit_width = len(values) // books, len(bit_values) // books
        for codebook in range(books):
            record: dict[str, Any] = {
                "step": closed.step, "layer": closed.spec.name, "codebook": codebook, "kind": "quantizer",
                "mode": closed.mode, "codebook_size": closed.spec.codebook_size,
            }
            record.update(_stats(closed, values[codebook * width:(codebook + 1) * width],
                                 bit_values[codebook * bit_width:(codebook + 1) * bit_width]))
            records.append(record)
    return records


def _pass_sums(counts: Tensor | list[Tensor]) -> Tensor:
    """(3, c): codes used, tokens and sum of n log n, from (c, K) counts or, for a sparse codebook,
    one tensor per codebook of the used codes' counts."""
    if isinstance(counts, list):
        return torch.stack([torch.stack([(n > 0).sum().float(), n.sum().float(),
                                         torch.special.xlogy(n.double(), n.double()).sum().float()]) for n in counts], 1)
    return torch.stack([(counts > 0).sum(-1).float(), counts.sum(-1).float(),
                        torch.special.xlogy(counts.float(), counts.float()).sum(-1)])


def evaluation_records(layers: dict[str, LayerSpec], counts: dict[str, Tensor | list[Tensor]]) -> list[dict[str, Any]]:
    """The usage of one evaluation pass per (layer, codebook); one transfer per device."""
    names = list(counts)
    values = _to_host([_pass_sums(c) for c in counts.values()])
    records: list[dict[str, Any]] = []
    for name, flat in zip(names, values, strict=True):
        spec = layers[name]
        books = spec.num_codebooks
        for codebook in range(books):
            used, tokens, n_log_n = flat[codebook], flat[books + codebook], flat[2 * books + codebook]
            per_code = tokens / spec.codebook_size
            records.append({
                "kind": "evaluation", "layer": name, "codebook": codebook, "codebook_size": spec.codebook_size,
                "tokens": int(tokens), "codes_used": int(used), "usage_fraction": used / spec.codebook_size,
                "perplexity": math.exp(math.log(tokens) - n_log_n / tokens) if tokens > 0 else math.nan,
                "tokens_per_code": per_code, "usage_ceiling": usage_ceiling(tokens, spec.codebook_size),
            })
    return records


def usage_ceiling(tokens: float, codebook_size: int) -> float:
    """1 - exp(-N/K): the expected share of K codes that N tokens assigned uniformly at random use."""
    return -math.expm1(-tokens / codebook_size)


def snapshot_records(snapshots: list[Snapshot]) -> list[dict[str, Any]]:
    """Sparse histogram rows: the used codes and their counts, per codebook; for binary codes
    also ``bit_frequencies``, the fraction of these tokens with each bit set (MSB first)."""
    records: list[dict[str, Any]] = []
    for step, name, mode, size, bits, counts, pair_mi in snapshots:
        if isinstance(counts, list):  # a sparse codebook's (codes, counts) per codebook
            sparse = [(c.cpu(), n.cpu()) for c, n in counts]
        else:
            sparse = [(codes, row[codes]) for row in counts.cpu() for codes in [row.nonzero().flatten()]]
        pair_step, pair_matrix, group_entropies = pair_mi if pair_mi is not None else (None, None, None)
        if pair_matrix is not None:
            pair_matrix, group_entropies = pair_matrix.cpu(), group_entropies.cpu()
        for codebook, (codes, used) in enumerate(sparse):
            record = {
                "step": step, "layer": name, "codebook": codebook, "codebook_size": size, "mode": mode,
                "codes": codes.tolist(), "counts": used.tolist(),
            }
            if bits is not None:
                total = int(used.sum())
                set_bits = bit_counts(codes, torch.zeros_like(codes), 1, bits, weights=used)[0]
                record["bit_frequencies"] = (set_bits.double() / total).tolist() if total else [math.nan] * bits
                if pair_matrix is not None:
                    record["bit_pair_mi"] = pair_matrix[codebook].tolist()
                    record["batch_entropy_groups"] = group_entropies[codebook].tolist()
                    record["bit_pair_mi_step"] = pair_step
            records.append(record)
    return records


class Evaluation:
    """What ``LFQMonitor.evaluating()`` measured, filled in when the block exits: ``records``, one
    dict per (layer, codebook) with ``kind="evaluation"``, ``layer``, ``codebook``,
    ``codebook_size``, ``tokens``, ``codes_used``, ``usage_fraction`` (codes used at least once
    in the pass / codebook size), ``perplexity`` (exp of the entropy of the pass's histogram),
    ``tokens_per_code`` and ``usage_ceiling`` (1 - exp(-tokens / codebook_size), what a uniform
    assignment of the pass's tokens reaches), over every rank's tokens (docs/records.md)."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.counts: dict[str, Tensor] = {}  # per layer, (c, K) code counts of the pass
        self.codes: dict[str, list[tuple[Tensor, Tensor]]] = {}  # per sparse layer, each pass's (indices, weights)

    def usage_fraction(self, layer: str | None = None) -> float:
        """Mean over codebooks (and layers, or one ``layer``) of the usage fraction."""
        values = [r["usage_fraction"] for r in self.records if layer is None or r["layer"] == layer]
        if not values:
            raise ValueError(f"no evaluation records{'' if layer is None else f' for layer {layer!r}'}: "
                             f"did the block run the model?")
        return sum(values) / len(values)
