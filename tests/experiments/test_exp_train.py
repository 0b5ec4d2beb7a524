"""The training run: deterministic, resumable to the same result, never re-run, explicit failures."""

from __future__ import annotations

import io
import math
import sys
from pathlib import Path

import pytest
import torch
from exp_helpers import PATCHES_YAML, Kill, kill_at, read_rows, run, smoke_config, without_wall_time

from experiments import train
from experiments.config import ConfigError, load_config
from experiments.loop import TrainState, lr_at
from experiments.run_dir import RunDir, run_status
from experiments.tasks import synthetic

SUMMARY_KEYS = {"run_id", "status", "reason", "step", "wall_time_s", "final_val_mse", "final_val_psnr",
                "best_val_mse", "best_val_psnr", "final_usage_fraction", "final_perplexity",
                "final_codes_used", "final_dead_codes", "final_train_loss"}


def test_a_run_writes_the_documented_folder(tmp_path):
    config = smoke_config()
    summary = run(config, tmp_path)
    rd = RunDir(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"config.json", "metrics.jsonl", "histograms.jsonl",
                                                     "checkpoint.pt", "summary.json", "DONE", "metrics.parquet",
                                                     "environment.jsonl",
                                                     ".lock", ".claim"}  # the run's lock (run_lock.try_lock_run)
    assert rd.read_config()["run_id"] == config.run_id == summary["run_id"]
    assert SUMMARY_KEYS <= set(summary) and summary["status"] == "done" and summary["step"] == 30
    assert summary == rd.read_summary()
    rows = read_rows(rd.metrics)
    kinds = {r["kind"] for r in rows}
    # The smoke run collapses to a few codes: its 5 constant bits raise the monitor's dead-bit alarm.
    assert kinds == {"quantizer", "train", "val", "alarm"}
    assert {r["rule"] for r in rows if r["kind"] == "alarm"} == {"dead_bit"} and summary["alarm_count"] >= 1
    val = [r for r in rows if r["kind"] == "val"]
    assert [r["step"] for r in val] == [10, 20, 30]
    assert summary["final_val_mse"] == val[-1]["val_mse"]
    # approx's default 1e-6 relative: one float64 log10 of the logged value (tests/tolerances.py)
    assert summary["final_val_psnr"] == pytest.approx(10 * math.log10(1 / val[-1]["val_mse"]))
    assert summary["best_val_mse"] == min(r["val_mse"] for r in val)
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert train_rows[-1]["step"] == 30 and {"loss", "recon_loss", "aux_loss", "lr"} <= set(train_rows[-1])
    last_usage = [r for r in rows if r["kind"] == "quantizer" and r["mode"] == "train" and r["step"] == 30]
    # a float64 mean of a few exact count ratios: approx's default
    assert summary["final_usage_fraction"] == pytest.approx(sum(r["usage_fraction"] for r in last_usage) / len(last_usage))
    assert 0 < summary["final_usage_fraction"] <= 1
    assert run_status(tmp_path) == "done"
    assert load_config(rd.config).run_id == config.run_id  # config.json reproduces the run


@pytest.mark.parametrize("kind", ["lfq", "vq", "fsq"])
def test_same_config_same_metrics(tmp_path, kind):
    # frac < 1: LFQ's token subsets draw from the global RNG, which must be seeded too.
    config = smoke_config(f"quantizer.kind={kind}", "quantizer.frac_per_sample_entropy=0.5", "schedule.steps=15")
    a = run(config, tmp_path / "a")
    b = run(config, tmp_path / "b")
    assert without_wall_time(a) == without_wall_time(b)
    assert read_rows(tmp_path / "a" / "metrics.jsonl") == read_rows(tmp_path / "b" / "metrics.jsonl")
    other_seed = run(smoke_config(f"quantizer.kind={kind}", "quantizer.frac_per_sample_entropy=0.5",
                                        "schedule.steps=15", "seed=1"), tmp_path / "c")
    assert other_seed["final_train_loss"] != a["final_train_loss"]


