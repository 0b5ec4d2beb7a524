"""Differential tests: ``LFQ(entropy_mode="reference")`` against vector-quantize-pytorch 1.14.12.

The oracle is a test dependency; importing it here (not skipping) makes a missing
install a failure, as CI requires.
"""

from __future__ import annotations

import itertools
import zlib

import pytest
import torch
from tolerances import assert_close_rel_max, sum_tol
from torch import nn
from vector_quantize_pytorch import LFQ as OracleLFQ

from lfq import LFQ

SHAPES = {
    # input kind -> spatial shape after the channel axis (None = sequence of 6 tokens)
    "sequence": None,
    "image": (3, 4),
    "video": (2, 2, 3),
}


def _make_pair(**kwargs) -> tuple[LFQ, OracleLFQ]:
    ours = LFQ(entropy_mode="reference", **kwargs)
    oracle = OracleLFQ(**kwargs)
    # The reference initialises its projections from the global RNG too; share weights.
    oracle.load_state_dict(ours.state_dict())
    return ours, oracle


def _input(kind: str, dim: int, batch: int = 2) -> torch.Tensor:
    spatial = SHAPES[kind]
    if spatial is None:
        return torch.randn(batch, 6, dim)
    return torch.randn(batch, dim, *spatial)


def _num_tokens(kind: str) -> int:
    spatial = SHAPES[kind]
    return 6 if spatial is None else int(torch.tensor(spatial).prod())


def _run(module: nn.Module, x: torch.Tensor, weight: torch.Tensor, seed: int, **forward_kwargs):
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)  # the frac subset draws from the global CPU generator
    ret, breakdown = module(x, return_loss_breakdown=True, **forward_kwargs)
    total = (ret.quantized * weight).sum() + ret.entropy_aux_loss
    if total.requires_grad:
        total.backward()
    grads = {"x": x.grad}
    for name, p in module.named_parameters():
        grads[name] = p.grad
    return ret, breakdown, grads


def _cases():
    cases = []
    # Every codebook size from 2^1 to 2^12 at least once in each input kind.
    for bits, kind in itertools.product(range(1, 13), SHAPES):
        cases.append(dict(bits=bits, kind=kind, codebooks=1, project=False, masked=False,
                          training=True, scale=1.0, act=False, frac=1.0))
    # The other axes, crossed on smaller codebooks so the dense oracle stays cheap.
    for bits, codebooks, project, masked, training, kind in itertools.product(
        (3, 6), (1, 2, 4), (False, True), (False, True), (False, True), ("sequence", "image", "video")
    ):
        cases.append(dict(bits=bits, kind=kind, codebooks=codebooks, project=project, masked=masked,
                          training=training, scale=1.0, act=False, frac=1.0))
    for bits, kind, masked in itertools.product((4, 8), ("sequence", "image"), (False, True)):
        cases.append(dict(bits=bits, kind=kind, codebooks=2, project=True, masked=masked,
                          training=True, scale=0.5, act=True, frac=1.0))
        cases.append(dict(bits=bits, kind=kind, codebooks=1, project=False, masked=masked,
                          training=True, scale=2.0, act=False, frac=0.5))
        cases.append(dict(bits=bits, kind=kind, codebooks=3, project=True, masked=masked,
                          training=True, scale=1.0, act=True, frac=0.3))
    return cases


def _case_id(case: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in case.items())


@pytest.mark.parametrize("case", _cases(), ids=_case_id)
def test_matches_oracle(case):
    torch.manual_seed(zlib.crc32(_case_id(case).encode()))
    bits, codebooks = case["bits"], case["codebooks"]
    dim = bits * codebooks + (3 if case["project"] else 0)
    kwargs = dict(dim=dim, codebook_size=2**bits, num_codebooks=codebooks,
                  codebook_scale=case["scale"], frac_per_sample_entropy=case["frac"])
    if case["act"]:
        kwargs["straight_through_activation"] = nn.Tanh()
    ours, oracle = _make_pair(**kwargs)
    ours.train(case["training"])
    oracle.train(case["training"])

    x = _input(case["kind"], dim)
    mask = None
    if case["masked"]:
        mask = torch.rand(x.shape[0], _num_tokens(case["kind"])) > 0.4
        mask[0, 0] = True  # at least one kept token, else the oracle returns NaN
    forward_kwargs = dict(inv_temperature=float(torch.empty(()).uniform_(1.0, 100.0)), mask=mask)
    weight = torch.randn_like(x)

    ret_o, br_o, grads_o = _run(oracle, x, weight, seed=1234, **forward_kwargs)
    ret_u, br_u, grads_u = _run(ours, x, weight, seed=1234, **forward_kwargs)

    assert torch.equal(ret_u.quantized, ret_o.quantized)
    assert torch.equal(ret_u.indices, ret_o.indices)
    assert ret_u.indices.dtype == ret_o.indices.dtype
    # The oracle's float32 arithmetic, its sums perhaps blocked otherwise: at most x.numel()
    # terms per sum; losses in units of 1 nat, gradients relative to their largest element.
    tol = sum_tol(torch.float32, x.numel())
    for name, a, b in zip(br_o._fields, br_u, br_o, strict=True):
        assert_close_rel_max(a, b, tol, floor=1.0, what=name)
    assert_close_rel_max(ret_u.entropy_aux_loss, ret_o.entropy_aux_loss, tol, floor=1.0, what="aux")
    assert grads_u.keys() == grads_o.keys()
    for name in grads_o:
        if grads_o[name] is None:
            assert grads_u[name] is None, name
            continue
        assert_close_rel_max(grads_u[name], grads_o[name], tol, what=f"grad {name}")

    # Round trip: the codes of the indices are the quantized output.
    codes = ours.indices_to_codes(ret_u.indices)
    if case["training"]:
        # straight-through z + (q - z): two roundings at the codes' magnitude
        assert_close_rel_max(codes, ret_u.quantized.detach(), sum_tol(torch.float32, 2))
    else:
        assert torch.equal(codes, ret_u.quantized)
    torch.testing.assert_close(codes, oracle.indices_to_codes(ret_o.indices), rtol=0, atol=0)


