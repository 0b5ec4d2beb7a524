"""LFQ under torch.distributed: the loss terms are those of the global batch.

Which quantities are global (identical on every rank, equal to one process on the
concatenated batch of all ranks' kept tokens):
- ``batch_entropy``: the entropy of the average code distribution over ALL ranks' tokens
  (all-reduce of the summed distribution and of the token count, never of per-rank means);
- ``per_sample_entropy`` and ``commitment``: means over all ranks' kept tokens;
- hence ``entropy_aux_loss``; and, after DDP's gradient averaging, every parameter gradient.
What stays per rank: ``quantized`` and ``indices`` (each rank's own tokens) and the
``frac_per_sample_entropy`` subset, which each rank draws from its own tokens.

Two gloo processes on the CPU; ranks hold different batch sizes and masks that keep
different numbers of tokens.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from rank_process import rank_process
from tolerances import assert_close_rel_max, softmax_tol, sum_tol
from torch.nn.parallel import DistributedDataParallel

from experiments.distributed import free_port
from lfq import LFQ

WORLD = 2
BATCH = {0: 2, 1: 3}  # different batch sizes per rank
TOKENS, DIM = 5, 11
KWARGS = dict(dim=DIM, codebook_size=2**5, num_codebooks=2, entropy_loss_weight=0.3,
              commitment_loss_weight=0.7, diversity_gamma=1.3)


def _data(empty_rank: bool = False):
    """Per-rank inputs and masks; with ``empty_rank`` rank 0 keeps no token at all."""
    generator = torch.Generator().manual_seed(7)
    xs, masks = [], []
    for rank in range(WORLD):
        xs.append(torch.randn(BATCH[rank], TOKENS, DIM, generator=generator))
        mask = torch.rand(BATCH[rank], TOKENS, generator=generator) < (0.3 if rank == 0 else 0.8)
        mask[0, 0] = True
        if empty_rank and rank == 0:
            mask[:] = False
        masks.append(mask)
    return xs, masks


def _weight(rank: int) -> torch.Tensor:
    return torch.linspace(-1, 1 + rank, BATCH[rank] * TOKENS * DIM).reshape(BATCH[rank], TOKENS, DIM)


def _step(module, x, mask, weight, world: int = 1):
    ret, terms = module(x, mask=mask, return_loss_breakdown=True, inv_temperature=3.0)
    # A per-token term on the output too, so project_out gets gradients. Scaled by the
    # world size: DDP averages gradients over ranks, the single process sums them.
    (ret.entropy_aux_loss + world * (ret.quantized * weight).sum()).backward()
    return ret, terms


def _tolerance(module: LFQ, x: torch.Tensor, tau: float = 3.0) -> float:
    """Relative tolerance between ranks' partial sums (added by gloo, then DDP) and one
    process's sums over the same tokens: float32 entropies of a softmax over the codes of
    logits up to 2 tau |z|_1 (softmax_tol) plus the sums over all tokens (sum_tol). Losses are
    compared in units of 1 nat, gradients relative to their largest element."""
    with torch.no_grad():
        z = module.project_in(x).unflatten(-1, (module.num_codebooks, -1))
    max_logit = 2 * tau * module.codebook_scale * z.abs().sum(dim=-1).max().item()
    tokens = x.numel() // x.shape[-1] * module.num_codebooks
    return softmax_tol(torch.float32, max_logit, module.codebook_size) + sum_tol(torch.float32, tokens)


@rank_process
def _worker(rank: int, port: int, mode: str, empty_rank: bool, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        quantizer = LFQ(entropy_mode=mode, **KWARGS).train()
        model = DistributedDataParallel(quantizer)
        xs, masks = _data(empty_rank)
        ret, terms = _step(model, xs[rank], masks[rank], _weight(rank), world=WORLD)
        torch.save({
            "terms": [t.detach() for t in terms],
            "aux": ret.entropy_aux_loss.detach(),
            "indices": ret.indices,
            "grads": {n: p.grad.clone() for n, p in quantizer.named_parameters() if p.grad is not None},
        }, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()



@pytest.mark.parametrize(("mode", "empty_rank"), [("reference", False), ("exact", False), ("exact", True)])
def test_ddp_terms_and_gradients_equal_one_process_on_the_global_batch(mode, empty_rank):
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(free_port(), mode, empty_rank, out_dir), nprocs=WORLD, join=True)
        results = [torch.load(Path(out_dir) / f"rank{r}.pt") for r in range(WORLD)]

    torch.manual_seed(0)
    single = LFQ(entropy_mode=mode, **KWARGS).train()
    xs, masks = _data(empty_rank)
    weight = torch.cat([_weight(rank) for rank in range(WORLD)])
    ret, terms = _step(single, torch.cat(xs), torch.cat(masks), weight)

    assert sum(int(m.sum()) for m in masks) == int(torch.cat(masks).sum())
    assert int(masks[0].sum()) != int(masks[1].sum())  # the case per-rank means get wrong
    assert (int(masks[0].sum()) == 0) == empty_rank  # a rank without tokens still joins the collectives
    tol = _tolerance(single, torch.cat(xs))
    for rank, result in enumerate(results):
        for name, got, want in zip(("per_sample_entropy", "batch_entropy", "commitment"),
                                   result["terms"], terms, strict=True):
            assert_close_rel_max(got, want, tol, floor=1.0, what=f"rank {rank} {name}")
        assert_close_rel_max(result["aux"], ret.entropy_aux_loss, tol, floor=1.0, what=f"rank {rank} aux")
        start = sum(BATCH[r] for r in range(rank))
        assert torch.equal(result["indices"], ret.indices[start:start + BATCH[rank]])
        grads = {n: p.grad for n, p in single.named_parameters() if p.grad is not None}
        assert result["grads"].keys() == grads.keys() and grads
        for name, want in grads.items():
            # Summation order differs (two halves, then DDP's sum): relative to the largest entry.
            assert_close_rel_max(result["grads"][name], want, tol, what=f"rank {rank} grad {name}")


def test_distributed_false_keeps_terms_per_rank(tmp_path):
    """Opt-out: with ``distributed=False`` each rank sees only its own tokens (the reference's behaviour)."""
    mp.spawn(_local_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    xs, masks = _data()
    for rank in range(WORLD):
        torch.manual_seed(0)
        local = LFQ(**KWARGS).train()
        _, want = local(xs[rank], mask=masks[rank], return_loss_breakdown=True, inv_temperature=3.0)
        got = torch.load(tmp_path / f"rank{rank}.pt")
        tol = _tolerance(local, xs[rank])  # one computation, perhaps blocked otherwise in another process
        for name, a, b in zip(want._fields, got, want, strict=True):
            assert_close_rel_max(a, b, tol, floor=1.0, what=f"rank {rank} {name}")


@rank_process
def _local_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        quantizer = LFQ(distributed=False, **KWARGS).train()
        xs, masks = _data()
        _, terms = quantizer(xs[rank], mask=masks[rank], return_loss_breakdown=True, inv_temperature=3.0)
        torch.save([t.detach() for t in terms], Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
