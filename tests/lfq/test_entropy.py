"""The factorised entropy kernels against a dense, unclamped computation.

Dense means what the reference does (a softmax over all 2**d codes per token) but
without its clamp: per-sample ``-sum p log p`` from log_softmax, and the batch term's
``log avg`` from a logsumexp over tokens, so no log(0) and no clamp anywhere. The
kernels are called directly in float64; the LFQ module (float32 inside) is used for
the end-to-end checks of masks, subsets and the default mode.
"""

from __future__ import annotations

import math
import random
import warnings

import pytest
import torch
import torch.nn.functional as F
from tolerances import assert_close_rel_max, softmax_tol, sum_tol

from lfq import LFQ, subcodes
from lfq.entropy import (
    ENTROPY_KERNELS,
    EXACT_MAX_BITS,
    OPEN_MAGVIT2_LOG_EPS,
    REFERENCE_LOG_CLAMP,
    EntropyInputs,
    bit_groups,
    clamped_entropy_kernel,
    clamped_per_token,
    entropy_from_gram,
    exact_entropy,
    group_entropy,
    open_magvit2_entropy,
    reference_entropy,
    sample_token_subset,
)
from lfq.subcodes import subcode_gram

F64 = torch.float64
F32 = torch.float32


def max_logit(z: torch.Tensor, tau: float, scale: float) -> float:
    """The largest |logit| 2 tau scale sum_d |z_d| a code sees: the rounding of log-probabilities
    (and so of entropies and their gradients) is eps times this (tolerances.softmax_tol)."""
    return (2 * tau * scale * z.detach().abs().sum(dim=-1)).max().item()


def grad_floor(tau: float, scale: float, num_codebooks: int, seed: int) -> float:
    """The size of weighted_loss's gradient terms before they cancel: dH/dlogit sums O(1) terms
    p (log p + H) per code, logits are 2 tau scale z, weighted by |w|. A gradient near the
    entropy's maximum is ~0 while its terms are this large, so its rounding is relative to this."""
    gen = torch.Generator().manual_seed(seed)
    return 2 * tau * scale * torch.randn(2, num_codebooks, generator=gen, dtype=F64).abs().max().item()


def assert_terms_close(ours, ref, tol: float, what: str = "") -> None:
    """Per-codebook entropies, 1 nat the unit of their rounding (sums of p log p, each log p to
    eps |logit| absolute), so a term near 0 is not compared to its own tiny size."""
    assert_close_rel_max(ours.per_sample_by_codebook, ref.per_sample_by_codebook, tol, floor=1.0, what=f"{what} per-sample")
    assert_close_rel_max(ours.batch_by_codebook, ref.batch_by_codebook, tol, floor=1.0, what=f"{what} batch")


def codebook_of(num_bits: int, scale: float, dtype: torch.dtype = F64) -> torch.Tensor:
    bits = (torch.arange(2**num_bits)[:, None] >> torch.arange(num_bits - 1, -1, -1)) & 1
    return (bits.to(dtype) * 2 - 1) * scale


def inputs_of(z: torch.Tensor, tau: float, scale: float) -> EntropyInputs:
    return EntropyInputs(z, tau, scale, codebook_of(z.shape[2], scale, z.dtype))


def dense_entropy(inputs: EntropyInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-sample (c,), batch (c,)) over all 2**d codes, unclamped."""
    logits = 2 * inputs.inv_temperature * torch.einsum("n c d, k d -> n c k", inputs.z, inputs.codebook)
    log_prob = logits.log_softmax(dim=-1)
    per_sample = -(log_prob.exp() * log_prob).sum(dim=-1).mean(dim=0)
    log_avg = torch.logsumexp(log_prob, dim=0) - math.log(inputs.z.shape[0])
    batch = -(log_avg.exp() * log_avg).sum(dim=-1)
    return per_sample, batch


def weighted_loss(per_sample: torch.Tensor, batch: torch.Tensor, seed: int) -> torch.Tensor:
    """A random linear functional of both per-codebook terms, so every gradient path counts."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(2, per_sample.shape[0], generator=gen, dtype=per_sample.dtype)
    return (w[0] * per_sample).sum() + (w[1] * batch).sum()


def random_config(seed: int) -> tuple[torch.Tensor, float, float]:
    rng = random.Random(seed)
    num_bits = rng.choice([1, 2, 3, 5, 7, 8, 9, 11])
    num_codebooks = rng.choice([1, 2, 3])
    num_tokens = rng.choice([1, 4, 17, 40])
    spread = rng.choice([0.01, 0.2, 1.0])  # unsaturated ... saturated bits
    tau, scale = rng.choice([0.5, 3.0, 100.0]), rng.choice([0.5, 1.0, 2.0])
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(num_tokens, num_codebooks, num_bits, generator=gen, dtype=F64) * spread
    return z, tau, scale


