# Everyday commands. `make help` lists them.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.DEFAULT_GOAL := help
.PHONY: help install train test test-fast test-models lint format clean-logs

help: ## List the commands
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-11s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed ## Create .venv and install transferkit (editable) with its dev tools; a no-op when up to date

train: install ## Train the default experiment (demo data, EfficientNet-Lite0, no network)
	$(BIN)/python train.py $(ARGS)

# One pytest worker per core (at most 4: each holds torch, about 1.5 GB); PYTEST_WORKERS=0 runs in one process.
PYTEST_WORKERS ?= auto
XDIST := $(if $(filter 0,$(PYTEST_WORKERS)),,-n $(PYTEST_WORKERS) --maxprocesses 4 --dist worksteal)

test: install ## Run every test that guards behaviour (what CI runs)
	$(BIN)/pytest $(XDIST) -m "not models and not upstream and not launchers"

test-fast: install ## Run the tests not marked slow, in about a minute: the one to run while editing
	$(BIN)/pytest $(XDIST) -m "not slow and not models and not upstream and not launchers"

test-models: install ## The minutes-long checks: every full-size model config exported with parity, inductor compile; upstream behaviour; the submitit and Optuna sweeps
	$(BIN)/pytest -m "models or upstream or launchers"

lint: install ## Check style with ruff
	$(BIN)/ruff check src tests scripts train.py eval.py predict.py export.py
	$(BIN)/ruff format --check src tests scripts train.py eval.py predict.py export.py

format: install ## Format and fix with ruff
	$(BIN)/ruff format src tests scripts train.py eval.py predict.py export.py
	$(BIN)/ruff check --fix src tests scripts train.py eval.py predict.py export.py

clean-logs: ## Delete every run under logs/
	find logs -mindepth 1 ! -name .gitkeep -exec rm -rf {} +
