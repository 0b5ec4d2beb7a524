"""A multi-node GPU job as SLURM starts it: 2 nodes x 4 GPUs, one task per GPU (faked on the CPU).

submitit's TorchDistributedEnvironment turns the SLURM variables into torch's; the
rendezvous is on the first node, global ranks and the world size span both nodes, and each
task computes on the GPU of its local rank.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from experiments import distributed as ddp
from experiments.config import Config
from experiments.runtime import resolve_device

# What SLURM sets for task 5 of an 8-task job on nodes gpu-node07 and gpu-node08 (4 tasks each).
SLURM_TASK_5 = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "8",
                "SLURM_JOB_NUM_NODES": "2", "SLURM_NNODES": "2", "SLURM_NODEID": "1", "SLURM_PROCID": "5",
                "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu-node[07-08]", "SLURM_NTASKS_PER_NODE": "4"}


@pytest.fixture
def restored_environ():
    """submitit's export() writes os.environ directly: put it back, or later tests see WORLD_SIZE=8."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def test_two_nodes_of_four_gpus(monkeypatch, restored_environ):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in SLURM_TASK_5.items():
        monkeypatch.setenv(name, value)
    calls = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls.setdefault("device", index))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group",
                        lambda backend, **kw: calls.update(backend=backend, **kw))
    assert ddp.init_from_submitit() is True
    assert calls["backend"] == "nccl"
    assert (calls["rank"], calls["world_size"]) == (5, 8)
    assert calls["device"] == 1  # LOCAL_RANK on its node
    assert os.environ["MASTER_ADDR"] == "gpu-node07"  # the rendezvous is on the first node
    assert os.environ["LOCAL_RANK"] == "1" and os.environ["LOCAL_WORLD_SIZE"] == "4"
    assert resolve_device(Config().runtime) == torch.device("cuda", 1)
