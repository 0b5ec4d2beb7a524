"""Evaluation over the whole validation set: reconstruction (MSE, PSNR, SSIM, rFID with the user's
Inception weights) and codebook utilization from the histogram of every validation token, summed
over ranks, with the usage ceiling 1 - exp(-N/K); docs/training.md defines every ``val_*`` column.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from experiments import distributed as ddp
from lfq.records import usage_ceiling


def code_histogram(indices: Tensor, num_codebooks: int, codebook_size: int) -> Tensor:
    """(num_codebooks, codebook_size) int64 counts of ``indices`` (last axis = codebook when several)."""
    flat = indices.reshape(-1, num_codebooks).long()
    offsets = torch.arange(num_codebooks, device=flat.device) * codebook_size
    return torch.bincount((flat + offsets).reshape(-1), minlength=num_codebooks * codebook_size).view(
        num_codebooks, codebook_size)


# A usage measured from fewer tokens per code than this is capped by the count (ceiling < 0.982).
CAPPED_BELOW = 4.0


def usage_figures(counts: Tensor) -> dict[str, float]:
    """Codes used, usage fraction, perplexity and the usage ceiling of a (num_codebooks, codebook_size) histogram."""
    counts = counts.double()
    total = counts.sum(-1)
    used = (counts > 0).sum(-1).double()
    p = counts / total.clamp(min=1)[:, None]
    entropy = -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(-1)
    perplexity = torch.where(total > 0, entropy.exp(), torch.full_like(entropy, math.nan))
    tokens, codebook_size = int(total[0].item()), counts.shape[-1]  # every codebook counts every token once
    out: dict[str, float] = {
        "val_tokens": tokens,
        "val_tokens_per_code": tokens / codebook_size,
        "val_usage_ceiling": usage_ceiling(tokens, codebook_size),
        "val_codes_used": used.mean().item(),
        "val_usage_fraction": (used / counts.shape[-1]).mean().item(),
        "val_perplexity": perplexity.mean().item(),
    }
    if counts.shape[0] > 1:
        for c in range(counts.shape[0]):
            out[f"val_codes_used_c{c}"] = used[c].item()
            out[f"val_usage_fraction_c{c}"] = (used[c] / counts.shape[-1]).item()
            out[f"val_perplexity_c{c}"] = perplexity[c].item()
    return out


class FrechetDistance:
    """rFID through torchmetrics, with any feature extractor (an ``nn.Module`` with ``num_features``)."""

    def __init__(self, extractor: nn.Module, device: torch.device):
        from torchmetrics.image.fid import FrechetInceptionDistance

        self.metric = FrechetInceptionDistance(feature=extractor, normalize=True).to(device)

    def update(self, real: Tensor, fake: Tensor, value_range: tuple[float, float]) -> None:
        self.add(real, value_range, real=True)
        self.add(fake, value_range, real=False)

    def add(self, images: Tensor, value_range: tuple[float, float], *, real: bool) -> None:
        """One side only (gFID: the real and the generated sets need not be the same size)."""
        lo, hi = value_range
        self.metric.update(((images.float() - lo) / (hi - lo)).clamp(0, 1), real=real)

    def compute(self) -> float:
        return float(self.metric.compute())


def inception_extractor(weights: str) -> nn.Module:
    """torch-fidelity's InceptionV3 (the FID standard) with the user's local weights file.

    Needs ``torch-fidelity`` (the ``fid`` extra), which depends on torchvision: install it with
    the torchvision that matches your torch. Nothing is downloaded.
    """
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError as e:
        raise RuntimeError("eval.rfid_weights needs torch-fidelity: pip install torch-fidelity (with the "
                           "torchvision that matches your torch)") from e

    class Inception(nn.Module):
        num_features = 2048

        def __init__(self) -> None:
            super().__init__()
            self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                                   feature_extractor_weights_path=weights)

        def forward(self, x: Tensor) -> Tensor:
            return self.net(x)[0].reshape(x.shape[0], -1)

    return Inception()


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[Tensor], *, device: torch.device, value_range: tuple[float, float],
             is_image: bool, autocast: Callable[[], Any] | None = None,
             fid: FrechetDistance | None = None) -> dict[str, float]:
    """Reconstruction and utilization over ``batches`` (this rank's share of the validation set).

    ``autocast``: a factory of the forward pass's autocast context (the run's precision)."""
    import contextlib

    from torchmetrics.functional.image import structural_similarity_index_measure

    quantizer = model.quantizer
    num_codebooks, codebook_size = quantizer.num_codebooks, quantizer.codebook_size
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # squared error, values, ssim sum
    count = torch.zeros((), dtype=torch.float64, device=device)  # images
    counts = torch.zeros(num_codebooks, codebook_size, dtype=torch.int64, device=device)
    try:
        for batch in batches:
            if batch.shape[0] == 0:
                continue
            with autocast() if autocast is not None else contextlib.nullcontext():
                out = model(batch)
            recon = out.recon.float()
            sums[0] += (recon - batch).pow(2).sum().double()
            sums[1] += batch.numel()
            if is_image:
                ssim = structural_similarity_index_measure(recon.clamp(*value_range), batch, reduction="none",
                                                           data_range=value_range)
                sums[2] += ssim.double().sum()
            count += batch.shape[0]
            counts += code_histogram(out.indices, num_codebooks, codebook_size)
            if fid is not None:
                fid.update(batch, recon, value_range)
    finally:
        model.train(was_training)
    if ddp.is_distributed():
        sums, count, counts = ddp.all_sum(sums), ddp.all_sum(count), ddp.all_sum(counts)
    mse = (sums[0] / sums[1]).item()
    peak = value_range[1] - value_range[0]
    out: dict[str, float] = {"val_mse": mse, "val_psnr": 10 * math.log10(peak**2 / mse) if mse > 0 else math.inf}
    if is_image:
        out["val_ssim"] = (sums[2] / count).item()
    out.update(usage_figures(counts))
    if fid is not None:
        out["val_rfid"] = fid.compute()
        fid.metric.reset()
    return out
