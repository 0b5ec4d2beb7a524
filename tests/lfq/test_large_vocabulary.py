"""Vocabularies past 2^24 codes (issue 34, item 4): lfq.LFQ up to 2^62 codes with int64 indices,
and the monitor's sparse counting (lfq.sparse_usage), exact without a (codebooks, K) table."""

from __future__ import annotations

import math
import sys

import pandas as pd
import pytest
import torch
from torch import nn

import lfq.monitor
import lfq.monitor_hooks
from lfq import LFQ, LFQMonitor, MemorySink
from lfq.alarms import DeadBit


def test_lfq_takes_up_to_2_62_codes_and_says_the_limit():
    q = LFQ(codebook_size=2**62, entropy_mode="group")
    x = torch.randn(2, 3, 62)
    _, indices, _ = q(x)
    bits = (indices[..., None] >> torch.arange(61, -1, -1)) & 1  # MSB first
    assert indices.dtype == torch.int64 and torch.equal(bits.bool(), x > 0)
    assert torch.equal(q.indices_to_codes(indices, project_out=False).sign(), x.sign())
    with pytest.raises(ValueError, match=r"codebook_size must be at most 2\*\*62 \(indices are int64\), got 2\*\*63"):
        LFQ(codebook_size=2**63)
    with pytest.raises(ValueError, match=r"entropy_mode='reference' needs the 2\*\*d|supports up to 2\*\*24"):
        LFQ(codebook_size=2**30, entropy_mode="reference")


class Tiny(nn.Module):
    def __init__(self, bits: int, entropy_mode: str = "group") -> None:
        super().__init__()
        self.encoder = nn.Linear(8, bits)
        self.quantizer = LFQ(dim=bits, codebook_size=2**bits, entropy_mode=entropy_mode)
        self.decoder = nn.Linear(bits, 8)

    def forward(self, x):
        q, indices, aux = self.quantizer(self.encoder(x), inv_temperature=1.0)
        return self.decoder(q), indices, aux


MONITOR = dict(log_every=2, usage_window=3, dead_after=2, histogram_every=3, diagnostics_every=2, alarms=[DeadBit()])


def _train(model: Tiny, monitor: LFQMonitor, steps: int, seed: int = 0) -> list[torch.Tensor]:
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    seen = []
    for step in range(steps):
        monitor.set_step(step)
        x = torch.randn(4, 16, 8)
        if step in (3, 4):  # repeat a batch: codes reused across steps, so the window has duplicates
            x = torch.randn(4, 16, 8, generator=torch.Generator().manual_seed(3))
        recon, indices, aux = model(x)
        loss = (recon - x).square().mean() + aux
        opt.zero_grad()
        loss.backward()
        opt.step()
        seen.append(indices.detach().reshape(-1))
    return seen


