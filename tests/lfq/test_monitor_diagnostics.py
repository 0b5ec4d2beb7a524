"""The monitor's diagnostics on our own LFQ, by hand: per-bit frequency and entropy, dead bits,
saturation and mean |z| from the latent (``project_in`` hook, or recomputed with projections),
their cadence, evaluation passes, and no host transfer between flushes."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch
from test_monitor import _HostTransfers, tokens_for
from tolerances import eps, sum_tol
from torch import nn
from upstream_vqp import load_latest

from lfq import LFQ, LFQMonitor, MemorySink
from lfq.latent_stats import SATURATION_LOGIT, SATURATION_RATIO


def test_saturation_threshold_is_where_the_gradient_factor_drops_below_1e_4_of_its_max():
    p = torch.sigmoid(torch.tensor(SATURATION_LOGIT, dtype=torch.float64))
    # float64 sigmoid of a logit of ~10.6: its rounding, relative, times the logit
    assert (p * (1 - p)).item() == pytest.approx(SATURATION_RATIO / 4, rel=sum_tol(torch.float64, 1, SATURATION_LOGIT))


def test_saturated_fraction_and_mean_abs_z_by_hand():
    lfq, sink = LFQ(dim=3), MemorySink()
    # logits 4 * tau * z at tau = 100: 4, 200, -8 | -40, 0.4, 12
    z = torch.tensor([[[0.01, 0.5, -0.02], [-0.1, 0.001, 0.03]]])
    with LFQMonitor(lfq, sink, diagnostics_every=1):
        lfq(z)
    row = sink.records[0]
    # 200, -40, 12 exceed ~10.6: a ratio of exact counts, rounded once to float32
    assert row["saturated_fraction"] == pytest.approx(3 / 6, rel=eps(torch.float32))
    assert row["mean_abs_z"] == pytest.approx(z.abs().mean().item(), rel=sum_tol(torch.float32, 6))  # float32, 6 terms
    sink = MemorySink()
    with LFQMonitor(lfq, sink, diagnostics_every=1):
        lfq(z, inv_temperature=1.0)  # logits 0.04 ... 2: none saturated
    assert sink.records[0]["saturated_fraction"] == 0.0


def test_latent_of_an_lfq_with_projections_and_a_mask():
    torch.manual_seed(0)
    lfq, sink = LFQ(dim=5, codebook_size=16, num_codebooks=2), MemorySink()
    x = torch.randn(2, 6, 5)
    mask = torch.tensor([[True, False, True, True, False, True], [False, True, True, True, True, True]])
    with LFQMonitor(lfq, sink, diagnostics_every=1):
        lfq(x, mask=mask, inv_temperature=0.5)
    z = lfq.project_in(x).detach().reshape(-1, 2, 4)[mask.reshape(-1)]
    for c in range(2):
        row = next(r for r in sink.records if r["codebook"] == c)
        # float32 sums over the kept token-bits
        assert row["mean_abs_z"] == pytest.approx(z[:, c].abs().mean().item(), rel=sum_tol(torch.float32, z[:, c].numel()))
        expected = ((2.0 * z[:, c]).abs() > SATURATION_LOGIT).float().mean().item()
        assert row["saturated_fraction"] == pytest.approx(expected, rel=eps(torch.float32))  # ratio of exact counts
        # our LFQ reports its own entropies: the monitor passes the float32 value through
        assert row["batch_entropy"] == pytest.approx(lfq.last_stats.batch_entropy[c].item(), rel=sum_tol(torch.float32, 1))


def test_bit_frequencies_entropies_and_dead_bits_by_hand():
    lfq, sink = LFQ(dim=3), MemorySink()
    # bits MSB first; step 10: 000, 001 | 11: 001 | 12: 011, 001 | 13: 111
    codes = {10: [0, 1], 11: [1], 12: [3, 1], 13: [7]}
    with LFQMonitor(lfq, sink, dead_after=2, diagnostics_every=1, alarms=False) as mon:
        for step, c in codes.items():
            mon.set_step(step)
            lfq(tokens_for(c, 3))
    rows = {r["step"]: r for r in sink.records}
    assert [rows[10][f"bit_frequency_{i}"] for i in range(3)] == [0.0, 0.0, 0.5]
    assert [rows[12][f"bit_frequency_{i}"] for i in range(3)] == [0.0, 0.5, 1.0]
    h = math.log(2)
    # exact counts, a few float64 operations: approx's default (1e-6 relative, ~4e9 eps) is ample
    assert [rows[12][f"bit_entropy_{i}"] for i in range(3)] == pytest.approx([0.0, h, 0.0])
    assert rows[12]["bit_entropy"] == pytest.approx(h / 3)
    # Dead = kept one value in every token of steps (s - 2, s]; never-seen values date from step 9.
    # Step 10: too early (10 - 2 < 9). Step 11 (steps 10-11): bits 0, 1 were never 1 -> 2 dead.
    # Step 12 (11-12): bit 0 never 1, bit 2 never 0 -> 2. Step 13 (12-13): bit 2 always 1 -> 1.
    assert [rows[s]["dead_bits"] for s in (10, 11, 12, 13)] == [0, 2, 2, 1]


def test_diagnostics_every_defaults_to_log_every():
    lfq, sink = LFQ(dim=4), MemorySink()
    with LFQMonitor(lfq, sink, log_every=4) as mon:
        assert mon.diagnostics_every == 4
        for _ in range(9):
            lfq(torch.randn(1, 5, 4))
    assert [r["step"] for r in sink.records if math.isfinite(r["mean_abs_z"])] == [0, 4, 8]


def test_evaluate_counts_every_token_of_the_pass():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), LFQ(dim=4, codebook_size=16))
    batches = [torch.randn(2, 7, 3) for _ in range(3)]
    monitor = LFQMonitor(model, MemorySink())
    evaluation = monitor.evaluate(batches)
    assert model.training  # restored
    model.eval()
    with torch.no_grad():
        indices = torch.cat([model(b).indices.reshape(-1) for b in batches])
    counts = torch.bincount(indices, minlength=16)
    (record,) = evaluation.records
    assert record["kind"] == "evaluation" and record["layer"] == "1" and record["tokens"] == 42
    assert record["codes_used"] == int((counts > 0).sum())
    assert record["usage_fraction"] == int((counts > 0).sum()) / 16  # exact counts over a power of 2
    p = counts[counts > 0].double() / 42
    # the monitor's float32 sum of n log n over 16 codes, terms up to log 42 in units of the entropy
    assert record["perplexity"] == pytest.approx(math.exp(-(p * p.log()).sum().item()),
                                                 rel=sum_tol(torch.float32, 16, math.log(42)))
    assert evaluation.usage_fraction() == record["usage_fraction"]
    with monitor.evaluating() as again:  # the context-manager form, with the caller's own loop
        for b in batches:
            model(b)
    assert again.records == evaluation.records
    monitor.detach()


def test_evaluation_records_carry_tokens_per_code_and_the_usage_ceiling():
    """tokens_per_code = N / K and usage_ceiling = 1 - exp(-N / K), the expected share of K codes
    that N uniformly drawn tokens reach: an LFQ fed random signs (uniform over its 2^10 codes)
    lands on it, with the issue's 368 validation tokens for 1,024 codes (ceiling 0.30)."""
    torch.manual_seed(2)
    lfq, sink = LFQ(dim=10), MemorySink()
    monitor = LFQMonitor(lfq, sink)
    monitor.set_step(7)
    evaluation = monitor.evaluate([torch.randn(4, 92, 10)], log=True)
    (record,) = evaluation.records
    assert record["tokens"] == 368 and record["tokens_per_code"] == 368 / 1024
    # expm1 against exp: a few float64 roundings of a number near 0.3
    assert record["usage_ceiling"] == pytest.approx(1 - math.exp(-368 / 1024), rel=1e-14)
    assert record["usage_ceiling"] == pytest.approx(0.3019, abs=1e-4)
    # codes used of N uniform draws: variance below K e^-λ (1 - e^-λ) (occupancies are negatively
    # correlated), ~15 codes = 0.014 of the codebook; 5 of those
    assert abs(record["usage_fraction"] - record["usage_ceiling"]) < 5 * math.sqrt(
        1024 * math.exp(-368 / 1024) * record["usage_ceiling"]) / 1024
    assert record["usage_fraction"] <= record["tokens_per_code"]  # never more codes than tokens
    (logged,) = [r for r in sink.records if r["kind"] == "evaluation"]
    assert logged == {"step": 7, **record}
    monitor.detach()


