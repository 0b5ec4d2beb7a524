"""A new quantizer kind or task is one module plus its one registry line: the toy kind
(``toy_kind.py``) and the toy task (``toy_task.py``) beside this file, each registered with one line,
are validated, estimated, swept and trained to DONE through ``python -m experiments.train``'s path."""

from __future__ import annotations

import json

import pytest
from exp_helpers import SYNTHETIC_YAML

from common.run_state import finished
from experiments import quantizers
from experiments.config import Config, ConfigError, load_config
from experiments.quantizers import QUANTIZERS
from experiments.resources import estimate
from experiments.sweep import expand, sweep_from_dict
from experiments.tasks import TASKS, Task
from experiments.train import main

SMOKE = ["scale=smoke", "schedule.steps=6", "schedule.val_every=3", "schedule.checkpoint_every=3",
         "logging.log_every=3", "data.batch_size=32", "data.val_size=64"]


@pytest.fixture
def toys(monkeypatch):
    monkeypatch.setitem(QUANTIZERS, "sign", "toy_kind")  # the kind's one line
    monkeypatch.setitem(TASKS, "line", Task("toy_task"))  # the task's one line
    quantizers._all_fields.cache_clear()  # the union of every kind's fields, computed once per registry
    yield
    monkeypatch.delitem(QUANTIZERS, "sign")
    quantizers._all_fields.cache_clear()


def _train(tmp_path, *overrides: str) -> tuple[Config, dict]:
    config = load_config(SYNTHETIC_YAML, [*overrides, *SMOKE])
    assert main([str(SYNTHETIC_YAML), *overrides, *SMOKE, "--out", str(tmp_path)]) == 0
    run_dir = tmp_path / config.run_id
    assert finished(run_dir) == ("done", "")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return config, rows


def test_a_toy_kind_is_validated_estimated_swept_and_trained_to_done(toys, tmp_path):
    with pytest.raises(ConfigError, match=r"quantizer\.sign_scale=0\.0 is invalid: must be > 0"):
        load_config(SYNTHETIC_YAML, ["quantizer.kind=sign", "quantizer.sign_scale=0"])
    config, rows = _train(tmp_path, "quantizer.kind=sign", "quantizer.codebook_size=16", "quantizer.sign_scale=0.5")
    assert type(config.quantizer).__name__ == "SignConfig" and config.quantizer.sign_scale == 0.5
    assert estimate(config)["quantizer.codebook_size: the sign kind's bit weights"] == 8 * 4
    assert [r["step"] for r in rows if r["kind"] == "train"] == [3, 6]
    assert [r["step"] for r in rows if r["kind"] == "val"] == [3, 6]
    usage = [r for r in rows if r["kind"] == "quantizer" and r["mode"] == "train"]
    assert usage and {r["codebook_size"] for r in usage} == {16} and all(1 <= r["codes_used"] <= 16 for r in usage)
    points = expand(sweep_from_dict({"name": "kinds", "base": str(SYNTHETIC_YAML),
                                     "grid": {"quantizer.kind": ["lfq", "sign"]}}), ["scale=smoke"])
    assert [p.config.quantizer.kind for p in points] == ["lfq", "sign"]
    # its field is new (new_field): the other kinds' configs keep their pinned ids
    assert Config(task="synthetic").run_id == "cff3389e8f"


def test_a_toy_task_is_validated_estimated_and_trained_to_done(toys, tmp_path):
    config, rows = _train(tmp_path, "task=line", "data.input_dim=4")
    assert config.task == "line"
    assert estimate(config)["data.val_size: the line's validation points"] == 64 * 4 * 4
    assert [r["step"] for r in rows if r["kind"] == "train"] == [3, 6]
    val = [r for r in rows if r["kind"] == "val"]
    assert [r["step"] for r in val] == [3, 6] and all(r["val_mse"] >= 0 for r in val)
    assert any(r["kind"] == "quantizer" for r in rows)