def test_state_dicts_load_both_ways():
    ours, oracle = _make_pair(dim=10, codebook_size=16, num_codebooks=2)
    assert ours.state_dict().keys() == oracle.state_dict().keys()
    fresh = LFQ(dim=10, codebook_size=16, num_codebooks=2)
    fresh.load_state_dict(oracle.state_dict())
    for key, value in oracle.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_buffers_and_attributes_match():
    ours, oracle = _make_pair(dim=7, codebook_size=32, num_codebooks=1, codebook_scale=0.25)
    for attr in ("dim", "codebook_dim", "num_codebooks", "keep_num_codebooks_dim", "has_projections",
                 "frac_per_sample_entropy", "diversity_gamma", "entropy_loss_weight",
                 "codebook_scale", "commitment_loss_weight"):
        assert getattr(ours, attr) == getattr(oracle, attr), attr
    assert torch.equal(ours.mask, oracle.mask)
    assert torch.equal(ours.codebook, oracle.codebook)
    assert ours.dtype == oracle.dtype


def test_defaults_match_when_only_dim_given():
    ours, oracle = _make_pair(dim=5)
    assert ours.codebook_dim == oracle.codebook_dim == 5
    assert ours.codebook.shape == oracle.codebook.shape == (32, 5)
    assert not ours.has_projections and not ours.keep_num_codebooks_dim


# ------------------------------------------------ masks: per-sample and the frac subset


def _compare_with_oracle(ours: LFQ, oracle: OracleLFQ, x: torch.Tensor, mask: torch.Tensor, seed: int) -> None:
    """Same outputs and gradients; where the oracle's subset is empty (NaN entropies), ours
    gives zero entropy terms, and the gradients still agree (the oracle's NaN mean sends
    no gradient)."""
    weight = torch.randn_like(x)
    forward_kwargs = dict(inv_temperature=2.0, mask=mask)
    ret_o, br_o, grads_o = _run(oracle, x, weight, seed=seed, **forward_kwargs)
    ret_u, br_u, grads_u = _run(ours, x, weight, seed=seed, **forward_kwargs)
    assert torch.equal(ret_u.quantized, ret_o.quantized) and torch.equal(ret_u.indices, ret_o.indices)
    empty = torch.isnan(br_o.per_sample_entropy).item()
    tol = sum_tol(torch.float32, x.numel())  # as in the test above
    if empty:
        assert br_u.per_sample_entropy.item() == 0.0 and br_u.batch_entropy.item() == 0.0
        assert_close_rel_max(br_u.commitment, br_o.commitment, tol, what="commitment")
    else:
        for name, a, b in zip(br_o._fields, br_u, br_o, strict=True):
            assert_close_rel_max(a, b, tol, floor=1.0, what=name)
        assert_close_rel_max(ret_u.entropy_aux_loss, ret_o.entropy_aux_loss, tol, floor=1.0, what="aux")
    for name in grads_o:
        assert_close_rel_max(grads_u[name], grads_o[name], tol, what=f"grad {name} (empty subset: {empty})")


@pytest.mark.parametrize("frac", [1.0, 0.5, 0.25])
@pytest.mark.parametrize("kind", ["sequence", "image"])
@pytest.mark.parametrize("batch", [1, 2, 3, 5, 8])
def test_per_sample_mask_matches_oracle(frac: float, kind: str, batch: int) -> None:
    """A (b,) mask keeps whole samples, and the frac subset is drawn over the kept samples,
    exactly as 1.14.12 does, for every number of kept samples (with none kept the oracle's
    commitment is NaN too; test_quantizer checks ours is 0)."""
    seed = zlib.crc32(f"{frac}-{kind}-{batch}".encode())
    torch.manual_seed(seed)
    kwargs = dict(dim=8, codebook_size=16, num_codebooks=2, frac_per_sample_entropy=frac, diversity_gamma=0.7)
    ours, oracle = _make_pair(**kwargs)
    x = _input(kind, 8, batch=batch) * 0.3  # unsaturated bits: the entropy gradients are not ~0
    for kept in range(1, batch + 1):
        mask = torch.zeros(batch, dtype=torch.bool)
        mask[torch.randperm(batch)[:kept]] = True
        _compare_with_oracle(ours, oracle, x, mask, seed + kept)


@pytest.mark.parametrize("frac", [0.25, 0.1, 0.6])
@pytest.mark.parametrize("num_tokens", [4, 9, 40])
def test_token_mask_subset_matches_oracle_for_every_kept_count(frac: float, num_tokens: int) -> None:
    """Token masks with frac < 1: the same subset as the reference for kept counts 1..N,
    small (int(kept * frac) == 0: the reference's subset is empty) and large."""
    seed = zlib.crc32(f"{frac}-{num_tokens}".encode())
    torch.manual_seed(seed)
    kwargs = dict(dim=5, codebook_size=8, frac_per_sample_entropy=frac, diversity_gamma=1.6)
    ours, oracle = _make_pair(**kwargs)
    x = torch.randn(2, num_tokens, 5) * 0.3
    for kept in range(1, 2 * num_tokens + 1):
        mask = torch.zeros(2 * num_tokens, dtype=torch.bool)
        mask[torch.randperm(2 * num_tokens)[:kept]] = True
        _compare_with_oracle(ours, oracle, x, mask.reshape(2, num_tokens), seed + kept)
