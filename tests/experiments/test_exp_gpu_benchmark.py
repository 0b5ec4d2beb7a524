"""The GPU benchmark's code paths, at toy sizes on the CPU (the real numbers need a GPU)."""

import csv
import json
import re
import subprocess
import sys

from exp_helpers import REPO


def test_gpu_benchmark_smoke_on_cpu(tmp_path):
    out = tmp_path / "gpu_step.csv"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_step.py"), "--device", "cpu", "--smoke",
                           "--repeats", "5", "--impls", "ours,clamped,oracle", "--out", str(out), "--no-compile",
                           "--folder", str(tmp_path / "images")],
                          capture_output=True, text=True, timeout=600, env={"OMP_NUM_THREADS": "1", "PATH": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = list(csv.DictReader(out.open()))
    assert {r["impl"] for r in rows} == {"ours", "clamped", "oracle"}
    assert all(r["status"] == "ok" and float(r["median_ms"]) > 0 for r in rows)
    tokenizer = [r for r in rows if r["part"] == "tokenizer_step"]
    assert len(tokenizer) == 1
    # The share is a difference of two timings: on a loaded CPU it may come out below 0, so the
    # test checks that it is that difference, not its sign.
    (bare_ms,) = re.findall(r"without the quantizer ([0-9.]+) ms", tokenizer[0]["note"])
    full_ms = float(tokenizer[0]["median_ms"])
    rounding = 5e-5 + 3 * 5e-4 / full_ms  # the share to 4 places; both times to 3 (bare / full up to 2)
    assert 0 < float(bare_ms) and abs(float(tokenizer[0]["quantizer_share"]) - (1 - float(bare_ms) / full_ms)) <= rounding
    assert float(tokenizer[0]["images_per_s"]) > 0 and len(list((tmp_path / "images").glob("*.png"))) == 64


def test_a_failing_tokenizer_step_is_a_row_and_the_lfq_rows_stay(tmp_path):
    """A part that fails (here: no image can be read) leaves the rows before it and one saying why."""
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(64):  # the names the generator would write, but not images: it skips them
        (folder / f"image{i:04d}.png").write_text("not a png")
    out = tmp_path / "gpu_step.csv"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_step.py"), "--device", "cpu", "--smoke",
                           "--repeats", "1", "--impls", "ours", "--out", str(out), "--no-compile", "--folder", str(folder)],
                          capture_output=True, text=True, timeout=600, env={"OMP_NUM_THREADS": "1", "PATH": ""})
    assert proc.returncode == 1 and "the tokenizer step (eager) failed" in proc.stderr
    rows = list(csv.DictReader(out.open()))
    assert [r["status"] for r in rows if r["part"] == "lfq_step"] == ["ok"] * 4
    (failed,) = [r for r in rows if r["part"] == "tokenizer_step"]
    assert failed["status"].startswith("error: ")


def test_gpu_benchmark_refuses_without_a_gpu(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_step.py"), "--out", str(tmp_path / "x.csv")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "x.csv").exists()


def test_gpu_check_script_wires_the_gpu_tests_and_the_benchmark(tmp_path):
    """benchmarks/gpu_check.sh, the one command for a GPU machine, in its CPU smoke mode: the
    gpu tests are collected (not run), the benchmark writes every impl's rows, files land in OUT."""
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), str(tmp_path / "out"), "--smoke"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    out = tmp_path / "out"
    assert "no CUDA device" in (out / "gpu.txt").read_text()
    assert "test_mixed_precision_runs_train_on_the_gpu[fp16]" in (out / "gpu_tests.log").read_text()
    assert "test_no_device_sync_between_flushes_on_cuda" in (out / "gpu_tests.log").read_text()  # tests/lfq's gpu test too
    rows = list(csv.DictReader((out / "gpu_step.csv").open()))
    assert {r["impl"] for r in rows if r["part"] == "lfq_step"} == {"ours", "clamped", "oracle", "upstream"}
    assert {r["impl"] for r in rows if r["part"] == "tokenizer_step"} == {"ours", "ours (compiled)"}
    assert all(r["status"] == "ok" for r in rows)
    (summary,) = (out / "runs").glob("*/summary.json")  # 200 steps of images.yaml (smoke scale here)
    assert json.loads(summary.read_text())["status"] == "done" and "final_val_usage_fraction" in summary.read_text()


def test_gpu_check_script_refuses_an_unknown_option(tmp_path):
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), str(tmp_path), "--fast"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown option '--fast'" in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_gpu_check_runs_every_module_that_holds_a_gpu_test():
    """gpu_check.sh names its test modules (collecting the whole tree could stop on a missing
    package there): a gpu test added elsewhere must be added to that list."""
    script = (REPO / "benchmarks" / "gpu_check.sh").read_text()
    (listed,) = re.findall(r"^gpu_modules=\((.*)\)$", script, flags=re.M)
    named = [REPO / path for path in listed.split()]
    mark = re.compile(r"^\s*(@pytest\.mark\.gpu\b|pytestmark\s*=.*\bpytest\.mark\.gpu\b)", flags=re.M)
    marked = {path for path in (REPO / "tests").rglob("test_*.py") if mark.search(path.read_text())}
    assert marked and all(any(path == n or n in path.parents for n in named) for path in marked), (marked, named)
