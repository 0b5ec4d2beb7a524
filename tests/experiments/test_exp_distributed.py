"""Training under DDP: two gloo processes on the CPU run the smoke synthetic config.

One spawn (module fixture) does, on both ranks: a whole run; a run killed after step 13 on
every rank and then resumed; a run (VQ) whose rank-1 shard turns NaN; a batch size the world size
does not divide. The assertions compare with one process in this test's process.

What is exactly comparable between 2 ranks and 1 process: the batches (the union of the
shards is the single-process batch), hence the code indices while the weights agree to the
last bits, hence every usage count, histogram and derived column (codes_used, perplexity,
usage_fraction, dead_codes, bit_balance_mad) over the whole smoke run. What is not: float
sums in a different order (DDP averages two half-batch gradients), so losses and weights
drift apart by float rounding that Adam amplifies; the first steps agree to 1e-5 relative,
the end of the 30 steps to 5e-3 (the per-sample entropy at inv_temperature 100 is ~1e-2 of
the other terms, so its relative error is the largest).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from exp_helpers import Kill, kill_at, read_rows, run, smoke_config, without_wall_time
from rank_process import rank_process, spawn_with_deadline
from tolerances import sum_tol

from experiments import distributed as ddp
from experiments.distributed import free_port
from experiments.run_dir import RunDir
from experiments.tasks import synthetic

WORLD = 2
SPAWN_TIMEOUT_S = 90
KILL_AT = 13
POISON_CALL = 7  # the 7th training batch: step 7
INTEGER_COLUMNS = ("codes_used", "tokens", "dead_codes", "usage_fraction", "perplexity", "bit_balance_mad")


@rank_process
def _worker(rank: int, port: int, out: str) -> None:
    # Through the env-var helper, as torchrun or submitit's TorchDistributedEnvironment would.
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    root, result = Path(out), {}
    with ddp.process_group():
        assert ddp.world_size() == WORLD and ddp.rank() == rank
        config = smoke_config()
        t0 = time.perf_counter()
        result["full"] = run(config, root / "full")
        result["full_s"] = time.perf_counter() - t0
        try:
            run(config, root / "resumed", on_step=kill_at(KILL_AT))
        except Kill:
            result["killed"] = True
        result["checkpoint_step_after_kill"] = torch.load(
            root / "resumed" / "checkpoint.pt", weights_only=False)["progress"]["step"]
        result["resumed"] = run(config, root / "resumed")

        clean, calls = synthetic.GaussianMixture.train_batch, []

        def poisoned(self, g, batch_size):  # NaN in rank 1's half of the global batch only
            calls.append(1)
            batch = clean(self, g, batch_size)
            if len(calls) == POISON_CALL:
                batch[batch_size // 2:] = math.nan
            return batch

        synthetic.GaussianMixture.train_batch = poisoned
        try:
            # VQ: no global loss terms (LFQ's batch entropy would carry the NaN to rank 0 by itself).
            result["nan"] = run(smoke_config("quantizer.kind=vq"), root / "nan")
        finally:
            synthetic.GaussianMixture.train_batch = clean
        try:
            run(smoke_config("data.batch_size=63"), root / "odd")
        except ValueError as e:
            result["odd_error"] = str(e)
    (root / f"rank{rank}.json").write_text(json.dumps(result))



def _spawn(out: Path) -> list[dict[str, Any]]:
    """Both ranks, with a deadline: a rank stuck in a collective fails the test instead of hanging it."""
    spawn_with_deadline(_worker, (free_port(), str(out)), WORLD, SPAWN_TIMEOUT_S)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("ddp")
    t0 = time.perf_counter()
    ranks = _spawn(out)
    spawn_s = time.perf_counter() - t0
    single = run(smoke_config(), out / "single")
    return {"out": out, "ranks": ranks, "single": single, "spawn_s": spawn_s}


def test_ddp_run_writes_one_folder_and_matches_one_process(runs):
    out, ranks, single = runs["out"], runs["ranks"], runs["single"]
    full = ranks[0]["full"]
    assert full["status"] == "done" and full["step"] == 30
    assert ranks[1]["full"] == full  # every rank returns rank 0's summary
    rd = RunDir(out / "full")
    assert rd.read_summary() == full and rd.is_done()
    # One writer: the documented files only (no temp files of a second writer), no row twice.
    assert {p.name for p in rd.path.iterdir()} == {"config.json", "metrics.jsonl", "histograms.jsonl",
                                                    "checkpoint.pt", "summary.json", "DONE", "metrics.parquet",
                                                    "environment.jsonl",
                                                    ".lock", ".claim"}  # rank 0's run lock (run_lock.try_lock_run)
    assert [(r["step"], r["world_size"]) for r in read_rows(rd.environment)] == [(0, 2)]  # rank 0's row only
    ddp_rows, one_rows = read_rows(rd.metrics), read_rows(out / "single" / "metrics.jsonl")
    keys = [(r["kind"], r["step"], r.get("mode"), r.get("codebook")) for r in ddp_rows]
    assert len(keys) == len(set(keys)) and keys == [(r["kind"], r["step"], r.get("mode"), r.get("codebook"))
                                                    for r in one_rows]

    # Usage: exactly the single process's, every step (the monitor sums the ranks' counts).
    for a, b in zip(ddp_rows, one_rows, strict=True):
        if a["kind"] == "quantizer":
            assert {k: a[k] for k in INTEGER_COLUMNS} == {k: b[k] for k in INTEGER_COLUMNS}, a["step"]
    # Counts exactly; the bits' pairwise mutual information of the latent drifts with the weights as the
    # losses below do (5e-3 relative after Adam amplified the summation order; ~1e-6 nats near independence).
    ddp_hist, one_hist = read_rows(rd.histograms), read_rows(out / "single" / "histograms.jsonl")
    floats = ("bit_pair_mi", "batch_entropy_groups")
    ddp_mi = [[r.pop(k, None) for k in floats] for r in ddp_hist]
    one_mi = [[r.pop(k, None) for k in floats] for r in one_hist]
    assert ddp_hist == one_hist and any(m[0] is not None for m in one_mi)
    for pair_a, pair_b in zip(ddp_mi, one_mi, strict=True):
        for a, b in zip(pair_a, pair_b, strict=True):
            assert (a is None) == (b is None) and (a is None or np.allclose(a, b, rtol=5e-3, atol=1e-6))
    for key in ("final_codes_used", "final_usage_fraction", "final_perplexity", "final_dead_codes",
                "final_bit_balance_mad", "best_val_step", "step", "run_id"):
        assert full[key] == single[key], key

    # Losses: float summation order only. Steps 1-3: float32 sums over the batch (batch x input_dim values)
    # in another order; later, no rounding bound: Adam amplifies those roundings step by step (measured
    # 5e-4 at step 27 for the per-sample entropy at inv_temperature 100, see the module docstring).
    smoke = smoke_config().resolved()
    early = sum_tol(torch.float32, smoke.data.batch_size * smoke.data.input_dim)
    for a, b in zip(ddp_rows, one_rows, strict=True):
        for key in ("loss", "recon_loss", "aux_loss", "per_sample_entropy", "batch_entropy", "commitment", "val_mse"):
            if key in b and not math.isnan(b[key]):
                rel = early if b["step"] <= 3 else 5e-3
                assert a[key] == pytest.approx(b[key], rel=rel), (a["kind"], a["step"], key)
    for key in ("final_train_loss", "final_recon_loss", "final_val_mse", "final_batch_entropy"):  # step 30: drift,
        assert full[key] == pytest.approx(single[key], rel=1e-4), key  # no rounding bound (measured 9e-6)
    assert full["final_val_mse"] != single["final_val_mse"]  # really two processes, not a copy


def test_ddp_kill_and_resume_ends_as_if_never_interrupted(runs):
    out, ranks = runs["out"], runs["ranks"]
    for result in ranks:
        assert result["killed"] and result["checkpoint_step_after_kill"] == 10
        assert without_wall_time(result["resumed"]) == without_wall_time(ranks[0]["full"])
    assert read_rows(out / "resumed" / "metrics.jsonl") == read_rows(out / "full" / "metrics.jsonl")
    assert read_rows(out / "resumed" / "histograms.jsonl") == read_rows(out / "full" / "histograms.jsonl")
    assert RunDir(out / "resumed").is_done()


def test_nan_on_one_rank_fails_the_run_on_every_rank(runs):
    for result in runs["ranks"]:
        assert result["nan"] == runs["ranks"][0]["nan"]
        assert result["nan"]["status"] == "failed" and result["nan"]["step"] == POISON_CALL - 1
        assert f"non-finite loss nan at step {POISON_CALL}" in result["nan"]["reason"]
    assert RunDir(runs["out"] / "nan").read_summary() == runs["ranks"][0]["nan"]


def test_batch_size_must_divide_by_the_world_size(runs):
    for result in runs["ranks"]:
        assert "data.batch_size=63" in result["odd_error"] and "world size 2" in result["odd_error"]
    assert not (runs["out"] / "odd").exists()  # refused before anything is written
    assert ddp.shard(64, 2, 1) == slice(32, 64)
    with pytest.raises(ValueError, match="batch_size=10 is not divisible by the world size 4"):
        ddp.shard(10, 4, 0)


def test_spawned_runs_are_fast(runs):
    # Four runs on two ranks; process start and gloo set-up included.
    assert runs["spawn_s"] < 45, runs["spawn_s"]
    assert runs["ranks"][0]["full_s"] < 20


def test_outside_a_process_group_nothing_is_distributed(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert ddp.init_from_env() is False and not ddp.is_distributed()
    assert (ddp.world_size(), ddp.rank(), ddp.is_main()) == (1, 0, True)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):
        ddp.init_from_env()
