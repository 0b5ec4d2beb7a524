"""The GPU benchmark's code paths, at toy sizes on the CPU (the real numbers need a GPU)."""

import csv
import subprocess
import sys

from exp_helpers import REPO


def test_gpu_benchmark_smoke_on_cpu(tmp_path):
    out = tmp_path / "gpu_step.csv"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_step.py"), "--device", "cpu", "--smoke",
                           "--repeats", "1", "--impls", "ours,oracle", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env={"OMP_NUM_THREADS": "1", "PATH": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = list(csv.DictReader(out.open()))
    assert {r["impl"] for r in rows} == {"ours", "oracle"}
    assert all(r["status"] == "ok" and float(r["median_ms"]) > 0 for r in rows)
    tokenizer = [r for r in rows if r["part"] == "tokenizer_step"]
    assert len(tokenizer) == 1 and 0 < float(tokenizer[0]["quantizer_share"]) < 1


def test_gpu_benchmark_refuses_without_a_gpu(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_step.py"), "--out", str(tmp_path / "x.csv")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "x.csv").exists()
