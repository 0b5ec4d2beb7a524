"""benchmarks/monitor_overhead.py's code paths at a few steps per trial: its rows, how each share is
derived from the timings, --merge, and bad arguments (the real numbers: results/benchmarks)."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "monitor_overhead.py"
ENV = {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "PATH": "/usr/bin:/bin"}


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600, env=ENV)


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_monitor_benchmark_rows_and_their_shares(tmp_path):
    out = tmp_path / "monitor_overhead.csv"
    proc = _run("--setups", "ours-2^10", "ours-2^40", "--steps", "4", "--repeats", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = _rows(out)
    assert [(r["setup"], r["config"]) for r in rows] == [
        ("ours-2^10", "none"), ("ours-2^10", "log_every=50"), ("ours-2^10", "log_every=1"),
        ("ours-2^40", "none"), ("ours-2^40", "log_every=50")]
    assert {r["codebook_size"] for r in rows} == {str(2**10), str(2**40)}
    assert all(r["steps_per_trial"] == "4" and r["repeats"] == "1" and r["malloc_env"] == "" for r in rows)
    for setup in ("ours-2^10", "ours-2^40"):
        none, *monitored = [r for r in rows if r["setup"] == setup]
        assert float(none["cpu_overhead_pct"]) == 0 and float(none["hook_cpu_ms_per_step"]) == 0
        base = float(none["median_cpu_step_ms"])
        for row in monitored:
            # One repeat: the overhead is this trial's CPU time over the unmonitored one, less 1
            # (both printed to 3 places in ms, the share to 2 in %); the monitor's own time is > 0.
            cpu = float(row["median_cpu_step_ms"])
            rounding = 100 * (cpu + 5e-4) / (base - 5e-4) - 100 * cpu / base + 5e-3
            assert abs(float(row["cpu_overhead_pct"]) - 100 * (cpu / base - 1)) <= rounding
            hook = float(row["hook_cpu_ms_per_step"])
            assert 0 < hook < cpu
            assert abs(float(row["hook_cpu_pct"]) - 100 * hook / base) <= 100 * (5e-5 / base + hook * 5e-4 / base**2) + 5e-4
    assert "ours-2^40" in proc.stdout and str(out) in proc.stdout


def test_monitor_benchmark_merge_keeps_the_setups_not_rerun(tmp_path):
    out = tmp_path / "monitor_overhead.csv"
    assert _run("--setups", "ours-2^10", "ours-2^40", "--steps", "2", "--repeats", "1", "--out", str(out)).returncode == 0
    before = _rows(out)
    proc = _run("--setups", "ours-2^10", "--steps", "3", "--repeats", "1", "--out", str(out), "--merge")
    assert proc.returncode == 0, proc.stderr[-2000:]
    after = _rows(out)
    assert [r for r in after if r["setup"] == "ours-2^40"] == [r for r in before if r["setup"] == "ours-2^40"]
    assert [r["steps_per_trial"] for r in after if r["setup"] == "ours-2^10"] == ["3", "3", "3"]


def test_monitor_benchmark_refuses_bad_counts_before_any_work(tmp_path):
    out = tmp_path / "monitor_overhead.csv"
    proc = _run("--steps", "0", "--out", str(out))
    assert proc.returncode != 0 and "--steps" in proc.stderr and ">= 1" in proc.stderr
    assert not out.exists()
