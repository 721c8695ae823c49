# Two entry points, each doing all of its own set-up on a fresh machine.
#   make toy    install, then run the embedded miniature end to end (report in runs/toy/report)
#   make test   install (with the test packages), then run the whole test suite
# and the study of issue 19 (docs/pipeline.md#the-study-make-study):
#   make study  install, then the pre-registered study (report in runs/study/report.md)
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/.installed: requirements.txt pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

$(BIN)/.installed-test: $(BIN)/.installed requirements-test.txt
	$(BIN)/pip install -q -r requirements-test.txt
	touch $@

.PHONY: install install-test system-deps toy study test test-fast test-pod

# The code executor's sandbox needs bubblewrap (and root, for its cgroups and uids).
system-deps:
	@command -v bwrap >/dev/null || (apt-get update -qq && apt-get install -y -qq bubblewrap)

install: $(BIN)/.installed system-deps

install-test: $(BIN)/.installed-test system-deps

toy: install
	$(BIN)/python -m launch.pipeline --config=configs/toy.py --workdir=runs/toy

# Warm starts, per-arm lr tuning, every arm on every warm start, the paired comparison;
# rerunning resumes (configs/study.py, fdpo/study.py).
study: install
	$(BIN)/python -m launch.study --config=configs/study.py --workdir=runs/study

# Two pytest-xdist workers, each test file on one worker (its module fixtures built once):
# the serial suite took ~33 min on a 2-core machine at 799 tests, this 22 min 12 s at 955
# (docs/testing.md), before tests/conftest.py's session compilation cache and longest-files-first
# order.
test: install-test
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m "not pod" tests

# The multi-host end-to-end tests (marker pod: every JAX program and the miniature's pipeline
# as 2 jax.distributed processes x 4 CPU devices against 1 x 8), kept out of `make test`'s
# 20 minutes; CI runs them after it (.ci/run).
test-pod: install-test
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m pod tests

# Skips the slow end-to-end tests; CI runs everything.
test-fast: install-test
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m "not slow and not pod" tests
