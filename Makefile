# migrate-job: every target echoes the real command it runs.
# uv is installed with pip on first use if the machine does not have it.
SHELL := /bin/bash
UV := $(shell command -v uv 2>/dev/null || echo python3 -m uv)
export UV_PYTHON_DOWNLOADS := never
# Job processes start often (tests, demo); compiled bytecode halves their start-up.
export UV_COMPILE_BYTECODE := 1

.PHONY: help install demo test lint format

help:
	@echo "make install   create .venv from uv.lock (runtime + dev tools)"
	@echo "make demo      migrate three throwaway databases the way Cloud Run would, then clean up"
	@echo "make test      lint, then the whole test suite against a real PostgreSQL"
	@echo "make lint      ruff check, ruff format --check, mypy"
	@echo "make format    ruff format and ruff check --fix"

install:
	@$(UV) --version >/dev/null 2>&1 || { echo "+ python3 -m pip install uv"; python3 -m pip install --quiet uv; }
	$(UV) sync --frozen

demo: install
	$(UV) run --frozen python -m devtools.demo

lint: install
	$(UV) run --frozen ruff check .
	$(UV) run --frozen ruff format --check .
	$(UV) run --frozen mypy job devtools

test: lint
	$(UV) run --frozen pytest

format: install
	$(UV) run --frozen ruff format .
	$(UV) run --frozen ruff check --fix .
