"""Differential tests against the newest vector-quantize-pytorch for the flags it added
after 1.14.12: ``spherical`` (BSQ), ``soft_clamp_input_value``, ``channel_first``,
``force_quantization_f32``, ``experimental_softplus_entropy_loss`` (with
``entropy_loss_offset``), ``has_projections`` and ``projection_has_bias``.

The newest upstream is imported beside the pinned oracle (``tests/upstream_vqp.py``;
``make upstream`` installs it). Its token masks are broken (the batch entropy becomes the
per-sample one), so masks are compared only per sample, which it still handles. Its
default ``commitment_loss_weight`` is 0 where 1.14.12's (and ours) is 0.25, so every case
passes the weight explicitly.
"""

from __future__ import annotations

import itertools
import math
import zlib

import pytest
import torch
from tolerances import assert_close_rel_max, softmax_tol, sum_tol
from torch import nn
from upstream_vqp import load_latest

from lfq import LFQ
from lfq.entropy import REFERENCE_LOG_CLAMP

latest = load_latest()


def _pair(mode: str = "reference", **kwargs) -> tuple[LFQ, nn.Module]:
    kwargs.setdefault("commitment_loss_weight", 0.25)
    ours = LFQ(entropy_mode=mode, **kwargs)
    theirs = latest.LFQ(**kwargs)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def _step(module: nn.Module, x: torch.Tensor, weight: torch.Tensor, seed: int, **forward_kwargs):
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)
    ret, breakdown = module(x, return_loss_breakdown=True, **forward_kwargs)
    total = (ret.quantized * weight).sum() + ret.entropy_aux_loss
    if total.requires_grad:
        total.backward()
    grads = {"x": x.grad, **{name: p.grad for name, p in module.named_parameters()}}
    return ret, breakdown, grads


def _latent_l1(module: LFQ, x: torch.Tensor, **forward_kwargs) -> float:
    """Largest L1 norm of a token's latent z per codebook (what meets the codes), read from a
    forward pass without gradients: the logits are bounded by 2 tau code |z|_1."""
    seen = []
    losses = module._losses

    def spy(z, *args, **kwargs):
        seen.append(z.detach().abs().sum(dim=-1).max().item())
        return losses(z, *args, **kwargs)

    module._losses = spy
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):  # the test's random draws stay as they were
            module(x, **forward_kwargs)
    finally:
        del module._losses
    return max(seen, default=0.0)


def _tolerance(ours: LFQ, x: torch.Tensor, **forward_kwargs) -> float:
    """Relative tolerance of upstream's dense float32 entropies (a softmax over the codes of
    logits up to 2 tau code |z|_1, averaged over the tokens) against ours (another
    factorisation, other summation orders): softmax_tol for the logits and codes plus sum_tol
    for the mean over the tokens. Losses are in units of 1 nat (their terms are O(1) even where
    the difference of two entropies is ~0); gradients relative to their largest element."""
    tau = forward_kwargs.get("inv_temperature", 100.0)
    code = ours.codebook_scale / ours.codebook_dim**0.5 if ours.spherical else ours.codebook_scale
    max_logit = 2 * tau * code * _latent_l1(ours, x, **forward_kwargs) if ours.training else 0.0
    tokens = x.numel() // ours.dim * ours.num_codebooks
    return softmax_tol(torch.float32, max_logit, ours.codebook_size) + sum_tol(torch.float32, tokens)


