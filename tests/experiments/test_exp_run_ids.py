"""Run ids and config.json of every shipped config and sweep run, as the code of 7ea45b7 made them.

Every run folder resumes by its id, so these may never change: ``run_id_fixture.py`` says how
the fixture was made (from the code before a change) and how runs of new files are added.
"""

from __future__ import annotations

import hashlib
import json

import pytest
from run_id_fixture import FIXTURE, REPO, _key, config_json, shipped_inputs

from experiments.config import Config, load_config

PINNED = json.loads(FIXTURE.read_text(encoding="utf-8"))


def test_the_fixture_covers_every_kind_task_and_scale() -> None:
    configs = [Config.from_dict({k: v for k, v in d.items() if k != "run_id"}) for d in PINNED["config_json"]]
    assert {c.quantizer.kind for c in configs} == {"lfq", "bsq", "vq", "fsq"}
    assert {c.task for c in configs} == {"images", "synthetic", "patches", "prior", "video"}
    assert {c.scale for c in configs} == {"full", "smoke"}
    assert len(PINNED["runs"]) > 600 and any("ablation_vocab.yaml quantizer.kind=vq" in r["label"] for r in PINNED["runs"])


def test_every_pinned_input_gives_its_run_id_and_config_json() -> None:
    wrong = []
    for run in PINNED["runs"]:
        config = load_config(PINNED["bases"][run["base"]], run["overrides"])
        digest = hashlib.sha256(config_json(config).encode()).hexdigest()[:16]
        if (config.run_id, digest) != (run["run_id"], run["config_json_sha256"]):
            wrong.append(f"{run['label']}: id {config.run_id} (pinned {run['run_id']}), config.json {digest} "
                         f"(pinned {run['config_json_sha256']})")
    assert not wrong, f"{len(wrong)} of {len(PINNED['runs'])} runs changed:\n" + "\n".join(wrong[:20])


@pytest.mark.parametrize("i", range(len(PINNED["config_json"])))
def test_an_old_config_json_loads_to_its_id_and_writes_back_the_same(i: int) -> None:
    old = PINNED["config_json"][i]
    config = Config.from_dict(old)
    assert config.run_id == old["run_id"]
    assert {**config.to_dict(), "run_id": config.run_id} == old


def test_every_run_the_repository_ships_is_pinned() -> None:
    pinned = {(r["base"], tuple(r["overrides"])): r["run_id"] for r in PINNED["runs"]}
    missing = [label for label, base, overrides in shipped_inputs(REPO) if (_key(base), tuple(overrides)) not in pinned]
    assert not missing, (f"{len(missing)} shipped runs are not in {FIXTURE.name} (e.g. {missing[0]!r}): add them with "
                         f"`python tests/experiments/run_id_fixture.py` from the code before your change")
