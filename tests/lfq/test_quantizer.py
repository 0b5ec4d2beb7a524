"""Behaviour of lfq.LFQ beyond the oracle: validation, dtypes, and the reference's fixed defects."""

from __future__ import annotations

import ast
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from tolerances import assert_close_rel_max, eps, softmax_tol, sum_tol
from vector_quantize_pytorch import LFQ as OracleLFQ

import lfq
from lfq import LFQ, LossBreakdown, Return, reverse_bits

LFQ_DIR = Path(lfq.__file__).parent


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(), "dim or codebook_size"),
        (dict(codebook_size=100), "power of 2.*100.*128"),
        (dict(codebook_size=1), "power of 2"),
        (dict(codebook_size=16.0), "power of 2"),
        (dict(dim=0), "dim must be a positive int"),
        (dict(dim=4, num_codebooks=0), "num_codebooks must be an int >= 1"),
        (dict(dim=8, num_codebooks=2, keep_num_codebooks_dim=False), "keep_num_codebooks_dim=False"),
        (dict(dim=4, frac_per_sample_entropy=0.0), r"frac_per_sample_entropy must be in \(0, 1\]"),
        (dict(dim=4, frac_per_sample_entropy=1.5), r"frac_per_sample_entropy must be in \(0, 1\]"),
        (dict(dim=4, codebook_scale=0.0), "codebook_scale must be > 0"),
        (dict(dim=4, entropy_mode="dense"), "entropy_mode must be one of"),
        (dict(dim=4, spherical=1), "spherical must be True or False"),
        (dict(dim=4, channel_first="yes"), "channel_first must be None"),
        (dict(dim=4, soft_clamp_input_value=0.5), r"soft_clamp_input_value must be None or a number >= codebook_scale \(1.0\)"),
        (dict(dim=4, force_quantization_f32=None), "force_quantization_f32 must be True or False"),
        (dict(dim=6, codebook_size=16, has_projections=False), "has_projections=False needs dim == .* = 4"),
    ],
)
def test_invalid_arguments_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LFQ(**kwargs)


def test_no_assert_statements_in_library():
    # Validation must survive `python -O`, which strips asserts.
    for path in LFQ_DIR.glob("*.py"):
        tree = ast.parse(path.read_text())
        asserts = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Assert)]
        assert not asserts, f"{path.name} uses assert at lines {asserts}"


@pytest.mark.parametrize(
    ("shape", "message"),
    [((2, 5), r"expected 4 channels on the last axis, got 5"),
     ((2, 5, 3, 3), r"expected 4 channels on axis 1"),
     ((2, 4), r"LFQ expects \(batch, tokens, 4\)")],
)
def test_wrong_input_shape_says_what_is_expected(shape, message):
    quantizer = LFQ(dim=4)
    x = torch.randn(*shape) if len(shape) != 2 or shape[1] != 5 else torch.randn(2, 3, 5)
    with pytest.raises(ValueError, match=message):
        quantizer(x)


