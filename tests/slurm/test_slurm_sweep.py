"""Sweep files -> validated run configs (experiments/sweep.py) and resource profiles (slurm/profiles.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from slurm_helpers import write_sweep

from experiments.config import load_config
from experiments.sweep import REPO_ROOT, SweepError, expand, grid_points, load_sweep
from slurm.profiles import ProfileError, available_profiles, resolve_resources, to_submitit
from slurm.submit import main as submit_main


def test_grid_zip_and_seeds_expand_to_the_product(tmp_path: Path) -> None:
    path = write_sweep(tmp_path, "g", grid={"quantizer.diversity_gamma": [0.5, 1.0, 2.0],
                                           "quantizer.frac_per_sample_entropy": [0.25, 1.0]},
                       seeds=[0, 1], zip={"optim.lr": [1e-3, 3e-4], "optim.min_lr": [1e-4, 3e-5]})
    sweep = load_sweep(path)
    points = grid_points(sweep)
    assert len(points) == 3 * 2 * 2 * 2
    # zip pairs its keys: never lr=1e-3 with min_lr=3e-5
    assert {(p["optim.lr"], p["optim.min_lr"]) for p in points} == {(1e-3, 1e-4), (3e-4, 3e-5)}
    runs = expand(sweep)
    assert len({r.run_id for r in runs}) == len(runs) == 24
    run = next(r for r in runs if r.point == {"quantizer.diversity_gamma": 2.0, "quantizer.frac_per_sample_entropy": 0.25,
                                               "optim.lr": 3e-4, "optim.min_lr": 3e-5, "seed": 1})
    assert (run.config.quantizer.diversity_gamma, run.config.quantizer.frac_per_sample_entropy) == (2.0, 0.25)
    assert (run.config.optim.lr, run.config.seed, run.config.name) == (3e-4, 1, "g")
    # the same config built by hand has the same id: runs are the experiments' own configs
    same = load_config({"task": "synthetic"}, ["quantizer.diversity_gamma=2.0", "quantizer.frac_per_sample_entropy=0.25",
                                               "optim.lr=3e-4", "optim.min_lr=3e-5", "seed=1"])
    assert same.run_id == run.run_id


def test_overrides_apply_last_and_identical_runs_are_deduplicated(tmp_path: Path) -> None:
    path = write_sweep(tmp_path, "d", grid={"schedule.steps": [100, 200]}, seeds=[0, 1])
    assert len(expand(load_sweep(path))) == 4
    smoke = expand(load_sweep(path), ["scale=smoke"])  # smoke caps steps at 30: 100 and 200 become one run
    assert len(smoke) == 2 and {r.config.seed for r in smoke} == {0, 1}
    assert all(r.config.scale == "smoke" for r in smoke)


def test_the_command_lines_values_win_over_smoke_and_the_sweeps_own_are_shrunk(tmp_path: Path) -> None:
    # scale=smoke is for trying the whole sweep in seconds: its grid and overrides are shrunk; a value
    # given on submit's command line beside scale=smoke is explicit and kept as given.
    path = write_sweep(tmp_path, "w", grid={"data.batch_size": [32, 512]}, overrides=["schedule.steps=200"])
    runs = expand(load_sweep(path), ["scale=smoke", "optim.warmup_steps=50"])
    ran = [r.config.resolved() for r in runs]
    assert sorted(c.data.batch_size for c in ran) == [32, 64]
    assert {(c.schedule.steps, c.optim.warmup_steps) for c in ran} == {(30, 50)}
    assert {r.config.explicit for r in runs} == {("optim.warmup_steps",)}
    # The job record (config.to_dict()) trains the same run.
    assert {load_config(r.config.to_dict()).run_id for r in runs} == {r.run_id for r in runs}


def test_a_bad_value_names_the_run_and_the_field(tmp_path: Path) -> None:
    path = write_sweep(tmp_path, "bad", grid={"quantizer.frac_per_sample_entropy": [0.5, 1.5]}, seeds=[0, 1])
    with pytest.raises(SweepError) as e:
        expand(load_sweep(path))
    msg = str(e.value)
    assert "2 of 4 runs" in msg and "quantizer.frac_per_sample_entropy=1.5" in msg and "(0, 1]" in msg
    assert "run 3/4" in msg and "seed=0" in msg
    with pytest.raises(SweepError, match="quantizer.codebok_size"):
        expand(load_sweep(write_sweep(tmp_path, "typo", grid={"quantizer.codebok_size": [8]})))


@pytest.mark.parametrize(("extra", "needle"), [
    ({"zip": {"optim.lr": [1e-3, 2e-3], "optim.min_lr": [1e-4]}}, "same length"),
    ({"grid": {"seed": [1, 2]}}, "appear twice"),
    ({"seeds": []}, "seeds"),
    ({"grid": {"optim.lr": []}}, "non-empty list"),
    ({"colour": "blue"}, "unknown sweep key"),
    ({"name": "a/b"}, "name"),
    ({"base": "no/such/config.yaml"}, "not found"),
])
def test_malformed_sweeps_are_refused(tmp_path: Path, extra: dict, needle: str) -> None:
    path = write_sweep(tmp_path, "m", **extra)
    with pytest.raises(SweepError, match=needle):
        expand(load_sweep(path))


def test_shipped_sweeps_expand() -> None:
    demo = expand(load_sweep(REPO_ROOT / "experiments/sweeps/demo.yaml"))
    assert len(demo) >= 8 and len({r.config.seed for r in demo}) == 2
    study = load_sweep(REPO_ROOT / "experiments/sweeps/gamma_frac.yaml")
    assert {"quantizer.diversity_gamma", "quantizer.frac_per_sample_entropy"} <= set(study.grid)
    assert len(study.seeds) >= 3 and len(expand(study)) == len(grid_points(study))
    for name in ("demo", "gamma_frac"):
        resolve_resources(load_sweep(REPO_ROOT / f"experiments/sweeps/{name}.yaml").resources)


def test_profiles_map_to_submitit_names_and_the_command_line_wins() -> None:
    assert {"default", "ci", "gpu-example"} <= set(available_profiles())
    name, params = resolve_resources({"profile": "gpu-example", "time": 30}, overrides={"gpus": 2, "memory": "512M"})
    assert name == "gpu-example"
    assert params["slurm_partition"] == "gpu" and params["slurm_account"] == "my-project"
    assert params["slurm_qos"] == "normal" and params["slurm_constraint"] == "volta32gb"
    assert params["cpus_per_task"] == 8 and params["slurm_array_parallelism"] == 16
    assert params["slurm_setup"][0].startswith("module load")
    assert params["slurm_additional_parameters"] == {"requeue": True}  # verbatim pass-through
    assert params["slurm_max_num_timeout"] == 10
    assert (params["timeout_min"], params["gpus_per_node"], params["mem_gb"]) == (30, 2, 0.5)
    assert to_submitit({"time": "1-02:03:00"}, "t")["timeout_min"] == 26 * 60 + 3
    assert to_submitit({"time": "4:00:00"}, "t")["timeout_min"] == 240


@pytest.mark.parametrize(("resources", "needle"), [
    ({"gpu": 1}, "unknown resource key 'gpu'"),
    ({"slurm_colour": "x"}, "unknown resource key"),
    ({"time": "soon"}, "expected minutes"),
    ({"memory": "lots"}, "expected GB"),
    ({"cpus": 0}, "must be >= 1"),
])
def test_bad_resources_are_refused(resources: dict, needle: str) -> None:
    with pytest.raises(ProfileError, match=needle):
        resolve_resources(resources)
    with pytest.raises(ProfileError, match="unknown cluster profile 'nope'"):
        resolve_resources({}, profile="nope")


def test_submit_refuses_bad_input_before_writing_anything(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    good = write_sweep(tmp_path, "ok")
    bad = write_sweep(tmp_path, "bad", grid={"quantizer.codebook_size": [256, 100]})
    results = tmp_path / "results"
    assert submit_main([str(bad), "--results", str(results)]) == 2
    assert "quantizer.codebook_size=100" in capsys.readouterr().err
    assert submit_main([str(good), "--results", str(results), "--profile", "nope"]) == 2
    assert "unknown cluster profile" in capsys.readouterr().err
    assert submit_main([str(good), "--results", str(results), "--resource", "slurm_colour=red"]) == 2
    assert submit_main([str(good), "--results", str(results), "quantizer.kind=pq"]) == 2
    assert "quantizer.kind" in capsys.readouterr().err
    assert not results.exists()
    # --dry-run validates and lists, and submits nothing
    assert submit_main([str(good), "--results", str(results), "--dry-run", "scale=smoke"]) == 0
    assert "would submit" in capsys.readouterr().out
    assert not (results / "ok" / "_sweep" / "jobs.jsonl").exists()


def test_slurm_without_slurm_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no srun/sbatch/sacct here
    sweep = write_sweep(tmp_path, "nosrun")
    assert submit_main([str(sweep), "--cluster", "slurm", "--results", str(tmp_path / "r"), "scale=smoke"]) == 2
    err = capsys.readouterr().err
    assert "srun is not on PATH" in err and "slurm/local-cluster.sh" in err
    assert not (tmp_path / "r" / "nosrun" / "_sweep" / "jobs.jsonl").exists()
