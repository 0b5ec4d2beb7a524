"""Data parallelism for the training loop: the process group (:func:`init_from_env` for
torchrun-style launchers, :func:`init_from_submitit` for submitit jobs), ranks, the batch shards and
the collectives; docs/training.md says who starts the group and what each rank does.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist

ENV_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now, for MASTER_PORT of a single-node process group."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def is_distributed() -> bool:
    """Inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main() -> bool:
    """Rank 0, the only rank that writes the run folder (always True in one process)."""
    return rank() == 0


def backend() -> str | None:
    """The process group's backend ('nccl', 'gloo'), or None without one. Where a rank computes
    is ``experiments.runtime.resolve_device``'s business (``cuda:LOCAL_RANK`` under NCCL)."""
    return dist.get_backend() if dist.is_available() and dist.is_initialized() else None


def init_from_env(backend: str | None = None) -> bool:
    """Initialise the default process group from ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``.

    Returns True if this call created the group (the caller then owns it; see
    :func:`process_group`); False if one already exists or ``WORLD_SIZE`` is unset or 1 (a
    single process needs none). Under NCCL the CUDA device is ``LOCAL_RANK`` modulo the
    visible devices (submitit's export leaves each task one visible device).
    """
    if dist.is_available() and dist.is_initialized():
        return False
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return False
    missing = [name for name in ENV_VARS if not os.environ.get(name)]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={world} but {', '.join(missing)} unset: a data-parallel run needs all of "
                           f"{', '.join(ENV_VARS)} (torchrun and submitit's TorchDistributedEnvironment set them)")
    backend = backend or default_backend()
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    dist.init_process_group(backend, init_method="env://", rank=int(os.environ["RANK"]), world_size=world)
    return True


def init_from_submitit(backend: str | None = None) -> bool:
    """Inside a submitit task: export its ``TorchDistributedEnvironment``, then :func:`init_from_env`."""
    from submitit.helpers import TorchDistributedEnvironment  # only jobs launched by submitit need it

    TorchDistributedEnvironment().export()
    return init_from_env(backend)


@contextlib.contextmanager
def process_group(init: Callable[[], bool] = init_from_env) -> Iterator[None]:
    """``init()`` on entry; on exit, destroy the group if ``init`` created it."""
    created = init()
    try:
        yield
    finally:
        if created:
            dist.destroy_process_group()


def shard(batch_size: int, world: int, rank_: int) -> slice:
    """This rank's rows of a global batch: equal contiguous shards, rank order = batch order."""
    if batch_size % world:
        raise ValueError(f"data.batch_size={batch_size} is not divisible by the world size {world}: "
                         f"data-parallel shards must be equal (so local means average to the global one); "
                         f"use a batch size that is a multiple of {world}")
    size = batch_size // world
    return slice(rank_ * size, (rank_ + 1) * size)


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum over the ranks (a copy; ``t`` itself in one process)."""
    if not is_distributed():
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (picklable objects)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (picklable objects)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