def _assert_same(ours: LFQ, theirs: nn.Module, x: torch.Tensor, seed: int, exact_outputs: bool = True,
                 **forward_kwargs) -> float:
    tol = _tolerance(ours, x, **forward_kwargs)
    weight = torch.randn_like(x)
    ret_t, br_t, grads_t = _step(theirs, x, weight, seed, **forward_kwargs)
    ret_u, br_u, grads_u = _step(ours, x, weight, seed, **forward_kwargs)
    assert ret_u.quantized.shape == ret_t.quantized.shape and ret_u.indices.shape == ret_t.indices.shape
    if exact_outputs:
        assert torch.equal(ret_u.quantized, ret_t.quantized)
    else:  # codes through project_out: a float32 sum over the latent's dimensions
        assert_close_rel_max(ret_u.quantized, ret_t.quantized, sum_tol(torch.float32, ours.codebook_dim * ours.num_codebooks),
                             what="quantized")
    assert torch.equal(ret_u.indices, ret_t.indices)
    for name, a, b in zip(br_t._fields, br_u, br_t, strict=True):
        assert_close_rel_max(a, b, tol, floor=1.0, what=name)
    assert_close_rel_max(ret_u.entropy_aux_loss, ret_t.entropy_aux_loss, tol, floor=1.0, what="aux")
    assert grads_u.keys() == grads_t.keys()
    for name, grad in grads_t.items():
        if grad is None:
            assert grads_u[name] is None, name
            continue
        assert_close_rel_max(grads_u[name], grad, tol, what=f"grad {name}")
    codes = ours.indices_to_codes(ret_u.indices)
    torch.testing.assert_close(codes, theirs.indices_to_codes(ret_t.indices), rtol=0, atol=0)
    return tol


def _input(kind: str, dim: int, batch: int = 2) -> torch.Tensor:
    return {"sequence": lambda: torch.randn(batch, 6, dim), "image": lambda: torch.randn(batch, dim, 3, 4),
            "video": lambda: torch.randn(batch, dim, 2, 2, 3)}[kind]()


SPHERICAL_CASES = [
    dict(bits=bits, codebooks=codebooks, project=project, scale=scale, kind=kind, training=training)
    for bits, codebooks, project, scale, kind, training in itertools.product(
        (1, 4, 9), (1, 2), (False, True), (1.0, 0.5), ("sequence", "image", "video"), (True, False))
    if not (bits == 9 and codebooks == 2)
]