def test_no_host_transfer_between_flushes_with_diagnostics(monkeypatch):
    from lfq.code_usage import CodeUsage

    transfers = _HostTransfers()

    def watched(method):
        def checked(*args, **kwargs):
            with transfers:
                return method(*args, **kwargs)

        return checked

    monkeypatch.setattr(LFQMonitor, "_observe", watched(LFQMonitor._observe))
    monkeypatch.setattr(CodeUsage, "close", watched(CodeUsage.close))
    latest = load_latest()
    generator = torch.Generator().manual_seed(5)
    model = nn.ModuleDict({"ours": LFQ(dim=6, codebook_size=16, num_codebooks=2),
                           "theirs": latest.LFQ(dim=6, codebook_size=64, spherical=True)})
    sink, hist = MemorySink(), MemorySink()
    with LFQMonitor(model, sink, log_every=100, diagnostics_every=1, dead_after=2, histogram_every=2,
                    histogram_sink=hist) as mon:
        for step in range(4):
            mon.set_step(step)
            x = torch.randn(2, 16, 6, generator=generator)
            mask = torch.rand(2, 16, generator=generator) > 0.3
            model["ours"](x, mask=mask)
            model["theirs"](x, mask=mask)
        assert sink.records == []
        assert transfers.calls == [], f"host transfers inside the per-step hooks: {transfers.calls}"
    theirs = [r for r in sink.records if r["layer"] == "theirs"]
    assert len(theirs) == 4 and all(math.isfinite(r["batch_entropy"]) for r in theirs)
    assert all(len(r["bit_frequencies"]) == (4 if r["layer"] == "ours" else 6) for r in hist.records)


