"""Every file and folder the suite writes has the umask's mode, as a plain ``open``/``mkdir`` gives.

The atomic writers used ``tempfile.mkstemp`` (0600 whatever the umask), so on a cluster's shared
storage no colleague could read a result. A smoke run and its report, made under a given umask in a
child process (the umask is per process), must hold 0666/0777 less that umask everywhere.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

MAKE = """
import os, sys
from pathlib import Path
os.umask(int(sys.argv[1], 8))
from experiments.config import load_config
from experiments.train import run
from analysis.report import write_report
out = Path(sys.argv[2])
config = load_config({"task": "synthetic"}, ["scale=smoke"])
summary = run(config, out / "sweep" / config.run_id)
assert summary["status"] == "done", summary
write_report(out / "sweep", out / "report", cache=False)
"""


def _modes(root: Path) -> dict[str, set[str]]:
    """{"file 0644": {paths}, "dir 0755": {paths}} of everything under ``root`` (not ``root`` itself)."""
    found: dict[str, set[str]] = {}
    for path in root.rglob("*"):
        st = path.lstat()
        kind = "dir" if stat.S_ISDIR(st.st_mode) else "file"
        found.setdefault(f"{kind} {stat.S_IMODE(st.st_mode):04o}", set()).add(str(path.relative_to(root)))
    return found


@pytest.mark.parametrize(("umask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_a_run_folder_and_its_report_have_the_umasks_modes(tmp_path: Path, umask: int, file_mode: int,
                                                           dir_mode: int) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", MAKE, f"{umask:o}", str(out)], check=True, env=env, cwd=ROOT, timeout=300)
    found = _modes(out)
    names = {Path(p).name for paths in found.values() for p in paths}
    # what is checked is what matters: the run's results, its checkpoint, DONE, and the report's figures
    assert {"summary.json", "config.json", "DONE", "checkpoint.pt", "metrics.jsonl", "report.md"} <= names
    assert any(n.endswith(".png") for n in names)
    want = {f"file {file_mode:04o}", f"dir {dir_mode:04o}"}
    assert set(found) == want, {k: sorted(v)[:5] for k, v in found.items() if k not in want}
