"""Evaluation over the whole validation set: reconstruction (MSE, PSNR, SSIM, rFID with the user's
Inception weights; for videos also per frame, and rFVD with the user's I3D weights) and codebook
utilization from the histogram of every validation token, summed over ranks, with the usage ceiling
1 - exp(-N/K) (for videos also of the first frame's tokens and the later frames' apart);
docs/training.md defines every ``val_*`` column.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from experiments import distributed as ddp
from experiments.video_tokenizer import frames_as_images
from lfq.records import usage_ceiling


def code_histogram(indices: Tensor, num_codebooks: int, codebook_size: int) -> Tensor:
    """(num_codebooks, codebook_size) int64 counts of ``indices`` (last axis = codebook when several)."""
    flat = indices.reshape(-1, num_codebooks).long()
    offsets = torch.arange(num_codebooks, device=flat.device) * codebook_size
    return torch.bincount((flat + offsets).reshape(-1), minlength=num_codebooks * codebook_size).view(
        num_codebooks, codebook_size)


# A usage measured from fewer tokens per code than this is capped by the count (ceiling < 0.982).
CAPPED_BELOW = 4.0


VIDEO_PARTS = ("first_frame", "later_frames")  # token step 0 (frame 0 alone), token steps 1.. (the rest)


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


def part_figures(counts: Tensor, part: str) -> dict[str, float]:
    """``usage_figures`` of one part of a video's tokens, each column suffixed ``_<part>``."""
    figures = usage_figures(counts)
    keys = ("val_tokens", "val_tokens_per_code", "val_usage_ceiling", "val_codes_used", "val_usage_fraction",
            "val_perplexity")
    return {f"{k}_{part}": figures[k] for k in keys}


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[Tensor], *, device: torch.device, value_range: tuple[float, float],
             is_image: bool, autocast: Callable[[], Any] | None = None,
             fid: FrechetDistance | None = None, fvd: FrechetDistance | None = None) -> dict[str, float]:
    """Reconstruction and utilization over ``batches`` (this rank's share of the validation set).

    Video batches (b, 3, T, H, W) add per-frame PSNR and SSIM, the usage of the first token step's
    tokens and of the later steps' apart (``VIDEO_PARTS``), rFID over the frames as images and rFVD
    (``fvd``) over the clips. ``autocast``: a factory of the forward pass's autocast context."""
    import contextlib

    from torchmetrics.functional.image import structural_similarity_index_measure

    quantizer = model.quantizer
    num_codebooks, codebook_size = quantizer.num_codebooks, quantizer.codebook_size
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # squared error, values, ssim sum
    count = torch.zeros((), dtype=torch.float64, device=device)  # images
    counts = torch.zeros(num_codebooks, codebook_size, dtype=torch.int64, device=device)
    frames = None  # video: per frame (squared error, values, ssim sum); the two parts' histograms
    parts = torch.zeros(2, num_codebooks, codebook_size, dtype=torch.int64, device=device)
    try:
        for batch in batches:
            if batch.shape[0] == 0:
                continue
            with autocast() if autocast is not None else contextlib.nullcontext():
                out = model(batch)
            recon = out.recon.float()
            sums[0] += (recon - batch).pow(2).sum().double()
            sums[1] += batch.numel()
            video = batch.dim() == 5
            if video and frames is None:
                frames = torch.zeros(3, batch.shape[2], dtype=torch.float64, device=device)
            if video:
                frames[0] += (recon - batch).pow(2).sum(dim=(0, 1, 3, 4)).double()
                frames[1] += batch[:, :, 0].numel()
            if is_image:
                images, real = (frames_as_images(recon), frames_as_images(batch)) if video else (recon, batch)
                ssim = structural_similarity_index_measure(images.clamp(*value_range), real, reduction="none",
                                                           data_range=value_range).double()
                if video:
                    ssim = ssim.view(batch.shape[0], batch.shape[2])
                    frames[2] += ssim.sum(0)
                    ssim = ssim.mean(1)  # a clip's SSIM: the mean of its frames'
                sums[2] += ssim.sum()
            count += batch.shape[0]
            counts += code_histogram(out.indices, num_codebooks, codebook_size)
            if video:
                parts[0] += code_histogram(out.indices[:, :1], num_codebooks, codebook_size)
                parts[1] += code_histogram(out.indices[:, 1:], num_codebooks, codebook_size)
            if fid is not None:
                fid.update(*((frames_as_images(batch), frames_as_images(recon)) if video else (batch, recon)),
                           value_range)
            if fvd is not None and video:
                fvd.update(batch, recon, value_range)
    finally:
        model.train(was_training)
    if ddp.is_distributed():
        sums, count, counts, parts = ddp.all_sum(sums), ddp.all_sum(count), ddp.all_sum(counts), ddp.all_sum(parts)
        frames = ddp.all_sum(frames) if frames is not None else None
    peak = value_range[1] - value_range[0]

    def psnr(mse: float) -> float:
        return 10 * math.log10(peak**2 / mse) if mse > 0 else math.inf

    mse = (sums[0] / sums[1]).item()
    out: dict[str, float] = {"val_mse": mse, "val_psnr": psnr(mse)}
    if is_image:
        out["val_ssim"] = (sums[2] / count).item()
    out.update(usage_figures(counts))
    if frames is not None:
        for part, histogram in zip(VIDEO_PARTS, parts, strict=True):
            if histogram.sum() > 0:
                out.update(part_figures(histogram, part))
        for t in range(frames.shape[1]):
            out[f"val_psnr_frame{t}"] = psnr((frames[0, t] / frames[1, t]).item())
            if is_image:
                out[f"val_ssim_frame{t}"] = (frames[2, t] / count).item()
    if fid is not None:
        out["val_rfid"] = fid.compute()
        fid.metric.reset()
    if fvd is not None and frames is not None:
        out["val_rfvd"] = fvd.compute()
        fvd.metric.reset()
    return out
