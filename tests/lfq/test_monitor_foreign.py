"""The monitor on quantizers we did not write: the newest vector-quantize-pytorch (installed for
tests only, ``tests/upstream_vqp.py``) and a user's binary quantizer through ``BinaryAdapter``.

Entropies and commitment the monitor computes from the latent are checked against a dense
float64 softmax over every code on the same latents (taken by an independent hook); code
counts against the histogram of the returned indices.
"""

from __future__ import annotations

import math

import pytest
import torch
from tolerances import eps, softmax_tol, sum_tol
from torch import nn
from upstream_vqp import load_latest

from lfq import BinaryAdapter, LFQMonitor, MemorySink
from lfq.latent_stats import SATURATION_LOGIT


def dense_terms(z: torch.Tensor, codebook: torch.Tensor, tau: float, keep: torch.Tensor | None):
    """Per codebook (per-sample entropy, batch entropy) of softmax(2 tau z.c) over all codes, float64.
    z: (N, c, d); codebook: (K, d) the codes as the quantizer compares them."""
    z, codebook = z.double(), codebook.double()
    if keep is not None:
        z = z[keep]
    prob = (2 * tau * torch.einsum("ncd,kd->nck", z, codebook)).softmax(-1)
    per_sample = -(torch.special.xlogy(prob, prob)).sum(-1).mean(0)
    avg = prob.mean(0)
    batch = -(torch.special.xlogy(avg, avg)).sum(-1)
    return per_sample, batch


def entropy_tol(z: torch.Tensor, tau: float, magnitude: float) -> float:
    """Relative tolerance (entropies in units of 1 nat) of the monitor's float32 entropies from
    the latent z (N, c, d) against float64 truth: bit logits 4 tau m z, so logits of codes up
    to 4 tau m |z|_1 over 2^d codes (softmax_tol), and sums over the N tokens (sum_tol)."""
    max_logit = 4 * tau * magnitude * z.abs().sum(-1).max().item()
    return softmax_tol(torch.float32, max_logit, 2 ** z.shape[-1]) + sum_tol(torch.float32, z.shape[0])


def histogram(indices: torch.Tensor, books: int, size: int, keep: torch.Tensor | None = None) -> torch.Tensor:
    idx = indices.reshape(-1, books)
    if keep is not None:
        idx = idx[keep.reshape(-1)]
    return torch.stack([torch.bincount(idx[:, c], minlength=size) for c in range(books)])


class Tokenizer(nn.Module):
    def __init__(self, quantizer: nn.Module, dim: int) -> None:
        super().__init__()
        self.encoder = nn.Linear(6, dim)
        self.quantizer = quantizer

    def forward(self, x: torch.Tensor, **kwargs):
        return self.quantizer(self.encoder(x), **kwargs)


@pytest.mark.parametrize("spherical", [False, True])
def test_newest_upstream_lfq_entropies_equal_a_dense_float64_computation(spherical: bool):
    latest = load_latest()
    torch.manual_seed(0)
    books, bits, scale, tau = 2, 5, 0.7, 3.0
    quantizer = latest.LFQ(dim=8, codebook_size=2**bits, num_codebooks=books, codebook_scale=scale,
                           spherical=spherical, commitment_loss_weight=0.25)
    model = Tokenizer(quantizer, 8)
    captured = []
    quantizer.project_in.register_forward_hook(lambda m, a, out: captured.append(out.detach()))
    sink = MemorySink()
    x = torch.randn(3, 10, 6)
    mask = torch.rand(3, 10) > 0.3
    with LFQMonitor(model, sink, diagnostics_every=1) as mon:
        assert mon.layers == ["quantizer"]
        out = model(x, inv_temperature=tau, mask=mask)
    z = captured[0].reshape(-1, books, bits)
    codebook = quantizer.codebook
    if spherical:
        z = nn.functional.normalize(z, dim=-1) * scale
        codebook = nn.functional.normalize(codebook, dim=-1) * scale
    keep = mask.reshape(-1)
    per_sample, batch = dense_terms(z, codebook, tau, keep)
    magnitude = scale / math.sqrt(bits) if spherical else scale
    commitment = (z[keep].abs() - magnitude).double().square().mean(dim=(0, 2))
    counts = histogram(out.indices, books, 2**bits, keep)
    tol = entropy_tol(z[keep], tau, magnitude)
    for c in range(books):
        row = next(r for r in sink.records if r["codebook"] == c)
        assert row["per_sample_entropy"] == pytest.approx(per_sample[c].item(), rel=tol, abs=tol)
        assert row["batch_entropy"] == pytest.approx(batch[c].item(), rel=tol, abs=tol)
        assert row["commitment"] == pytest.approx(commitment[c].item(), rel=tol)  # float32 sum over the tokens
        assert row["codes_used"] == int((counts[c] > 0).sum()) and row["tokens"] == int(keep.sum())
        assert row["mean_abs_z"] == pytest.approx(z[keep][:, c].abs().mean().item(), rel=tol)
        logits = 4 * tau * magnitude * z[keep][:, c]
        # a ratio of exact counts, rounded once to float32
        assert row["saturated_fraction"] == pytest.approx((logits.abs() > SATURATION_LOGIT).float().mean().item(),
                                                          rel=eps(torch.float32))
    # the upstream's own float32 loss, passed through (a rounding or two)
    assert sink.records[0]["aux_loss"] == pytest.approx(out.entropy_aux_loss.item(), rel=sum_tol(torch.float32, 2))
    assert torch.equal(mon.histogram("quantizer"), counts)


