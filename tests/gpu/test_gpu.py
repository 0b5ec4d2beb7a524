"""Checks that need a CUDA device: ``pytest -m gpu`` on a GPU machine (deselected elsewhere by the marker).

Device selection, a bf16 and an fp16 training run, ``compile=true``, the monitor with no host
sync between log steps, and two-rank NCCL DDP where two GPUs exist.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "experiments"))

from exp_helpers import run, smoke_config  # noqa: E402
from rank_process import rank_process  # noqa: E402

from experiments.config import load_config  # noqa: E402
from experiments.runtime import resolve_device  # noqa: E402

pytestmark = pytest.mark.gpu
IMAGES_YAML = REPO / "experiments" / "configs" / "images.yaml"


def test_auto_picks_this_ranks_gpu(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert resolve_device(smoke_config().runtime) == torch.device("cuda", 0)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs_train_on_the_gpu(tmp_path, precision):
    config = load_config(IMAGES_YAML, ["scale=smoke", f"runtime.precision={precision}", "quantizer.codebook_size=262144"])
    summary = run(config, tmp_path)
    assert summary["status"] == "done", summary.get("reason")
    assert summary["final_train_loss"] == summary["final_train_loss"]  # finite, not NaN
    rows = (tmp_path / "metrics.jsonl").read_text()
    assert '"max_memory_mb"' in rows


def test_compiled_run_on_the_gpu(tmp_path):
    config = load_config(IMAGES_YAML, ["scale=smoke", "schedule.steps=6", "runtime.compile=true"])
    eager = run(load_config(IMAGES_YAML, ["scale=smoke", "schedule.steps=6"]), tmp_path / "eager")
    compiled = run(config, tmp_path / "compiled")
    assert compiled["status"] == "done"
    # Not a rounding bound: compiled kernels fuse and reorder float32 operations, and 6 optimizer
    # steps amplify that; 1e-2 asks that the compiled run trains the same model to the same loss.
    assert compiled["final_train_loss"] == pytest.approx(eager["final_train_loss"], rel=1e-2)


@pytest.mark.parametrize("bits", [18, 40])
def test_monitor_does_no_host_sync_between_log_steps(bits):
    """Diagnostic steps every 4 (the dependence columns, the group bound, the exact batch distribution),
    the default alarms, and at 2^40 codes the sparse counting: nothing syncs before the log step."""
    from lfq import LFQ, LFQMonitor, MemorySink

    mode = "exact" if bits <= 24 else "group"
    model = torch.nn.Sequential(torch.nn.Linear(bits, bits),
                                LFQ(codebook_size=2**bits, dim=bits, entropy_mode=mode)).cuda()
    sink = MemorySink()
    monitor = LFQMonitor(model, sink=sink, log_every=50, diagnostics_every=4, histogram_every=1000)
    x = torch.randn(4, 1024, bits, device="cuda")
    for step in range(3):  # warm-up: allocations, cuBLAS handles
        monitor.set_step(step)
        model(x)[2].backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(3, 40):  # no log step in between
            monitor.set_step(step)
            model(x)[2].backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    monitor.detach()
    assert sink.records
    rows = [r for r in sink.records if r["kind"] == "quantizer" and r["step"] % 4 == 0]
    assert rows and all(r["bit_pair_mi_max"] == r["bit_pair_mi_max"] for r in rows)  # computed, not NaN


@rank_process
def _ddp_worker(rank: int, port: int, out: str) -> None:
    from experiments import distributed as ddp

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    with ddp.process_group():
        assert ddp.backend() == "nccl"
        summary = run(smoke_config(), Path(out))
        assert summary["status"] == "done"


def test_two_rank_nccl_ddp(tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("two-rank NCCL needs two GPUs; this machine has one")
    import torch.multiprocessing as mp

    from experiments.distributed import free_port

    mp.start_processes(_ddp_worker, args=(free_port(), str(tmp_path / "ddp")), nprocs=2, start_method="spawn")
    one = run(smoke_config(), tmp_path / "one")
    import json

    two = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert two["final_codes_used"] == one["final_codes_used"]