@pytest.mark.parametrize("kind", ["lfq", "vq", "fsq"])
def test_kill_and_resume_ends_as_if_never_interrupted(tmp_path, kind):
    config = smoke_config(f"quantizer.kind={kind}", "quantizer.frac_per_sample_entropy=0.5")
    reference = run(config, tmp_path / "ref")

    # Killed at 13: the checkpoint is from step 10, the logs already hold rows up to 13.
    with pytest.raises(Kill):
        run(config, tmp_path / "run", on_step=kill_at(13))
    rd = RunDir(tmp_path / "run")
    assert torch.load(rd.checkpoint, weights_only=False)["progress"]["step"] == 10
    assert max(r["step"] for r in read_rows(rd.metrics)) == 13
    assert rd.read_summary()["status"] == "failed" and not rd.is_done()

    resumed = run(config, tmp_path / "run")
    assert without_wall_time(resumed) == without_wall_time(reference)
    assert read_rows(rd.metrics) == read_rows(tmp_path / "ref" / "metrics.jsonl")  # nothing duplicated
    assert [r["step"] for r in read_rows(rd.environment)] == [0, 10]  # one row per attempt, kept over the resume
    assert read_rows(rd.histograms) == read_rows(tmp_path / "ref" / "histograms.jsonl")


def test_a_run_ends_with_a_histogram_and_resumes_without_repeating_one(tmp_path):
    """15 steps, snapshots every 10 (after step 9): the run's last step has a final snapshot.
    Killed right after the checkpoint of step 10 (the monitor detaches as the attempt closes), it
    leaves no snapshot there for the resumed run to repeat: the logs end as the reference's.
    At 20 steps the snapshot of step 19 is the last (not one of step 20 alone)."""
    run(smoke_config("schedule.steps=20"), tmp_path / "twenty")
    steps = {r["step"] for r in read_rows(tmp_path / "twenty" / "histograms.jsonl") if r["mode"] == "train"}
    assert sorted(steps) == [9, 19]
    config = smoke_config("schedule.steps=15")
    run(config, tmp_path / "ref")
    reference = read_rows(tmp_path / "ref" / "histograms.jsonl")
    assert sorted({r["step"] for r in reference if r["mode"] == "train"}) == [9, 15]
    with pytest.raises(Kill):
        run(config, tmp_path / "run", on_step=kill_at(10))
    run(config, tmp_path / "run")
    assert read_rows(tmp_path / "run" / "histograms.jsonl") == reference


def test_killed_before_the_first_checkpoint_starts_over(tmp_path):
    config = smoke_config()
    reference = run(config, tmp_path / "ref")
    with pytest.raises(Kill):
        run(config, tmp_path / "run", on_step=kill_at(4))
    assert not RunDir(tmp_path / "run").checkpoint.exists()
    assert without_wall_time(run(config, tmp_path / "run")) == without_wall_time(reference)
    assert read_rows(tmp_path / "run" / "metrics.jsonl") == read_rows(tmp_path / "ref" / "metrics.jsonl")


def test_a_done_folder_is_never_run_again(tmp_path, monkeypatch):
    config = smoke_config()
    first = run(config, tmp_path)
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}

    def no_training(*args, **kwargs):
        raise AssertionError("a DONE run built its dataset again")

    monkeypatch.setattr(synthetic, "build_dataset", no_training)
    assert run(config, tmp_path) == first
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before


def test_killed_between_summary_and_done_finishes_without_training(tmp_path):
    config = smoke_config()
    first = run(config, tmp_path)
    metrics = (tmp_path / "metrics.jsonl").read_text()
    (tmp_path / "DONE").unlink()
    steps = []
    assert without_wall_time(run(config, tmp_path, on_step=steps.append)) == without_wall_time(first)
    assert steps == [] and (tmp_path / "DONE").exists()
    assert (tmp_path / "metrics.jsonl").read_text() == metrics