def test_newest_upstream_lfq_without_mask_matches_its_own_unclamped_terms():
    """At a small codebook the upstream's 1e-5 clamp never binds: its own breakdown is the reference."""
    latest = load_latest()
    torch.manual_seed(1)
    quantizer = latest.LFQ(dim=4, codebook_size=16, commitment_loss_weight=0.25)
    sink = MemorySink()
    x = torch.randn(2, 32, 4) * 0.01
    with LFQMonitor(quantizer, sink, diagnostics_every=1):
        _, terms = quantizer(x, inv_temperature=2.0, return_loss_breakdown=True)
    row = sink.records[0]
    tol = entropy_tol(x.reshape(-1, 1, 4), 2.0, 1.0)  # no projection: the latent is x, codes +-1
    assert row["per_sample_entropy"] == pytest.approx(terms.per_sample_entropy.item(), rel=tol, abs=tol)
    assert row["batch_entropy"] == pytest.approx(terms.batch_entropy.item(), rel=tol, abs=tol)
    assert row["commitment"] == pytest.approx(terms.commitment.item(), rel=tol)


def test_diagnostics_only_on_diagnostic_steps_and_usage_every_step():
    latest = load_latest()
    quantizer = latest.LFQ(dim=4, codebook_size=16)
    sink = MemorySink()
    with LFQMonitor(quantizer, sink, diagnostics_every=3, alarms=False) as mon:
        for step in range(7):
            mon.set_step(step)
            quantizer(torch.randn(1, 8, 4))
    measured = [r["step"] for r in sink.records if not math.isnan(r["batch_entropy"])]
    assert measured == [0, 3, 6]
    assert all(r["tokens"] == 8 and math.isfinite(r["bit_entropy"]) for r in sink.records)
    assert all(math.isnan(r["saturated_fraction"]) == (r["step"] % 3 != 0) for r in sink.records)


def test_residual_lfq_is_watched_per_layer():
    latest = load_latest()
    torch.manual_seed(2)
    rlfq = latest.ResidualLFQ(dim=4, codebook_size=16, num_quantizers=3)
    sink = MemorySink()
    with LFQMonitor(rlfq, sink, diagnostics_every=1) as mon:
        assert mon.layers == ["layers.0", "layers.1", "layers.2"]
        _, indices, _ = rlfq(torch.randn(2, 12, 4))
    for q in range(3):
        row = next(r for r in sink.records if r["layer"] == f"layers.{q}")
        counts = histogram(indices[..., q], 1, 16)
        assert row["codes_used"] == int((counts > 0).sum())
        assert torch.equal(mon.histogram(f"layers.{q}"), counts)
        assert math.isfinite(row["batch_entropy"]) and math.isfinite(row["saturated_fraction"])


