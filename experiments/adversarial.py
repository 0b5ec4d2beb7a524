"""The adversarial half of the tokenizer objective: discriminators trained from scratch, the hinge
losses, VQGAN's adaptive weight and MAGVIT-v2's LeCAM regulariser (docs/training.md, "Objective").

Two discriminators, both initialised here (no pretrained weights): ``patchgan``, the PatchGAN of
pix2pix that VQGAN and Open-MAGVIT2 train against (one logit per overlapping patch), and
``stylegan``, the residual network with blurred downsampling that MAGVIT-v2 uses (one logit per
image). Input images are in [-1, 1], shape ``(batch, channels, height, width)``.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

DISCRIMINATORS = ("patchgan", "stylegan")
LEAK = 0.2  # LeakyReLU slope of both designs
ADAPTIVE_EPS = 1e-4  # VQGAN's: the adaptive weight is |grad rec| / (|grad adv| + 1e-4), clamped to [0, 1e4]
ADAPTIVE_MAX = 1e4


def _init_patchgan(module: nn.Module) -> None:
    """pix2pix's initialisation: convolutions N(0, 0.02), batch-norm scales N(1, 0.02) and shifts 0."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class PatchGAN(nn.Module):
    """pix2pix's PatchGAN: ``layers`` stride-2 4x4 convolutions (width doubling up to 8x), one stride-1
    convolution and a 1-channel 4x4 output; batch norm after every convolution but the first and last.
    Returns a logit map ``(batch, 1, h', w')``: a 70x70 receptive field per logit at 3 layers."""

    def __init__(self, in_channels: int = 3, width: int = 64, layers: int = 3) -> None:
        super().__init__()
        if layers < 1:
            raise ValueError(f"PatchGAN layers={layers} is invalid: must be >= 1")
        blocks: list[nn.Module] = [nn.Conv2d(in_channels, width, 4, stride=2, padding=1), nn.LeakyReLU(LEAK)]
        mult = 1
        for n in range(1, layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < layers else 1
            blocks += [nn.Conv2d(width * prev, width * mult, 4, stride=stride, padding=1, bias=False),
                       nn.BatchNorm2d(width * mult), nn.LeakyReLU(LEAK)]
        blocks.append(nn.Conv2d(width * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*blocks)
        self.apply(_init_patchgan)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.main(images)


class BlurDownsample(nn.Module):
    """Halve height and width after a [1, 3, 3, 1] binomial blur (StyleGAN's anti-aliased resampling)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        taps = torch.tensor([1.0, 3.0, 3.0, 1.0])
        kernel = torch.outer(taps, taps)
        self.register_buffer("kernel", (kernel / kernel.sum()).expand(channels, 1, 4, 4).clone(), persistent=False)
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), self.kernel.to(x.dtype), stride=2,
                        groups=self.channels)


class ResidualDown(nn.Module):
    """conv3x3 -> LeakyReLU -> blur-downsample -> conv3x3 -> LeakyReLU, beside a blur-downsampled 1x1
    skip; the sum is scaled by 1/sqrt(2) so that the variance stays put through the blocks."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cin, 3, padding=1)
        self.down = BlurDownsample(cin)
        self.conv2 = nn.Conv2d(cin, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.conv1(x), LEAK)
        h = F.leaky_relu(self.conv2(self.down(h)), LEAK)
        return (h + self.skip(self.down(x))) / math.sqrt(2.0)


class StyleGANDiscriminator(nn.Module):
    """MAGVIT-v2's discriminator: a 3x3 stem, residual blocks with blurred downsampling (one per
    entry of ``channel_mults`` that keeps the map at least 4 px), a 3x3 convolution and two dense
    layers to one logit per image, shape ``(batch, 1)``."""

    def __init__(self, in_channels: int = 3, resolution: int = 32, width: int = 64,
                 channel_mults: tuple[int, ...] = (2, 4, 4, 4, 4)) -> None:
        super().__init__()
        if resolution < 4 or resolution & (resolution - 1):
            raise ValueError(f"stylegan discriminator resolution={resolution} is invalid: must be a power of two >= 4")
        blocks = min(len(channel_mults), int(math.log2(resolution)) - 2)
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1)
        chans = [width, *(width * m for m in channel_mults[:blocks])]
        self.blocks = nn.Sequential(*(ResidualDown(a, b) for a, b in itertools.pairwise(chans)))
        self.final_conv = nn.Conv2d(chans[-1], chans[-1], 3, padding=1)
        side = resolution >> blocks
        self.dense = nn.Linear(chans[-1] * side * side, chans[-1])
        self.out = nn.Linear(chans[-1], 1)
        self.resolution = resolution

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-1] != self.resolution or images.shape[-2] != self.resolution:
            raise ValueError(f"stylegan discriminator built for {self.resolution} px got images of "
                             f"{tuple(images.shape[-2:])}: build it with the data's resolution")
        h = F.leaky_relu(self.stem(images), LEAK)
        h = F.leaky_relu(self.final_conv(self.blocks(h)), LEAK)
        return self.out(F.leaky_relu(self.dense(h.flatten(1)), LEAK))


