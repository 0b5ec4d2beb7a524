"""Batches for the training loop, from a dataset in memory on the device or read from files by a
DataLoader in an order fixed by the seed and the step (:func:`step_positions`); docs/training.md and
docs/ARCHITECTURE.md ("Datasets") describe both kinds.
"""

from __future__ import annotations

import hashlib
import os
import signal
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Sampler

from experiments import run_lock
from experiments.config import Config


def _epoch_permutation(n: int, seed: int, epoch: int) -> Tensor:
    g = torch.Generator().manual_seed(_mix(seed, epoch))
    return torch.randperm(n, generator=g)


def _mix(*parts: int) -> int:
    """A 63-bit seed from integers; the same on every machine and Python (no hash randomisation)."""
    digest = hashlib.sha256(",".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def step_positions(step: int, batch_size: int) -> range:
    """Positions of step ``step`` (1-based) in the endless sequence of epoch permutations."""
    return range((step - 1) * batch_size, step * batch_size)


def step_items(n: int, step: int, batch_size: int, seed: int,
               cache: dict[int, Tensor] | None = None) -> list[tuple[int, int]]:
    """``(index, sample_seed)`` of every sample of the global batch of ``step``.

    Epoch ``e`` is a permutation of the ``n`` items fixed by ``(seed, e)``; the global batch of
    step ``s`` is positions ``[(s-1) B, s B)`` of their concatenation. ``sample_seed`` fixes the
    random crop and flip of that sample at that position. ``cache`` keeps the permutations of
    the epochs in use between calls (a permutation of ImageNet takes ~20 ms to draw).
    """
    cache = {} if cache is None else cache
    items = []
    for pos in step_positions(step, batch_size):
        epoch = pos // n
        if epoch not in cache:
            for old in [e for e in cache if e < epoch]:
                del cache[old]
            cache[epoch] = _epoch_permutation(n, seed, epoch)
        items.append((int(cache[epoch][pos % n]), _mix(seed, pos)))
    return items


class StepBatchSampler(Sampler[list[tuple[int, int]]]):
    """The batches of steps ``start + 1 .. steps``; each is this rank's ``rows`` of the global batch."""

    def __init__(self, n: int, batch_size: int, seed: int, start: int, steps: int, rows: slice):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.start, self.steps, self.rows = start, steps, rows

    def __len__(self) -> int:
        return max(0, self.steps - self.start)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        cache: dict[int, Tensor] = {}
        for step in range(self.start + 1, self.steps + 1):
            yield step_items(self.n, step, self.batch_size, self.seed, cache)[self.rows]


def leave_signals_to_the_trainer(worker_id: int = 0) -> None:
    """A DataLoader worker's ``worker_init_fn``: it ignores SIGTERM and the requeue signal, and lets
    go of the run lock it inherited (``run_lock.let_go_in_forked_child``).

    scancel, a preemption and SLURM's time-limit signal reach every process of the job, the workers
    too. A forked worker would die of SIGTERM (torch's handler kills it unless its parent sent it),
    and the trainer would then record a run SLURM cancelled as failed; and it would run the
    submitit handler it inherited for USR2 (checkpoint, requeue, exit) itself. The trainer process
    handles both; a worker ends when the trainer tells it to or, if the trainer is gone, when
    torch's watchdog sees that (within 5 s), or with SIGKILL at the job's end."""
    run_lock.let_go_in_forked_child()
    requeue = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")  # submitit's own rule for its signal
    for sig in {signal.SIGTERM, getattr(signal, f"SIG{requeue}", signal.SIGUSR2)}:
        signal.signal(sig, signal.SIG_IGN)


def loader_kwargs(config: Config, device: torch.device) -> dict[str, Any]:
    """DataLoader settings from ``config.runtime``. Its own generator: creating an iterator
    draws a seed, which must not come from the global RNG that LFQ's token subsets use.
    Workers leave SIGTERM and the requeue signal to the trainer (:func:`leave_signals_to_the_trainer`)."""
    r = config.runtime
    kwargs: dict[str, Any] = {"num_workers": r.num_workers, "pin_memory": r.pin_memory and device.type == "cuda",
                              "generator": torch.Generator().manual_seed(0)}
    if r.num_workers > 0:
        kwargs.update(prefetch_factor=r.prefetch_factor, persistent_workers=True,
                      worker_init_fn=leave_signals_to_the_trainer)
    return kwargs


def train_loader(dataset: Any, config: Config, device: torch.device, start: int, rows: slice,
                 collate_fn: Callable[[list[Any]], Any]) -> DataLoader:
    sampler = StepBatchSampler(len(dataset), config.data.batch_size, config.seed, start, config.schedule.steps, rows)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_fn, **loader_kwargs(config, device))
