# Quick start (README): `make demo` runs the main job, `make test` runs the tests.
# Both create the virtual environment .venv inside the checkout on first use.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= data/demo

.PHONY: demo test venv fonts browser slurm postgres clean-venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -e '.[dev,dask,deploy]'
	@touch $(STAMP)

fonts:
	@bash scripts/install_fonts.sh

browser:
	@bash scripts/install_browser.sh

slurm:
	@bash scripts/slurm_local.sh install

postgres:
	@bash scripts/install_postgres.sh

demo: $(STAMP) fonts
	$(BIN)/python -m flows.demo --data-dir $(DEMO_DIR) $(DEMO_ARGS)

test: $(STAMP) fonts browser slurm postgres
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q

clean-venv:
	rm -rf $(VENV)
