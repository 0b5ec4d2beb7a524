"""The token prior's three heads (experiments/prior_model.py): each likelihood is a normalised
distribution over all K codes, the whole model over all sequences, and where two heads can express
the same distribution they give the same likelihood."""

from __future__ import annotations

import itertools

import pytest
import torch

from experiments.prior_model import (
    BitwiseHead,
    FactorizedHead,
    FullHead,
    PriorShape,
    TokenPrior,
    bits_to_code,
    code_bits,
    join_code,
    split_code,
)
from lfq import LFQ
from tests.tolerances import SAFETY, eps, softmax_tol

WIDTH = 16


def _randomised(head: torch.nn.Module) -> torch.nn.Module:
    """Every parameter drawn at random (the factorized head's zero-initialised mixers too), so the
    sub-tokens' conditioning is not the trivial one."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return head


def _all_codes_log_prob(head: torch.nn.Module, k: int, positions: int = 5) -> torch.Tensor:
    """(positions, K) log p(code | state) for every code at random states."""
    h = torch.randn(positions, 1, WIDTH, generator=torch.Generator().manual_seed(2)).expand(positions, k, WIDTH)
    codes = torch.arange(k).expand(positions, k)
    with torch.no_grad():
        return head.log_prob(h, codes)


def _assert_normalised(log_p: torch.Tensor, k: int, terms: int = 1) -> None:
    # each log p (float32, of magnitude up to max|log p|) is rounded to eps * that; the sum over K codes
    total = torch.logsumexp(log_p.double(), -1)
    tol = softmax_tol(torch.float32, float(log_p.abs().max()) * terms, k)
    assert total.abs().max().item() <= tol, (total, tol)


@pytest.mark.parametrize("bits", [1, 4, 8])
def test_full_head_sums_to_one_over_all_codes(bits):
    k = 2**bits
    _assert_normalised(_all_codes_log_prob(_randomised(FullHead(WIDTH, k)), k), k)


@pytest.mark.parametrize("bits", [1, 4, 8])
def test_bitwise_head_sums_to_one_over_all_codes(bits):
    k = 2**bits
    _assert_normalised(_all_codes_log_prob(_randomised(BitwiseHead(WIDTH, bits)), k), k, terms=bits)


@pytest.mark.parametrize("factors", [(4,), (1, 3), (3, 1), (2, 2, 2), (1, 1, 1, 1, 1), (6, 2)])
def test_factorized_head_sums_to_one_over_all_codes(factors):
    k = 2 ** sum(factors)
    _assert_normalised(_all_codes_log_prob(_randomised(FactorizedHead(WIDTH, factors)), k), k, terms=len(factors))


def test_one_factor_is_the_full_head_exactly():
    full, factorized = _randomised(FullHead(WIDTH, 64)), FactorizedHead(WIDTH, (6,))
    factorized.outs[0].load_state_dict(full.out.state_dict())
    assert torch.equal(_all_codes_log_prob(full, 64), _all_codes_log_prob(factorized, 64))


def test_bitwise_is_a_factorized_head_of_one_bit_factors_without_conditioning():
    # p(bit = 1) = sigmoid(l) is a two-way softmax over the logits (0, l): with one-bit sub-tokens
    # whose conditioning on the earlier ones is switched off, the factorized head is the bitwise one.
    bits = 5
    bitwise, factorized = _randomised(BitwiseHead(WIDTH, bits)), _randomised(FactorizedHead(WIDTH, (1,) * bits))
    with torch.no_grad():
        for i, out in enumerate(factorized.outs):
            out.weight.zero_()
            out.bias.zero_()
            out.weight[1] = bitwise.out.weight[i]
            out.bias[1] = bitwise.out.bias[i]
        for e in factorized.embeds:
            e.weight.zero_()
        for mixer in factorized.mixers:
            mixer[-1].weight.zero_()
            mixer[-1].bias.zero_()
    a, b = _all_codes_log_prob(bitwise, 2**bits), _all_codes_log_prob(factorized, 2**bits)
    # d float32 log-sigmoid terms summed, each rounded to eps * its magnitude
    assert (a - b).abs().max().item() <= SAFETY * eps(torch.float32) * bits * float(a.abs().max())


def test_code_bits_follow_lfq_bit_order_and_round_trip():
    q = LFQ(codebook_size=64, dim=6)
    codes = torch.arange(64)
    bits = code_bits(codes, 6)
    assert torch.equal(bits.bool(), q.codebook > 0)  # LFQ's code k: bit j positive iff digit j of k is 1
    assert torch.equal(bits_to_code(bits), codes)
    for factors in ((6,), (2, 4), (4, 2), (1, 2, 3)):
        subs = split_code(codes, factors)
        assert [int(s.max()) for s in subs] == [2**f - 1 for f in factors]
        assert torch.equal(join_code(subs, factors), codes)
    assert split_code(torch.tensor([0b101101]), (2, 4))[0].item() == 0b10  # the most significant bits first


@pytest.mark.parametrize("head", ["full", "factorized", "bitwise"])
def test_the_prior_is_a_distribution_over_all_sequences(head):
    # K = 4 codes, 3 tokens: the likelihoods of all 64 sequences sum to 1 only if every token sees
    # no later one (the causal mask) and every head is normalised.
    shape = PriorShape(codebook_size=4, length=3, head=head, factors=(1, 1) if head == "factorized" else None,
                       width=WIDTH, layers=2, attention_heads=2)
    torch.manual_seed(0)
    model = _randomised(TokenPrior(shape)).eval()
    sequences = torch.tensor(list(itertools.product(range(4), repeat=3)))
    with torch.no_grad():
        log_p = model(sequences).sum(-1)
    _assert_normalised(log_p[None], 64, terms=3)


@pytest.mark.parametrize("head", ["full", "factorized", "bitwise"])
def test_samples_are_valid_codes_and_follow_the_generator(head):
    shape = PriorShape(codebook_size=16, length=5, head=head, width=WIDTH, layers=1, attention_heads=2)
    model = TokenPrior(shape).eval()
    a = model.sample(7, torch.Generator().manual_seed(3))
    b = model.sample(7, torch.Generator().manual_seed(3))
    assert a.shape == (7, 5) and torch.equal(a, b)
    assert int(a.min()) >= 0 and int(a.max()) < 16


def _sample_recomputing(model: TokenPrior, count: int, g: torch.Generator) -> torch.Tensor:
    """Sampling without a cache: every position's state from model.hidden over the whole prefix."""
    codes = torch.zeros(count, 0, dtype=torch.long)
    for _ in range(model.shape.length):
        codes = torch.cat([codes, model.head.sample(model.hidden(codes)[:, -1], g)[:, None]], 1)
    return codes


