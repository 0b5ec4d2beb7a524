"""vector-quantize-pytorch's own LFQ tests and README examples, with the import changed.

Ported (rewritten, same inputs and assertions) from its ``tests/test_readme.py`` (1.14.23
onwards: ``test_lfq``, ``test_lfq_video``, ``test_lfq2``), ``tests/test_lfq.py`` (the
newest: ``test_masked_lfq``, ``test_lfq_bruteforce_frac_per_sample_entropy``) and the LFQ
section of the 1.14.12 README. Each runs in our default mode and in ``"reference"``; the
newest upstream's ``test_lfq`` runs with its ``spherical`` and ``codebook_scale``
parameters. The dense ``"reference"`` runs at 2**16 codes take seconds: marked slow.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

import lfq

MODES = [pytest.param("default", id="default"), pytest.param("reference", id="reference", marks=pytest.mark.slow)]


def lfq_class(mode: str):
    """``from vector_quantize_pytorch import LFQ`` becomes this."""
    return lfq.LFQ if mode == "default" else functools.partial(lfq.LFQ, entropy_mode=mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("spherical", [True, False])
@pytest.mark.parametrize("codebook_scale", [1.0, 0.5])
def test_lfq(mode: str, spherical: bool, codebook_scale: float) -> None:
    LFQ = lfq_class(mode)
    quantizer = LFQ(codebook_size=65536, dim=16, entropy_loss_weight=0.1, diversity_gamma=1.0,
                    spherical=spherical, codebook_scale=codebook_scale)
    image_feats = torch.randn(1, 16, 32, 32)
    quantized, indices, entropy_aux_loss = quantizer(image_feats, inv_temperature=100.0)
    assert image_feats.shape == quantized.shape and indices.shape == (1, 32, 32)
    assert entropy_aux_loss.ndim == 0 and torch.isfinite(entropy_aux_loss)
    assert (quantized == quantizer.indices_to_codes(indices)).all()


@pytest.mark.parametrize("mode", MODES)
def test_lfq_video_and_sequences(mode: str) -> None:
    LFQ = lfq_class(mode)
    quantizer = LFQ(codebook_size=65536, dim=16, entropy_loss_weight=0.1, diversity_gamma=1.0)
    seq = torch.randn(1, 32, 16)
    quantized, *_ = quantizer(seq)
    assert seq.shape == quantized.shape
    video_feats = torch.randn(1, 16, 10, 8, 8)  # upstream: 10 x 32 x 32; smaller for the dense mode
    quantized, indices, _ = quantizer(video_feats)
    assert video_feats.shape == quantized.shape and indices.shape == (1, 10, 8, 8)


@pytest.mark.parametrize("mode", MODES)
def test_lfq_multiple_codebooks(mode: str) -> None:
    LFQ = lfq_class(mode)
    quantizer = LFQ(codebook_size=4096, dim=16, num_codebooks=4)  # 4 x 12 bits, projected from 16
    image_feats = torch.randn(1, 16, 32, 32)
    quantized, indices, entropy_aux_loss = quantizer(image_feats)
    assert image_feats.shape == quantized.shape and indices.shape == (1, 32, 32, 4)
    assert (quantized == quantizer.indices_to_codes(indices)).all()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("frac_per_sample_entropy", [1.0, 0.5])
@pytest.mark.parametrize("mask", [[False, False], [True, False], [True, True]], ids=str)
def test_masked_lfq(mode: str, frac_per_sample_entropy: float, mask: list[bool]) -> None:
    """One mask flag per sample, shape (b,), as upstream's test passes it."""
    LFQ = lfq_class(mode)
    quantizer = LFQ(codebook_size=65536, dim=16, entropy_loss_weight=0.1, diversity_gamma=1.0,
                    frac_per_sample_entropy=frac_per_sample_entropy)
    image_feats = torch.randn(2, 16, 32, 32)
    ret, breakdown = quantizer(image_feats, inv_temperature=100.0, return_loss_breakdown=True,
                               mask=torch.tensor(mask))
    quantized, indices, aux_loss = ret
    assert (quantized == quantizer.indices_to_codes(indices)).all()
    assert torch.isfinite(aux_loss) and all(torch.isfinite(t) for t in breakdown)  # 1.14.12: NaN for 2 of 6
    if not any(mask):
        assert aux_loss.item() == 0.0


@pytest.mark.parametrize("mask", [None, "per-sample"])
def test_lfq_bruteforce_frac_per_sample_entropy(mask: str | None) -> None:
    """The frac subset's per-sample entropy is an unbiased estimate of the full one.

    Upstream's test uses 2 samples and mask [True, False]; under 1.14.12's per-sample
    semantics (ours) the subset is drawn over kept samples, and int(1 * 0.1) = 0 of them
    would be drawn, so the per-sample case here keeps 10 of 20 samples and draws 2.
    """
    torch.manual_seed(0)
    iters, frac = 10, 0.1 if mask is None else 0.2
    batch = 2 if mask is None else 20
    image_feats = torch.randn(batch, 16, 8, 8) if mask else torch.randn(2, 16, 32, 32)
    keep = None if mask is None else torch.arange(batch) % 2 == 0
    kwargs = dict(codebook_size=65536, dim=16, entropy_loss_weight=0.1, diversity_gamma=1.0)
    full = lfq.LFQ(frac_per_sample_entropy=1.0, **kwargs)
    partial = lfq.LFQ(frac_per_sample_entropy=frac, **kwargs)
    _, breakdown = full(image_feats, inv_temperature=100.0, return_loss_breakdown=True, mask=keep)
    losses = torch.zeros(iters)
    for i in range(iters):
        ret, breakdown_i = partial(image_feats, inv_temperature=100.0, return_loss_breakdown=True, mask=keep)
        assert (ret.quantized == partial.indices_to_codes(ret.indices)).all()
        losses[i] = breakdown_i.per_sample_entropy
    assert losses.std() > 0  # different subsets each call
    assert abs(losses.mean() - breakdown.per_sample_entropy) < 1.96 * losses.std() / math.sqrt(iters)


@pytest.mark.parametrize("mode", MODES)
def test_readme_1_14_12_example(mode: str) -> None:
    """The LFQ section of the 1.14.12 README, with its shape comments as assertions."""
    LFQ = lfq_class(mode)
    quantizer = LFQ(codebook_size=65536, dim=16, entropy_loss_weight=0.1, diversity_gamma=1.0)
    image_feats = torch.randn(1, 16, 32, 32)
    quantized, indices, entropy_aux_loss = quantizer(image_feats, inv_temperature=100.0)
    # (1, 16, 32, 32), (1, 32, 32), (1,)
    assert quantized.shape == (1, 16, 32, 32) and indices.shape == (1, 32, 32)
    assert image_feats.shape == quantized.shape
    assert (quantized == quantizer.indices_to_codes(indices)).all()
