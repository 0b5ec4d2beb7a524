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
    Files that cannot be read are reported once each, on the main rank; of the training files
    smaller than ``data.resolution`` (``data.min_size``) the first is reported and all are counted
    (``small``). The dataset's own notes (its validation files, printed by its ``describe``) are
    counted too, not printed again.
    """

    def __init__(self, dataset: Any, config: Config, device: torch.device, start: int, rows: slice,
                 data_rng: torch.Generator, run_id: str):
        self.dataset, self.config, self.device, self.rows, self.data_rng = dataset, config, device, rows, data_rng
        self.run_id, self.unreadable, self.small = run_id, set(), set()
        for note in getattr(dataset, "notes", ()):
            if note.kind == "unreadable":
                self.unreadable.add(note.text)
            else:
                self.small.add(note.path)
        self._small_reported = False
        self.from_files = hasattr(dataset, "train_loader")
        if self.from_files:
            self._to_input = dataset.to_model_input
            self._train = iter(dataset.train_loader(config, device, start, rows))
            self._val = dataset.val_loader(config, device, ddp.rank(), ddp.world_size(), VAL_BATCH)
        elif hasattr(dataset, "to"):
            dataset.to(device)

    def _report(self, notes: list[Any]) -> None:
        for note in notes:
            if note.kind == "unreadable":
                if note.text not in self.unreadable:
                    self.unreadable.add(note.text)
                    print(f"[{self.run_id}] skipping an unreadable image: {note.text}", flush=True)
            elif note.path not in self.small:
                self.small.add(note.path)
                if not self._small_reported:
                    self._small_reported = True
                    what = "skipping" if note.kind == "small" else "upscaling"
                    print(f"[{self.run_id}] {what} a training image smaller than data.resolution "
                          f"(data.min_size={self.config.data.min_size}): {note.text}; further ones are counted "
                          f"(small_images in summary.json), not printed", flush=True)

    def _from_loader(self, item: tuple[torch.Tensor, list[Any]]) -> torch.Tensor:
        crops, notes = item
        self._report(notes)
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