@pytest.mark.parametrize("seed", range(16))
def test_exact_equals_dense_values_and_gradients(seed: int) -> None:
    z, tau, scale = random_config(seed)
    z_dense = z.clone().requires_grad_()
    z = z.requires_grad_()
    terms = exact_entropy(inputs_of(z, tau, scale))
    per_sample, batch = dense_entropy(inputs_of(z_dense, tau, scale))

    tol = softmax_tol(F64, max_logit(z, tau, scale), 2 ** z.shape[2])  # float64 softmax over 2**d codes
    assert_close_rel_max(terms.per_sample_by_codebook, per_sample, tol, floor=1.0, what="per-sample")
    assert_close_rel_max(terms.batch_by_codebook, batch, tol, floor=1.0, what="batch")
    assert_close_rel_max(terms.per_sample_entropy, per_sample.mean(), tol, floor=1.0, what="per-sample mean")
    assert_close_rel_max(terms.batch_entropy, batch.mean(), tol, floor=1.0, what="batch mean")

    weighted_loss(terms.per_sample_by_codebook, terms.batch_by_codebook, seed).backward()
    weighted_loss(per_sample, batch, seed).backward()
    assert_close_rel_max(z.grad, z_dense.grad, tol, floor=grad_floor(tau, scale, z.shape[1], seed), what="grad")


@pytest.mark.parametrize("chunk_tokens", [1, 7, 64])
def test_chunked_equals_unchunked(chunk_tokens: int) -> None:
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(50, 2, 9, generator=gen, dtype=F64) * 0.3
    results = []
    for chunk in (chunk_tokens, None):  # None: all 50 tokens in one chunk
        leaf = z.clone().requires_grad_()
        terms = exact_entropy(inputs_of(leaf, 4.0, 1.0), chunk_tokens=chunk)
        weighted_loss(terms.per_sample_by_codebook, terms.batch_by_codebook, 0).backward()
        results.append((terms.batch_by_codebook.detach(), leaf.grad))
    # chunking reorders the sums over tokens of the softmax's terms
    tol = softmax_tol(F64, max_logit(z, 4.0, 1.0), 2**9)
    assert_close_rel_max(results[0][0], results[1][0], tol, floor=1.0, what="batch")
    assert_close_rel_max(results[0][1], results[1][1], tol, floor=grad_floor(4.0, 1.0, 2, 0), what="grad")


def test_gram_is_the_batch_distribution_in_index_order() -> None:
    """avg_prob = P_A^T P_B / N, flattened, is the dense mean softmax code by code."""
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(30, 2, 7, generator=gen, dtype=F64)
    inputs = inputs_of(z, 1.5, 0.5)
    avg = subcode_gram(z * (4 * 1.5 * 0.5)).flatten(1) / z.shape[0]
    logits = 2 * 1.5 * torch.einsum("n c d, k d -> n c k", z, inputs.codebook)
    # probabilities from logits up to max_logit over 2**7 codes, relative to the largest
    tol = softmax_tol(F64, logits.abs().max().item(), 2**7)
    assert_close_rel_max(avg, logits.softmax(dim=-1).mean(dim=0), tol)


def test_uniform_usage_reaches_log_codebook_size_at_2_18() -> None:
    """z = 0 gives p = 1/2 for every bit: per-sample and batch entropy are both 18 log 2,
    above the reference's clamp cap of -log(1e-5) = 11.51 nats."""
    num_bits = 18
    terms = exact_entropy(EntropyInputs(torch.zeros(3, 1, num_bits, dtype=F64), 100.0, 1.0, torch.empty(0)))
    # a sum of 18 per-bit entropies of log 2 each
    assert terms.batch_entropy.item() == pytest.approx(num_bits * math.log(2), rel=sum_tol(F64, num_bits))
    assert terms.per_sample_entropy.item() == pytest.approx(num_bits * math.log(2), rel=sum_tol(F64, num_bits))

    lfq = LFQ(codebook_size=2**num_bits)  # the default mode, float32 inside
    assert lfq.entropy_mode == "exact"
    _, breakdown = lfq(torch.zeros(1, 4, num_bits), return_loss_breakdown=True)
    assert breakdown.batch_entropy.item() == pytest.approx(num_bits * math.log(2), rel=sum_tol(F32, num_bits))
    assert breakdown.batch_entropy.item() > -math.log(REFERENCE_LOG_CLAMP) + 0.9
    reference = reference_entropy(inputs_of(torch.zeros(2, 1, num_bits), 100.0, 1.0))
    # float32 dense sum over 2**18 codes
    assert reference.batch_entropy.item() == pytest.approx(-math.log(REFERENCE_LOG_CLAMP), rel=sum_tol(F32, 2**num_bits))


