"""This rank's batches for the training loop (``experiments.train``): its shard of every global
training batch, on the device, and its share of the validation set.

How a dataset orders its batches is ``experiments.data``'s; this module only hands them to the loop.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from experiments import distributed as ddp
from experiments.config import Config

VAL_BATCH = 256


class Batches:
    """This rank's training batches on the device, and its share of the validation set.

    In-memory datasets move to the device once and draw with the run's data generator; file
    datasets come through a DataLoader whose order is a function of the seed and the step.
    Files that cannot be read are reported once each, on the main rank.
    """

    def __init__(self, dataset: Any, config: Config, device: torch.device, start: int, rows: slice,
                 data_rng: torch.Generator, run_id: str):
        self.dataset, self.config, self.device, self.rows, self.data_rng = dataset, config, device, rows, data_rng
        self.run_id, self.unreadable = run_id, set()
        self.from_files = hasattr(dataset, "train_loader")
        if self.from_files:
            self._to_input = dataset.to_model_input
            self._train = iter(dataset.train_loader(config, device, start, rows))
            self._val = dataset.val_loader(config, device, ddp.rank(), ddp.world_size(), VAL_BATCH)
        elif hasattr(dataset, "to"):
            dataset.to(device)

    def _report(self, reasons: list[str]) -> None:
        for reason in reasons:
            if reason not in self.unreadable:
                self.unreadable.add(reason)
                print(f"[{self.run_id}] skipping an unreadable image: {reason}", flush=True)

    def _from_loader(self, item: tuple[torch.Tensor, list[str]]) -> torch.Tensor:
        crops, bad = item
        self._report(bad)
        return self._to_input(crops.to(self.device, non_blocking=True))

    def train(self) -> torch.Tensor:
        if self.from_files:
            return self._from_loader(next(self._train))
        return self.dataset.train_batch(self.data_rng, self.config.data.batch_size)[self.rows].to(self.device)

    def val(self) -> Iterator[torch.Tensor]:
        if self.from_files:
            for item in self._val:
                yield self._from_loader(item)
            return
        shard = self.dataset.val.tensor_split(ddp.world_size())[ddp.rank()]
        for i in range(0, len(shard), VAL_BATCH):
            yield shard[i:i + VAL_BATCH].to(self.device)


def dataset_value_range(dataset: Any) -> tuple[float, float]:
    """The range the task's data lies in (PSNR's peak is its width); [0, 1] unless the task says."""
    return tuple(getattr(dataset, "value_range", (0.0, 1.0)))