def _mixed_run(monkeypatch, batch_max_codes: int, batch_max_steps: int):
    import lfq.code_usage

    monkeypatch.setattr(lfq.code_usage, "BATCH_MAX_CODES", batch_max_codes)
    monkeypatch.setattr(lfq.code_usage, "BATCH_MAX_STEPS", batch_max_steps)
    generator = torch.Generator().manual_seed(7)
    model = nn.ModuleDict({"a": LFQ(dim=6, codebook_size=8, num_codebooks=2), "b": LFQ(dim=4)})
    sink, hist, state = MemorySink(), MemorySink(), None
    with LFQMonitor(model, sink, log_every=5, usage_window=3, dead_after=4, histogram_every=4, histogram_sink=hist,
                    diagnostics_every=2) as mon:
        for step in [0, 1, 2, 4, 5, 6, 7, 9, 10, 11, 12, 13]:  # gaps: windows count steps, not passes
            mon.set_step(step)
            model.train(step % 5 != 3)
            x = torch.randn(2, 9, 6, generator=generator) * (0.2 + step / 10)
            model["a"](x, mask=torch.rand(2, 9, generator=generator) > 0.3)
            xb = x[..., :4].clone()
            if step >= 5:  # bit 0 stuck at 1 from here: a dead bit once dead_after steps pass
                xb[..., 0] = xb[..., 0].abs()
            model["b"](xb)
            if step % 4 == 1:
                model.eval()
                model["b"](x[..., :4].flip(1))
            if step == 9:
                state = mon.state_dict()
        histogram = mon.histogram("a")
    return pd.DataFrame.from_records(sink.records), hist.records, histogram, state


def test_batched_and_per_step_closing_give_the_same_records(monkeypatch):
    batched = _mixed_run(monkeypatch, 2**14, 3)  # batches of at most 3 steps, and at each flush
    per_step = _mixed_run(monkeypatch, 0, 3)
    pd.testing.assert_frame_equal(batched[0], per_step[0])
    assert batched[0]["dead_bits"].max() > 0 and batched[0]["dead_codes"].max() > 0
    assert len(batched[1]) > 0 and json.dumps(batched[1]) == json.dumps(per_step[1])  # NaN-safe equality
    assert torch.equal(batched[2], per_step[2])
    for key in ("last_used", "histogram", "bit_last_set", "bit_last_clear"):
        for layer in ("a", "b"):
            assert torch.equal(batched[3]["usage"][layer]["train"][key], per_step[3]["usage"][layer]["train"][key])


def test_per_sample_masks_keep_or_drop_whole_samples():
    from test_monitor import FakeVQ, one_hot_tokens

    vq, sink = FakeVQ(codebook_size=5), MemorySink()
    x = torch.cat([one_hot_tokens([0, 1, 2], 5), one_hot_tokens([3, 3, 4], 5)])  # (2 samples, 3 tokens, 5)
    with LFQMonitor(vq, sink) as mon:
        vq(x, mask=torch.tensor([False, True]))
        assert mon.histogram("<root>").tolist() == [[0, 0, 0, 2, 1]]
    assert sink.records[0]["tokens"] == 3