def test_a_2_40_code_lfq_trains_with_the_monitor_and_counts_codes_exactly():
    bits = 40
    model, sink, hist = Tiny(bits), MemorySink(), MemorySink()
    with LFQMonitor(model, sink, histogram_sink=hist, **MONITOR) as monitor:
        seen = _train(model, monitor, 6)
        evaluation = monitor.evaluate([torch.randn(2, 16, 8) for _ in range(2)])
    rows = [r for r in sink.records if r["kind"] == "quantizer" and r["mode"] == "train"]
    assert [r["step"] for r in rows] == list(range(6))
    for r, codes in zip(rows, seen, strict=True):
        window = torch.cat(seen[max(0, r["step"] - 2): r["step"] + 1]).unique()
        assert r["codes_used"] == codes.unique().numel() and r["tokens"] == 64
        assert r["codes_used_window"] == window.numel()
        assert r["usage_fraction"] == window.numel() / 2**bits
        _, counts = codes.unique(return_counts=True)
        p = counts.double() / 64
        assert r["perplexity"] == pytest.approx(math.exp(-(p * p.log()).sum()), rel=1e-6)
        assert math.isnan(r["dead_codes"])  # not defined past the dense limit (docs/records.md)
        frequencies = ((codes[:, None] >> torch.arange(bits - 1, -1, -1)) & 1).double().mean(0)
        assert [r[f"bit_frequency_{i}"] for i in range(bits)] == pytest.approx(frequencies.tolist())
        if r["step"] % 2 == 0:  # diagnostic steps: the group bound and dependence columns exist
            assert math.isfinite(r["batch_entropy_group_bound"]) and math.isfinite(r["bit_pair_mi_max"])
            assert math.isnan(r["bit_total_correlation"])  # no exact batch entropy past 2^24
        assert math.isfinite(r["bit_total_correlation_hard"]) and math.isfinite(r["batch_entropy"])
    assert rows[4]["codes_used_window"] < len(torch.cat(seen[2:5]))  # duplicates across steps counted once
    # Snapshots: the used codes since the last one, exactly.
    first = [r for r in hist.records if r["step"] == 2]
    codes, counts = torch.cat(seen[:3]).unique(return_counts=True)
    assert first[0]["codes"] == codes.tolist() and first[0]["counts"] == counts.tolist()
    # ... and the exact entropies of the 5 groups of the group bound (9, 9, 9, 9, 4 bits) of step 2.
    groups = first[0]["batch_entropy_groups"]
    assert first[0]["bit_pair_mi_step"] == 2 and len(groups) == 5 and max(groups[-1:]) <= 4 * math.log(2) + 1e-9
    assert sum(groups) == pytest.approx(rows[2]["batch_entropy_group_bound"], rel=1e-5)
    (record,) = evaluation.records
    assert record["tokens"] == 64 and record["codes_used"] <= 64 and record["codebook_size"] == 2**bits
    with pytest.raises(ValueError, match="past the dense limit"):
        monitor.histogram("quantizer")


@pytest.mark.parametrize("log_every", [2, 5])
def test_the_sparse_counting_equals_the_dense_tables(monkeypatch, log_every):
    """With the sparse path forced at 2^6 codes, every column equals the dense path's, resume included,
    except dead_codes (NaN there)."""
    def records(sparse: bool) -> tuple[pd.DataFrame, list[dict]]:
        if sparse:
            monkeypatch.setattr(lfq.monitor, "SPARSE_ABOVE", 2**4)
            monkeypatch.setattr(lfq.monitor_hooks, "SPARSE_ABOVE", 2**4)
        torch.manual_seed(0)
        model, sink, hist = Tiny(6, entropy_mode="exact"), MemorySink(), MemorySink()
        options = {**MONITOR, "log_every": log_every}
        with LFQMonitor(model, sink, histogram_sink=hist, **options) as monitor:
            _train(model, monitor, 7)
            state = monitor.state_dict()
        torch.manual_seed(1)
        resumed = Tiny(6, entropy_mode="exact")
        with LFQMonitor(resumed, sink, histogram_sink=hist, **options) as monitor:
            monitor.load_state_dict(state)
            monitor.set_step(7)
            resumed(torch.randn(4, 16, 8, generator=torch.Generator().manual_seed(9)))
            evaluation = monitor.evaluate([torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(5))])
        monkeypatch.undo()
        return pd.DataFrame.from_records(sink.records), hist.records + evaluation.records

    dense, dense_other = records(False)
    sparse, sparse_other = records(True)
    assert dense["dead_codes"].notna().all() and sparse["dead_codes"].isna().all()
    assert dense["dead_bits"].max() >= 0
    pd.testing.assert_frame_equal(sparse.drop(columns="dead_codes"), dense.drop(columns="dead_codes"),
                                  check_exact=False, rtol=1e-6)
    assert sparse_other == dense_other