@pytest.mark.parametrize("num_bits,tau,spread", [(4, 100.0, 1.0), (8, 3.0, 1.0), (10, 100.0, 0.05), (10, 0.5, 1.0)])
def test_exact_minus_reference_is_the_clamp_effect(num_bits: int, tau: float, spread: float) -> None:
    """The reference's clamp replaces log p by log eps where p < eps (eps = 1e-5), so

        exact - reference = sum over {p < eps} of p log(eps / p)  >= 0,

    and p log(eps / p) peaks at p = eps / e with value eps / e, hence

        0 <= exact - reference <= 2**d * eps / e   (3.8e-3 at d = 10),

    for each token's entropy, so for their mean, and for the batch entropy.
    """
    gen = torch.Generator().manual_seed(num_bits)
    z = torch.randn(64, 2, num_bits, generator=gen, dtype=F64) * spread
    inputs = inputs_of(z, tau, 1.0)
    exact, reference = exact_entropy(inputs), reference_entropy(inputs)
    bound = 2**num_bits * REFERENCE_LOG_CLAMP / math.e
    # the gap is a difference of entropies of O(1) nats: its rounding is theirs, not its own size
    tol = softmax_tol(F64, max_logit(z, tau, 1.0), 2**num_bits)

    prob = (2 * tau * torch.einsum("n c d, k d -> n c k", z, inputs.codebook)).softmax(dim=-1)

    def clamp_effect(p: torch.Tensor) -> torch.Tensor:
        small = (p < REFERENCE_LOG_CLAMP) & (p > 0)
        safe = torch.where(small, p, torch.ones_like(p))
        return torch.where(small, p * (math.log(REFERENCE_LOG_CLAMP) - safe.log()), torch.zeros_like(p)).sum(dim=-1)

    per_sample_gap = exact.per_sample_by_codebook - reference.per_sample_by_codebook
    batch_gap = exact.batch_by_codebook - reference.batch_by_codebook
    for gap in (per_sample_gap, batch_gap):
        assert (gap >= -tol).all() and (gap <= bound).all(), (gap, bound)
    assert_close_rel_max(per_sample_gap, clamp_effect(prob).mean(dim=0), tol, floor=1.0, what="per-sample gap")
    assert_close_rel_max(batch_gap, clamp_effect(prob.mean(dim=0)), tol, floor=1.0, what="batch gap")


def test_module_exact_vs_reference_within_the_clamp_bound() -> None:
    """Through LFQ in float32: the same bound, plus float32 rounding of the entropies."""
    torch.manual_seed(0)
    x = torch.randn(2, 32, 10)
    terms = {}
    for mode in ("exact", "reference"):
        _, terms[mode] = LFQ(dim=10, entropy_mode=mode)(x, inv_temperature=100.0, return_loss_breakdown=True)
    bound = 2**10 * REFERENCE_LOG_CLAMP / math.e
    # float32 entropies of at most 10 log 2 nats from logits up to max_logit
    tol = softmax_tol(F32, max_logit(x.reshape(-1, 1, 10), 100.0, 1.0), 2**10) * 10 * math.log(2)
    for name in ("per_sample_entropy", "batch_entropy"):
        gap = (getattr(terms["exact"], name) - getattr(terms["reference"], name)).item()
        assert -tol <= gap <= bound + tol, (name, gap, bound, tol)


@pytest.mark.parametrize("frac", [1.0, 0.4])
def test_module_masks_and_subsets_match_dense(frac: float) -> None:
    """LFQ's default (exact) entropies of the kept, subsampled tokens equal the dense ones.

    The module computes in float32, so values are compared to float32 precision and the
    gradient wrt the input against the dense float64 gradient.
    """
    num_codebooks, num_bits, seed = 2, 6, 11
    lfq = LFQ(
        dim=num_codebooks * num_bits, codebook_size=2**num_bits, num_codebooks=num_codebooks,
        frac_per_sample_entropy=frac,
    )
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 20, num_codebooks * num_bits, generator=gen) * 0.05).requires_grad_()
    mask = torch.rand(3, 20, generator=gen) < 0.6

    torch.manual_seed(seed)  # the subset is drawn from the global generator, as in the reference
    _, breakdown = lfq(x, inv_temperature=3.0, return_loss_breakdown=True, mask=mask)
    (breakdown.per_sample_entropy - 0.7 * breakdown.batch_entropy).backward()

    x64 = x.detach().double().requires_grad_()
    tokens = x64.reshape(3, 20, num_codebooks, num_bits)[mask]
    torch.manual_seed(seed)
    subset = sample_token_subset(tokens.shape[0], frac, tokens.device)
    tokens = tokens if subset is None else tokens[subset]
    assert 0 < tokens.shape[0] < 60
    per_sample, batch = dense_entropy(inputs_of(tokens, 3.0, 1.0))
    (per_sample.mean() - 0.7 * batch.mean()).backward()

    tol = softmax_tol(F32, max_logit(tokens, 3.0, 1.0), 2**num_bits)  # the module's float32 softmax
    assert breakdown.per_sample_entropy.item() == pytest.approx(per_sample.mean().item(), rel=tol)
    assert breakdown.batch_entropy.item() == pytest.approx(batch.mean().item(), rel=tol)
    assert x64.grad.abs().max() > 0
    assert_close_rel_max(x.grad, x64.grad, tol, what="grad")


def test_gradient_is_finite_when_codes_have_zero_average() -> None:
    """Saturated float32 bits leave codes whose average probability is exactly 0; their
    0 log 0 must contribute 0 to the gradient, not inf * 0 = NaN."""
    gen = torch.Generator().manual_seed(0)
    z = (torch.randn(8, 1, 12, generator=gen) * 2).requires_grad_()
    logits = z * 400.0
    assert (subcode_gram(logits.detach()) == 0).any()
    terms = exact_entropy(EntropyInputs(z, 100.0, 1.0, torch.empty(0)))
    (terms.per_sample_entropy - terms.batch_entropy).backward()
    assert torch.isfinite(z.grad).all() and torch.isfinite(terms.batch_entropy)
    assert entropy_from_gram(torch.zeros(1, 2, 2), 1.0).item() == 0.0


