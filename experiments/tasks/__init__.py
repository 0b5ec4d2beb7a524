"""Training tasks: each module builds a dataset and an autoencoder with a quantizer bottleneck.

A task module provides ``build_dataset(config) -> Dataset`` and ``build_model(config) -> nn.Module``.
A dataset has ``val`` (a fixed tensor of validation examples in [0, 1]) and
``train_batch(generator, batch_size)``; a model maps a batch to ``ModelOutput``. The training
loop shared by all tasks is :func:`experiments.train.run`.
"""

from __future__ import annotations

from types import ModuleType
from typing import NamedTuple

from torch import Tensor


class ModelOutput(NamedTuple):
    recon: Tensor  # same shape as the input batch
    aux_loss: Tensor  # scalar: the quantizer's auxiliary loss (0 in eval mode)
    indices: Tensor  # code indices, for inspection


def get_task(name: str) -> ModuleType:
    # Imported lazily: the patches task pulls in scikit-image, which the synthetic task never needs.
    if name == "synthetic":
        from experiments.tasks import synthetic

        return synthetic
    if name == "patches":
        from experiments.tasks import patches

        return patches
    if name == "images":
        from experiments.tasks import images

        return images
    raise ValueError(f"task={name!r} is unknown: expected 'images', 'synthetic' or 'patches'")
