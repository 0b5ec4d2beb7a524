"""The command line: --help explains, a smoke run makes a DONE folder, bad input fails before work."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
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
    # The last line leads with validation usage, PSNR and tokens per code: 256 validation tokens for
    # FSQ's 8 x 6 x 5 = 240 codes cap usage at 1 - exp(-256/240), and it says so.
    last = out.stdout.splitlines()[-1]
    assert last.startswith("val_usage=") and " val_psnr=" in last and " tokens_per_code=1.07 " in last
    assert "usage capped at 0.656 (N/K = 1.07 < 4)" in last and "status=done" in last
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


@pytest.mark.parametrize(("override", "message"), [
    ("quantizer.diversity_gamma=-1", "error: quantizer.diversity_gamma=-1.0 is invalid: must be >= 0"),
    ("quantizer.entropy_loss_weight=-0.1", "error: quantizer.entropy_loss_weight=-0.1 is invalid: must be >= 0"),
    ("quantizer.inv_temperature=-5", "error: quantizer.inv_temperature=-5.0 is invalid: must be > 0"),
    ("schedule.steps=1.5", "error: schedule.steps=1.5 is invalid: must be a whole number"),
])
def test_negative_weights_and_fractional_ints_fail_in_one_line_before_any_work(tmp_path, capsys, override, message):
    assert main([str(SYNTHETIC_YAML), override, "scale=smoke", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_the_command_lines_values_win_over_scale_smoke(tmp_path, capsys):
    # scale=smoke caps the batch at 64 and the steps at 30; values given beside it are what the user asked for.
    assert main([str(SYNTHETIC_YAML), "scale=smoke", "data.batch_size=512", "schedule.steps=1.5e3",
                 "--dry-run", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    resolved = json.loads(out[:out.index("run folder:")])
    assert (resolved["data"]["batch_size"], resolved["schedule"]["steps"]) == (512, 1500)
    assert resolved["data"]["val_size"] == 256 and resolved["explicit"] == ["data.batch_size", "schedule.steps"]
    assert list(tmp_path.iterdir()) == []
    # A batch no machine holds is refused for what it is, no longer trained silently at 64.
    assert main([str(SYNTHETIC_YAML), "scale=smoke", "data.batch_size=100000000000", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: this run needs at least") and "lower data.batch_size" in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []
