"""The run ids of every shipped config and sweep, pinned (``tests/experiments/data/run_ids.json``).

Every run folder resumes by its id, so a change to the config code must map every input it
ever accepted to the same id and the same ``config.json``. The fixture stores the inputs (the
base mappings and the override lists, exactly as ``experiments.sweep.expand`` builds them) with
what the code of the time made of them; ``test_exp_run_ids.py`` replays them.

    python tests/experiments/run_id_fixture.py          # add the runs of new sweep/config files

Adding keeps every entry already there and refuses to add one whose input is there with another
id: regenerate from the code *before* a change, never after.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
FIXTURE = Path(__file__).resolve().parent / "data" / "run_ids.json"
KINDS = ("lfq", "bsq", "vq", "fsq")  # the kinds every shipped config is also pinned with


def config_json(config: Any) -> str:
    """The text ``experiments.train`` writes to a run folder's ``config.json``."""
    resolved = config.resolved()
    return json.dumps({**resolved.to_dict(), "run_id": config.run_id}, indent=2, sort_keys=True, allow_nan=True) + "\n"


def _key(base: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(base, sort_keys=True).encode()).hexdigest()[:12]


STAND_IN_TOKENIZER = "0123456789"


def shipped_inputs(repo: Path = REPO) -> list[tuple[str, dict[str, Any], list[str]]]:
    """(label, base mapping, overrides) of every run the repository ships, at both scales."""
    import yaml

    from experiments.sweep import _override, grid_points, load_sweep

    inputs: list[tuple[str, dict[str, Any], list[str]]] = [("Config()", {}, []), ("Config(task=synthetic)", {}, ["task=synthetic"])]
    for path in sorted((repo / "experiments" / "configs").glob("*.yaml")):
        base = yaml.safe_load(path.read_text(encoding="utf-8"))
        rel = str(path.relative_to(repo))
        # a prior's config names no tokenizer run (the user gives one): pinned with a stand-in run id
        needs = [f"data.tokenizer_run=images/{STAND_IN_TOKENIZER}"] if base.get("task") == "prior" else []
        for kind in (None, *KINDS):
            for scale in ("full", "smoke"):
                overrides = needs + ([] if kind is None else [f"quantizer.kind={kind}"]) + [f"scale={scale}"]
                inputs.append((f"{rel} {' '.join(overrides)}", base, overrides))
    for path in sorted((repo / "experiments" / "sweeps").glob("*.yaml")):
        sweep = load_sweep(path)
        rel = str(path.relative_to(repo))
        for point in grid_points(sweep):
            items = [*sweep.overrides, *(_override(k, v) for k, v in point.items()), _override("name", sweep.name)]
            label = " ".join(f"{k}={v}" for k, v in point.items())
            inputs.append((f"{rel} {label}", dict(sweep.base), items))
            inputs.append((f"{rel} {label} scale=smoke", dict(sweep.base), [*items, "scale=smoke"]))
    return inputs


def build(repo: Path = REPO, existing: dict[str, Any] | None = None) -> dict[str, Any]:
    from experiments.config import load_config

    fixture = existing or {"bases": {}, "runs": [], "config_json": []}
    known = {(r["base"], tuple(r["overrides"])): r for r in fixture["runs"]}
    for label, base, overrides in shipped_inputs(repo):
        key = _key(base)
        config = load_config(base, overrides)
        text = config_json(config)
        entry = {"label": label, "base": key, "overrides": overrides, "run_id": config.run_id,
                 "config_json_sha256": hashlib.sha256(text.encode()).hexdigest()[:16]}
        old = known.get((key, tuple(overrides)))
        if old is not None:
            if (old["run_id"], old["config_json_sha256"]) != (entry["run_id"], entry["config_json_sha256"]):
                raise SystemExit(f"{label}: this code gives run id {entry['run_id']}, the fixture {old['run_id']}; "
                                 f"the code changed the id: fix the code, not the fixture")
            continue
        fixture["bases"].setdefault(key, base)
        fixture["runs"].append(entry)
        known[(key, tuple(overrides))] = entry
        # whole config.json files of every shipped config with every kind: what old run folders hold
        if label.startswith("experiments/configs/") or label.startswith("Config("):
            fixture["config_json"].append(json.loads(text))
    return fixture


def dumps(fixture: dict[str, Any]) -> str:
    """One base, run or config.json per line: diffs show what was added."""
    def lines(items: Any) -> str:
        return ",\n".join(f"  {json.dumps(i, sort_keys=True)}" for i in items)

    bases = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v, sort_keys=True)}" for k, v in sorted(fixture["bases"].items()))
    return (f'{{"bases": {{\n{bases}\n}},\n"runs": [\n{lines(fixture["runs"])}\n],\n'
            f'"config_json": [\n{lines(fixture["config_json"])}\n]}}\n')


def main() -> None:
    sys.path.insert(0, str(REPO))
    existing = json.loads(FIXTURE.read_text()) if FIXTURE.exists() else None
    fixture = build(REPO, existing)
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    FIXTURE.write_text(dumps(fixture))
    print(f"{FIXTURE}: {len(fixture['runs'])} runs, {len(fixture['config_json'])} config.json files")


if __name__ == "__main__":
    main()
