"""Sparse counting (codebooks past lfq.sparse_usage.SPARSE_ABOVE) under torch.distributed: rank 0's
usage columns, snapshots and evaluation equal one process's on the concatenated batch. Two gloo
ranks with different token counts; the sparse path is forced at 2^5 codes so both can be compared."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
from rank_process import rank_process, spawn_with_deadline

import lfq.monitor
import lfq.monitor_hooks
from experiments.distributed import free_port
from lfq import LFQ, LFQMonitor, MemorySink
from lfq.alarms import DeadBit

WORLD, BITS = 2, 5
EXACT = ("step", "layer", "codebook", "kind", "mode", "codes_used", "tokens", "usage_fraction", "codes_used_window",
         "dead_bits", *(f"bit_frequency_{i}" for i in range(BITS)))


def _batches(step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return [torch.randn(3, 4, BITS, generator=g), torch.randn(5, 4, BITS, generator=g)]


def _run(rank: int | None) -> tuple[list[dict], list[dict], list[dict]]:
    lfq.monitor.SPARSE_ABOVE = lfq.monitor_hooks.SPARSE_ABOVE = 2**4
    quantizer, sink, hist = LFQ(dim=BITS), MemorySink(), MemorySink()
    with LFQMonitor(quantizer, sink, histogram_sink=hist, log_every=2, usage_window=2, dead_after=2,
                    histogram_every=2, alarms=[DeadBit()]) as monitor:
        for step in range(5):
            monitor.set_step(step)
            batches = _batches(step)
            quantizer(torch.cat(batches) if rank is None else batches[rank])
        evaluation = monitor.evaluate([_batches(9)[0 if rank is None else rank]] if rank is not None
                                      else [torch.cat([_batches(9)[0]]), _batches(9)[1]])
    return sink.records, hist.records, evaluation.records


@rank_process
def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        records, hist, evaluation = _run(rank)
        torch.save({"records": records, "hist": hist, "evaluation": evaluation}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_rank0_sparse_counts_equal_one_process_on_the_global_batch(tmp_path, monkeypatch):
    spawn_with_deadline(_worker, (free_port(), str(tmp_path)), WORLD, timeout_s=120)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    monkeypatch.setattr(lfq.monitor, "SPARSE_ABOVE", lfq.monitor.SPARSE_ABOVE)  # _run sets it; undone after
    monkeypatch.setattr(lfq.monitor_hooks, "SPARSE_ABOVE", lfq.monitor_hooks.SPARSE_ABOVE)
    records, hist, evaluation = _run(None)
    got = ranks[0]["records"]
    assert ranks[1]["records"] == [] and len(got) == len(records) == 5 + 1
    assert [{k: r[k] for k in EXACT} for r in got] == [{k: r[k] for k in EXACT} for r in records]
    assert all(r["dead_codes"] != r["dead_codes"] for r in got)  # NaN: sparse
    assert [(r["codes"], r["counts"]) for r in ranks[0]["hist"]] == [(r["codes"], r["counts"]) for r in hist]
    assert ranks[0]["evaluation"] == evaluation and evaluation[0]["tokens"] == 8 * 4
