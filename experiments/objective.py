"""The tokenizer's loss beyond L1 + L2 (:class:`Objective`): LPIPS and the adversarial game, with the
discriminator's own optimiser, learning-rate schedule, gradient scaler and checkpoint state.

The training loop calls :meth:`Objective.generator_loss` inside the model's step (the terms added to
the reconstruction loss, VQGAN's adaptive weight included) and :meth:`Objective.discriminator_step`
after the model's update; both are no-ops for a run that asks for neither term (docs/training.md,
"Objective").
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from experiments import distributed as ddp
from experiments.adversarial import (
    GENERATOR_LOSSES,
    LeCAM,
    adaptive_weight,
    build_discriminator,
    hinge_d_loss,
)
from experiments.perceptual import LPIPS, WeightsError, linear_keys, read_state, trunk_keys
from experiments.sections import ConfigError
from experiments.video_tokenizer import frames_as_images

# Columns of the train rows the objective adds, where they apply (NaN before loss.disc_start)
ADVERSARIAL_KEYS = ("d_loss", "g_adv_loss", "adaptive_weight", "d_real", "d_fake", "lecam_loss")
PERCEPTUAL_KEYS = ("perceptual_loss",)


def check_objective(config: Any, task: Any) -> None:
    """What the objective can refuse before a run folder exists (ConfigError, one line): a term on a
    task that does not reconstruct images, a StyleGAN discriminator at a size it cannot take, a
    perceptual weights file that is missing or is not LPIPS's."""
    loss = config.loss
    if loss.adversarial_weight <= 0 and loss.perceptual_weight <= 0:
        return
    if not getattr(task, "RECONSTRUCTS_IMAGES", False):
        term = "loss.adversarial_weight" if loss.adversarial_weight > 0 else "loss.perceptual_weight"
        raise ConfigError(f"{term} applies to tasks that reconstruct images (task=images or video), not task={config.task}: "
                          f"set it to 0")
    resolution = config.data.resolution
    if loss.adversarial_weight > 0 and loss.disc == "stylegan" and (resolution < 4 or resolution & (resolution - 1)):
        raise ConfigError(f"loss.disc='stylegan' needs data.resolution a power of two >= 4, not {resolution}: "
                          f"use loss.disc=patchgan")
    if loss.perceptual_weight > 0:
        try:
            read_state(loss.perceptual_weights, {**trunk_keys(), **linear_keys()}, "loss.perceptual_weights")
        except WeightsError as err:
            raise ConfigError(f"{err} (python -m experiments.perceptual VGG16.pth LPIPS_VGG.pth --out FILE "
                              f"writes one from the published files)") from None


def last_layer(model: nn.Module) -> torch.Tensor:
    """The weight of the decoder's last convolution (or linear layer): where VQGAN's adaptive weight
    compares the two gradients."""
    decoder = getattr(model, "decoder", None)
    if decoder is None:
        raise ValueError(f"the adversarial loss needs a model with a decoder; {type(model).__name__} has none")
    weights = [m.weight for m in decoder.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.Linear))]
    if not weights:
        raise ValueError("the adversarial loss needs a decoder that ends in a convolution or a linear layer")
    return weights[-1]