def test_fsq_and_vector_quantize_usage_equals_the_indices_histogram():
    latest = load_latest()
    torch.manual_seed(3)
    fsq = latest.FSQ(levels=[8, 5, 5], dim=3)
    vq = latest.VectorQuantize(dim=3, codebook_size=32)
    model = nn.ModuleDict({"fsq": fsq, "vq": vq})
    sink = MemorySink()
    x = torch.randn(2, 20, 3)
    mask = torch.rand(2, 20) > 0.4
    with LFQMonitor(model, sink) as mon:
        assert mon.layers == ["fsq", "vq"]
        _, fsq_indices = fsq(x)
        _, vq_indices, vq_loss = vq(x, mask=mask)  # masked tokens come back as index -1
    fsq_row = next(r for r in sink.records if r["layer"] == "fsq")
    vq_row = next(r for r in sink.records if r["layer"] == "vq")
    assert fsq_row["codebook_size"] == 200 and fsq_row["tokens"] == 40
    assert torch.equal(mon.histogram("fsq"), histogram(fsq_indices, 1, 200))
    assert vq_row["tokens"] == int(mask.sum())
    assert torch.equal(mon.histogram("vq"), histogram(vq_indices, 1, 32, mask))
    assert vq_row["aux_loss"] == pytest.approx(vq_loss.item(), rel=sum_tol(torch.float32, 2))  # its float32 loss, passed through
    assert math.isnan(vq_row["bit_entropy"]) and math.isnan(fsq_row["saturated_fraction"])


class MagvitStyleLFQ(nn.Module):
    """A user's binary quantizer with its own return convention (quantized, aux, indices)."""

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = bits

    def forward(self, z: torch.Tensor):
        q = torch.where(z > 0, 1.0, -1.0)
        weights = 2 ** torch.arange(self.bits - 1, -1, -1)
        return q, torch.zeros(()), ((q > 0).long() * weights).sum(-1)


def test_binary_adapter_on_a_user_quantizer():
    torch.manual_seed(4)
    bits, tau = 6, 0.5
    model = nn.Sequential(nn.Linear(4, bits), MagvitStyleLFQ(bits))
    adapter = BinaryAdapter(codebook_size=2**bits, inv_temperature=tau, indices=lambda out: out[2])
    sink = MemorySink()
    x = torch.randn(5, 7, 4)
    with LFQMonitor(model, sink, adapters={"1": adapter}, diagnostics_every=1) as mon:
        assert mon.layers == ["1"]
        _, _, indices = model(x)
    z = model[0](x).detach().reshape(-1, 1, bits)
    codes = torch.tensor([[1.0 if (j >> (bits - 1 - i)) & 1 else -1.0 for i in range(bits)] for j in range(2**bits)])
    per_sample, batch = dense_terms(z, codes, tau, None)
    row = sink.records[0]
    tol = entropy_tol(z, tau, 1.0)
    assert row["per_sample_entropy"] == pytest.approx(per_sample.item(), rel=tol, abs=tol)
    assert row["batch_entropy"] == pytest.approx(batch.item(), rel=tol, abs=tol)
    counts = histogram(indices, 1, 2**bits)
    assert torch.equal(mon.histogram("1"), counts)
    freq = [((indices >> (bits - 1 - i)) & 1).float().mean().item() for i in range(bits)]
    # ratios of exact counts, rounded once to float32 in freq
    assert [row[f"bit_frequency_{i}"] for i in range(bits)] == pytest.approx(freq, rel=eps(torch.float32))


def test_adapter_errors_say_what_was_wrong():
    with pytest.raises(ValueError, match="codebook_size must be a power of 2"):
        BinaryAdapter(codebook_size=100)
    model = nn.Sequential(nn.Linear(4, 6), MagvitStyleLFQ(6))
    with pytest.raises(ValueError, match=r"adapters name modules \['2'\]"):
        LFQMonitor(model, MemorySink(), adapters={"2": BinaryAdapter(codebook_size=64)})
    with pytest.raises(ValueError, match="adapters maps a module path"):
        LFQMonitor(model, MemorySink(), adapters={"1": "lfq"})
    adapter = BinaryAdapter(codebook_size=64, indices=lambda o: o[2], latent=lambda m, args, kw: args[0][..., :4])
    mon = LFQMonitor(model, MemorySink(), adapters={"1": adapter}, diagnostics_every=1)
    with pytest.raises(ValueError, match="num_codebooks \\* bits = 6 channels"):
        model(torch.randn(2, 3, 4))
    mon.detach(flush=False)