def test_group_is_an_upper_bound_and_exact_with_one_group() -> None:
    gen = torch.Generator().manual_seed(5)
    # Correlated bits (shared latent), so the groups are far from independent.
    z = (torch.randn(40, 2, 1, generator=gen) + 0.3 * torch.randn(40, 2, 10, generator=gen)).to(F64)
    inputs = inputs_of(z, 2.0, 1.0)
    exact = exact_entropy(inputs)
    one_group = group_entropy(inputs, group_bits=10)
    tol = softmax_tol(F64, max_logit(z, 2.0, 1.0), 2**10)
    assert_close_rel_max(one_group.batch_by_codebook, exact.batch_by_codebook, tol, floor=1.0)
    for group_bits in (1, 3, 5):
        grouped = group_entropy(inputs, group_bits=group_bits)
        assert (grouped.batch_by_codebook > exact.batch_by_codebook + 1e-3).all()
        assert_close_rel_max(grouped.per_sample_entropy, exact.per_sample_entropy, tol, floor=1.0)
    # One-bit groups: the sum of the binary entropies of each bit's mean probability.
    mean_p = torch.sigmoid(4 * 2.0 * z).mean(dim=0)
    per_bit = -(mean_p * mean_p.log() + (1 - mean_p) * (1 - mean_p).log()).sum(dim=-1)
    assert_close_rel_max(group_entropy(inputs, group_bits=1).batch_by_codebook, per_bit, tol, floor=1.0)


def test_bit_groups_cover_the_bits_evenly() -> None:
    assert bit_groups(25, 16) == [(0, 12), (12, 25)]
    assert bit_groups(10, 16) == [(0, 10)]
    assert bit_groups(9, 3) == [(0, 3), (3, 6), (6, 9)]


def test_exact_switches_to_group_above_the_limit_with_a_warning() -> None:
    num_bits = EXACT_MAX_BITS + 1
    z = torch.randn(4, 1, num_bits, dtype=F64).requires_grad_()
    inputs = EntropyInputs(z, 1.0, 1.0, torch.empty(0))
    with pytest.warns(UserWarning, match="UPPER BOUND"):
        terms = exact_entropy(inputs)
    # the same groups' sums; float64 logits up to max_logit over 2**group_bits codes
    assert_close_rel_max(terms.batch_entropy, group_entropy(inputs).batch_entropy,
                         softmax_tol(F64, max_logit(z, 1.0, 1.0), 2**16), floor=1.0)
    terms.batch_entropy.backward()
    assert torch.isfinite(z.grad).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # below the limit: no warning
        exact_entropy(EntropyInputs(z.detach()[..., :10], 1.0, 1.0, torch.empty(0)))


def test_kernels_are_registered() -> None:
    assert {"reference", "exact", "group", "clamped", "open_magvit2"} <= set(ENTROPY_KERNELS)


# ---------------------------------------------------------------- "clamped" and "open_magvit2"


def _loss_and_grad(kernel, z: torch.Tensor, tau: float, scale: float, seed: int):
    leaf = z.clone().requires_grad_()
    terms = kernel(inputs_of(leaf, tau, scale))
    weighted_loss(terms.per_sample_by_codebook, terms.batch_by_codebook, seed).backward()
    return terms, leaf.grad


@pytest.mark.parametrize("seed", range(16))
def test_clamped_equals_reference_values_and_gradients(seed: int) -> None:
    """In float64 the factorised clamped kernel is the reference's dense one up to rounding,
    per codebook, gradients too: within softmax_tol (eps x the largest logit and the number of
    codes; 1e-13-1e-10 here), the gradient relative to its largest element or its terms' size.
    Measured on AVX-512, AVX2 and the scalar kernels: at most 9e-12 of the largest element."""
    z, tau, scale = random_config(seed)
    ours, grad = _loss_and_grad(clamped_entropy_kernel, z, tau, scale, seed)
    ref, ref_grad = _loss_and_grad(reference_entropy, z, tau, scale, seed)
    tol = softmax_tol(F64, max_logit(z, tau, scale), 2 ** z.shape[2])
    assert_terms_close(ours, ref, tol)
    assert_close_rel_max(grad, ref_grad, tol, floor=grad_floor(tau, scale, z.shape[1], seed), what="grad")


