"""The monitor under torch.distributed: rank 0's records describe the global batch.

Global (equal to one process monitoring the concatenation of every rank's batch): code
counts, hence ``codes_used``, ``tokens``, ``perplexity``, ``usage_fraction``, ``dead_codes``,
``bit_balance_mad`` and the histogram snapshots; the losses, because ``lfq.LFQ`` reports the
global batch's. Only rank 0 calls the sinks; every rank holds the same state.

Two gloo processes on the CPU, with different batch sizes and masks that keep different
numbers of tokens per rank, two quantizer layers (one collective covers both), train and
eval passes.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from rank_process import rank_process
from tolerances import softmax_tol, sum_tol
from torch import Tensor, nn

from experiments.distributed import free_port
from lfq import LFQ, LFQMonitor, MemorySink

WORLD = 2
BATCH = {0: 3, 1: 5}
TOKENS, DIM = 6, 4
STEPS = 6
MONITOR = dict(log_every=2, usage_window=2, dead_after=3, histogram_every=2)
EXACT = ("step", "layer", "codebook", "kind", "mode", "codebook_size", "codes_used", "tokens",
         "usage_fraction", "dead_codes", "forward_passes")
CLOSE = ("per_sample_entropy", "batch_entropy", "commitment", "aux_loss", "perplexity", "bit_balance_mad")


class TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = LFQ(dim=DIM, codebook_size=2**DIM)
        self.second = LFQ(dim=DIM, codebook_size=2**2, num_codebooks=2)

    def forward(self, x: Tensor, mask: Tensor) -> None:
        self.first(x, mask=mask, inv_temperature=2.0)
        self.second(x * 0.5 - 0.1, mask=mask, inv_temperature=2.0)


def _batches(step: int) -> list[tuple[Tensor, Tensor]]:
    """Per-rank (x, mask) of a step; rank 0 keeps about 30% of its tokens, rank 1 about 80%."""
    g = torch.Generator().manual_seed(100 + step)
    out = []
    for rank in range(WORLD):
        x = torch.randn(BATCH[rank], TOKENS, DIM, generator=g)
        mask = torch.rand(BATCH[rank], TOKENS, generator=g) < (0.3 if rank == 0 else 0.8)
        mask[0, 0] = True
        out.append((x, mask))
    return out


def _drive(model: TwoLayers, monitor: LFQMonitor, rank: int | None) -> None:
    """STEPS steps of training-mode passes, an eval pass every other step; ``rank`` None = all ranks' data."""
    for step in range(STEPS):
        monitor.set_step(step)
        batches = _batches(step)
        if rank is None:
            x, mask = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
        else:
            x, mask = batches[rank]
        model.train()(x, mask)
        if step % 2 == 1:
            model.eval()(x.flip(0), mask.flip(0))
    monitor.flush()


