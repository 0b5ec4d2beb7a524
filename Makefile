# The two commands of the README:
#   make demo   a small local sweep, then the utilization report (results/demo/report/)
#   make test   lint + the whole test suite, the real one-node SLURM cluster included
# Both create .venv on first use. TORCH selects the torch build: the default is the
# 2.13.0 CPU build; with a GPU, install your CUDA build of torch first and run
# `make TORCH= demo` so nothing replaces it.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
# The newest vector-quantize-pytorch, for differential tests beside the pinned 1.14.12 oracle
# (tests/upstream_vqp.py): both are the same package, so this one lives in its own folder.
UPSTREAM_VERSION ?= 1.32.0
UPSTREAM_DIR     := .upstream/vqp-latest
UPSTREAM_STAMP   := $(UPSTREAM_DIR)/.installed-$(UPSTREAM_VERSION)

.PHONY: demo test lint cluster upstream gpu-wheels clean-venv

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first: a plain `torch` requirement would pull a multi-GB CUDA build
	test -z "$(TORCH)" || $(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test,notebooks]"
	rm -f $(VENV)/.installed-*
	touch $@

# experiments/sweeps/demo.yaml: 16 runs of the images tokenizer (2^10 codes) at the recipe's and the
# reference's inverse temperature, as many at once as the CPUs (about 4 minutes on 2 idle cores),
# then the report (seconds). Run again, it only starts what is not done.
demo: $(STAMP)
	$(BIN)/python -m slurm.submit experiments/sweeps/demo.yaml --cluster local --wait
	$(BIN)/python -m analysis.report results/demo

lint: $(STAMP)
	$(BIN)/ruff check .

$(UPSTREAM_STAMP): $(STAMP)
	rm -rf $(UPSTREAM_DIR)
	$(BIN)/python -m pip install --quiet --no-deps --target $(UPSTREAM_DIR) "vector-quantize-pytorch==$(UPSTREAM_VERSION)"
	touch $@

upstream: $(UPSTREAM_STAMP)

# Pure-Python wheels that a GPU machine with PyTorch but no network lacks, for
# benchmarks/gpu_check.sh there (carry .whl and .upstream): submitit and the 1.14.12 oracle
# with their dependencies that such images do not hold.
GPU_WHEELS := submitit==1.5.4 vector-quantize-pytorch==1.14.12 \
              einx==0.4.3 frozendict==2.5.1 loguru==0.7.3 torch-einops-utils==0.2.0
gpu-wheels: $(UPSTREAM_STAMP)
	rm -rf .whl
	$(BIN)/python -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
	    --implementation py --abi none --platform any -d .whl $(GPU_WHEELS)

# A throwaway one-node SLURM cluster for the cluster tests (Debian, as root).
cluster:
	bash slurm/local-cluster.sh ensure

# The numeric modules of lfq again under torch's scalar kernels (and AVX2 where the CPU has
# AVX-512): summation order differs by ISA, so a tolerance that holds on one CPU only fails
# on every machine, not on a colleague's (issue 28). The distributed modules (gloo processes,
# minutes) are left out. 1-2 min per ISA on 2 cores (131 s measured on a loaded machine).
NUMERIC_TESTS := tests/lfq/test_entropy.py tests/lfq/test_quantizer.py tests/lfq/test_oracle.py \
                 tests/lfq/test_upstream_latest.py tests/experiments/test_exp_clamp_probe.py
OTHER_ISAS := default $(if $(shell grep -qw avx512f /proc/cpuinfo 2>/dev/null && echo y),avx2)

test: $(STAMP) $(UPSTREAM_STAMP) lint cluster
	$(BIN)/python -m pytest
	set -e; for isa in $(OTHER_ISAS); do \
	    echo "numeric tests under ATEN_CPU_CAPABILITY=$$isa"; \
	    ATEN_CPU_CAPABILITY=$$isa $(BIN)/python -m pytest -q -p no:cacheprovider $(NUMERIC_TESTS); \
	done

clean-venv:
	rm -rf $(VENV)
