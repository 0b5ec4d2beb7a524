"""The runtime section: device selection (CUDA faked), precision, compile, checkpoints across devices, throughput."""

from __future__ import annotations

import pytest
import torch
from exp_helpers import (
    PATCHES_YAML,
    REPO,
    SYNTHETIC_YAML,
    Kill,
    kill_at,
    read_rows,
    run,
    smoke_config,
    without_wall_time,
)
from tolerances import sum_tol

from experiments import train
from experiments.config import load_config
from experiments.run_dir import RunDir
from experiments.runtime import RuntimeConfigError, resolve_device

IMAGES_YAML = REPO / "experiments" / "configs" / "images.yaml"


def _runtime(*overrides: str):
    return load_config(SYNTHETIC_YAML, list(overrides)).runtime


def test_device_selection_under_faked_cuda(monkeypatch):
    fake = {"cuda_available": True, "device_count": 4}
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert resolve_device(_runtime(), **fake) == torch.device("cuda", 3)  # auto: this rank's GPU
    assert resolve_device(_runtime("runtime.device=cuda"), **fake) == torch.device("cuda", 3)
    assert resolve_device(_runtime("runtime.device=cuda:1"), **fake) == torch.device("cuda", 1)
    assert resolve_device(_runtime("runtime.device=cpu"), **fake) == torch.device("cpu")
    monkeypatch.setenv("LOCAL_RANK", "5")  # submitit leaves each task one device: LOCAL_RANK modulo visible
    assert resolve_device(_runtime(), cuda_available=True, device_count=1) == torch.device("cuda", 0)
    monkeypatch.delenv("LOCAL_RANK")
    assert resolve_device(_runtime(), cuda_available=False, device_count=0) == torch.device("cpu")
    with pytest.raises(RuntimeConfigError, match=r"cuda:3.*only 2 CUDA device"):
        resolve_device(_runtime("runtime.device=cuda:3"), cuda_available=True, device_count=2)
    with pytest.raises(RuntimeConfigError, match="no CUDA device is visible"):
        resolve_device(_runtime("runtime.device=cuda"), cuda_available=False, device_count=0)


