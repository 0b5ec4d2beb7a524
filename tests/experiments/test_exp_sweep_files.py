"""Every shipped sweep file validates in full, and a smoke version of it trains, so none rots.

The smoke version runs, at ``scale=smoke`` and 3 steps, the fewest seed-0 runs that still
cover every value of every grid key (e.g. each codebook size and each quantizer kind at
least once), in-process. A sweep of priors needs its tokenizers' finished runs: it is checked to
name runs of the shipped tokenizer sweeps instead (a prior trains end to end in test_exp_prior.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from experiments.sweep import REPO_ROOT, RunSpec, expand, load_sweep
from experiments.train import run

SWEEP_FILES = sorted((REPO_ROOT / "experiments" / "sweeps").glob("*.yaml"))
PRIOR_SWEEPS = [p for p in SWEEP_FILES if load_sweep(p).base.get("task") == "prior"]
SMOKE = ["scale=smoke", "schedule.steps=3", "schedule.val_every=3", "schedule.checkpoint_every=3"]


def covering_runs(runs: list[RunSpec]) -> list[RunSpec]:
    """Greedy: seed-0 runs until every (grid key, value) pair has been seen once."""
    first_seed = [r for r in runs if r.point.get("seed", 0) == min(x.point.get("seed", 0) for x in runs)]
    wanted = {(k, repr(v)) for r in first_seed for k, v in r.point.items() if k != "seed"}
    chosen: list[RunSpec] = []
    while wanted:
        best = max(first_seed, key=lambda r: len(wanted & {(k, repr(v)) for k, v in r.point.items()}))
        chosen.append(best)
        wanted -= {(k, repr(v)) for k, v in best.point.items()}
    return chosen or first_seed[:1]


def test_there_are_sweeps_for_the_readme_and_every_ablation():
    names = {path.stem for path in SWEEP_FILES}
    assert {"demo", "gamma_frac", "ablation_vocab", "ablation_vocab_lfq18", "ablation_entropy_weight",
            "ablation_gamma_frac", "ablation_clamp"} <= names


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.stem)
def test_sweep_validates_in_full_with_at_least_three_seeds_for_ablations(path: Path):
    sweep = load_sweep(path)
    runs = expand(sweep)
    assert runs, f"{path.name} expands to no runs"
    assert len({r.run_id for r in runs}) == len(runs)
    if path.stem.startswith("ablation_"):
        assert len(sweep.seeds) >= 3, f"{path.name}: ablations need at least 3 seeds"


def test_prior_sweeps_name_finished_runs_of_the_shipped_tokenizer_sweeps():
    assert PRIOR_SWEEPS, "no sweep of priors (issue 33's prior_generation_images.yaml)"
    for path in PRIOR_SWEEPS:
        for spec in expand(load_sweep(path)):
            sweep, _, run_id = spec.config.data.tokenizer_run.partition("/")
            tokenizers = {r.run_id for r in expand(load_sweep(REPO_ROOT / "experiments" / "sweeps" / f"{sweep}.yaml"))}
            assert run_id in tokenizers, f"{path.name}: {spec.config.data.tokenizer_run} is no run of {sweep}.yaml"


@pytest.mark.slow
@pytest.mark.parametrize("path", [p for p in SWEEP_FILES if p not in PRIOR_SWEEPS], ids=lambda p: p.stem)
def test_smoke_version_of_the_sweep_trains(path: Path, tmp_path: Path):
    runs = covering_runs(expand(load_sweep(path), SMOKE))
    for spec in runs:
        summary = run(spec.config, tmp_path / spec.run_id, num_threads=1)
        assert summary["status"] == "done", (spec.label(), summary.get("reason"))
        assert (tmp_path / spec.run_id / "DONE").exists()
        assert 0.0 < summary["final_usage_fraction"] <= 1.0, spec.label()


def test_the_demo_is_the_images_recipe_beside_the_reference_with_uncapped_usage():
    """`make demo` shows the suite's finding (results/README.md): the images task over
    diversity_gamma x frac_per_sample_entropy at the recipe's inverse temperature and the
    reference's, on enough validation tokens that usage is not capped by their count."""
    import inspect

    from experiments.config import load_config
    from experiments.image_folder import even_subset
    from experiments.tasks.images import shipped_crops, tokens_per_image
    from lfq import LFQ

    sweep = load_sweep(REPO_ROOT / "experiments" / "sweeps" / "demo.yaml")
    runs = expand(sweep)
    recipe = load_config(REPO_ROOT / "experiments" / "configs" / "images.yaml").quantizer.inv_temperature
    reference = inspect.signature(LFQ.forward).parameters["inv_temperature"].default  # as in vector-quantize-pytorch
    assert recipe != reference
    assert set(sweep.grid["quantizer.inv_temperature"]) == {recipe, reference}
    assert len(sweep.grid["quantizer.diversity_gamma"]) >= 2 and len(sweep.grid["quantizer.frac_per_sample_entropy"]) >= 2
    assert len(sweep.seeds) >= 2
    shipped_val = {}  # resolution -> number of shipped validation crops
    for spec in runs:
        config = spec.config.resolved()
        assert config.task == "images" and config.data.root is None and config.quantizer.kind == "lfq"
        resolution = config.data.resolution
        if resolution not in shipped_val:
            shipped_val[resolution] = len(shipped_crops(resolution)[1])
        val_images = len(even_subset(shipped_val[resolution], config.data.val_size))
        per_code = val_images * tokens_per_image(config) / config.quantizer.codebook_size
        # below 4 per code a uniform assignment reaches under 1 - exp(-4) = 98 % of the codes
        assert per_code >= 4, f"{spec.label()}: {per_code:.2f} validation tokens per code"
