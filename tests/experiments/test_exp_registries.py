"""The registries are the one list: a quantizer kind (experiments.quantizers.QUANTIZERS) or a task
(experiments.tasks.TASKS) added there is validated, built and dispatched with nothing else touched;
a config class per kind, and fields of another kind refused in new input."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest
import torch
from exp_helpers import PATCHES_YAML, SYNTHETIC_YAML

from experiments import quantizers
from experiments.config import Config, ConfigError, load_config
from experiments.quantizers import QUANTIZERS, QuantizerConfig, build_quantizer, quantizer_config
from experiments.quantizers.binary import LFQConfig
from experiments.quantizers.fsq import FSQConfig
from experiments.quantizers.vq import VQConfig
from experiments.sections import new_field
from experiments.tasks import TASKS, Task, get_task
from lfq import LFQ


@dataclass(frozen=True)
class RoundConfig(QuantizerConfig):
    kind: str = "round"
    round_scale: float = new_field(1.0)


class Round(torch.nn.Module):
    def __init__(self, cfg: RoundConfig, latent_dim: int | None):
        super().__init__()
        self.cfg, self.latent_dim = cfg, latent_dim


CONFIG, build = RoundConfig, Round  # this test module is the kind "round"'s module


@pytest.fixture
def round_kind(monkeypatch):
    monkeypatch.setitem(QUANTIZERS, "round", __name__)
    quantizers._all_fields.cache_clear()  # the union of every kind's fields, computed once per registry
    yield
    monkeypatch.delitem(QUANTIZERS, "round")
    quantizers._all_fields.cache_clear()


def test_a_kind_added_to_the_registry_alone_is_validated_built_and_leaves_every_id(round_kind):
    config = load_config(SYNTHETIC_YAML, ["quantizer.kind=round", "quantizer.round_scale=2"])
    assert type(config.quantizer) is RoundConfig and config.quantizer.round_scale == 2.0
    module = build_quantizer(config.quantizer, 7)
    assert isinstance(module, Round) and module.latent_dim == 7
    assert Config.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match=r"quantizer\.round_scale=3 is a field of kind 'round', not of kind='lfq'"):
        load_config(SYNTHETIC_YAML, ["quantizer.round_scale=3"])
    # its field is new (new_field): configs of the other kinds keep their pinned ids
    assert Config(task="synthetic").run_id == "cff3389e8f" and Config().run_id == "a6c0c990c7"


def test_kind_choices_builders_and_classes_come_from_the_registry():
    assert list(QUANTIZERS) == ["lfq", "bsq", "vq", "fsq"]
    with pytest.raises(ConfigError, match=r"quantizer\.kind='pq' .*\['lfq', 'bsq', 'vq', 'fsq'\]"):
        quantizer_config({"kind": "pq"})
    for kind, cls in [("lfq", LFQConfig), ("bsq", LFQConfig), ("vq", VQConfig), ("fsq", FSQConfig)]:
        config = quantizer_config({"kind": kind, "codebook_size": 64})
        assert type(config) is cls and config.kind == kind
    bsq = build_quantizer(quantizer_config({"kind": "bsq", "codebook_size": 64}))
    assert isinstance(bsq, LFQ) and bsq.spherical
    with pytest.raises(ConfigError, match=r"quantizer\.kind='vq' is invalid: is configured by VQConfig, not LFQConfig"):
        dataclasses.replace(LFQConfig(), kind="vq")


def test_another_kinds_field_in_new_input_is_one_line_naming_both_kinds_and_the_allowed_keys(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("task: synthetic\nquantizer:\n  kind: lfq\n  vq_init: kmeans\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("quantizer.vq_init='kmeans' is a field of kind 'vq', not of kind='lfq': it takes ")
    assert "quantizer.entropy_mode" in msg and "quantizer.codebook_loss_weight" not in msg
    with pytest.raises(ConfigError, match=r"quantizer\.fsq_levels=\[8, 6\] is a field of kind 'fsq', not of "
                                          r"kind='vq': .*plus kind 'lfq', 'bsq''s"):
        load_config(SYNTHETIC_YAML, ["quantizer.kind=vq", "quantizer.fsq_levels=[8, 6]"])
    # at its default another kind's field is no error: every config.json lists every kind's fields
    assert load_config(SYNTHETIC_YAML, ["quantizer.vq_init=uniform", "quantizer.fsq_levels=null"]) == \
        load_config(SYNTHETIC_YAML)


def test_a_sweep_over_kinds_on_a_base_written_for_lfq_carries_its_lfq_fields_inert_and_checked():
    config = load_config(PATCHES_YAML, ["quantizer.kind=vq"])  # ablation_vocab.yaml's VQ runs
    assert type(config.quantizer) is VQConfig
    assert config.quantizer.carried == (("entropy_mode", "exact"),)
    assert config.to_dict()["quantizer"]["entropy_mode"] == "exact"  # in its id, as before the split
    assert not hasattr(config.quantizer, "diversity_gamma")
    assert load_config(PATCHES_YAML, ["quantizer.kind=vq", "quantizer.diversity_gamma=2"]).run_id != config.run_id
    with pytest.raises(ConfigError, match=r"quantizer\.entropy_mode='magic' is invalid"):
        load_config(PATCHES_YAML, ["quantizer.kind=vq", "quantizer.entropy_mode=magic"])


def test_a_config_written_before_the_split_with_another_kinds_field_loads_with_its_id():
    # what the flat config wrote for `task=synthetic quantizer.vq_init=kmeans quantizer.fsq_levels=[4, 4]` (kind lfq)
    old = Config(task="synthetic").to_dict()
    old["quantizer"].update(vq_init="kmeans", fsq_levels=[4, 4])
    config = Config.from_dict({**old, "run_id": "2ec12ce32a"})
    assert config.run_id == "2ec12ce32a"  # the id the flat config gave it (computed with main at 7ea45b7)
    assert config.to_dict() == old and type(config.quantizer) is LFQConfig
    with pytest.raises(ConfigError, match="is a field of kind 'vq'"):
        Config.from_dict(old, strict=True)


def test_a_task_added_to_the_registry_alone_is_a_valid_task_and_dispatched(monkeypatch):
    monkeypatch.setitem(TASKS, "mixture", Task("experiments.tasks.synthetic"))
    config = load_config(SYNTHETIC_YAML, ["task=mixture", "scale=smoke"])
    assert config.task == "mixture" and get_task("mixture") is get_task("synthetic")
    monkeypatch.setitem(TASKS, "broken", Task("experiments.tasks"))
    with pytest.raises(TypeError, match=r"task 'broken': experiments\.tasks has no build_dataset or build_model"):
        get_task("broken")
    with pytest.raises(ConfigError, match=r"task='nope' is invalid: must be one of \['images', 'synthetic', 'patches'"):
        Config(task="nope")


def test_a_tasks_smoke_sizes_come_from_its_registry_entry(monkeypatch):
    images = Config(task="images", scale="smoke").resolved()
    assert images.data.resolution == 32 and images.model.base_channels == 16 and images.model.num_res_blocks == 1
    assert Config(task="synthetic", scale="smoke").resolved().data.resolution == 64  # not an images task
    monkeypatch.setitem(TASKS, "images", dataclasses.replace(TASKS["images"], smoke=None))
    assert Config(task="images", scale="smoke").resolved().data.resolution == 64