def as_images(x: torch.Tensor) -> torch.Tensor:
    """Images as they are; video clips (b, c, t, h, w) as their b * t frames."""
    return frames_as_images(x) if x.dim() == 5 else x


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """The module's parameters take no gradient inside (they still pass gradients to its input)."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(module.parameters(), flags, strict=True):
            p.requires_grad_(flag)


class Objective:
    """LPIPS and the adversarial terms of one run; built on every rank, after the model."""

    def __init__(self, config: Any, model: nn.Module, device: torch.device, *, world: int,
                 grad_scaler: Callable[[], torch.amp.GradScaler], autocast: Callable[[], Any]) -> None:
        loss, self.config = config.loss, config
        self.autocast, self.world = autocast, world
        self.perceptual = None
        if loss.perceptual_weight > 0:
            self.perceptual = LPIPS.from_file(loss.perceptual_weights).to(device)
        self.disc = None
        self.keys: tuple[str, ...] = PERCEPTUAL_KEYS if self.perceptual is not None else ()
        self.last: dict[str, torch.Tensor] = {}
        if loss.adversarial_weight <= 0:
            return
        self.keys = (*self.keys, *ADVERSARIAL_KEYS)
        self.decoder_weight = last_layer(model)
        self.disc = build_discriminator(loss.disc, resolution=config.data.resolution, width=loss.disc_width).to(device)
        self.disc_net = self.disc if world == 1 else DistributedDataParallel(
            self.disc, device_ids=[device] if device.type == "cuda" else None)
        self.lecam = LeCAM(loss.lecam_decay).to(device) if loss.lecam_weight > 0 else None
        o = config.optim
        self.disc_lr = loss.disc_lr if loss.disc_lr is not None else o.lr
        self.optimizer = torch.optim.AdamW(self.disc.parameters(), lr=self.disc_lr, betas=(o.beta1, o.beta2),
                                           weight_decay=o.weight_decay)
        self.scaler = grad_scaler()

    @property
    def active(self) -> bool:
        return bool(self.keys)

    def adversarial_on(self, step: int) -> bool:
        return self.disc is not None and step > self.config.loss.disc_start

    def generator_loss(self, step: int, x: torch.Tensor, recon: torch.Tensor,
                       rec_loss: torch.Tensor) -> torch.Tensor:
        """The terms to add to ``rec_loss`` (float32): LPIPS, then the generator's adversarial term with
        its weight, adaptive or fixed; what they were is kept for the step's train row. Video clips
        (b, c, t, h, w) are seen as b * t images: every frame by LPIPS and the discriminator."""
        x, recon = as_images(x), as_images(recon)
        loss = self.config.loss
        nan = rec_loss.new_full((), math.nan)
        self.last = {k: nan for k in self.keys}
        extra = rec_loss.new_zeros(())
        if self.perceptual is not None:
            p = self.perceptual(recon.float(), x.float()).mean()
            extra = extra + loss.perceptual_weight * p
            self.last["perceptual_loss"] = p.detach()
        if not self.adversarial_on(step):
            return extra
        with frozen(self.disc), self.autocast():
            fake = self.disc(recon)
        g_adv = GENERATOR_LOSSES[loss.generator_loss](fake.float())
        if loss.adaptive_weight:
            weight = adaptive_weight(rec_loss + extra, g_adv, self.decoder_weight)
            if self.world > 1:  # one weight per step for every rank: the mean of theirs
                weight = ddp.all_sum(weight.reshape(1))[0] / self.world
            weight = weight * loss.adversarial_weight
        else:
            weight = rec_loss.new_tensor(loss.adversarial_weight)
        self.last.update(g_adv_loss=g_adv.detach(), adaptive_weight=weight.detach())
        return extra + weight * g_adv

    def discriminator_step(self, step: int, x: torch.Tensor, recon: torch.Tensor, lr_scale: float) -> None:
        """One update of the discriminator on this step's real images and (detached) reconstructions,
        one forward over both so that its batch statistics and DDP's one-forward rule hold."""
        if not self.adversarial_on(step):
            return
        x, recon = as_images(x), as_images(recon)
        loss = self.config.loss
        for group in self.optimizer.param_groups:
            group["lr"] = self.disc_lr * lr_scale
        with self.autocast():
            logits = self.disc_net(torch.cat([x, recon.detach().to(x.dtype)]))
        real, fake = logits.float().chunk(2)
        d_loss = hinge_d_loss(real, fake)
        total = d_loss
        if self.lecam is not None:
            means = torch.stack([real.detach().mean(), fake.detach().mean()])
            if self.world > 1:  # the global batch's means: every rank keeps the same averages
                means = ddp.all_sum(means) / self.world
            lecam = self.lecam(real, fake, means)
            total = total + loss.lecam_weight * lecam
            self.last["lecam_loss"] = lecam.detach()
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.last.update(d_loss=d_loss.detach(), d_real=real.mean().detach(), d_fake=fake.mean().detach())

    def logged(self) -> dict[str, float]:
        """The last step's values of :attr:`keys`, averaged over the ranks (NaN where not computed)."""
        if not self.keys:
            return {}
        values = torch.stack([self.last.get(k, torch.tensor(math.nan)).float().reshape(())
                              .to(self._device()) for k in self.keys])
        if self.world > 1:
            values = ddp.all_sum(values) / self.world
        return dict(zip(self.keys, values.tolist(), strict=True))

    def _device(self) -> torch.device:
        module = self.disc if self.disc is not None else self.perceptual
        return next(module.parameters()).device

    def state_dict(self) -> dict[str, Any] | None:
        """What a resume needs: the discriminator, its optimiser and scaler, LeCAM's averages."""
        if self.disc is None:
            return None
        return {"disc": self.disc.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                "lecam": self.lecam.state_dict() if self.lecam is not None else None}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if self.disc is None or state is None:
            return
        self.disc.load_state_dict(state["disc"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.lecam is not None and state.get("lecam") is not None:
            self.lecam.load_state_dict(state["lecam"])
