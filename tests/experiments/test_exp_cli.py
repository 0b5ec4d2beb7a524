"""The command line: --help explains, a smoke run makes a DONE folder, bad input fails before work."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from exp_helpers import REPO, SYNTHETIC_YAML, smoke_config

from experiments.train import main


def cli(*args: str, cwd=REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "experiments.train", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=120)


def test_help_explains_usage():
    out = cli("--help")
    assert out.returncode == 0
    for text in ("key=value", "--out", "run_id", "resumes", "DONE", "scale=smoke"):
        assert text.lower() in out.stdout.lower(), text


def test_smoke_run_from_the_command_line(tmp_path):
    out = cli(str(SYNTHETIC_YAML), "scale=smoke", "quantizer.kind=fsq", "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr
    run_id = smoke_config("quantizer.kind=fsq").run_id  # the same id in this process as in the CLI's
    run_dir = tmp_path / run_id
    assert (run_dir / "DONE").exists()
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "done"
    assert "status=done" in out.stdout
    # Not a terminal: plain progress lines, not a tqdm bar.
    assert f"[{run_id}] step 30/30" in out.stdout and "\r" not in out.stderr


def test_bad_override_fails_before_any_work(tmp_path, capsys):
    assert main([str(SYNTHETIC_YAML), "quantizer.codebook_size=1000", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "quantizer.codebook_size=1000" in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_dry_run_prints_the_resolved_config(tmp_path, capsys):
    assert main([str(SYNTHETIC_YAML), "scale=smoke", "--dry-run", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"run folder: {tmp_path / smoke_config().run_id}" in out
    assert '"steps": 30' in out
    assert list(tmp_path.iterdir()) == []


def test_another_kinds_field_fails_in_one_line_before_any_work(tmp_path, capsys):
    assert main([str(SYNTHETIC_YAML), "quantizer.vq_init=kmeans", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: quantizer.vq_init='kmeans' is a field of kind 'vq', not of kind='lfq'")
    assert err.count("\n") == 1 and list(tmp_path.iterdir()) == []
