# Two entry points, each doing its own set-up on a fresh machine.
#   make test   install the pinned requirements into .venv and run the whole test suite
#   make toy    install, then run the embedded miniature end to end (not built yet)
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/.installed: requirements.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	touch $@

.PHONY: install test test-fast
install: $(BIN)/.installed

test: install
	$(BIN)/python -m pytest -q tests

# Skips the slow end-to-end tests; CI runs everything.
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" tests
