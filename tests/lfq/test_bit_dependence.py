"""The monitor's dependence columns (issue 34): the bits' total correlation (soft and hard), the
largest pairwise mutual information, the d x d matrix in the snapshots and the group bound, each
against a dense float64 computation over all 2**d codes at small d."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lfq import BinaryAdapter, LFQMonitor, MemorySink
from lfq.adapters import BinaryLatent
from lfq.latent_stats import dependence_stats, dependence_sums

TAU = 0.5  # logits 4 * tau * z = 2 z: soft bits, far from saturation


def dense_batch_distribution(logits: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(N, c, d) float64 logits -> (c, 2**d) weighted mean over tokens of each token's code
    distribution, code j's bit i = bit (d - 1 - i) of j (MSB first), by brute force."""
    d = logits.shape[-1]
    codes = (torch.arange(2**d)[:, None] >> torch.arange(d - 1, -1, -1)) & 1  # (2**d, d)
    p1 = torch.sigmoid(logits.double())  # (N, c, d)
    per_token = torch.where(codes.bool(), p1[:, :, None, :], 1 - p1[:, :, None, :]).prod(-1)  # (N, c, 2**d)
    w = weight.double().reshape(-1, 1, 1)
    return (per_token * w).sum(0) / w.sum()


def entropy(p: torch.Tensor) -> torch.Tensor:
    return -torch.special.xlogy(p, p).sum(-1)


def marginal(avg: torch.Tensor, keep: list[int], d: int) -> torch.Tensor:
    """(c, 2**d) -> (c, 2**len(keep)): the distribution of the bits ``keep`` (MSB-first positions)."""
    shaped = avg.reshape(avg.shape[0], *([2] * d))
    other = [1 + i for i in range(d) if i not in keep]
    return shaped.sum(dim=other).reshape(avg.shape[0], -1) if other else avg


def dense_reference(logits: torch.Tensor, weight: torch.Tensor, group_bits: int):
    """(total correlation, pairwise MI (c, d, d), group bound) per codebook, in float64."""
    d = logits.shape[-1]
    avg = dense_batch_distribution(logits, weight)
    bit_h = torch.stack([entropy(marginal(avg, [i], d)) for i in range(d)], dim=-1)  # (c, d)
    tc = bit_h.sum(-1) - entropy(avg)
    mi = torch.zeros(avg.shape[0], d, d, dtype=torch.float64)
    for i in range(d):
        for j in range(d):
            if i != j:
                mi[:, i, j] = bit_h[:, i] + bit_h[:, j] - entropy(marginal(avg, [i, j], d))
    bound = sum(entropy(marginal(avg, list(range(g, min(g + group_bits, d))), d)) for g in range(0, d, group_bits))
    return tc, mi, bound, entropy(avg)


def correlated_latent(tokens: int, books: int, bits: int, seed: int) -> torch.Tensor:
    """Latents whose bits share a common factor per token: dependent, but not deterministically."""
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(tokens, books, 1, generator=g)
    return common * torch.linspace(-1.5, 1.5, bits) + 0.7 * torch.randn(tokens, books, bits, generator=g)


@pytest.mark.parametrize("group_bits", [2, 3, 9])
def test_dependence_stats_match_a_dense_float64_computation(group_bits):
    books, bits = 2, 5
    z = correlated_latent(300, books, bits, seed=1)
    weight = (torch.rand(300, generator=torch.Generator().manual_seed(2)) > 0.25).long()
    latent = BinaryLatent(z=z, logit_scale=4 * TAU, code_magnitude=1.0)
    stats, mi, groups = dependence_stats(dependence_sums(latent, weight, group_bits), bits, group_bits)
    tc, mi_ref, bound, exact = dense_reference(z * 4 * TAU, weight, group_bits)
    avg = dense_batch_distribution(z * 4 * TAU, weight)
    group_ref = torch.stack([entropy(marginal(avg, list(range(g, min(g + group_bits, bits))), bits))
                             for g in range(0, bits, group_bits)], dim=-1)
    torch.testing.assert_close(groups, group_ref, atol=1e-9, rtol=0)  # each group's exact entropy
    # stats[:, 0] is the sum of the bits' entropies; minus the exact entropy it is the total correlation.
    torch.testing.assert_close(stats[:, 0].double() - exact, tc, atol=1e-6, rtol=0)
    torch.testing.assert_close(mi, mi_ref, atol=1e-9, rtol=0)
    torch.testing.assert_close(stats[:, 1].double(), mi_ref.flatten(1).max(-1).values, atol=1e-6, rtol=0)
    torch.testing.assert_close(stats[:, 2].double(), bound, atol=1e-6, rtol=0)
    assert (tc > 0.05).all() and (mi_ref.flatten(1).max(-1).values > 0.01).all()  # the data is dependent
    if group_bits < bits:
        assert (bound > exact + 1e-3).all()  # the bound is strictly above: the groups are dependent


