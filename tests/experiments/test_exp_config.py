"""Config: validation names the field, round trips, run ids that are stable and ignore logging."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
from exp_helpers import PATCHES_YAML, SYNTHETIC_YAML

from experiments.config import (
    Config,
    ConfigError,
    apply_overrides,
    load_config,
)
from experiments.quantizers.binary import LFQConfig
from experiments.quantizers.fsq import default_fsq_levels


@pytest.mark.parametrize("path", [SYNTHETIC_YAML, PATCHES_YAML])
def test_shipped_configs_round_trip(path):
    config = load_config(path)
    assert config.task == path.stem
    assert Config.from_dict(config.to_dict()) == config
    assert Config.from_dict(config.resolved().to_dict()) == config.resolved()


def test_round_trip_keeps_tuples_and_nones():
    config = load_config({"quantizer": {"kind": "fsq", "fsq_levels": [8, 5, 5]}, "model": {"latent_dim": None}})
    assert config.quantizer.fsq_levels == (8, 5, 5)
    d = config.to_dict()
    assert d["quantizer"]["fsq_levels"] == [8, 5, 5]
    assert Config.from_dict(d) == config
    assert Config.from_dict({**d, "run_id": "ignored"}) == config  # config.json carries run_id


def test_overrides_are_yaml_scalars():
    config = load_config(SYNTHETIC_YAML, ["quantizer.kind=fsq", "quantizer.codebook_size=512", "optim.lr=1e-3",
                                          "seed=7", "quantizer.fsq_levels=[8, 6]", "model.latent_dim=null"])
    assert config.quantizer.codebook_size == 512
    assert config.optim.lr == 1e-3 and isinstance(config.optim.lr, float)
    assert config.seed == 7
    assert config.quantizer.fsq_levels == (8, 6)
    assert config.model.latent_dim is None
    assert apply_overrides(load_config(SYNTHETIC_YAML), ["quantizer.kind=fsq", "quantizer.codebook_size=512", "optim.lr=1e-3",
                                                         "seed=7", "quantizer.fsq_levels=[8, 6]"]) == config


def test_ints_widen_to_float_so_ids_do_not_depend_on_spelling():
    a = load_config({}, ["quantizer.diversity_gamma=1"])
    b = load_config({}, ["quantizer.diversity_gamma=1.0"])
    assert a.quantizer.diversity_gamma == 1.0 and isinstance(a.quantizer.diversity_gamma, float)
    assert a.run_id == b.run_id


def test_run_id_ignores_logging_and_name_but_not_results_fields():
    base = load_config(SYNTHETIC_YAML)
    assert len(base.run_id) == 10 and int(base.run_id, 16) >= 0
    same = apply_overrides(base, ["logging.log_every=7", "logging.print_every=3",
                                  "logging.histogram_every=11", "name=other"])
    assert same.run_id == base.run_id
    for override in ["quantizer.diversity_gamma=2.0", "seed=1", "quantizer.frac_per_sample_entropy=0.5",
                     "monitor.usage_window=50", "scale=smoke", "quantizer.kind=vq"]:
        assert apply_overrides(base, [override]).run_id != base.run_id, override


def test_run_id_is_the_same_in_another_process():
    config = load_config(SYNTHETIC_YAML, ["quantizer.diversity_gamma=0.5"])
    code = ("from experiments.config import load_config; "
            f"print(load_config({str(SYNTHETIC_YAML)!r}, ['quantizer.diversity_gamma=0.5']).run_id)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "123", "PATH": ""})
    assert out.stdout.strip() == config.run_id


def test_run_id_of_the_default_config_is_pinned():
    # Changing the canonical form silently orphans every existing run folder. The synthetic
    # config was the default when ids were first published; fields added since (runtime, loss,
    # images data and model fields) must leave its id alone while they hold their defaults.
    assert Config(task="synthetic").run_id == "cff3389e8f"
    assert Config().run_id == "a6c0c990c7"  # the images task, the default since issue 14


def test_new_fields_enter_the_id_only_away_from_their_default():
    base = Config(task="synthetic")
    assert apply_overrides(base, ["loss.l2_weight=1.0", "runtime.precision=fp32"]).run_id == base.run_id
    assert apply_overrides(base, ["runtime.precision=bf16"]).run_id != base.run_id
    assert apply_overrides(base, ["loss.l1_weight=0.5"]).run_id != base.run_id
    # Where and how fast a run computes never changes its id.
    moved = ["runtime.device=cuda:1", "runtime.compile=true", "runtime.num_workers=8", "runtime.pin_memory=false"]
    assert apply_overrides(base, moved).run_id == base.run_id


def test_smoke_shrinks_and_is_idempotent():
    full = load_config(PATCHES_YAML)
    smoke = apply_overrides(full, ["scale=smoke"]).resolved()
    assert smoke.schedule.steps <= 30 < full.schedule.steps
    assert smoke.data.batch_size <= 64 and smoke.data.val_size <= 256
    assert smoke.resolved() == smoke
    assert full.resolved() == full
    # Two smoke configs that shrink to the same run are the same run.
    assert apply_overrides(full, ["scale=smoke", "schedule.steps=500"]).run_id == \
        apply_overrides(full, ["scale=smoke"]).run_id


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["quantizer.codebook_size=1000"], r"quantizer\.codebook_size=1000 .*power of two.*1024"),
        (["quantizer.frac_per_sample_entropy=0"], r"quantizer\.frac_per_sample_entropy=0\.0 .*\(0, 1\]"),
        (["quantizer.frac_per_sample_entropy=1.5"], r"quantizer\.frac_per_sample_entropy=1\.5 .*\(0, 1\]"),
        (["task=imagenet"], r"task='imagenet' .*'synthetic', 'patches'"),
        (["scale=tiny"], r"scale='tiny' .*'full', 'smoke'"),
        (["task=patch"], r"task='patch' .*did you mean 'patches'"),
        (["quantizer.codebok_size=512"], r"unknown config key 'quantizer\.codebok_size'; did you mean 'quantizer\.codebook_size'"),
        (["quantizr.kind=vq"], r"unknown config key 'quantizr\.kind'; did you mean 'quantizer\.kind'"),
        (["sed=1"], r"unknown config key 'sed'; did you mean 'seed'"),
        (["data.batch_size=big"], r"data\.batch_size='big' has the wrong type str: expected int"),
        (["seed=true"], r"seed=True has the wrong type bool: expected int"),
        (["data.batch_size=1.5"], r"data\.batch_size=1\.5 is invalid: must be a whole number .*1\.5e3 = 1500"),
        (["schedule.steps=15e-1"], r"schedule\.steps='15e-1' is invalid: must be a whole number"),
        (["schedule.steps=.inf"], r"schedule\.steps=inf is invalid: must be a whole number"),
        (["quantizer.diversity_gamma=-1"], r"quantizer\.diversity_gamma=-1\.0 is invalid: must be >= 0"),
        (["optim.lr=fast"], r"optim\.lr='fast' has the wrong type str: expected float"),
        (["quantizer.kind=fsq", "quantizer.fsq_levels=8"],
         r"quantizer\.fsq_levels=8 has the wrong type int: expected list of int"),
        (["quantizer.entropy_mode=magic"], r"quantizer\.entropy_mode='magic' .*one of"),
        (["quantizer.kind=pq"], r"quantizer\.kind='pq' .*'lfq', 'bsq', 'vq', 'fsq'"),
        (["schedule.steps=0"], r"schedule\.steps=0 .*>= 1"),
        (["optim.lr=inf"], r"optim\.lr=inf .*finite"),
        (["quantizer=lfq"], r"names a whole section"),
        (["steps"], r"must look like key=value"),
    ],
)
def test_bad_input_names_field_value_and_what_is_allowed(overrides, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(SYNTHETIC_YAML, overrides)


@pytest.mark.parametrize("value", ["1.5e3", "1500.0", "15e2", "1.5E+3"])
def test_an_integral_float_is_the_int_it_means(value):
    # YAML 1.1 reads 1.5e3 as the string '1.5e3' and 1500.0 as a float: both mean 1500 steps,
    # and the run is the one schedule.steps=1500 names (the same id).
    config = load_config(SYNTHETIC_YAML, [f"schedule.steps={value}"])
    assert config.schedule.steps == 1500 and type(config.schedule.steps) is int
    assert config.run_id == load_config(SYNTHETIC_YAML, ["schedule.steps=1500"]).run_id
    assert load_config(SYNTHETIC_YAML, ["quantizer.kind=fsq", f"quantizer.fsq_levels=[8.0, {value}]"]
                       ).quantizer.fsq_levels == (8, 1500)


# Every weight and temperature a config sets: none may be negative (a temperature not even 0).
NON_NEGATIVE = ["quantizer.diversity_gamma", "quantizer.entropy_loss_weight", "quantizer.commitment_loss_weight",
                "loss.l1_weight", "loss.l2_weight", "anneal.entropy_start", "anneal.commitment_start"]
POSITIVE = ["quantizer.inv_temperature", "anneal.inv_temperature_start", "quantizer.codebook_scale"]


@pytest.mark.parametrize("key", [*NON_NEGATIVE, *POSITIVE, "quantizer.codebook_loss_weight"])
def test_negative_weights_and_temperatures_are_refused_in_one_line(key):
    kind = ["quantizer.kind=vq"] if key == "quantizer.codebook_loss_weight" else []
    with pytest.raises(ConfigError) as e:
        load_config(SYNTHETIC_YAML, [*kind, f"{key}=-0.5"])
    message = str(e.value)
    assert message.startswith(f"{key}=-0.5 is invalid: must be ") and "\n" not in message
    assert (">= 0" if key not in POSITIVE else "> 0") in message
    if key in NON_NEGATIVE:  # 0 switches a term off: allowed
        load_config(SYNTHETIC_YAML, [f"{key}=0", *(["loss.l1_weight=1"] if key == "loss.l2_weight" else [])])


def test_explicit_values_win_over_the_smoke_preset():
    # The command line's values (explicit) are kept; the file's are shrunk.
    config = load_config(SYNTHETIC_YAML, explicit=["scale=smoke", "data.batch_size=100000000000",
                                                   "schedule.steps=200", "logging.diagnostics_every=3"])
    ran = config.resolved()
    assert (ran.data.batch_size, ran.schedule.steps) == (100000000000, 200)
    assert ran.logging.diagnostics_every == 3  # the preset used to reset the logging section whole
    assert (ran.data.val_size, ran.schedule.val_every, ran.optim.warmup_steps) == (256, 10, 5)  # still shrunk
    assert config.explicit == ("data.batch_size", "schedule.steps")  # the values the preset would change
    # Read back from config.json it resolves to the same values and the same id.
    again = Config.from_dict({**ran.to_dict(), "run_id": config.run_id})
    assert again.resolved() == ran and again.run_id == config.run_id
    assert ran.to_dict()["explicit"] == ["data.batch_size", "schedule.steps"]
    # Order does not matter, and the file's scale counts as much as the command line's.
    assert load_config(SYNTHETIC_YAML, ["scale=smoke"], explicit=["schedule.steps=200"]).resolved().schedule.steps == 200
    # Overrides that are part of the config (a sweep's grid, the Python API) are shrunk, as before.
    assert load_config(SYNTHETIC_YAML, ["scale=smoke", "data.batch_size=512"]).resolved().data.batch_size == 64


def test_an_explicit_value_the_preset_keeps_anyway_changes_nothing():
    # Below the cap the preset changes nothing: the config (id, config.json) is the one it always was.
    plain = load_config(SYNTHETIC_YAML, ["scale=smoke", "data.batch_size=32"])
    given = load_config(SYNTHETIC_YAML, explicit=["scale=smoke", "data.batch_size=32"])
    assert given == plain and given.explicit == () and "explicit" not in given.resolved().to_dict()
    # At scale=full nothing is shrunk, so nothing is recorded.
    assert load_config(SYNTHETIC_YAML, explicit=["data.batch_size=512"]).explicit == ()


def test_explicit_images_task_sizes_win_too():
    config = load_config({"task": "images"}, explicit=["scale=smoke", "model.num_res_blocks=2", "data.resolution=64"])
    ran = config.resolved()
    assert (ran.model.num_res_blocks, ran.data.resolution, ran.model.base_channels) == (2, 64, 16)


def test_explicit_must_name_config_keys():
    with pytest.raises(ConfigError, match=r"explicit=\['data\.batchsize'\] is invalid: .*did you mean 'data\.batch_size'"):
        Config(explicit=("data.batchsize",))


def test_config_error_is_a_value_error_and_raised_at_construction():
    assert issubclass(ConfigError, ValueError)
    with pytest.raises(ConfigError, match="quantizer.codebook_size"):
        LFQConfig(codebook_size=1000)
    with pytest.raises(ConfigError, match="quantizer.frac_per_sample_entropy"):
        dataclasses.replace(LFQConfig(), frac_per_sample_entropy=0.0)
    with pytest.raises(ConfigError, match="task"):
        Config(task="nope")


def test_unknown_key_in_yaml_section(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("task: synthetic\noptim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'optim\.learning_rate'"):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    path.write_text("task: [synthetic\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_non_power_of_two_is_fine_for_vq_but_not_lfq():
    assert load_config({}, ["quantizer.kind=vq", "quantizer.codebook_size=1000"]).quantizer.codebook_size == 1000
    with pytest.raises(ConfigError, match="power of two"):
        load_config({}, ["quantizer.kind=lfq", "quantizer.codebook_size=1000"])


@pytest.mark.parametrize(("size", "levels"), [(256, (8, 6, 5)), (1024, (8, 5, 5, 5)), (64, (8, 8)),
                                              (32, (8, 4)), (2, (2,))])
def test_fsq_levels_derive_from_codebook_size(size, levels):
    assert default_fsq_levels(size) == levels
    config = load_config({}, ["quantizer.kind=fsq", f"quantizer.codebook_size={size}"])
    assert config.quantizer.resolved_fsq_levels() == levels
