"""What a run on ``data.root`` read (its fingerprint), the warnings before a done run whose folder
changed is skipped, and ``data.min_size`` with counts that are the ones used."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from exp_helpers import REPO, run
from PIL import Image

from experiments import image_folder, train
from experiments.config import ConfigError, load_config
from experiments.image_folder import TooSmall, fingerprint, list_images, load_crop
from experiments.sweep import RunSpec
from slurm.submit import submit_runs

IMAGES_YAML = REPO / "experiments" / "configs" / "images.yaml"
FAST = ["scale=smoke", "schedule.steps=3", "data.batch_size=8", "runtime.num_workers=0", "data.resolution=32"]


def _image(path: Path, h: int, w: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


def _folder(root: Path, n: int = 10) -> Path:
    for i in range(n):
        _image(root / f"sub{i % 2}" / f"img{i}.png", 40, 48, i)
    return root


def test_fingerprint_is_recorded_stable_and_changes_with_an_added_file(tmp_path):
    root = _folder(tmp_path / "data")
    config = load_config(IMAGES_YAML, [*FAST, f"data.root={root}", "data.val_fraction=0.3"])
    summary = run(config, tmp_path / "run")
    assert summary["status"] == "done"
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())
    files = sorted(root.rglob("*.png"))
    expected = {"data_files": len(files), "data_bytes": sum(p.stat().st_size for p in files)}
    assert {k: recorded[k] for k in expected} == expected == {k: summary[k] for k in expected}
    assert recorded["data_sha256"] == summary["data_sha256"] and len(recorded["data_sha256"]) == 16
    assert load_config(tmp_path / "run" / "config.json").run_id == config.run_id  # the record is no config key
    again = fingerprint(list_images(root, 0.3))
    assert again == {k: recorded[k] for k in image_folder.FINGERPRINT_KEYS}  # stable: nothing changed
    assert fingerprint(list_images(root, 0.5)) == again  # the files, not their split
    _image(root / "sub0" / "added.png", 40, 48, 99)
    grown = fingerprint(list_images(root, 0.3))
    assert grown["data_files"] == len(files) + 1 and grown["data_sha256"] != again["data_sha256"]
    assert load_config(IMAGES_YAML, [*FAST, f"data.root={root}", "data.val_fraction=0.3"]).run_id == config.run_id
    assert image_folder.data_change(recorded, grown).startswith(f"the run read {len(files)} files")
    assert image_folder.data_change(recorded, again) == ""


def test_train_warns_before_skipping_a_done_run_whose_folder_changed(tmp_path, capsys):
    root = _folder(tmp_path / "data")
    argv = [str(IMAGES_YAML), *FAST, f"data.root={root}", "data.val_fraction=0.3", "--out", str(tmp_path / "out")]
    assert train.main(argv) == 0
    first = capsys.readouterr().out
    assert train.main(argv) == 0  # done, unchanged: skipped without a word about the data
    unchanged = capsys.readouterr().out
    assert "warning" not in first + unchanged and "status=done" in unchanged
    _image(root / "sub1" / "added.png", 40, 48, 99)
    (run_dir,) = (tmp_path / "out").iterdir()
    before = (run_dir / "summary.json").read_text()
    assert train.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    (warning,) = [i for i, line in enumerate(lines) if line.startswith("warning:")]
    assert "data.root changed since" in lines[warning] and "--restart" in lines[warning] and "name=" in lines[warning]
    assert "the folder now holds 11 files" in lines[warning]
    assert warning < max(i for i, line in enumerate(lines) if "status=done" in line)  # before the skip
    assert (run_dir / "summary.json").read_text() == before  # skipped, not re-run


def _fake_done(run_dir: Path, config, record: dict) -> None:
    """A finished run folder as far as skipping goes: config.json with its record, summary, DONE."""
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({**config.to_dict(), "run_id": config.run_id, **record}))
    (run_dir / "summary.json").write_text(json.dumps({"run_id": config.run_id, "status": "done", **record}))
    (run_dir / "DONE").write_text("")


def test_submit_warns_before_skipping_done_runs_and_lists_the_folder_once(tmp_path, monkeypatch):
    root = _folder(tmp_path / "data")
    configs = [load_config(IMAGES_YAML, [*FAST, f"data.root={root}", "name=fp", f"seed={s}"]) for s in range(3)]
    record = fingerprint(list_images(root, 0.05))
    for config in configs:
        _fake_done(tmp_path / "results" / "fp" / config.run_id, config, record)
    runs = [RunSpec(point={"seed": c.seed}, config=c) for c in configs]
    calls = []
    real = image_folder.list_images
    monkeypatch.setattr(image_folder, "list_images", lambda *a, **k: calls.append(a) or real(*a, **k))

    log: list[str] = []
    result = submit_runs("fp", runs, {}, results=tmp_path / "results", dry_run=True, log=log.append)
    assert len(result.done) == 3 and not any("warning" in line for line in log)  # unchanged: no word
    _image(root / "sub0" / "added.png", 40, 48, 99)
    calls.clear()
    log.clear()
    result = submit_runs("fp", runs, {}, results=tmp_path / "results", dry_run=True, log=log.append)
    assert len(result.done) == 3 and len(calls) == 1  # three runs of one root: one walk
    (warning,) = [i for i, line in enumerate(log) if "warning" in line]
    assert "changed since 3 done run(s)" in log[warning] and "--force" in log[warning]
    assert all(c.run_id in log[warning] for c in configs)
    assert warning < [i for i, line in enumerate(log) if "3 done" in line and "runs (" in line][0]


def test_min_size_is_a_new_field_with_the_old_behaviour_as_its_default():
    default = load_config(IMAGES_YAML, [])
    explicit = load_config(IMAGES_YAML, ["data.min_size=0"])
    skip = load_config(IMAGES_YAML, ["data.min_size=32"])
    assert explicit.run_id == default.run_id != skip.run_id
    assert "min_size" not in default.to_dict()["data"] and skip.to_dict()["data"]["min_size"] == 32
    with pytest.raises(ConfigError, match=r"data.min_size=-1 is invalid: must be >= 0 pixels"):
        load_config(IMAGES_YAML, ["data.min_size=-1"])
    with pytest.raises(ConfigError, match=r"data.min_size='skip' has the wrong type str: expected int"):
        load_config(IMAGES_YAML, ["data.min_size=skip"])


def test_load_crop_refuses_a_small_image_only_when_told(tmp_path):
    _image(tmp_path / "tiny.png", 8, 8, 0)
    assert load_crop(tmp_path / "tiny.png", 32, None).shape == (3, 32, 32)  # min_size 0: upscaled, as before
    assert load_crop(tmp_path / "tiny.png", 32, None, 8).shape == (3, 32, 32)  # at min_size: upscaled
    with pytest.raises(TooSmall, match="8x8"):
        load_crop(tmp_path / "tiny.png", 32, None, 9)


@pytest.mark.parametrize("rule", ["upscale", "skip"])  # data.min_size 0 and 32 (= data.resolution)
def test_min_size_rule_and_counts_that_are_the_ones_used(tmp_path, capsys, rule):
    root = tmp_path / "data"
    for i in range(6):
        _image(root / "train" / f"t{i}.png", 40, 48, i)
    _image(root / "train" / "tiny.png", 8, 8, 50)
    for i in range(3):
        _image(root / "val" / f"v{i}.png", 40, 48, 10 + i)
    _image(root / "val" / "tiny.png", 8, 8, 51)
    (root / "val" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    config = load_config(IMAGES_YAML, [*FAST, f"data.root={root}", f"data.min_size={0 if rule == 'upscale' else 32}",
                                          "schedule.steps=4"])
    summary = run(config, tmp_path / "run")
    out = capsys.readouterr().out
    assert summary["status"] == "done"
    used = 3 if rule == "skip" else 4  # of the 5 validation files: corrupt.png never, tiny.png only upscaled
    (data_line,) = [line for line in out.splitlines() if "] data: " in line]
    assert f"validation uses {used} images of the 5 validation files (1 unreadable: " in data_line
    noted = "under data.min_size, skipped" if rule == "skip" else "under 32 px, upscaled"
    assert f"1 {noted}: {root / 'val' / 'tiny.png'}: 8x8" in data_line
    tokens = (config.resolved().data.resolution // config.model.downsample) ** 2
    assert summary["val_images"] == used and summary["final_val_tokens"] == used * tokens
    assert summary["unreadable_files"] == 1  # corrupt.png, reported once (at the start) and counted
    assert summary["small_images"] == 2  # both tiny.png: 4 steps of 8 draw every training file
    what = "skipping" if rule == "skip" else "upscaling"
    small_lines = [line for line in out.splitlines() if "smaller than data.resolution" in line]
    assert len(small_lines) == 1 and small_lines[0].split("] ", 1)[1].startswith(f"{what} a training image")
    assert str(root / "train" / "tiny.png") in small_lines[0]
    assert not [line for line in out.splitlines() if "skipping an unreadable image" in line]  # named in the data line
