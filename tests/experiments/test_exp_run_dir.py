"""The run folder's writers: atomic, truncation that tolerates a torn last line, status."""

from __future__ import annotations

import json

import pytest

from experiments.run_dir import RunDir, atomic_write_json, read_jsonl, run_status, truncate_jsonl


def test_atomic_write_leaves_no_temp_files_and_keeps_the_old_file_on_error(tmp_path):
    path = tmp_path / "summary.json"
    atomic_write_json(path, {"a": 1, "nan": float("nan")})
    assert json.loads(path.read_text())["a"] == 1
    with pytest.raises(TypeError):
        atomic_write_json(path, {"not json": object()})
    assert json.loads(path.read_text())["a"] == 1  # the failed write changed nothing
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_truncate_keeps_rows_up_to_the_checkpoint_and_drops_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "kind": "train"} for s in (1, 2, 3, 4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5, "ki')
    assert read_jsonl(path) == rows  # the torn line is skipped when reading, too
    assert truncate_jsonl(path, 2) == 3
    assert read_jsonl(path) == rows[:2]
    assert path.read_text().endswith("\n")
    assert truncate_jsonl(path, 2) == 0
    assert truncate_jsonl(tmp_path / "missing.jsonl", 2) == 0


def test_status_from_the_folder_alone(tmp_path):
    rd = RunDir(tmp_path / "run")
    assert run_status(rd.path) == "missing" and rd.read_summary() is None
    rd.write_config({"task": "synthetic"}, "abc")
    assert rd.status() == "started" and rd.read_config()["run_id"] == "abc"
    rd.write_summary({"status": "failed", "reason": "x"})
    assert rd.status() == "failed"
    rd.write_summary({"status": "done"})
    rd.mark_done()
    assert rd.status() == "done" and rd.is_done() and rd.done.read_text() == ""
    rd.summary.write_text("{torn")
    assert rd.read_summary() is None  # unreadable, reported as absent rather than raising
