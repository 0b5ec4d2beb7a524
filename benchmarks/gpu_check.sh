#!/usr/bin/env bash
# The GPU checks of issues 13 and 29 (and the GPU rows of "clamped", issue 15) as one command, for a
# GPU machine that has PyTorch but no network, like this project's lent device machine:
#
#   make gpu-wheels                         # here, with the package index: fills .whl/ (git-ignored)
#   bash benchmarks/gpu_check.sh OUT        # there, with .whl and .upstream carried along
#
# It installs the carried wheels into a temporary site (submitit and the 1.14.12 oracle are not
# in that machine's image), records the GPU, runs `pytest -m gpu`, then benchmarks/gpu_step.py,
# then 200 steps of images.yaml, and leaves in OUT: gpu.txt (nvidia-smi, torch), gpu_tests.log,
# gpu_step.csv, gpu_step.log, images_run.log and runs/<run id>/ (metrics, summary.json).
# Each part runs even if the one before failed; the exit status is that of the first failure.
#
#   bash benchmarks/gpu_check.sh OUT --smoke   # on a CPU: the same wiring at toy sizes
#                                              # (the gpu tests collected, not run)
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR [--smoke]}
smoke=${2:-}
if [ -n "$smoke" ] && [ "$smoke" != "--smoke" ]; then
    echo "gpu_check: unknown option '$smoke' (the only one is --smoke)" >&2
    exit 2
fi
repo=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$repo" || exit 2
python=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
    site=$(mktemp -d)
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl || exit 2
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$repo:$repo/tests${PYTHONPATH:+:$PYTHONPATH}"
status=0
note() { [ "$status" -eq 0 ] && status=$1; }

{ nvidia-smi 2>&1 || echo "nvidia-smi: not found"
  "$python" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device")'; } > "$out/gpu.txt" 2>&1
cat "$out/gpu.txt"

# Each part has its own time limit, so that one that hangs leaves time for the others (the lent
# machine gives 15 minutes in all, its start included).
echo "== pytest -m gpu (every gpu-marked test: tests/gpu, the monitor's no-sync check)"
# The modules that hold gpu tests, named: collecting the whole tree would import packages that
# such a machine may lack (PyAV, nbclient) and stop before any test ran.
gpu_modules=(tests/gpu tests/lfq/test_monitor.py)
if [ -n "$smoke" ]; then
    timeout 150 "$python" -m pytest -m gpu -q -p no:cacheprovider --collect-only "${gpu_modules[@]}" 2>&1 | tee "$out/gpu_tests.log"
else
    timeout 150 "$python" -m pytest -m gpu -q -p no:cacheprovider -rA "${gpu_modules[@]}" 2>&1 | tee "$out/gpu_tests.log"
fi
note "${PIPESTATUS[0]}"

echo "== benchmarks/gpu_step.py (the LFQ step, then the base tokenizer's step eager and compiled)"
if [ -n "$smoke" ]; then
    args=(--device cpu --smoke --repeats 1)
else
    args=()
fi
images=$(mktemp -d)
timeout 270 "$python" benchmarks/gpu_step.py "${args[@]}" --folder "$images" --out "$out/gpu_step.csv" 2>&1 | tee "$out/gpu_step.log"
note "${PIPESTATUS[0]}"

echo "== 200 steps of experiments/configs/images.yaml on the device, to its validation"
if [ -n "$smoke" ]; then
    run=(scale=smoke runtime.device=cpu)
else
    run=(schedule.steps=200 schedule.val_every=200 schedule.checkpoint_every=200 runtime.device=cuda)
fi
timeout 100 "$python" -m experiments.train experiments/configs/images.yaml "${run[@]}" --out "$out/runs" 2>&1 | tee "$out/images_run.log"
note "${PIPESTATUS[0]}"
echo "gpu_check: exit $status; files in $out"
exit "$status"