def build_discriminator(kind: str, *, in_channels: int = 3, resolution: int = 32, width: int = 64) -> nn.Module:
    if kind == "patchgan":
        return PatchGAN(in_channels, width)
    if kind == "stylegan":
        return StyleGANDiscriminator(in_channels, resolution, width)
    raise ValueError(f"discriminator {kind!r} is unknown: must be one of {list(DISCRIMINATORS)}")


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """The discriminator's hinge loss, 0.5 (E[relu(1 - D(x))] + E[relu(1 + D(G(z)))])."""
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def hinge_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """The generator's side of the hinge game, -E[D(G(z))]."""
    return -fake_logits.mean()


def non_saturating_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """The non-saturating generator loss Open-MAGVIT2 trains with, E[softplus(-l)], where l is each
    image's mean logit (a patch map is averaged per image first)."""
    return F.softplus(-fake_logits.flatten(1).mean(dim=1)).mean()


GENERATOR_LOSSES = {"hinge": hinge_g_loss, "non_saturating": non_saturating_g_loss}


def adaptive_weight(rec_loss: torch.Tensor, adv_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """VQGAN's balance: ||d rec / d W|| / (||d adv / d W|| + 1e-4) at the decoder's last weight W,
    clamped to [0, 1e4] and detached. Both gradients keep the graph, for the backward that follows."""
    rec_grad, = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)
    adv_grad, = torch.autograd.grad(adv_loss, last_layer, retain_graph=True)
    weight = rec_grad.float().norm() / (adv_grad.float().norm() + ADAPTIVE_EPS)
    return weight.clamp(0.0, ADAPTIVE_MAX).detach()


class LeCAM(nn.Module):
    """MAGVIT-v2's LeCAM regulariser (Tseng et al. 2021) with its logit averages as buffers, so they
    travel in the checkpoint: E[relu(D(x) - ema_fake)^2] + E[relu(ema_real - D(G(z)))^2], where the
    exponential moving averages of the mean real and fake logits decay by ``decay`` per step."""

    def __init__(self, decay: float = 0.999) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"LeCAM decay={decay} is invalid: must be in [0, 1)")
        self.decay = decay
        self.register_buffer("ema_real", torch.zeros(()))
        self.register_buffer("ema_fake", torch.zeros(()))

    def forward(self, real_logits: torch.Tensor, fake_logits: torch.Tensor,
                means: torch.Tensor | None = None) -> torch.Tensor:
        """The averages updated with this batch (as LeCAM's and Open-MAGVIT2's code do), then the penalty.
        ``means``: the batch's mean real and fake logits to average in, when they are not this call's
        (under DDP, the global batch's, so that every rank keeps the same averages)."""
        if means is None:
            means = torch.stack([real_logits.detach().float().mean(), fake_logits.detach().float().mean()])
        with torch.no_grad():
            self.ema_real.mul_(self.decay).add_((1 - self.decay) * means[0])
            self.ema_fake.mul_(self.decay).add_((1 - self.decay) * means[1])
        real_ref = self.ema_real.to(real_logits.dtype)
        fake_ref = self.ema_fake.to(fake_logits.dtype)
        return F.relu(real_logits - fake_ref).pow(2).mean() + F.relu(real_ref - fake_logits).pow(2).mean()