@pytest.mark.parametrize("sparse", [False, True])
def test_the_new_statistics_do_not_sync_the_host_between_flushes(monkeypatch, sparse):
    """The CPU stand-in of tests/lfq/test_monitor.py's no-sync check, with diagnostics every other
    step, a codebook large enough to close each step at once (2^15 > BATCH_MAX_CODES: the dependence
    statistics run at close) or counted sparsely (its codes wait for the flush), and the alarms on;
    histogram snapshots every 3 steps, between flushes (a sparse one is counted at the flush)."""
    from test_monitor import _HostTransfers

    from lfq.code_usage import CodeUsage
    from lfq.sparse_usage import SparseCodeUsage

    if sparse:
        monkeypatch.setattr(lfq.monitor, "SPARSE_ABOVE", 2**4)
        monkeypatch.setattr(lfq.monitor_hooks, "SPARSE_ABOVE", 2**4)
    transfers = _HostTransfers()

    def watched(method):
        def checked(*args, **kwargs):
            with transfers:
                return method(*args, **kwargs)

        return checked

    monkeypatch.setattr(LFQMonitor, "_observe", watched(LFQMonitor._observe))
    monkeypatch.setattr(LFQMonitor, "_take_snapshots", watched(LFQMonitor._take_snapshots))
    for cls in (CodeUsage, SparseCodeUsage):
        monkeypatch.setattr(cls, "close", watched(cls.close))
    generator = torch.Generator().manual_seed(5)
    quantizer, sink, hist = LFQ(dim=15, codebook_size=2**15), MemorySink(), MemorySink()
    seen = []
    with LFQMonitor(quantizer, sink, histogram_sink=hist, log_every=100, diagnostics_every=2, histogram_every=3) as mon:
        for step in range(6):
            mon.set_step(step)
            mask = torch.rand(2, 16, generator=generator) > 0.3
            _, indices, _ = quantizer(torch.randn(2, 16, 15, generator=generator), mask=mask)
            seen.append(indices[mask])
        assert sink.records == [] and hist.records == []
        assert transfers.calls == [], f"host transfers inside the per-step hooks: {transfers.calls}"
    # the snapshots of steps 0-2 (taken between flushes) and 3-5, each exact, with step 2's pair MI
    assert [r["step"] for r in hist.records] == [2, 5]
    for record, part in zip(hist.records, (seen[:3], seen[3:]), strict=True):
        codes, counts = torch.cat(part).unique(return_counts=True)
        assert record["codes"] == codes.tolist() and record["counts"] == counts.tolist()
    assert [r["bit_pair_mi_step"] for r in hist.records] == [2, 4]
    rows = [r for r in sink.records if r["kind"] == "quantizer"]
    assert len(rows) == 6 and math.isfinite(rows[0]["bit_total_correlation"])  # 15 bits: exact either way
    assert all(math.isfinite(r["bit_pair_mi_max"]) for r in rows[::2])
    assert math.isnan(rows[0]["dead_codes"]) == sparse


@pytest.mark.parametrize("bits", [1, 8, 9, 40, 62])
def test_bit_counts_from_byte_histograms_equal_testing_every_bit(bits, monkeypatch):
    """The sparse usage's per-step bit counts (a histogram of each code's bytes) against testing each
    bit of each code, most significant bit first, for 4 steps (one without codes); also through
    shifts, the path of big-endian machines."""
    import lfq.sparse_usage
    from lfq.sparse_usage import bit_counts

    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (300,), generator=g)
    codes[:5] = 2**bits - 1  # every bit set, the top one included
    step = torch.randint(0, 3, (300,), generator=g).sort().values  # step 3 has none
    each_bit = (codes.unsqueeze(-1) >> torch.arange(bits - 1, -1, -1)) & 1
    expected = torch.stack([each_bit[step == t].sum(0) for t in range(4)])
    assert torch.equal(bit_counts(codes, step, 4, bits), expected)
    counts = torch.randint(0, 2**30, (300,), generator=g)  # a histogram's counts: each code weighs its count
    weighted = torch.stack([(each_bit * counts[:, None])[step == t].sum(0) for t in range(4)])
    assert torch.equal(bit_counts(codes, step, 4, bits, weights=counts), weighted)
    if bits < 31:
        assert torch.equal(bit_counts(codes.int(), step, 4, bits), expected)
    monkeypatch.setattr(lfq.sparse_usage.sys, "byteorder", "big")
    assert torch.equal(bit_counts(codes, step, 4, bits), expected)


