# The README's commands. Each installs what it needs (idempotent) and then runs.
#   make demo   — the embedded default end to end on this machine (profile local); no root, no Debian packages
#   make check  — the fast loop: ruff (lint + import order) and the unit tier (in-process tests only); no root,
#                 no Debian packages; under 3 minutes on the 2-core dev machine
#   make test   — ruff and the whole test suite (unit, process, dist, s3, slurm; gpu tests skip without CUDA);
#                 installs the test cluster's Debian packages (Slurm, munge, MariaDB) when missing, as root
# ARGS="..." adds pytest arguments to check and test (`make check ARGS="-k render"`). pytest's exit status
# is make's: "no tests ran" (5, e.g. a -k that matches nothing) fails like a failed test.
# Parts: `make venv` (runtime packages only), `make test-deps` (system packages + test packages).

SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
# DeepSpeed compiles C++ ops on first use; keep them outside the clone so CI reuses them, one folder
# per venv and pinned versions: the build names the venv's include paths, so two clones sharing one
# folder rebuild it in turn, and the pins name the headers it was built against (see OP_BUILD_INPUTS).
# tests/cli_runs.py computes the same folder when pytest runs outside make.
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/sd35dist/torch_extensions/$(shell { printf %s '$(CURDIR)/$(VENV)'; cat requirements.txt; } | sha256sum | cut -c1-12)
# ninja rebuilds an op when a header it includes is newer than its build, and pip gives every file it
# installs the time of the install: a fresh venv would rebuild both ops (minutes of CPU) on every CI run.
# The headers and op sources get one fixed old time instead; their content is fixed by the pins, which
# the folder's name carries.
OP_BUILD_INPUTS = $(VENV)/lib/python3*/site-packages/torch/include $(VENV)/lib/python3*/site-packages/deepspeed/ops/csrc
export PIP_DISABLE_PIP_VERSION_CHECK := 1
# The venv first on PATH: its ninja builds DeepSpeed's ops; another ninja would invalidate them.
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: demo check test lint venv test-deps system-deps clean

demo: venv
	$(BIN)/python -m sd35dist.demo

check: $(TEST_STAMP) lint
	$(BIN)/python -m pytest -q -m unit --durations=10 $(ARGS)

test: test-deps lint
	$(BIN)/python -m pytest -q -n 2 --durations=60 $(ARGS)

lint: $(TEST_STAMP)
	$(BIN)/ruff check .

venv: $(STAMP)

test-deps: system-deps $(TEST_STAMP)

# Debian packages of the test cluster (Slurm, munge, MariaDB) and venv support; skipped when present.
system-deps:
	@$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || { apt-get update -qq && apt-get install -y -qq --no-install-recommends python3-venv; }
	@bash slurm/devcluster.sh install

# One pip run per target: `make test` installs the runtime and test pins together (a second run would resolve
# the runtime pins again). The bytecode is compiled after it, on every core (pip compiles one file at a time:
# 125 s of install became 65 + 30 on 2 cores): where PYTHONDONTWRITEBYTECODE is set (CI images often set it)
# Python would otherwise compile every module from source in every process. As pip does, the files that do
# not compile under this Python (torch's Python 3.12 test samples) are left without bytecode.
define install
	@$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || { echo "make: $(PYTHON) cannot create a venv (Debian: the python3-venv package; or run 'make test-deps' as root)" >&2; exit 2; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --no-compile -r $(1)
	$(BIN)/python -m pip install -q --no-deps -e .
	$(BIN)/python -m compileall -qq -j 0 $(VENV)/lib/python3*/site-packages || true
	find $(OP_BUILD_INPUTS) -exec touch -h -d @946684800 {} +
endef

$(STAMP): requirements.txt pyproject.toml
	$(call install,requirements.txt)
	touch $(STAMP)

$(TEST_STAMP): requirements-test.txt requirements.txt pyproject.toml
	$(call install,requirements-test.txt)
	touch $(STAMP) $(TEST_STAMP)

clean:
	rm -rf $(VENV) runs build *.egg-info
