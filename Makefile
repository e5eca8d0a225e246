# Two commands do all the set-up: `make run` and `make test`. Both create .venv from the lock when missing.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
# This machine's pip config names index folders that may not exist; hide that noise, keep real errors.
QUIET_PIP := 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch 2.13.0 is a CPU wheel on local disk; never let pip fetch a CUDA build from the index.
WHEELS ?= /opt/wheels
PIP_LINKS := $(if $(wildcard $(WHEELS)),--find-links $(WHEELS),)
PYTEST_ARGS ?=

.PHONY: setup run test compile lock clean

# The venv, then the programs the tests run besides Python: where each was found, or how to install it.
setup: $(STAMP)
	@$(PY) -m tests.tools

$(STAMP): requirements.lock pyproject.toml
	@echo "==> creating $(VENV) from requirements.lock (about 2 minutes the first time)"
	@[ -n "$(PIP_LINKS)" ] || echo "note: no $(WHEELS) folder: pip must find torch==2.13.0+cpu (the CPU build the lock pins; PyPI has none) through its own configuration, PIP_EXTRA_INDEX_URL, or a folder given as make WHEELS=DIR"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=24" $(QUIET_PIP)
	$(PY) -m pip install -q $(PIP_LINKS) --no-deps -r requirements.lock $(QUIET_PIP)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e . $(QUIET_PIP)
	$(PY) -m pip check
	@touch $(STAMP)

run: setup
	$(VENV)/bin/flywheel run

test: setup
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m pytest $(PYTEST_ARGS)

compile: setup
	$(VENV)/bin/flywheel compile

# Re-resolve the lock from pyproject.toml and constraints.txt (torch first, from the local CPU wheel).
lock:
	rm -rf /tmp/flywheel-lock && $(PYTHON) -m venv /tmp/flywheel-lock
	/tmp/flywheel-lock/bin/pip install -q --upgrade pip setuptools wheel
	/tmp/flywheel-lock/bin/pip install -q $(PIP_LINKS) torch==2.13.0
	/tmp/flywheel-lock/bin/pip install -q $(PIP_LINKS) -c constraints.txt -e ".[test,usecases]"
	/tmp/flywheel-lock/bin/pip freeze --all --exclude-editable | grep -v -E "^pip==" > requirements.lock

clean:
	rm -rf $(VENV) build .flywheel