def test_non_finite_loss_stops_the_run_as_failed(tmp_path, monkeypatch):
    clean = synthetic.GaussianMixture.train_batch
    calls = []

    def poisoned(self, g, batch_size):
        calls.append(1)
        batch = clean(self, g, batch_size)
        return batch * math.nan if len(calls) == 7 else batch

    monkeypatch.setattr(synthetic.GaussianMixture, "train_batch", poisoned)
    summary = run(smoke_config(), tmp_path)  # returned, not raised
    assert summary["status"] == "failed" and summary["step"] == 6
    assert "non-finite loss nan at step 7" in summary["reason"]
    assert RunDir(tmp_path).read_summary() == summary and not RunDir(tmp_path).is_done()
    assert run_status(tmp_path) == "failed"


def test_an_exception_is_recorded_then_propagates(tmp_path):
    def boom(step):
        if step == 3:
            raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        run(smoke_config(), tmp_path, on_step=boom)
    summary = RunDir(tmp_path).read_summary()
    assert summary["status"] == "failed" and summary["reason"] == "RuntimeError: disk on fire"
    assert "Traceback" in summary["error"] and "disk on fire" in summary["error"]
    assert not RunDir(tmp_path).is_done()


def test_a_folder_of_another_run_is_refused(tmp_path):
    run(smoke_config("schedule.steps=5"), tmp_path)
    with pytest.raises(ConfigError, match="holds run"):  # not another run's summary, silently
        run(smoke_config("schedule.steps=6"), tmp_path)
    (tmp_path / "DONE").unlink()
    with pytest.raises(ConfigError, match="holds run"):
        run(smoke_config("schedule.steps=6"), tmp_path)


def test_train_state_goes_through_a_checkpoint_as_plain_data_and_reads_older_ones(tmp_path):
    state = TrainState(step=7, wall_time_s=1.5, best_val_mse=0.1, best_val_psnr=10.0, best_val_step=5,
                       last_val={"val_mse": 0.2, "val_psnr": 7.0}, last_train={"loss": 1.0, "recon_loss": 0.9,
                                                                               "aux_loss": 0.1},
                       last_quantizer=[{"step": 7, "usage_fraction": 0.5}], unreadable_files=2)
    torch.save({"progress": state.to_dict()}, tmp_path / "c.pt")
    loaded = torch.load(tmp_path / "c.pt", weights_only=True)["progress"]  # plain containers only
    assert TrainState.from_dict(loaded) == state
    target = TrainState()
    keep = target
    target.load(loaded)  # in place: the monitor's sink holds the object
    assert target is keep and target == state
    older = {k: v for k, v in loaded.items() if k != "unreadable_files"}  # a checkpoint from before the field
    assert TrainState.from_dict(older).unreadable_files == 0
    summary = TrainState.from_dict(older).summary("r", smoke_config().resolved(), "done", "")
    assert "unreadable_files" not in summary and summary["step"] == 7 and summary["final_usage_fraction"] == 0.5
    assert summary["best_val_step"] == 5 and summary["final_val_mse"] == 0.2 and summary["final_train_loss"] == 1.0


def test_lr_warms_up_then_decays_to_min_lr():
    config = smoke_config("optim.warmup_steps=5").resolved()
    lrs = [lr_at(s, config) for s in range(1, config.schedule.steps + 1)]
    assert lrs[4] == config.optim.lr and lrs[0] == config.optim.lr / 5
    assert lrs[-1] == pytest.approx(config.optim.min_lr)  # float64 cosine of a few terms: approx's default
    assert all(a >= b for a, b in zip(lrs[4:-1], lrs[5:], strict=True))


def test_patches_smoke_run(tmp_path):
    summary = run(smoke_config("quantizer.codebook_size=256", path=PATCHES_YAML), tmp_path)
    assert summary["status"] == "done" and summary["task"] == "patches"
    assert 0 < summary["final_val_mse"] < 1 and summary["final_val_psnr"] > 0
    assert summary["final_codes_used"] >= 1


