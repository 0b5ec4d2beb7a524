"""What the newest vector-quantize-pytorch's LFQ computes as its batch entropy under DDP, and that
the monitor's columns beside it stay the true ones (issue 34, item 3).

Two gloo ranks hold different tokens (same count). The upstream's ``maybe_distributed_mean``
calls ``torch.distributed.nn.all_reduce(t)`` and drops its return value (that function reduces a
copy), then divides the local mean by the world size W. Its "batch entropy" on rank r is then
``H(a_r / W) = (H_r + ln W) / W`` (a_r, H_r: that rank's mean distribution and its entropy), not
the entropy of the global batch. The monitor's ``batch_entropy`` on the same run is the global
batch's exact entropy and ``batch_entropy_local`` the mean over ranks of the H_r.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from rank_process import rank_process, spawn_with_deadline
from test_bit_dependence import dense_batch_distribution, entropy

from experiments.distributed import free_port
from lfq import LFQMonitor, MemorySink

WORLD, BITS, TAU = 2, 4, 0.25


def _inputs(rank: int) -> torch.Tensor:
    """(2, 24, BITS): rank 0's latents lean to positive bits, rank 1's to negative ones."""
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(2, 24, BITS, generator=g) + (1.2 if rank == 0 else -1.2)


def _upstream_lfq():
    from upstream_vqp import load_latest

    # dim = log2(codebook_size): no projections, the latent is the input.
    return load_latest().LFQ(dim=BITS, codebook_size=2**BITS, entropy_loss_weight=0.1)


@rank_process
def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        lfq, sink = _upstream_lfq(), MemorySink()
        monitor = LFQMonitor(lfq, sink, log_every=1, diagnostics_every=1)
        monitor.set_step(0)
        _, breakdown = lfq(_inputs(rank), inv_temperature=TAU, return_loss_breakdown=True)
        monitor.detach()
        torch.save({"upstream_batch_entropy": float(breakdown.batch_entropy), "records": sink.records},
                   Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_upstream_132_batch_entropy_under_ddp_is_local_plus_log_world_over_world(tmp_path):
    spawn_with_deadline(_worker, (free_port(), str(tmp_path)), WORLD, timeout_s=120)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    logit_scale = 4 * TAU  # P(bit = +) = sigmoid(4 tau s z), s = 1
    local = [float(entropy(dense_batch_distribution(_inputs(r).reshape(-1, 1, BITS) * logit_scale,
                                                    torch.ones(48)))[0]) for r in range(WORLD)]
    both = torch.cat([_inputs(r).reshape(-1, 1, BITS) for r in range(WORLD)])
    global_h = float(entropy(dense_batch_distribution(both * logit_scale, torch.ones(96)))[0])
    assert global_h > max(local) + 0.3  # the ranks' tokens differ: the union is more diverse

    for r in range(WORLD):
        got = ranks[r]["upstream_batch_entropy"]
        # The upstream's number: this rank's distribution divided by W, i.e. (H_r + ln W) / W.
        assert got == pytest.approx((local[r] + math.log(WORLD)) / WORLD, abs=1e-4)
        assert abs(got - global_h) > 0.5  # far from the global batch entropy it means to compute
    # The monitor (rank 0's records): the global exact entropy, and the ranks' mean local entropy.
    (row,) = ranks[0]["records"]
    assert ranks[1]["records"] == []
    assert row["tokens"] == 96
    assert row["batch_entropy"] == pytest.approx(global_h, abs=1e-5)
    assert row["batch_entropy_local"] == pytest.approx(sum(local) / WORLD, abs=1e-5)