@pytest.mark.parametrize("head", ["full", "factorized", "bitwise"])
def test_cached_sampling_draws_what_recomputing_every_state_draws(head):
    """TokenPrior.sample caches each block's keys and values; in float64 (rounding ~1e-16, far
    from any of the draws' thresholds) it draws the very codes that recomputing every prefix
    draws from the same generator, and its states are model.hidden's."""
    shape = PriorShape(codebook_size=16, length=6, head=head, width=WIDTH, layers=2, attention_heads=2)
    torch.manual_seed(0)
    model = _randomised(TokenPrior(shape)).double().eval()
    with torch.no_grad():
        expected = _sample_recomputing(model, 9, torch.Generator().manual_seed(5))
        drawn = model.sample(9, torch.Generator().manual_seed(5))
        assert torch.equal(drawn, expected)
        assert len(set(map(tuple, drawn.tolist()))) > 1  # the draws depend on the prefix: not one sequence
        # The cached states, position by position, against one pass over the whole sequence.
        caches = [[] for _ in model.blocks]
        states = []
        x = (model.start + model.position[0]).expand(9, 1, -1)
        for t in range(shape.length):
            for block, cache in zip(model.blocks, caches, strict=True):
                x = block(x, cache)
            states.append(model.norm(x[:, 0]))
            if t + 1 < shape.length:
                x = model.embed_codes(drawn[:, t : t + 1]) + model.position[t + 1]
        full = model.hidden(drawn[:, :-1])
    torch.testing.assert_close(torch.stack(states, 1), full, rtol=0, atol=1e3 * eps(torch.float64))


def test_a_cached_pass_takes_one_position():
    model = TokenPrior(PriorShape(codebook_size=16, length=4, width=WIDTH, layers=1, attention_heads=2))
    with pytest.raises(ValueError, match="one position at a time, got 2"):
        model.blocks[0](torch.zeros(1, 2, WIDTH), [])


def test_shape_problems_name_the_field():
    assert "power-of-two" in PriorShape(codebook_size=1000, length=4, head="bitwise").problem()
    assert "model.factors" in PriorShape(codebook_size=1024, length=4, head="factorized", factors=(6, 6)).problem()
    assert PriorShape(codebook_size=1024, length=4, head="factorized").resolved_factors() == (5, 5)
    assert PriorShape(codebook_size=1000, length=4, head="full").problem() == ""
