"""Every entry point, driven through its real command line with a table of bad inputs.

Each case must end with exit code 2, exactly one line on stderr that names what was wrong, no
traceback, and not one file or folder written anywhere under the sandbox it runs in (nor in the
unwritable places some cases point at). The sandbox holds a results root with one finished run,
a few broken files, a symlink out of the results root and a copy of the configs and sweeps.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
UNWRITABLE = "/proc/lfq-bad-inputs"  # cannot be created, even by root (chmod does not stop root)
HUGE_CODEBOOK = "quantizer.codebook_size=1099511627776"  # 2**40: valid, but petabytes
HUGE_BATCH = "data.batch_size=100000000000"
TRAIN = ("-m", "experiments.train")
SUBMIT = ("-m", "slurm.submit")
STATUS = ("-m", "slurm.status")
REPORT = ("-m", "analysis.report")
ABLATIONS = ("-m", "analysis.report", "--study", "ablations")
BENCH = (str(REPO / "benchmarks" / "load_runs.py"),)
SYN = "configs/synthetic.yaml"
DEMO = "sweeps/demo.yaml"

# (id, command, argv, a piece of the one-line error)
CASES = [
    # experiments.train: paths, encodings, names, resources, arguments
    ("train-missing-config", TRAIN, ["nope.yaml"], "does not exist"),
    ("train-config-is-folder", TRAIN, ["configs"], "is a folder"),
    ("train-config-not-utf8", TRAIN, ["latin1.yaml"], "UTF-8"),
    ("train-config-empty", TRAIN, ["empty.yaml"], "is empty"),
    ("train-config-a-list", TRAIN, ["list.yaml"], "mapping"),
    ("train-config-bad-yaml", TRAIN, ["broken.yaml"], "not valid YAML"),
    ("train-name-dotdot", TRAIN, [SYN, "name=.."], "name='..'"),
    ("train-name-dot", TRAIN, [SYN, "name=."], "name='.'"),
    ("train-name-slash", TRAIN, [SYN, "name=a/b"], "one folder name"),
    ("train-name-underscore", TRAIN, [SYN, "name=_sweep"], "starting with a letter or digit"),
    ("train-name-300-chars", TRAIN, [SYN, "name=" + "x" * 300], "at most 100 characters"),
    ("train-name-symlink-out", TRAIN, [SYN, "name=escape"], "outside the results root"),
    ("train-threads-0", TRAIN, [SYN, "--threads", "0"], "--threads 0"),
    ("train-threads-negative", TRAIN, [SYN, "--threads", "-2"], "must be >= 1"),
    ("train-threads-not-int", TRAIN, [SYN, "--threads", "two"], "invalid int value"),
    ("train-out-is-file", TRAIN, [SYN, "--out", "afile"], "is a file"),
    ("train-out-is-file-dry-run", TRAIN, [SYN, "--dry-run", "--out", "afile"], "is a file"),
    ("train-out-under-file", TRAIN, [SYN, "--out", "afile/sub"], "is a file"),
    ("train-out-unwritable", TRAIN, [SYN, "--out", UNWRITABLE], "cannot create"),
    ("train-huge-codebook", TRAIN, [SYN, HUGE_CODEBOOK], "needs at least"),
    ("train-huge-batch", TRAIN, [SYN, HUGE_BATCH], "lower data.batch_size"),
    ("train-codebook-not-power-of-2", TRAIN, [SYN, "quantizer.codebook_size=1000"], "power of two"),
    ("train-unknown-key", TRAIN, [SYN, "optim.learning_rate=1"], "unknown config key"),
    ("train-whole-section", TRAIN, [SYN, "optim=1"], "whole section"),
    ("train-bad-choice", TRAIN, [SYN, "scale=huge"], "scale='huge'"),
    ("train-wrong-type", TRAIN, [SYN, "seed=abc"], "wrong type"),
    ("train-unknown-flag", TRAIN, [SYN, "--gpus", "1"], "unrecognized arguments"),
    # slurm.submit
    ("submit-missing-sweep", SUBMIT, ["nope.yaml", "--dry-run"], "does not exist"),
    ("submit-sweep-not-utf8", SUBMIT, ["latin1.yaml", "--dry-run"], "UTF-8"),
    ("submit-results-is-file", SUBMIT, [DEMO, "--results", "afile", "--dry-run"], "is a file"),
    ("submit-results-is-file-wet", SUBMIT, [DEMO, "--results", "afile", "--cluster", "debug"], "is a file"),
    ("submit-results-unwritable", SUBMIT, [DEMO, "--results", UNWRITABLE, "--cluster", "debug"], "cannot create"),
    ("submit-bad-override", SUBMIT, [DEMO, "quantizer.codebook_size=1000", "--dry-run"], "power of two"),
    ("submit-huge-codebook", SUBMIT, [DEMO, HUGE_CODEBOOK, "--cluster", "debug"], "needs at least"),
    ("submit-huge-for-its-mem", SUBMIT, [DEMO, "data.batch_size=10000000", "--mem", "1", "--cluster", "debug"],
     "the requested --mem"),
    ("submit-local-too-many-cpus", SUBMIT, [DEMO, "--cpus", "999"], "this machine has"),
    ("submit-local-multi-task", SUBMIT, [DEMO, "--tasks", "2"], "only --cluster slurm"),
    ("submit-unknown-profile", SUBMIT, [DEMO, "--profile", "nope", "--dry-run"], "nope"),
    ("submit-bad-time", SUBMIT, [DEMO, "--time", "soon", "--dry-run"], "soon"),
    ("submit-unknown-run-id", SUBMIT, [DEMO, "--only", "0123456789", "--dry-run"], "not in sweep"),
    ("submit-bad-cluster", SUBMIT, [DEMO, "--cluster", "cloud"], "invalid choice"),
    ("submit-resource-no-equals", SUBMIT, [DEMO, "--resource", "slurm_exclude", "--dry-run"], "KEY=VALUE"),
    # slurm.status
    ("status-typo-folder", STATUS, ["results/dmeo"], "does not exist"),
    ("status-missing-sweep-file", STATUS, ["nope.yaml"], "sweep file"),
    ("status-folder-with-overrides", STATUS, ["results/demo", "scale=smoke"], "only make sense"),
    ("status-bad-lines", STATUS, ["results/demo", "--lines", "x"], "invalid int value"),
    # analysis.report
    ("report-missing-folder", REPORT, ["results/dmeo"], "does not exist"),
    ("report-target-is-file", REPORT, ["afile"], "is a file"),
    ("report-existing-yaml", REPORT, [SYN], "is a file"),
    ("report-out-is-file", REPORT, ["results/demo", "--out", "afile"], "is a file"),
    ("report-out-unwritable", REPORT, ["results/demo", "--out", UNWRITABLE + "/r"], "cannot write"),
    ("report-where-no-column", REPORT, ["results/demo", "--where", "quantizer.codebook_sise=16"], "did you mean"),
    ("report-where-no-match", REPORT, ["results/demo", "--where", "name=nomatch"], "matches none"),
    ("report-where-no-equals", REPORT, ["results/demo", "--where", "seed"], "KEY=VALUE"),
    # analysis.report --study ablations
    ("ablations-missing-root", ABLATIONS, ["nope", "--out", "abl"], "does not exist"),
    ("ablations-root-is-file", ABLATIONS, ["afile", "--out", "abl"], "is a file"),
    ("ablations-out-is-file", ABLATIONS, ["results", "--out", "afile"], "is a file"),
    ("ablations-merge-and-replace", ABLATIONS, ["results", "--merge", "--replace"], "not allowed with"),
    # benchmarks
    ("bench-runs-0", BENCH, ["--runs", "0"], "--runs 0"),
    ("bench-out-unwritable", BENCH, ["--out", UNWRITABLE + "/t.csv"], "cannot create"),
    ("bench-out-is-folder", BENCH, ["--out", "results"], ".csv file"),
]


def _tree(root: Path) -> dict[str, int]:
    """Every path under ``root`` with its file's mtime (a folder's own mtime moves when a writability
    probe makes and removes an empty folder in it, which leaves nothing behind)."""
    return {str(p.relative_to(root)): 0 if p.is_dir() and not p.is_symlink() else p.lstat().st_mtime_ns
            for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bad-inputs")
    shutil.copytree(REPO / "experiments" / "configs", root / "configs")
    shutil.copytree(REPO / "experiments" / "sweeps", root / "sweeps")
    (root / "latin1.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    (root / "empty.yaml").write_text("")
    (root / "list.yaml").write_text("- 1\n- 2\n")
    (root / "broken.yaml").write_text("task: [synthetic\n")
    (root / "afile").write_text("not a folder\n")
    run = root / "results" / "demo" / "r1"  # one finished run, for status, report and ablations
    run.mkdir(parents=True)
    config = {"name": "demo", "task": "synthetic", "seed": 0, "scale": "smoke",
              "quantizer": {"kind": "lfq", "codebook_size": 16}, "run_id": "r1"}
    (run / "config.json").write_text(json.dumps(config))
    (run / "summary.json").write_text(json.dumps({"run_id": "r1", "status": "done", "step": 3}))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "kind": "train", "loss": 1.0}) + "\n")
    (run / "DONE").write_text("")
    outside = tmp_path_factory.mktemp("outside-the-results-root")
    (root / "results" / "escape").symlink_to(outside)
    return root


@pytest.mark.slow
@pytest.mark.parametrize(("command", "argv", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(sandbox: Path, command: tuple[str, ...],
                                                         argv: list[str], expected: str) -> None:
    before = _tree(sandbox)
    env = {**os.environ, "PYTHONPATH": str(REPO), "LFQ_ANALYSIS_CACHE": str(sandbox.parent / "cache")}
    out = subprocess.run([sys.executable, *command, *argv], cwd=sandbox, capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert "Traceback" not in out.stderr and "Traceback" not in out.stdout
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    assert expected in lines[0], lines[0]
    assert _tree(sandbox) == before  # not a folder, not a lock file, nothing
    assert not Path(UNWRITABLE).exists()


def test_the_table_is_what_the_closing_note_counts() -> None:
    assert len(CASES) == len({c[0] for c in CASES}) >= 60