@rank_process
def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model = TwoLayers()
        sink, histograms = MemorySink(), MemorySink()
        monitor = LFQMonitor(model, sink, histogram_sink=histograms, **MONITOR)
        _drive(model, monitor, rank)
        state = monitor.state_dict()
        monitor.detach()
        local_sink = MemorySink()
        opted_out = LFQMonitor(model, local_sink, distributed=False, **MONITOR)
        model.train()(*_batches(0)[rank])
        opted_out.detach()
        torch.save({"records": sink.records, "histograms": histograms.records, "state": state,
                    "local": local_sink.records}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()



def _tolerance(latents: list[Tensor], bits: int, inv_temperature: float = 2.0) -> float:
    """Relative tolerance (in units of 1 nat for the entropies) between ranks' float32 sums,
    all-reduced, and one process's over the same tokens: entropies of logits spanning 4 tau |z|_1
    over 2^bits codes (softmax_tol) plus the sums over all tokens of a logged window of 2 steps
    (sum_tol); perplexity and bit balance come from exact counts."""
    max_l1 = max(z.unflatten(-1, (-1, bits)).abs().sum(-1).max().item() for z in latents)
    tokens = 2 * max(z.shape[:-1].numel() for z in latents)
    return softmax_tol(torch.float32, 4 * inv_temperature * max_l1, 2**bits) + sum_tol(torch.float32, tokens)


def _assert_records_equal(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want) and want
    # The layers' latents are the inputs (no projection), the first layer's 4 bits the widest.
    tol = _tolerance([torch.cat([b[0] for b in _batches(step)]) for step in range(STEPS)], DIM)
    for a, b in zip(got, want, strict=True):
        assert {k: a[k] for k in EXACT} == {k: b[k] for k in EXACT}
        for key in CLOSE:
            if math.isnan(b[key]):
                assert math.isnan(a[key]), (key, a, b)
            else:
                assert a[key] == pytest.approx(b[key], rel=tol, abs=tol), (key, a, b)


def test_rank0_records_equal_one_process_on_the_global_batch(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]

    model = TwoLayers()
    sink, histograms = MemorySink(), MemorySink()
    monitor = LFQMonitor(model, sink, histogram_sink=histograms, **MONITOR)
    _drive(model, monitor, None)
    want_state = monitor.state_dict()

    # The case a per-rank statistic gets wrong: ranks keep different numbers of tokens.
    assert int(_batches(0)[0][1].sum()) != int(_batches(0)[1][1].sum())
    _assert_records_equal(ranks[0]["records"], sink.records)
    assert {r["mode"] for r in sink.records} == {"train", "eval"}
    assert max(r["dead_codes"] for r in sink.records) > 0  # dead codes were exercised
    # Counts exactly; the pairwise mutual information of float sums reduced over ranks, to rounding.
    got_mi = [(r.pop("bit_pair_mi", None), r.pop("batch_entropy_groups", None)) for r in ranks[0]["histograms"]]
    want_mi = [(r.pop("bit_pair_mi", None), r.pop("batch_entropy_groups", None)) for r in histograms.records]
    assert ranks[0]["histograms"] == histograms.records and histograms.records
    assert [m[0] is None for m in got_mi] == [m[0] is None for m in want_mi] and any(m[0] for m in want_mi)
    for (a, a_groups), (b, b_groups) in zip(got_mi, want_mi, strict=True):
        if b is not None:
            assert torch.tensor(a) == pytest.approx(torch.tensor(b), abs=1e-9)
            assert a_groups == pytest.approx(b_groups, abs=1e-9)

    # Rank 1 sends nothing anywhere, yet holds the same (global) state: either rank can resume.
    assert ranks[1]["records"] == [] and ranks[1]["histograms"] == []
    for rank in ranks:
        for name, by_mode in want_state["usage"].items():
            for mode, saved in by_mode.items():
                for key in ("last_used", "histogram", "since_snapshot"):
                    assert torch.equal(rank["state"]["usage"][name][mode][key], saved[key]), (name, mode, key)

    # distributed=False: each rank counts its own tokens and reports to its own sink.
    for r in range(WORLD):
        tokens = {rec["tokens"] for rec in ranks[r]["local"] if rec["layer"] == "first"}
        assert tokens == {int(_batches(0)[r][1].sum())}


def test_distributed_true_needs_a_process_group():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="needs an initialised torch.distributed process group"):
        LFQMonitor(TwoLayers(), MemorySink(), distributed=True)
    with pytest.raises(ValueError, match="distributed must be None"):
        LFQMonitor(TwoLayers(), MemorySink(), distributed="yes")


LATENT = ("per_sample_entropy", "batch_entropy", "commitment", "saturated_fraction", "mean_abs_z")


def _upstream_model() -> nn.Module:
    from upstream_vqp import load_latest

    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(DIM, 8), load_latest().LFQ(dim=8, codebook_size=16, num_codebooks=2))


def _drive_upstream(model: nn.Module, monitor: LFQMonitor, rank: int | None) -> None:
    for step in range(3):
        monitor.set_step(step)
        batches = _batches(step)
        x = torch.cat([b[0] for b in batches]) if rank is None else batches[rank][0]
        # No mask: the upstream's own masked batch entropy has a rank-dependent shape under DDP
        # (its (b n) merge runs after masking), so its all_reduce fails. Ranks still hold
        # different token counts (batches of 3 and 5).
        model[1](model[0](x), inv_temperature=2.0)
    monitor.flush()


@rank_process
def _upstream_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model, sink = _upstream_model(), MemorySink()
        monitor = LFQMonitor(model, sink, log_every=2, diagnostics_every=1)
        _drive_upstream(model, monitor, rank)
        monitor.detach()
        torch.save(sink.records, Path(out_dir) / f"upstream{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_latent_diagnostics_of_a_foreign_lfq_cover_the_global_batch(tmp_path):
    """The entropies, commitment and saturation the monitor computes itself are those of the
    concatenated batch: sums and token counts reduced over the ranks, never per-rank means."""
    mp.spawn(_upstream_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    got = torch.load(tmp_path / "upstream0.pt", weights_only=False)
    assert torch.load(tmp_path / "upstream1.pt", weights_only=False) == []
    model, sink = _upstream_model(), MemorySink()
    monitor = LFQMonitor(model, sink, log_every=2, diagnostics_every=1)
    _drive_upstream(model, monitor, None)
    want = sink.records
    assert len(got) == len(want) == 3 * 2
    with torch.no_grad():  # the LFQ's latent: the Linear's outputs, 2 codebooks of 4 bits
        tol = _tolerance([model[0](torch.cat([b[0] for b in _batches(step)])) for step in range(3)], 4)
    for a, b in zip(got, want, strict=True):
        assert (a["step"], a["codebook"], a["tokens"], a["codes_used"]) == (b["step"], b["codebook"], b["tokens"], b["codes_used"])
        for key in LATENT:
            assert math.isfinite(b[key]) and a[key] == pytest.approx(b[key], rel=tol, abs=tol), (key, a, b)