def test_num_threads_applies_during_the_run_only(tmp_path):
    before, seen = torch.get_num_threads(), []
    run(smoke_config("schedule.steps=2"), tmp_path, on_step=lambda s: seen.append(torch.get_num_threads()))
    assert seen == [1, 1] and torch.get_num_threads() == before
    assert not torch.are_deterministic_algorithms_enabled()  # restored for the caller, too


def test_kill_and_resume_on_patches(tmp_path):
    config = smoke_config("quantizer.codebook_size=256", "schedule.steps=12", path=PATCHES_YAML)
    reference = run(config, tmp_path / "ref")
    with pytest.raises(Kill):
        run(config, tmp_path / "run", on_step=kill_at(11))
    assert without_wall_time(run(config, tmp_path / "run")) == without_wall_time(reference)
    assert read_rows(tmp_path / "run" / "metrics.jsonl") == read_rows(tmp_path / "ref" / "metrics.jsonl")


def test_tqdm_on_a_terminal(tmp_path, monkeypatch, capsys):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    run(smoke_config("schedule.steps=3"), tmp_path)
    assert "3/3" in terminal.getvalue()  # the bar
    assert "step 3/3" not in capsys.readouterr().out  # and no plain lines


@pytest.mark.slow
def test_diversity_knobs_raise_code_usage(tmp_path):
    # The suite exists to measure this: at the library defaults (inv_temperature=100, gamma=1)
    # LFQ collapses to a few codes; a softer temperature and a larger gamma use the codebook.
    default = run(smoke_config("scale=full", "schedule.steps=500"), tmp_path / "default")
    tuned = run(smoke_config("scale=full", "schedule.steps=500", "quantizer.inv_temperature=10",
                             "quantizer.diversity_gamma=4"), tmp_path / "tuned")
    assert tuned["final_usage_fraction"] > 0.5 > 3 * default["final_usage_fraction"]
    assert tuned["final_perplexity"] > 2 * default["final_perplexity"]


def test_each_attempt_records_what_it_computed_on(tmp_path, monkeypatch):
    import subprocess

    config = smoke_config("schedule.steps=12")
    with pytest.raises(Kill):
        run(config, tmp_path, on_step=kill_at(11))
    monkeypatch.setenv("SLURM_JOB_ID", "77")  # the resume lands in a job-array task
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "70")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    run(config, tmp_path)
    first, resumed = read_rows(RunDir(tmp_path).environment)
    assert (first["step"], resumed["step"]) == (0, 10) and (first["job_id"], resumed["job_id"]) == (None, "70_3")
    for row in (first, resumed):
        assert row["torch"] == torch.__version__ and row["threads"] == 1 and row["device"] == "cpu"
        assert row["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and row["cpu"]
        assert row["gpu"] is None and row["world_size"] == 1
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                          cwd=Path(train.__file__).parents[1]).stdout.strip()
    assert first["commit"] == head and isinstance(first["dirty"], bool)  # CI and make test run in a checkout
    from experiments.run_lock import try_lock_run

    with try_lock_run(tmp_path / "held", info={"job_id": "4242"}):  # as slurm.job holds a run: its job id wins
        run(config, tmp_path / "held")
    assert [r["job_id"] for r in read_rows(RunDir(tmp_path / "held").environment)] == ["4242"]
    from experiments import provenance

    code = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", *provenance.CODE],
                          capture_output=True, text=True, check=True, cwd=provenance.REPO).stdout
    assert first["dirty"] == bool(code.strip())


def test_provenance_outside_a_git_checkout_is_none(monkeypatch, tmp_path):
    from experiments import provenance

    provenance.code_version.cache_clear()
    monkeypatch.setattr(provenance, "REPO", tmp_path)  # not a checkout
    try:
        assert provenance.code_version() == {"commit": None, "dirty": None}
        monkeypatch.setenv("PATH", str(tmp_path))  # no git at all
        provenance.code_version.cache_clear()
        assert provenance.code_version() == {"commit": None, "dirty": None}
    finally:
        provenance.code_version.cache_clear()
