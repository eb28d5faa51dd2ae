# The README's two commands. Each installs what it needs (idempotent) and then runs.
#   make demo   — the embedded default end to end on this machine (profile local)
#   make test   — the whole test suite (unit, dist, s3, slurm; gpu tests skip without CUDA)

SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# DeepSpeed compiles C++ ops on first use; keep them outside the clone so CI reuses them.
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/sd35dist/torch_extensions
export PIP_DISABLE_PIP_VERSION_CHECK := 1
# The venv first on PATH: its ninja builds DeepSpeed's ops; another ninja would invalidate them.
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: demo test install system-deps clean

demo: install
	$(BIN)/python -m sd35dist.demo

test: install
	$(BIN)/python -m pytest -q

install: system-deps $(STAMP)

# Debian packages: Slurm + munge + MariaDB (the test cluster), venv support. Skipped when present.
system-deps:
	@$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || { apt-get update -qq && apt-get install -y -qq --no-install-recommends python3-venv; }
	@bash slurm/devcluster.sh install

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(STAMP)

clean:
	rm -rf $(VENV) runs build *.egg-info
