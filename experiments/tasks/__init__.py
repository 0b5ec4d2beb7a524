"""The registry of training tasks, ``TASKS`` (name -> the module that builds its dataset and its
model, an autoencoder with a quantizer bottleneck or a token prior, and optional smoke sizes), and :func:`get_task`;
docs/ARCHITECTURE.md ("Registries") gives the rules and docs/experiments.md how to add a task.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any, NamedTuple

from torch import Tensor


class ModelOutput(NamedTuple):
    recon: Tensor  # same shape as the input batch
    aux_loss: Tensor  # scalar: the quantizer's auxiliary loss (0 in eval mode)
    indices: Tensor  # code indices, for inspection


@dataclass(frozen=True)
class Task:
    module: str  # dotted name of the module with build_dataset, build_model (and check)
    # At scale=smoke, beyond the shrinking every task gets (Config.resolved): config -> {section: {field: value}}.
    smoke: Callable[[Any], dict[str, dict[str, Any]]] | None = None


def _images_smoke(config: Any) -> dict[str, dict[str, Any]]:
    """A tokenizer of any preset shrinks to a few seconds on a CPU."""
    m = config.model
    return {"data": {"resolution": min(config.data.resolution, 32)},
            "model": {"base_channels": min(m.base_channels or 16, 16), "num_res_blocks": 1,
                      "ch_mult": None if m.ch_mult is None else tuple(min(k, 2) for k in m.ch_mult)}}


def _prior_smoke(config: Any) -> dict[str, dict[str, Any]]:
    """A prior of any preset shrinks to a few seconds on a CPU, and so does its sampling."""
    m = config.model
    return {"model": {"width": min(m.width or 32, 32), "layers": min(m.layers or 1, 1),
                      "attention_heads": min(m.attention_heads or 2, 2)},
            "eval": {"prior_samples": min(config.eval.prior_samples, 16)}}
def _video_smoke(config: Any) -> dict[str, dict[str, Any]]:
    """The images tokenizer's shrinking, and clips of at most 1 + 2 temporal_downsample frames."""
    return {**_images_smoke(config),
            "data": {"resolution": min(config.data.resolution, 32),
                     "frames": min(config.data.frames, 1 + 2 * config.model.temporal_downsample)}}


TASKS: dict[str, Task] = {
    "images": Task("experiments.tasks.images", smoke=_images_smoke),  # a MAGVIT-v2-style tokenizer on images
    "synthetic": Task("experiments.tasks.synthetic"),  # an MLP on a Gaussian mixture: seconds
    "patches": Task("experiments.tasks.patches"),  # a small conv tokenizer on shipped image patches
    "prior": Task("experiments.tasks.prior", smoke=_prior_smoke),  # a token prior on a finished tokenizer's codes
    "video": Task("experiments.tasks.video", smoke=_video_smoke),  # a causal 3D tokenizer on clips
}


def get_task(name: str) -> ModuleType:
    """The module of task ``name``, imported now (only the task that runs pays for its imports)."""
    if name not in TASKS:
        raise ValueError(f"task={name!r} is unknown: expected one of {list(TASKS)}")
    module = importlib.import_module(TASKS[name].module)
    missing = [f for f in ("build_dataset", "build_model") if not callable(getattr(module, f, None))]
    if missing:
        raise TypeError(f"task {name!r}: {TASKS[name].module} has no {' or '.join(missing)}; a task module "
                        f"defines build_dataset(config) and build_model(config)")
    return module
