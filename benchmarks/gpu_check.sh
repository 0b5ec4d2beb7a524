#!/usr/bin/env bash
# The GPU checks of issue 13 (and the GPU rows of "clamped", issue 15) as one command, for a
# GPU machine that has PyTorch but no network, like this project's lent device machine:
#
#   make gpu-wheels                         # here, with the package index: fills .whl/ (git-ignored)
#   bash benchmarks/gpu_check.sh OUT        # there, with .whl and .upstream carried along
#
# It installs the carried wheels into a temporary site (submitit and the 1.14.12 oracle are not
# in that machine's image), records the GPU, runs `pytest -m gpu`, then benchmarks/gpu_step.py,
# and leaves in OUT: gpu.txt (nvidia-smi, torch), gpu_tests.log, gpu_step.csv, gpu_step.log.
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

echo "== pytest -m gpu"
if [ -n "$smoke" ]; then
    "$python" -m pytest -m gpu -q -p no:cacheprovider --collect-only tests/gpu 2>&1 | tee "$out/gpu_tests.log"
else
    "$python" -m pytest -m gpu -q -p no:cacheprovider -rA tests/gpu 2>&1 | tee "$out/gpu_tests.log"
fi
note "${PIPESTATUS[0]}"

echo "== benchmarks/gpu_step.py"
if [ -n "$smoke" ]; then
    args=(--device cpu --smoke --repeats 1)
else
    args=()
fi
"$python" benchmarks/gpu_step.py "${args[@]}" --out "$out/gpu_step.csv" 2>&1 | tee "$out/gpu_step.log"
note "${PIPESTATUS[0]}"
echo "gpu_check: exit $status; files in $out"
exit "$status"
