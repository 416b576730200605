# The README's two commands: `make demo` and `make test`. Both build .venv
# from the pinned lock when it is missing or stale; nothing is installed by hand.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.fbta-installed
PIP_VERSION := 26.3

# Offline hygiene: no telemetry, no hub look-ups, tools' state inside the project.
export PATH := $(BIN):$(PATH)
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export HF_HUB_OFFLINE := 1
export PYTHONDONTWRITEBYTECODE := 1
# Prefect's ephemeral server (flows run directly, the tests) gets 300 s to start, not its default 20 s, which a
# busy machine overruns (issue #27); a value already in the environment wins.
PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 300
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

.PHONY: help venv test test-slow mutate demo lock clean-data serve flow-run dashboard mlflow-ui audit gpu-check docs docs-serve screenshots

help:
	@echo "make demo       build .venv, make the demo cohort, run the pipeline (dvc repro), print results"
	@echo "make test       build .venv, run the test suite (slow tests excluded)"
	@echo "make test-slow  the slow tests only"
	@echo "make mutate     mutation testing of the method cores (mutmut) → reports/mutation.json; PER_MODULE=0: all"
	@echo "make gpu-check  on a CUDA machine: every GPU path + GPU figures → gpu_check.json (DEVICE=cpu: dry run)"
	@echo "make docs       the docs site → site/ (mkdocs build --strict); make docs-serve: 127.0.0.1:$(DOCS_PORT)"
	@echo "make screenshots  MLflow UI, optuna-dashboard, Prefect UI on a small demo run → checked, docs/img/*.png"
	@echo "make lock       re-resolve requirements.lock from pyproject.toml"
	@echo "make serve      Prefect server on 127.0.0.1:$(PREFECT_PORT) + the process serving prefect.yaml's deployments"
	@echo "make flow-run   (another shell, while serve runs) prefect deployment run 'fbta-pipeline/local' --watch"
	@echo "make dashboard  optuna-dashboard on sqlite:///optuna.db (fbta tune studies), 127.0.0.1:$(DASHBOARD_PORT)"
	@echo "make mlflow-ui  MLflow UI on sqlite:///mlflow.db (runs, registry aliases), 127.0.0.1:$(MLFLOW_PORT)"
	@echo "make audit      pip-audit over requirements.lock in a throwaway venv (SECURITY.md; needs the network)"

venv: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q pip==$(PIP_VERSION)
	$(BIN)/python -m pip install -q -r requirements.lock
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	$(BIN)/python -m pip check
	@touch $@

test: venv
	$(BIN)/python -m pytest -q

# every CUDA path + the GPU figures in one JSON (benchmarks/gpu_check.py). On a bare CUDA box with PyTorch and no
# network, carry the wheels docs/gpu-check.md names and run the same line with its PYTHONPATH.
gpu-check:
	PYTHONPATH=. $(if $(wildcard $(BIN)/python),$(BIN)/python,python3) benchmarks/gpu_check.py $(if $(OUT),--out $(OUT),)

# the docs site (docs/, mkdocs.yml): offline, strict (a broken link or a missing page fails)
DOCS_PORT ?= 8000
docs: venv
	$(BIN)/mkdocs build --strict

docs-serve: venv
	$(BIN)/mkdocs serve -a 127.0.0.1:$(DOCS_PORT)

# the dashboards on a small demo run, in headless Chromium (Debian's chromium): pages checked, PNGs → docs/img/
screenshots: venv
	$(BIN)/python tools/screenshots.py

test-slow: venv
	$(BIN)/python -m pytest -q -m slow

# Outside the default suite (docs/testing.md): PER_MODULE mutants of each method core (default 40; 0 = all ~1,200,
# hours on 2 cores), niced; results accumulate in mutants/ (gitignored), the scores and survivors in the JSON.
PER_MODULE ?= 40
mutate: venv
	nice -n 10 $(BIN)/python tools/mutate.py --per-module $(PER_MODULE)

demo: venv
	@test -d .dvc || $(BIN)/dvc init -q
	$(BIN)/dvc config core.analytics false
	$(BIN)/dvc repro
	$(BIN)/python -m fbta.results

lock:
	rm -rf /tmp/fbta-lock && $(PYTHON) -m venv /tmp/fbta-lock
	/tmp/fbta-lock/bin/pip install -q pip==$(PIP_VERSION) && /tmp/fbta-lock/bin/pip install -q -e '.[test,docs]'
	{ echo "# Resolved, pinned environment for fbta. Regenerate: make lock"; \
	  /tmp/fbta-lock/bin/pip freeze --exclude-editable | grep -v '^-e'; } > requirements.lock

# Prefect: state in .prefect/ (gitignored); the UI at http://127.0.0.1:$(PREFECT_PORT).
PREFECT_PORT ?= 4200
serve: venv
	PREFECT_HOME=$(CURDIR)/.prefect $(BIN)/python flows/serve.py --host 127.0.0.1 --port $(PREFECT_PORT)

flow-run: venv
	PREFECT_HOME=$(CURDIR)/.prefect PREFECT_API_URL=http://127.0.0.1:$(PREFECT_PORT)/api \
	  $(BIN)/prefect deployment run 'fbta-pipeline/local' --watch

# Optuna studies and the MLflow store/registry, browsed locally (never the same SQLite file).
DASHBOARD_PORT ?= 8080
MLFLOW_PORT ?= 5000
# a fresh checkout has no optuna.db yet: create the (empty) store first, or the dashboard crashes
dashboard: venv
	$(BIN)/python -c "import optuna; optuna.storages.RDBStorage('sqlite:///optuna.db')"
	$(BIN)/optuna-dashboard sqlite:///optuna.db --host 127.0.0.1 --port $(DASHBOARD_PORT)

audit:
	PYTHON=$(PYTHON) tools/audit.sh

mlflow-ui: venv
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --default-artifact-root $(CURDIR)/mlruns \
	  --host 127.0.0.1 --port $(MLFLOW_PORT)

clean-data:
	rm -rf data/slides data/masks data/labels.csv data/coords data/reports