@pytest.mark.parametrize("num_bits,tau,spread", [(4, 100.0, 1.0), (10, 100.0, 0.05), (12, 1.0, 1.0), (13, 10.0, 0.1)])
def test_clamped_differs_from_exact_where_the_clamp_binds(num_bits: int, tau: float, spread: float) -> None:
    """Where many codes sit under 1e-5 the clamped terms are below the exact ones, and equal
    the reference's: the kernel computes the clamp, not the exact entropy."""
    gen = torch.Generator().manual_seed(num_bits)
    z = torch.randn(64, 2, num_bits, generator=gen, dtype=F64) * spread
    inputs = inputs_of(z, tau, 1.0)
    clamped, exact, ref = clamped_entropy_kernel(inputs), exact_entropy(inputs), reference_entropy(inputs)
    gap = exact.per_sample_by_codebook - clamped.per_sample_by_codebook
    tol = softmax_tol(F64, max_logit(z, tau, 1.0), 2**num_bits)
    assert (gap > tol).all(), "the clamp's effect should exceed rounding"
    assert_terms_close(clamped, ref, tol)


@pytest.mark.parametrize("num_codebooks,num_bits,spread,seed", [(2, 12, 0.05, 0), (1, 14, 0.1, 0)])
def test_clamped_float32_module_equals_reference(num_codebooks: int, num_bits: int, spread: float, seed: int) -> None:
    """Through LFQ (float32 inside): "clamped" equals "reference" and the float64 truth up to
    float32 rounding of a softmax over 2**d codes (softmax_tol: 16 eps (1 + largest logit +
    sqrt(codes)), 1.5e-4-2.6e-4 here), values and gradients (relative to their largest
    element). The README's numbers are what this shows over 6 sizes x 4 seeds on AVX-512,
    AVX2 and the scalar kernels: values within 2e-6 relative, gradients within 1e-4 of the
    largest element, most of it the dense reference's own float32 rounding ("clamped" is
    within 4e-7 and 4e-5 of the float64 truth)."""
    torch.manual_seed(seed)
    dim = num_codebooks * num_bits
    x = torch.randn(4, 64, dim) * spread  # unsaturated at tau = 10
    terms, grads = {}, {}
    for mode in ("clamped", "reference"):
        leaf = x.clone().requires_grad_()
        quantizer = LFQ(dim=dim, codebook_size=2**num_bits, num_codebooks=num_codebooks, entropy_mode=mode)
        _, terms[mode] = quantizer(leaf, inv_temperature=10.0, return_loss_breakdown=True)
        (terms[mode].per_sample_entropy - terms[mode].batch_entropy).backward()
        grads[mode] = leaf.grad
    x64 = x.double().requires_grad_()
    truth = reference_entropy(inputs_of(x64.reshape(-1, num_codebooks, num_bits), 10.0, 1.0))
    (truth.per_sample_entropy - truth.batch_entropy).backward()
    tol = softmax_tol(F32, max_logit(x.reshape(-1, num_codebooks, num_bits), 10.0, 1.0), 2**num_bits)
    for name in ("per_sample_entropy", "batch_entropy"):
        value = getattr(terms["clamped"], name).item()
        assert value == pytest.approx(getattr(truth, name).item(), rel=tol), name
        assert value == pytest.approx(getattr(terms["reference"], name).item(), rel=tol), name
    assert grads["reference"].abs().max() > 0
    assert_close_rel_max(grads["clamped"], x64.grad, tol, what="clamped vs float64 truth")
    assert_close_rel_max(grads["clamped"], grads["reference"], tol, what="clamped vs reference")


@pytest.mark.parametrize("chunk_tokens", [1, 7])
def test_clamped_chunked_equals_unchunked(chunk_tokens: int) -> None:
    gen = torch.Generator().manual_seed(4)
    z = torch.randn(30, 2, 9, generator=gen, dtype=F64) * 0.5
    results = []
    for chunk in (chunk_tokens, None):
        leaf = z.clone().requires_grad_()
        per_token = clamped_per_token(leaf * 8.0, chunk_tokens=chunk)
        (per_token * torch.linspace(-1, 1, 30, dtype=F64)[:, None]).sum().backward()
        results.append((per_token.detach(), leaf.grad))
    # chunking reorders sums; logits 8 z over 2**9 sub-codes; the weights are at most 1
    tol = softmax_tol(F64, max_logit(z, 4.0, 1.0), 2**9)
    assert_close_rel_max(results[0][0], results[1][0], tol, floor=1.0, what="values")
    assert_close_rel_max(results[0][1], results[1][1], tol, floor=8.0, what="grad")