@pytest.mark.parametrize("case", SPHERICAL_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_spherical_matches_newest_upstream(case: dict) -> None:
    torch.manual_seed(zlib.crc32(repr(case).encode()))
    dim = case["bits"] * case["codebooks"] + (3 if case["project"] else 0)
    ours, theirs = _pair(dim=dim, codebook_size=2 ** case["bits"], num_codebooks=case["codebooks"],
                         codebook_scale=case["scale"], spherical=True)
    ours.train(case["training"])
    theirs.train(case["training"])
    _assert_same(ours, theirs, _input(case["kind"], dim), seed=7, inv_temperature=float(torch.empty(()).uniform_(1, 100)))


@pytest.mark.parametrize("spherical", [False, True])
@pytest.mark.parametrize("frac", [1.0, 0.5])
def test_per_sample_mask_and_frac_match_newest_upstream(spherical: bool, frac: float) -> None:
    """Per-sample masks with frac = 1, and frac < 1 without a mask, are drawn the same way
    in 1.14.12, the newest upstream and ours. (With a per-sample mask AND frac < 1 the
    newest draws tokens, 1.14.12 and ours draw samples: see test_oracle.)"""
    torch.manual_seed(3)
    ours, theirs = _pair(dim=12, codebook_size=2**6, num_codebooks=2, spherical=spherical,
                         frac_per_sample_entropy=frac, straight_through_activation=nn.Tanh())
    x = torch.randn(3, 12, 4, 4)
    mask = torch.tensor([True, False, True]) if frac == 1.0 else None
    _assert_same(ours, theirs, x, seed=11, inv_temperature=5.0, mask=mask)


@pytest.mark.parametrize("spherical", [False, True])
@pytest.mark.parametrize("value,scale", [(1.0, 1.0), (1.5, 1.0), (0.8, 0.5)])
def test_soft_clamp_matches_newest_upstream(spherical: bool, value: float, scale: float) -> None:
    torch.manual_seed(5)
    ours, theirs = _pair(dim=10, codebook_size=2**4, num_codebooks=2, soft_clamp_input_value=value,
                         codebook_scale=scale, spherical=spherical)
    x = torch.randn(2, 10, 3, 3) * 3  # large inputs, so the clamp matters
    _assert_same(ours, theirs, x, seed=0, inv_temperature=3.0)
    plain = LFQ(dim=10, codebook_size=2**4, num_codebooks=2, codebook_scale=scale).train()
    plain.load_state_dict(ours.state_dict())
    _, clamped_terms = ours(x, return_loss_breakdown=True)
    _, plain_terms = plain(x, return_loss_breakdown=True)
    assert clamped_terms.commitment != plain_terms.commitment


@pytest.mark.parametrize("channel_first", [None, True])
@pytest.mark.parametrize("kind", ["sequence", "image"])
def test_channel_first_matches_newest_upstream(channel_first: bool | None, kind: str) -> None:
    torch.manual_seed(9)
    ours, theirs = _pair(dim=8, codebook_size=2**4, num_codebooks=2, channel_first=channel_first)
    x = torch.randn(2, 8, 5) if kind == "sequence" and channel_first else _input(kind, 8)
    _assert_same(ours, theirs, x, seed=0, inv_temperature=10.0)
    ours.eval()
    theirs.eval()
    _assert_same(ours, theirs, x, seed=0)


@pytest.mark.parametrize("force", [True, False])
def test_force_quantization_f32_is_accepted_and_matches_on_float32(force: bool) -> None:
    torch.manual_seed(2)
    ours, theirs = _pair(dim=7, codebook_size=2**5, force_quantization_f32=force)
    _assert_same(ours, theirs, torch.randn(2, 6, 7), seed=0, inv_temperature=4.0)
    # Ours is float32 inside either way; a bf16 input comes back as bf16.
    ret = ours(torch.randn(2, 6, 7, dtype=torch.bfloat16))
    assert ret.quantized.dtype == torch.bfloat16 and ret.entropy_aux_loss.dtype == torch.float32


@pytest.mark.parametrize("offset", [5.0, 0.5])
@pytest.mark.parametrize("spherical", [False, True])
def test_softplus_entropy_loss_matches_newest_upstream(offset: float, spherical: bool) -> None:
    torch.manual_seed(4)
    ours, theirs = _pair(dim=10, codebook_size=2**5, num_codebooks=2, spherical=spherical,
                         experimental_softplus_entropy_loss=True, entropy_loss_offset=offset)
    _assert_same(ours, theirs, torch.randn(3, 4, 10), seed=0, inv_temperature=2.0)


@pytest.mark.parametrize("bias", [True, False])
def test_projection_flags_match_newest_upstream(bias: bool) -> None:
    torch.manual_seed(6)
    ours, theirs = _pair(dim=6, codebook_size=2**3, num_codebooks=2, has_projections=True,
                         projection_has_bias=bias)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    _assert_same(ours, theirs, torch.randn(2, 5, 6), seed=0, inv_temperature=3.0)


@pytest.mark.parametrize("bits,tau", [(8, 3.0), (10, 30.0), (12, 100.0)])
def test_spherical_clamped_and_exact_against_newest_upstream(bits: int, tau: float) -> None:
    """The newest upstream's spherical entropies are dense and clamped: "clamped" matches
    them to float32 rounding; "exact" is above them by at most the clamp's effect."""
    torch.manual_seed(bits)
    x = torch.randn(4, 32, bits)
    _, theirs = _pair(dim=bits, spherical=True)
    clamped, _ = _pair("clamped", dim=bits, spherical=True)
    tol = _assert_same(clamped, theirs, x, seed=0, inv_temperature=tau)
    exact = LFQ(dim=bits, spherical=True).train()
    _, terms_t = theirs(x, inv_temperature=tau, return_loss_breakdown=True)
    _, terms_e = exact(x, inv_temperature=tau, return_loss_breakdown=True)
    bound = 2**bits * REFERENCE_LOG_CLAMP / torch.e
    slack = tol * bits * math.log(2)  # the rounding of entropies of up to ln(2^bits) nats
    for name in ("per_sample_entropy", "batch_entropy"):
        gap = (getattr(terms_e, name) - getattr(terms_t, name)).item()
        assert -slack <= gap <= bound + slack, (name, gap, slack)
