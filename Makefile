# Two commands for a fresh machine with Python 3.11 and pip:
#   make demo   installs into .venv and runs the whole pipeline once
#   make test   installs into .venv (with test tools) and runs the test suite
PYTHON ?= python3.11
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: demo test install clean bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed-test: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[all]'
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/aic demo

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/pipeline.py

clean:
	rm -rf $(VENV) .aic .pytest_cache .hypothesis .schemathesis *.egg-info