def _dense_clamped_per_token(logits: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """-sum_j p_j log max(p_j, eps) over all 2**d codes of (N, c, d) bit logits, densely."""
    d = logits.shape[-1]
    bits = ((torch.arange(2**d)[:, None] >> torch.arange(d - 1, -1, -1)) & 1).to(logits.dtype)
    log_p = F.logsigmoid(logits) @ bits.T + F.logsigmoid(-logits) @ (1 - bits).T
    return -(log_p.exp() * log_p.clamp(min=math.log(eps))).sum(dim=-1)


@pytest.mark.parametrize("chunk_tokens,saved_bytes", [(None, None), (5, None), (5, 0)])
def test_clamped_per_token_mixes_unsure_and_confident_tokens(chunk_tokens: int | None, saved_bytes: int | None,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Near-uniform tokens keep nearly every sub-code, confident ones a few: rows are grouped
    by that count, and each group, chunked or not, its sub-codes held for backward or rebuilt
    there (``saved_bytes=0``), gives the dense values and gradients."""
    if saved_bytes is not None:
        monkeypatch.setattr(subcodes, "SAVED_BYTES", saved_bytes)
    gen = torch.Generator().manual_seed(12)
    spread = torch.tensor([0.02, 0.3, 1.0, 3.0, 8.0, 40.0], dtype=F64).repeat(7)[:, None, None]
    z = torch.randn(42, 2, 12, generator=gen, dtype=F64) * spread
    bits = ((torch.arange(64)[:, None] >> torch.arange(5, -1, -1)) & 1).to(F64)
    high = z[:, 0, :6]
    kept = ((F.logsigmoid(high) @ bits.T + F.logsigmoid(-high) @ (1 - bits).T) >= math.log(1e-5)).sum(dim=-1)
    assert kept.min() <= 16 < kept.max(), "the rows should fall into several groups"
    weights = torch.randn(42, 2, generator=gen, dtype=F64)
    results = []
    for fn in (lambda x: clamped_per_token(x, chunk_tokens=chunk_tokens), _dense_clamped_per_token):
        leaf = z.clone().requires_grad_()
        value = fn(leaf)
        (value * weights).sum().backward()
        results.append((value.detach(), leaf.grad))
    # logits are z itself; the gradient's terms are of the weights' size
    tol = softmax_tol(F64, z.abs().sum(dim=-1).max().item(), 2 ** z.shape[2])
    assert_close_rel_max(results[0][0], results[1][0], tol, floor=1.0, what="values")
    assert_close_rel_max(results[0][1], results[1][1], tol, floor=weights.abs().max().item(), what="grad")


def test_clamped_per_token_mixes_alone_grouped_and_fully_clamped_rows() -> None:
    """At 2**18 codes one chunk holds rows of all three kinds: confident (the most probable
    code is the only one at or above eps: no sub-codes built), unsure (grouped sub-codes) and
    near-uniform (every code under eps: H = -log eps, no gradient). Dense values and
    gradients, row for row."""
    gen = torch.Generator().manual_seed(18)
    spread = torch.tensor([60.0, 0.01, 3.0, 400.0, 0.0, 1.0], dtype=F64).repeat(2)[:, None, None]
    z = torch.randn(12, 1, 18, generator=gen, dtype=F64) * spread
    weights = torch.randn(12, 1, generator=gen, dtype=F64)
    results = []
    for fn in (clamped_per_token, _dense_clamped_per_token):
        leaf = z.clone().requires_grad_()
        value = fn(leaf)
        (value * weights).sum().backward()
        results.append((value.detach(), leaf.grad))
    cap = -math.log(1e-5)
    assert results[1][0][4].item() == pytest.approx(cap, rel=sum_tol(F64, 2**18)) and results[1][0][3].item() < 1e-3
    # logits are z itself; the gradient's terms are of the weights' size
    tol = softmax_tol(F64, z.abs().sum(dim=-1).max().item(), 2 ** z.shape[2])
    assert_close_rel_max(results[0][0], results[1][0], tol, floor=1.0, what="values")
    assert_close_rel_max(results[0][1], results[1][1], tol, floor=weights.abs().max().item(), what="grad")


def test_row_groups_partition_the_rows_by_their_kept_count() -> None:
    count = torch.tensor([0, 3, 16, 17, 64, 65, 200, 256, 300, 512, 5])
    groups = subcodes._row_groups(count, 512)
    rows = torch.cat([r for r, _ in groups])
    assert sorted(rows.tolist()) == list(range(1, len(count))), "every row that keeps a code, once; not row 0"
    for (r, k), bound in zip(groups, (16, 64, 256, 512), strict=True):
        assert k == int(count[r].max()) <= bound
    assert subcodes._row_groups(torch.tensor([2, 16, 1]), 512) == [(None, 16)]
    (rows, most), = subcodes._row_groups(torch.tensor([2, 0, 16]), 512)
    assert rows.tolist() == [0, 2] and most == 16
    assert subcodes._row_groups(torch.zeros(3, dtype=torch.long), 512) == []


def test_clamped_caps_at_the_clamp_at_2_18() -> None:
    """Uniform usage of 2**18 codes, a size the dense reference cannot hold in memory: every
    probability (2**-18 = 3.8e-6) is under the clamp, so both clamped terms are
    -log(1e-5) = 11.51 nats, where the exact ones are 18 log 2 = 12.48."""
    z = torch.zeros(3, 1, 18, dtype=F64)
    clamped = clamped_entropy_kernel(EntropyInputs(z, 100.0, 1.0, torch.empty(0)))
    cap = -math.log(REFERENCE_LOG_CLAMP)
    # sums over 2**18 codes (factorised) of float64 terms
    assert clamped.batch_entropy.item() == pytest.approx(cap, rel=sum_tol(F64, 2**18))
    assert clamped.per_sample_entropy.item() == pytest.approx(cap, rel=sum_tol(F64, 2**18))


def _dense_open_magvit2(inputs: EntropyInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Open-MAGVIT2's entropy_loss, per codebook: softmax over the codes, exact per-sample
    entropy (a constant inside log_softmax cancels), batch -sum a log(a + 1e-5)."""
    logits = 2 * inputs.inv_temperature * torch.einsum("n c d, k d -> n c k", inputs.z, inputs.codebook)
    log_prob = (logits + OPEN_MAGVIT2_LOG_EPS).log_softmax(dim=-1)
    per_sample = -(logits.softmax(dim=-1) * log_prob).sum(dim=-1).mean(dim=0)
    avg = logits.softmax(dim=-1).mean(dim=0)
    return per_sample, -(avg * (avg + OPEN_MAGVIT2_LOG_EPS).log()).sum(dim=-1)


@pytest.mark.parametrize("seed", range(8))
def test_open_magvit2_equals_their_dense_formula(seed: int) -> None:
    z, tau, scale = random_config(seed)
    ours, grad = _loss_and_grad(open_magvit2_entropy, z, tau, scale, seed)
    leaf = z.clone().requires_grad_()
    per_sample, batch = _dense_open_magvit2(inputs_of(leaf, tau, scale))
    weighted_loss(per_sample, batch, seed).backward()
    tol = softmax_tol(F64, max_logit(z, tau, scale), 2 ** z.shape[2])
    assert_close_rel_max(ours.per_sample_by_codebook, per_sample, tol, floor=1.0, what="per-sample")
    assert_close_rel_max(ours.batch_by_codebook, batch, tol, floor=1.0, what="batch")
    assert_close_rel_max(grad, leaf.grad, tol, floor=grad_floor(tau, scale, z.shape[1], seed), what="grad")
    # Neither the reference's number nor the exact one, unless nothing is small.
    exact = exact_entropy(inputs_of(z, tau, scale)).batch_by_codebook
    assert ((exact - ours.batch_by_codebook) > 0).all()


def test_open_magvit2_at_uniform_2_18_is_neither_the_clamp_nor_the_entropy() -> None:
    """The README's number: -log(2**-18 + 1e-5) = 11.19 nats, below both -log(1e-5) = 11.51
    (reference) and 18 log 2 = 12.48 (exact)."""
    z = torch.zeros(2, 1, 18, dtype=F64)
    terms = open_magvit2_entropy(EntropyInputs(z, 100.0, 1.0, torch.empty(0)))
    # float64 sums over 2**18 codes
    assert terms.batch_entropy.item() == pytest.approx(-math.log(2**-18 + 1e-5), rel=sum_tol(F64, 2**18))
    assert round(terms.batch_entropy.item(), 2) == 11.19
    assert terms.per_sample_entropy.item() == pytest.approx(18 * math.log(2), rel=sum_tol(F64, 2**18))


@pytest.mark.parametrize("mode", ["clamped", "open_magvit2"])
def test_dense_batch_modes_refuse_codebooks_above_the_limit(mode: str) -> None:
    z = torch.zeros(2, 1, EXACT_MAX_BITS + 1)
    with pytest.raises(ValueError, match=f"entropy_mode='{mode}'.*2\\*\\*{EXACT_MAX_BITS}"):
        ENTROPY_KERNELS[mode](EntropyInputs(z, 1.0, 1.0, torch.empty(0)))
    with pytest.raises(ValueError, match=f"entropy_mode='{mode}' supports up to"):
        LFQ(codebook_size=2 ** (EXACT_MAX_BITS + 1), entropy_mode=mode)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: exact_entropy(EntropyInputs(torch.zeros(4, 3), 1.0, 1.0, torch.empty(0))), "shape"),
        (lambda: exact_entropy(EntropyInputs(torch.zeros(0, 1, 3), 1.0, 1.0, torch.empty(0))), "at least one token"),
        (lambda: exact_entropy(EntropyInputs(torch.zeros(4, 1, 3), 1.0, 1.0, torch.empty(0)), chunk_tokens=0), "chunk_tokens"),
        (lambda: group_entropy(EntropyInputs(torch.zeros(4, 1, 3), 1.0, 1.0, torch.empty(0)), group_bits=0), "group_bits"),
    ],
)
def test_bad_input_raises(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------- on the sphere (BSQ)


def sphere_inputs(z: torch.Tensor, tau: float, scale: float) -> EntropyInputs:
    """What LFQ(spherical=True) hands the kernels; the dense ones use its codebook.

    BSQ: u = s z / |z| per codebook, codes c = s / sqrt(d) * {-1, +1}^d, logits 2 tau u.c,
    so the factorised kernels see bits of magnitude s / sqrt(d).
    """
    num_bits = z.shape[2]
    u = torch.nn.functional.normalize(z, dim=-1) * scale
    code = scale / math.sqrt(num_bits)
    return EntropyInputs(u, tau, code, codebook_of(num_bits, code, z.dtype))


@pytest.mark.parametrize("seed", range(12))
def test_spherical_exact_equals_dense_in_float64(seed: int) -> None:
    z, tau, scale = random_config(seed)
    z_dense = z.clone().requires_grad_()
    z = z.requires_grad_()
    terms = exact_entropy(sphere_inputs(z, tau, scale))
    per_sample, batch = dense_entropy(sphere_inputs(z_dense, tau, scale))
    # on the sphere |u| = scale and |code| = scale, so |logit| <= 2 tau scale**2
    tol = softmax_tol(F64, 2 * tau * scale**2, 2 ** z.shape[2])
    assert_close_rel_max(terms.per_sample_by_codebook, per_sample, tol, floor=1.0, what="per-sample")
    assert_close_rel_max(terms.batch_by_codebook, batch, tol, floor=1.0, what="batch")
    weighted_loss(terms.per_sample_by_codebook, terms.batch_by_codebook, seed).backward()
    weighted_loss(per_sample, batch, seed).backward()
    # d logit / d z = 2 tau (scale / sqrt(d)) (scale / |z|) through the normalisation
    floor = grad_floor(tau, scale, z.shape[1], seed) * scale / (math.sqrt(z.shape[2]) * z.detach().norm(dim=-1).min().item())
    assert_close_rel_max(z.grad, z_dense.grad, tol, floor=floor, what="grad")
    # and the clamped kernel is the clamped dense one on the sphere too
    clamped = clamped_entropy_kernel(sphere_inputs(z.detach(), tau, scale))
    reference = reference_entropy(sphere_inputs(z.detach(), tau, scale))
    assert_terms_close(clamped, reference, tol, what="clamped")


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_spherical_module_matches_dense_float64(scale: float) -> None:
    """LFQ(spherical=True) end to end (float32 inside): its default exact entropies and
    input gradient against the dense unclamped float64 computation on the sphere."""
    num_codebooks, num_bits, tau = 2, 7, 20.0
    quantizer = LFQ(dim=num_codebooks * num_bits, codebook_size=2**num_bits, num_codebooks=num_codebooks,
                    spherical=True, codebook_scale=scale)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 16, num_codebooks * num_bits, generator=gen).requires_grad_()
    _, breakdown = quantizer(x, inv_temperature=tau, return_loss_breakdown=True)
    (breakdown.per_sample_entropy - 0.7 * breakdown.batch_entropy).backward()

    x64 = x.detach().double().requires_grad_()
    per_sample, batch = dense_entropy(sphere_inputs(x64.reshape(-1, num_codebooks, num_bits), tau, scale))
    (per_sample.mean() - 0.7 * batch.mean()).backward()
    tol = softmax_tol(F32, 2 * tau * scale**2, 2**num_bits)  # float32 softmax; |logit| <= 2 tau scale**2
    assert breakdown.per_sample_entropy.item() == pytest.approx(per_sample.mean().item(), rel=tol)
    assert breakdown.batch_entropy.item() == pytest.approx(batch.mean().item(), rel=tol)
    assert x64.grad.abs().max() > 1e-3
    assert_close_rel_max(x.grad, x64.grad, tol, what="grad")