@pytest.mark.parametrize("scale", [40.0, 400.0, 4000.0])
def test_group_distributions_stay_exact_when_the_bits_saturate(scale):
    """The groups' distributions come from exp(log probabilities) (lfq.latent_stats._block_probs):
    at logits in the hundreds and thousands (exp(-x) far below float64's range, where a naive
    product underflows or goes subnormal) each group's entropy is still the dense one, and finite."""
    books, bits, group_bits = 2, 7, 3
    z = correlated_latent(400, books, bits, seed=5)
    weight = torch.ones(400, dtype=torch.long)
    latent = BinaryLatent(z=z, logit_scale=scale, code_magnitude=1.0)
    _, _, groups = dependence_stats(dependence_sums(latent, weight, group_bits), bits, group_bits)
    avg = dense_batch_distribution(z * scale, weight)
    group_ref = torch.stack([entropy(marginal(avg, list(range(g, min(g + group_bits, bits))), bits))
                             for g in range(0, bits, group_bits)], dim=-1)
    assert torch.isfinite(groups).all()
    torch.testing.assert_close(groups, group_ref, atol=1e-9, rtol=0)


def test_known_answers_independent_and_identical_bits():
    bits = 6
    g = torch.Generator().manual_seed(3)
    # Saturated independent fair coins: total correlation ~0 and MI ~0 over many tokens.
    coins = (torch.randint(0, 2, (20000, 1, bits), generator=g) * 2 - 1).float() * 50
    stats, mi, _ = dependence_stats(dependence_sums(BinaryLatent(coins, 1.0, 1.0), torch.ones(20000)), bits)
    assert stats[0, 1] < 1e-3 and mi.max() < 1e-3
    assert abs(stats[0, 0] - bits * math.log(2)) < 1e-3
    # All d bits equal (one fair coin copied): total correlation (d - 1) ln 2, every pair ln 2.
    same = (torch.randint(0, 2, (20000, 1, 1), generator=g) * 2 - 1).float().expand(-1, -1, bits) * 50
    stats, mi, _ = dependence_stats(dependence_sums(BinaryLatent(same, 1.0, 1.0), torch.ones(20000)), bits)
    assert abs(stats[0, 1] - math.log(2)) < 1e-3
    assert abs(stats[0, 2] - math.log(2)) < 1e-3  # one group of 9 bits >= 6: the bound is exact
    assert abs(stats[0, 0] - bits * math.log(2)) < 1e-3  # exact entropy ln 2, so TC = (d - 1) ln 2


class SignQuantizer(nn.Module):
    """Binary codes of a (b, n, c * d) latent: the signs, indices MSB first."""

    def __init__(self, books: int, bits: int) -> None:
        super().__init__()
        self.books, self.bits = books, bits

    def forward(self, z: torch.Tensor):
        bits = (z.reshape(*z.shape[:-1], self.books, self.bits) > 0).long()
        indices = (bits * 2 ** torch.arange(self.bits - 1, -1, -1)).sum(-1)
        return z.sign(), indices


def test_monitor_rows_and_snapshots_carry_the_dependence_of_the_batch():
    books, bits = 2, 4
    quantizer = SignQuantizer(books, bits)
    adapter = BinaryAdapter(codebook_size=2**bits, num_codebooks=books, inv_temperature=TAU,
                            indices=lambda out: out[1])
    sink, hist = MemorySink(), MemorySink()
    latents = [correlated_latent(64, books, bits, seed=10 + s).reshape(2, 32, books * bits) for s in range(3)]
    with LFQMonitor(quantizer, sink, adapters={"<root>": adapter}, log_every=3, diagnostics_every=2,
                    histogram_every=3, histogram_sink=hist) as mon:
        for step, z in enumerate(latents):
            mon.set_step(step)
            quantizer(z)
    rows = {(r["step"], r["codebook"]): r for r in sink.records}
    for step, z in enumerate(latents):
        tokens = z.reshape(-1, books, bits)
        hard = (tokens > 0).double() * 100 - 50  # saturated logits: the hard codes' distribution
        tc_hard, *_ = dense_reference(hard, torch.ones(64), 9)
        tc, mi, bound, exact = dense_reference(tokens * 4 * TAU, torch.ones(64), 9)
        for c in range(books):
            row = rows[step, c]
            assert row["bit_total_correlation_hard"] == pytest.approx(float(tc_hard[c]), abs=1e-6)
            if step % 2:  # not a diagnostic step
                assert math.isnan(row["bit_total_correlation"]) and math.isnan(row["bit_pair_mi_max"])
                continue
            assert row["bit_total_correlation"] == pytest.approx(float(tc[c]), abs=1e-5)
            assert row["bit_pair_mi_max"] == pytest.approx(float(mi[c].max()), abs=1e-6)
            assert row["batch_entropy_group_bound"] == pytest.approx(float(bound[c]), abs=1e-5)
            assert row["batch_entropy_group_bound"] == pytest.approx(float(exact[c]), abs=1e-5)  # d <= 9
            assert row["batch_entropy_local"] == pytest.approx(row["batch_entropy"], abs=1e-6)  # one process
    # The snapshot after step 2 carries the MI matrix of the last diagnostic step (2).
    snaps = [r for r in hist.records if r["step"] == 2]
    _, mi, _, _ = dense_reference(latents[2].reshape(-1, books, bits) * 4 * TAU, torch.ones(64), 9)
    assert [r["bit_pair_mi_step"] for r in snaps] == [2, 2]
    for r in snaps:
        torch.testing.assert_close(torch.tensor(r["bit_pair_mi"], dtype=torch.float64), mi[r["codebook"]],
                                   atol=1e-9, rtol=0)
