"""The spawned-rank entry point of the DDP tests: results and errors still reach the test."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch.multiprocessing as mp
from rank_process import rank_process


@rank_process
def _writes(rank: int, out: str) -> None:
    Path(out, f"rank{rank}").write_text(str(rank))


@rank_process
def _raises(rank: int) -> None:
    if rank == 1:
        raise ValueError("rank 1 failed")


def test_a_rank_that_returns_exits_0_after_its_body(tmp_path):
    context = mp.start_processes(_writes, args=(str(tmp_path),), nprocs=2, start_method="spawn", join=True)
    assert context is None  # joined: every rank exited 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank0", "rank1"]


def test_a_rank_that_raises_still_reports_its_exception():
    with pytest.raises(mp.ProcessRaisedException, match="rank 1 failed"):
        mp.start_processes(_raises, nprocs=2, start_method="spawn", join=True)