def test_mask_of_wrong_shape_names_the_expected_shape():
    quantizer = LFQ(dim=4).train()
    with pytest.raises(ValueError, match=r"mask must have shape \(2, 12\) or \(2, 3, 4\).*got \(2, 11\)"):
        quantizer(torch.randn(2, 4, 3, 4), mask=torch.ones(2, 11, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        quantizer(torch.randn(2, 6, 4), mask=torch.ones(2, 6))


def test_spatial_mask_equals_flat_mask():
    quantizer = LFQ(dim=4, entropy_mode="reference").train()
    x = torch.randn(2, 4, 3, 4)
    mask = torch.rand(2, 3, 4) > 0.5
    mask[0, 0, 0] = True
    _, spatial = quantizer(x, mask=mask, return_loss_breakdown=True)
    _, flat = quantizer(x, mask=mask.reshape(2, 12), return_loss_breakdown=True)
    for a, b in zip(spatial, flat, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("mode", ["reference", "exact", "clamped"])
def test_empty_frac_subset_gives_zero_entropy_instead_of_nan(mode):
    kwargs = dict(dim=4, frac_per_sample_entropy=0.01, diversity_gamma=0.5)
    ours = LFQ(entropy_mode=mode, **kwargs).train()
    oracle = OracleLFQ(**kwargs).train()
    x = torch.randn(1, 10, 4) * 0.1  # int(10 * 0.01) == 0 tokens sampled, as in the reference
    results = []
    for module in (oracle, ours):
        leaf = x.clone().requires_grad_()
        torch.manual_seed(0)
        ret, terms = module(leaf, inv_temperature=1.0, return_loss_breakdown=True)
        ret.entropy_aux_loss.backward()
        results.append((ret, terms, leaf.grad))
    (oracle_ret, oracle_terms, oracle_grad), (ret, terms, grad) = results
    assert torch.isnan(oracle_terms.per_sample_entropy)  # the defect we fix
    assert terms.per_sample_entropy.item() == 0.0 and terms.batch_entropy.item() == 0.0
    # a product and a sum of float32 scalars; elementwise gradients of the same ops
    assert_close_rel_max(ret.entropy_aux_loss, 0.25 * terms.commitment, sum_tol(torch.float32, 2))
    # The same (empty) subset as the reference: the same gradient, the commitment's alone.
    assert_close_rel_max(grad, oracle_grad, sum_tol(torch.float32, 2))


def test_all_samples_masked_by_a_per_sample_mask_gives_zero_loss():
    quantizer = LFQ(dim=4, frac_per_sample_entropy=0.5).train()
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    ret, terms = quantizer(x, mask=torch.zeros(2, dtype=torch.bool), return_loss_breakdown=True)
    assert ret.entropy_aux_loss.item() == 0.0 and all(t.item() == 0.0 for t in terms)
    ret.entropy_aux_loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_per_sample_mask_equals_the_expanded_token_mask():
    quantizer = LFQ(dim=8, codebook_size=16, num_codebooks=2).train()
    x = torch.randn(3, 8, 2, 5)
    keep = torch.tensor([True, False, True])
    _, per_sample = quantizer(x, mask=keep, return_loss_breakdown=True)
    _, tokens = quantizer(x, mask=keep[:, None, None].expand(3, 2, 5), return_loss_breakdown=True)
    _, kept_only = quantizer(x[keep], return_loss_breakdown=True)
    for a, b, c in zip(per_sample, tokens, kept_only, strict=True):
        assert torch.equal(a, b)
        # the same per-token terms, the sums over the 16 kept tokens blocked differently
        assert_close_rel_max(a, c, sum_tol(torch.float32, 16), floor=1.0)


def test_channel_last_images_with_channel_first_false():
    """channel_first=False takes (b, *spatial, dim) images (the newest upstream's flag, which
    there fails on >= 4-D input): the same numbers as channel-first, indices (b, *spatial)."""
    torch.manual_seed(0)
    first = LFQ(dim=6, codebook_size=8, num_codebooks=2).train()
    last = LFQ(dim=6, codebook_size=8, num_codebooks=2, channel_first=False).train()
    x = torch.randn(2, 6, 3, 4)
    mask = torch.rand(2, 3, 4) > 0.3
    ret_f, terms_f = first(x, mask=mask, return_loss_breakdown=True)
    ret_l, terms_l = last(x.permute(0, 2, 3, 1), mask=mask, return_loss_breakdown=True)
    assert ret_l.quantized.shape == (2, 3, 4, 6) and ret_l.indices.shape == (2, 3, 4, 2)
    assert torch.equal(ret_l.quantized, ret_f.quantized.permute(0, 2, 3, 1))
    assert torch.equal(ret_l.indices, ret_f.indices)
    for a, b in zip(terms_f, terms_l, strict=True):  # the same tokens, sums over them reordered
        assert_close_rel_max(a, b, sum_tol(torch.float32, int(mask.sum())), floor=1.0)
    assert torch.equal(last.indices_to_codes(ret_l.indices), ret_l.quantized.detach())
    with pytest.raises(ValueError, match="expected 6 channels on the last axis"):
        last(x)


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_spherical_codes_lie_on_the_sphere(scale):
    quantizer = LFQ(dim=10, codebook_size=2**5, num_codebooks=2, spherical=True, codebook_scale=scale).eval()
    x = torch.randn(3, 10, 4, 4)
    ret = quantizer(x)
    codes = quantizer.indices_to_codes(ret.indices, project_out=False)
    assert torch.equal(codes, ret.quantized)
    per_codebook = codes.permute(0, 2, 3, 1).reshape(-1, 2, 5)
    # a norm sums 5 squares; each element is one float32 rounding of scale / sqrt(5)
    assert_close_rel_max(per_codebook.norm(dim=-1), torch.full((48, 2), scale), sum_tol(torch.float32, 5))
    assert_close_rel_max(per_codebook.abs(), torch.full_like(per_codebook, scale / 5**0.5), sum_tol(torch.float32, 1))
    assert quantizer.spherical and "spherical=True" in repr(quantizer)


def test_softplus_entropy_loss_and_its_per_codebook_stats():
    torch.manual_seed(0)
    plain = LFQ(dim=8, codebook_size=16, num_codebooks=2).train()
    soft = LFQ(dim=8, codebook_size=16, num_codebooks=2, experimental_softplus_entropy_loss=True,
               entropy_loss_offset=3.0).train()
    x = torch.randn(2, 7, 8)
    ret_p, terms = plain(x, return_loss_breakdown=True)
    ret_s, terms_s = soft(x, return_loss_breakdown=True)
    entropy = terms.per_sample_entropy - terms.batch_entropy
    expected = torch.nn.functional.softplus(entropy + 3.0) * 0.1 + terms.commitment * 0.25
    # softplus, two products and a sum of float32 scalars (per codebook, then their mean over 2)
    assert_close_rel_max(ret_s.entropy_aux_loss, expected, sum_tol(torch.float32, 6))
    assert all(torch.equal(a, b) for a, b in zip(terms, terms_s, strict=True))  # breakdown unchanged
    assert_close_rel_max(soft.last_stats.aux_loss.mean(), ret_s.entropy_aux_loss.detach(), sum_tol(torch.float32, 6))
    spread = plain.last_stats.aux_loss - plain.last_stats.aux_loss.mean()
    # differences of O(1) losses: rounding relative to the losses, not to their spread
    assert_close_rel_max(soft.last_stats.aux_loss - soft.last_stats.aux_loss.mean(), spread,
                         sum_tol(torch.float32, 6), floor=float(plain.last_stats.aux_loss.abs().max()))


def test_projection_flags():
    forced = LFQ(dim=4, has_projections=True, projection_has_bias=False)
    assert isinstance(forced.project_in, torch.nn.Linear) and forced.project_in.bias is None
    assert forced.project_out.bias is None and forced.has_projections
    ret = forced.train()(torch.randn(2, 3, 4))
    assert ret.quantized.shape == (2, 3, 4)


def test_all_tokens_masked_gives_zero_loss_not_nan():
    quantizer = LFQ(dim=4).train()
    x = torch.randn(2, 5, 4, requires_grad=True)
    ret, terms = quantizer(x, mask=torch.zeros(2, 5, dtype=torch.bool), return_loss_breakdown=True)
    assert ret.entropy_aux_loss.item() == 0.0
    assert all(t.item() == 0.0 for t in terms)
    ret.entropy_aux_loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_module_trains_and_keeps_input_dtype(dtype):
    torch.manual_seed(0)
    reference = LFQ(dim=12, codebook_size=32, num_codebooks=2, codebook_scale=0.3).train()
    half = LFQ(dim=12, codebook_size=32, num_codebooks=2, codebook_scale=0.3).train()
    half.load_state_dict(reference.state_dict())
    half = half.to(dtype)
    x = torch.randn(2, 6, 12).to(dtype)

    ret, terms = half(x.clone().requires_grad_(True), return_loss_breakdown=True)
    assert ret.quantized.dtype == dtype
    assert ret.entropy_aux_loss.dtype == torch.float32
    assert all(t.dtype == torch.float32 for t in terms)
    assert torch.isfinite(ret.entropy_aux_loss)
    (ret.quantized.float().sum() + ret.entropy_aux_loss).backward()
    assert half.project_in.weight.grad is not None and half.project_in.weight.grad.dtype == dtype

    # The entropy runs in float32 on the half-precision weights: same indices as float32
    # weights rounded the same way, and losses close to the float32 module's.
    ref_ret, ref_terms = reference(x.float(), return_loss_breakdown=True)
    # z rounded to the half dtype (eps relative), squared and averaged: a few eps of that dtype
    assert_close_rel_max(terms.commitment, ref_terms.commitment, sum_tol(dtype, 1))
    # The codebook keeps its exact values although the buffer was cast.
    # (0.3 rounded once to the half dtype: within half a unit in its last place, eps / 2 relative)
    assert half.indices_to_codes(ret.indices, project_out=False).abs().unique().float().allclose(
        torch.tensor(0.3), rtol=0, atol=eps(dtype) / 2 * 0.3)


def test_half_precision_input_to_float32_module():
    quantizer = LFQ(dim=4).train()
    ret = quantizer(torch.randn(2, 4, 3, 3, dtype=torch.bfloat16))
    assert ret.quantized.dtype == torch.bfloat16
    assert ret.quantized.shape == (2, 4, 3, 3)
    assert ret.entropy_aux_loss.dtype == torch.float32


def test_autocast_region_runs_in_float32():
    quantizer = LFQ(dim=16, codebook_size=16).train()
    x = torch.randn(2, 6, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ret, terms = quantizer(x, return_loss_breakdown=True)
    plain, plain_terms = quantizer(x, return_loss_breakdown=True)
    assert ret.quantized.dtype == torch.float32
    # Same random-free computation inside and outside autocast: identical numbers.
    assert torch.equal(ret.quantized, plain.quantized)
    assert_close_rel_max(terms.batch_entropy, plain_terms.batch_entropy, sum_tol(torch.float32, 1), floor=1.0)


def test_no_deprecated_cuda_amp_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LFQ(dim=4).train()(torch.randn(1, 3, 4))
    source = "\n".join(p.read_text() for p in LFQ_DIR.glob("*.py"))
    assert "torch.cuda.amp" not in source


def test_eval_mode_returns_zero_losses():
    quantizer = LFQ(dim=6, codebook_size=8, num_codebooks=2).eval()
    ret, terms = quantizer(torch.randn(2, 5, 6), return_loss_breakdown=True)
    assert isinstance(ret, Return) and isinstance(terms, LossBreakdown)
    assert ret.entropy_aux_loss.item() == 0.0 and all(t.item() == 0.0 for t in terms)
    assert quantizer.last_stats is None


def test_last_stats_are_per_codebook_and_average_to_the_breakdown():
    quantizer = LFQ(dim=12, codebook_size=16, num_codebooks=3).train()
    ret, terms = quantizer(torch.randn(4, 7, 12), return_loss_breakdown=True)
    stats = quantizer.last_stats
    for field in ("per_sample_entropy", "batch_entropy", "commitment", "aux_loss"):
        value = getattr(stats, field)
        assert value.shape == (3,) and not value.requires_grad, field
    # a mean over 3 codebooks against the module's own reduction of the same terms
    tol = sum_tol(torch.float32, 3)
    assert_close_rel_max(stats.per_sample_entropy.mean(), terms.per_sample_entropy, tol, floor=1.0)
    assert_close_rel_max(stats.batch_entropy.mean(), terms.batch_entropy, tol, floor=1.0)
    assert_close_rel_max(stats.commitment.mean(), terms.commitment, tol)
    assert_close_rel_max(stats.aux_loss.mean(), ret.entropy_aux_loss.detach(), tol, floor=1.0)


def test_imports_with_only_torch_and_einops():
    blocked = ["pandas", "matplotlib", "submitit", "yaml", "tqdm", "sklearn", "skimage",
               "vector_quantize_pytorch", "einx", "scipy", "experiments", "analysis", "slurm"]
    code = f"""
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {blocked!r}:
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
import torch
from lfq import LFQ, Return, LossBreakdown
import lfq, pkgutil
for module in pkgutil.iter_modules(lfq.__path__):
    importlib = __import__('importlib'); importlib.import_module('lfq.' + module.name)
ret = LFQ(dim=4).train()(torch.randn(1, 3, 4))
print('ok', ret.indices.shape)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "ok torch.Size([1, 3])" in result.stdout


def test_open_magvit2_mapping_reproduces_their_loss_and_indices():
    """The README's recipe for Open-MAGVIT2 users: their entropy loss
    ``w_s * S - w_b * B`` with B = -sum a log(a + 1e-5) of the mean softmax at temperature
    0.01 and logits 2 z.c, and their indices (channel i has weight 2**i)."""
    torch.manual_seed(0)
    bits, w_s, w_b = 10, 1.0, 0.5
    ours = LFQ(dim=bits, codebook_size=2**bits, entropy_mode="open_magvit2", entropy_loss_weight=w_s,
               diversity_gamma=w_b / w_s, commitment_loss_weight=0.0).train()
    z = torch.randn(2, bits, 4, 4) * 0.02  # (b, d, h, w), as they take it
    (quantized, indices, aux), terms = ours(z, return_loss_breakdown=True)  # inv_temperature 100 = 1 / 0.01

    tokens = z.permute(0, 2, 3, 1).reshape(-1, bits)
    signs = ((torch.arange(2**bits)[:, None] >> torch.arange(bits)) & 1) * 2.0 - 1.0  # their codebook order
    probs = (2 * tokens @ signs.T / 0.01).softmax(dim=-1)
    sample = -(probs * (2 * tokens @ signs.T / 0.01 + 1e-5).log_softmax(dim=-1)).sum(dim=-1).mean()
    avg = probs.mean(dim=0)
    batch = -(avg * (avg + 1e-5).log()).sum()
    # float32 softmax over 2**10 codes from logits up to 2 sum|z| / 0.01
    tol = softmax_tol(torch.float32, (2 * tokens.abs().sum(dim=-1) / 0.01).max().item(), 2**bits)
    assert_close_rel_max(aux, w_s * sample - w_b * batch, tol, floor=1.0)
    their_indices = ((tokens > 0).long() * 2 ** torch.arange(bits)).sum(dim=-1)
    assert torch.equal(reverse_bits(indices, bits).flatten(), their_indices)
    assert torch.equal(reverse_bits(reverse_bits(indices, bits), bits), indices)
