# The two commands: `make serve` and `make test`. Both install what they need into .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# A CPU build of torch, pinned: an unpinned torch pulls a multi-GB CUDA build.
TORCH_CPU ?= torch==2.13.0

.PHONY: install serve test lint proto docs

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH_CPU)
	$(BIN)/python -m pip install -q -e '.[router,engine,dev]'
	touch $(STAMP)

install: $(STAMP)

serve: install
	VENV=$(VENV) scripts/serve-demo.sh

test: install
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	cd proto && ../$(BIN)/buf lint

proto: install
	$(BIN)/python proto/generate.py

# docs/configuration.md, from the servers' config dataclasses (a test fails while it is stale).
docs: install
	$(BIN)/python scripts/config_docs.py