@pytest.mark.parametrize(("overrides", "message"), [
    (["runtime.device=cuda"], "no CUDA device is visible"),
    (["runtime.device=cuda:3"], "no CUDA device is visible"),
    (["runtime.precision=fp16"], "fp16.*needs a CUDA device"),
])
def test_impossible_runtime_fails_before_the_run_folder(tmp_path, overrides, message):
    assert not torch.cuda.is_available()  # this test is about CPU machines
    config = smoke_config(*overrides)
    with pytest.raises(RuntimeConfigError, match=message):
        run(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_cli_reports_an_impossible_device_in_one_line(tmp_path, capsys):
    assert train.main([str(SYNTHETIC_YAML), "scale=smoke", "runtime.device=cuda", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "no CUDA device is visible" in err[-1] and "Traceback" not in "\n".join(err)
    assert not any(tmp_path.iterdir())


def test_bf16_run_trains_and_resumes(tmp_path):
    config = smoke_config("runtime.precision=bf16", "schedule.steps=20")
    reference = run(config, tmp_path / "ref")
    assert reference["status"] == "done"
    assert config.run_id != smoke_config("schedule.steps=20").run_id  # precision changes the arithmetic
    fp32 = run(smoke_config("schedule.steps=20"), tmp_path / "fp32")
    assert reference["final_train_loss"] != fp32["final_train_loss"]  # autocast really ran

    with pytest.raises(Kill):
        run(config, tmp_path / "resumed", on_step=kill_at(13))
    assert without_wall_time(run(config, tmp_path / "resumed")) == without_wall_time(reference)
    assert read_rows(tmp_path / "resumed" / "metrics.jsonl") == read_rows(tmp_path / "ref" / "metrics.jsonl")
    rows = read_rows(tmp_path / "ref" / "metrics.jsonl")
    assert all(isinstance(r["loss"], float) for r in rows if r["kind"] == "train")


def test_throughput_columns_on_train_rows(tmp_path):
    run(smoke_config(), tmp_path)
    rows = [r for r in RunDir(tmp_path).metrics.read_text().splitlines() if '"kind": "train"' in r]
    import json

    train_rows = [json.loads(r) for r in rows]
    assert train_rows
    for row in train_rows:
        assert set(train.TIMING_KEYS) <= set(row)
        assert row["step_time_s"] > 0 and 0 <= row["data_wait_s"] < row["step_time_s"]
        assert row["samples_per_s"] == pytest.approx(64 / row["step_time_s"])  # smoke batch 64
        assert row["tokens_per_s"] == pytest.approx(row["samples_per_s"])  # one token per sample
        assert row["max_memory_mb"] > 10  # the process's peak RSS on a CPU


def test_checkpoint_from_a_gpu_resumes_on_a_cpu(tmp_path, monkeypatch):
    """A checkpoint whose tensors say 'cuda:0' (as a GPU run writes them) loads here via map_location."""
    config = smoke_config("schedule.steps=20")
    reference = run(config, tmp_path / "ref")

    with pytest.raises(Kill):
        run(config, tmp_path / "moved", on_step=kill_at(10))
    rd = RunDir(tmp_path / "moved")
    state = torch.load(rd.checkpoint, weights_only=False)
    # Rewrite it as a GPU run would have: every storage tagged cuda:0.
    monkeypatch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
    torch.save(state, rd.checkpoint)
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match="CUDA"):
        torch.load(rd.checkpoint, weights_only=False)  # what a load without map_location does here
    assert without_wall_time(run(config, tmp_path / "moved")) == without_wall_time(reference)


def test_lfq_exact_mode_compiles_without_a_graph_break():
    from lfq import LFQ

    quantizer = LFQ(codebook_size=2**10, dim=10, entropy_mode="exact")
    explanation = torch._dynamo.explain(quantizer)(torch.randn(2, 10, 4, 4), inv_temperature=10.0)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.slow
@pytest.mark.parametrize(("path", "task_overrides"), [
    (SYNTHETIC_YAML, []),
    (PATCHES_YAML, []),
    (IMAGES_YAML, ["data.batch_size=8", "model.downsample=4"]),  # 3 levels: a smaller graph to compile
])
def test_compiled_run_trains_to_the_eager_losses(tmp_path, path, task_overrides):
    overrides = ["scale=smoke", "schedule.steps=4", "logging.log_every=1", *task_overrides]
    eager = run(load_config(path, overrides), tmp_path / "eager")
    compiled_config = load_config(path, [*overrides, "runtime.compile=true"])
    compiled = run(compiled_config, tmp_path / "compiled")
    assert compiled["status"] == eager["status"] == "done"
    losses = [[r["loss"] for r in read_rows(tmp_path / name / "metrics.jsonl") if r["kind"] == "train"]
              for name in ("eager", "compiled")]
    assert len(losses[0]) == 4
    # The first step sees the same weights and batch: equal to float tolerance. After it the
    # fused kernels' rounding can flip the sign of a latent within 1e-6 of 0, i.e. one token's
    # code, so later losses agree to that token's share of the reconstruction (no rounding bound;
    # measured 9.4e-4 for images), the first to float32 sums of the largest batch (images: 8 x 3 x 32 x 32).
    assert losses[1][0] == pytest.approx(losses[0][0], rel=sum_tol(torch.float32, 8 * 3 * 32 * 32))
    assert losses[1] == pytest.approx(losses[0], rel=3e-2)


@pytest.mark.slow
def test_compiled_run_resumes_to_the_uninterrupted_summary(tmp_path):
    config = smoke_config("schedule.steps=20", "runtime.compile=true")
    reference = run(config, tmp_path / "ref")

    with pytest.raises(Kill):
        run(config, tmp_path / "resumed", on_step=kill_at(10))
    resumed = run(config, tmp_path / "resumed")
    assert resumed["status"] == "done" and resumed["step"] == 20
    # Compiled kernels may round differently from one compilation to the next: equal to tolerance, a
    # budget for 10 steps of drift, no rounding bound (measured equal on AVX-512).
    for key in ("final_train_loss", "final_val_mse"):
        assert resumed[key] == pytest.approx(reference[key], rel=1e-3), key