def test_spherical_uniform_batch_reaches_log_codebook_size_at_2_20() -> None:
    """BSQ's exact batch entropy at 2**20 codes, which neither bsq-vit (groups) nor the
    newest upstream (dense) computes: tokens spread over all sign patterns give about
    log 2**20 = 13.86 nats, beyond the clamp's 11.51."""
    num_bits = 20
    quantizer = LFQ(codebook_size=2**num_bits, spherical=True)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4096, num_bits, generator=gen)
    _, breakdown = quantizer(x, inv_temperature=1.0, return_loss_breakdown=True)
    assert breakdown.batch_entropy.item() > -math.log(REFERENCE_LOG_CLAMP) + 2
    assert breakdown.batch_entropy.item() <= num_bits * math.log(2) * (1 + softmax_tol(torch.float32, 2.0, 2**num_bits))


def test_spherical_group_and_reference_modes() -> None:
    """On the sphere too: "group" bounds the exact batch entropy from above (equal with one
    group), "reference" and "clamped" agree, and all share the exact per-sample term up
    to the clamp."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 64, 20, generator=gen)
    terms = {}
    for mode in ("exact", "group", "reference", "clamped"):
        quantizer = LFQ(dim=20, codebook_size=2**10, num_codebooks=2, spherical=True, entropy_mode=mode)
        _, terms[mode] = quantizer(x, inv_temperature=30.0, return_loss_breakdown=True)
    tol = softmax_tol(F32, 2 * 30.0, 2**10)  # float32 softmax over 2**10 codes, |logit| <= 2 tau
    assert terms["group"].batch_entropy.item() == pytest.approx(terms["exact"].batch_entropy.item(), rel=tol)
    # 10 bits fit one group; smaller groups through the kernel give an upper bound.
    u = torch.nn.functional.normalize(x.reshape(-1, 2, 10).double(), dim=-1)
    inputs = EntropyInputs(u, 30.0, 1 / math.sqrt(10), torch.empty(0))
    assert (group_entropy(inputs, group_bits=3).batch_by_codebook > exact_entropy(inputs).batch_by_codebook).all()
    assert terms["clamped"].batch_entropy.item() == pytest.approx(terms["reference"].batch_entropy.item(), rel=tol)
    assert terms["clamped"].per_sample_entropy.item() == pytest.approx(
        terms["reference"].per_sample_entropy.item(), rel=tol)