def _flush_by_hand(codes, position, steps, window, usage_window, horizon):
    """flush_counts' outputs from dictionaries, one (code, step) at a time."""
    last = dict(zip(window[0].tolist(), window[1].tolist(), strict=True))
    uses = {}  # code -> steps where it was used (old window's last use first)
    for code, at in last.items():
        uses.setdefault(code, []).append(at)
    per_step = []
    for t, s in enumerate(steps.tolist()):
        tokens = {}
        for code in codes[position == t].tolist():
            tokens[code] = tokens.get(code, 0) + 1
        for code in tokens:
            uses.setdefault(code, []).append(s)
        in_window = sum(any(s - usage_window < u <= s for u in us) for us in uses.values())
        per_step.append((len(tokens), sum(n * math.log(n) for n in tokens.values()), in_window, tokens))
    last_step = int(steps[-1])
    kept = sorted((code, max(us)) for code, us in uses.items() if max(us) > last_step - horizon)
    runs = sorted(((code, n, t) for t, (_, _, _, tokens) in enumerate(per_step) for code, n in tokens.items()),
                  key=lambda run: (run[0], run[2]))  # by code, then step
    return per_step, kept, runs


@pytest.mark.parametrize("numpy", [True, False], ids=["numpy", "torch-only"])
@pytest.mark.parametrize("seed", range(8))
def test_flush_counts_equal_counting_by_hand(seed, numpy, monkeypatch):
    """lfq.sparse_usage.flush_counts (one sort per flush) against dictionaries: per stashed step the
    distinct codes, sum of n log n and codes in the usage window (old window entries included,
    a code reused cut at its next use), the window kept, and the (code, tokens, step) runs. Codes
    up to 2**62, past what packs with the step into one int64 key (the stable sort instead), and
    without numpy (torch's sort and nonzero instead of numpy's)."""
    from lfq.sparse_usage import flush_counts

    if not numpy:
        monkeypatch.setitem(sys.modules, "numpy", None)  # `import numpy` raises ImportError
    g = torch.Generator().manual_seed(seed)
    # Many repeats .. nearly all distinct; the last: 40 codes just under 2**62, with repeats.
    low, vocabulary = [(0, 5), (0, 40), (0, 2**40), (2**62 - 40, 2**62)][seed % 4]
    steps = torch.tensor(sorted(torch.randperm(30, generator=g)[:8].add(20).tolist()))  # gaps between steps
    position = torch.randint(0, len(steps), (200,), generator=g).sort().values
    codes = torch.randint(low, vocabulary, (200,), generator=g)
    old = torch.randint(low, vocabulary, (60,), generator=g).unique()
    old_last = torch.randint(int(steps[0]) - 12, int(steps[0]), (len(old),), generator=g)
    usage_window, horizon = [(4, 9), (9, 9), (3, 3)][seed % 3]
    found = flush_counts(codes, position, steps, (old, old_last), usage_window, horizon)
    per_step, kept, runs = _flush_by_hand(codes, position, steps, (old, old_last), usage_window, horizon)
    assert found.used.tolist() == [u for u, _, _, _ in per_step]
    torch.testing.assert_close(found.n_log_n, torch.tensor([x for _, x, _, _ in per_step], dtype=torch.float64))
    assert found.in_window.tolist() == [w for _, _, w, _ in per_step]
    assert list(zip(*(t.tolist() for t in found.window), strict=True)) == kept
    assert list(zip(*(t.tolist() for t in found.counts), strict=True)) == runs
