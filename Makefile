# migrate-job: every target echoes the real command it runs.
# uv is installed with pip on first use if the machine does not have it.
SHELL := /bin/bash
UV := $(shell command -v uv 2>/dev/null || echo python3 -m uv)
export UV_PYTHON_DOWNLOADS := never
# Job processes start often (tests, demo); compiled bytecode halves their start-up.
export UV_COMPILE_BYTECODE := 1

# Deploy settings: override on the command line (make deploy ENV=prod IMAGE=...).
ENV ?= dev
REGION ?= us-central1
PROJECT ?= fusion-prime-$(ENV)
REPOSITORY ?= migrate-job
TAG ?= $(shell git rev-parse --short HEAD 2>/dev/null || echo manual)
IMAGE ?= $(REGION)-docker.pkg.dev/$(PROJECT)/$(REPOSITORY)/migrate-job:$(TAG)
JOB = migrate-job-$(ENV)
# The Dockerfile's base image; empty keeps its default (python:3.11-slim-bookworm).
PYTHON_IMAGE ?=

# Test processes: pytest-xdist workers, each with a PostgreSQL of its own (see docs/development.md).
TEST_WORKERS ?= 2

.PHONY: help install demo test test-suite test-scale lint format image-check image image-test push deploy execute bench

help:
	@echo "make install   create .venv from uv.lock (runtime + dev tools)"
	@echo "make demo      migrate three throwaway databases the way Cloud Run would, then a fleet as 3 tasks; clean up"
	@echo "make test      lint, image-check and the whole test suite (in parallel) against a real PostgreSQL"
	@echo "make test-suite  the test suite alone: pytest in TEST_WORKERS processes"
	@echo "make test-scale  the scale tests: 1000 databases in one run, memory of the process tree sampled"
	@echo "make lint      ruff check, ruff format --check, mypy"
	@echo "make format    ruff format and ruff check --fix"
	@echo "make bench     time this job against the alembic loop, dbmate and psql -f on 100 databases (not in make test)"
	@echo "make image-check  hadolint, job YAMLs, cloudbuild.yaml, and the image's files rebuilt and run without Docker"
	@echo "make image     build the image as IMAGE: docker if a Docker engine answers, else podman (ENGINE=... chooses)"
	@echo "make image-test  build the real image with podman and run it as Cloud Run runs a job task (as root)"
	@echo "make push      push IMAGE to Artifact Registry with the same engine"
	@echo "make deploy ENV=dev IMAGE=...   gcloud run jobs replace deploy/jobs/ENV.yaml with IMAGE"
	@echo "make execute ENV=dev            gcloud run jobs execute migrate-job-ENV --wait (exit code = the job's outcome)"

install:
	@$(UV) --version >/dev/null 2>&1 || { echo "+ python3 -m pip install uv"; python3 -m pip install --quiet uv; }
	$(UV) sync --frozen

demo: install
	$(UV) run --frozen python -m devtools.demo

lint: install
	$(UV) run --frozen ruff check .
	$(UV) run --frozen ruff format --check .
	$(UV) run --frozen mypy job devtools

# lint, image-check and the suite run side by side (the suite leaves a core idle about half the
# time, waiting on servers and processes); each one's output is printed whole when it ends.
test: install
	$(MAKE) --no-print-directory -j3 --output-sync=target lint image-check test-suite

test-suite: install
	$(UV) run --frozen pytest -n $(TEST_WORKERS) --dist loadgroup

test-scale: install
	$(UV) run --frozen pytest -m scale

bench: install
	$(UV) run --frozen python -m devtools.bench $(BENCH_ARGS)

image-check: install
	$(UV) run --frozen python -m devtools.image_check

image: install
	$(UV) run --frozen python -m devtools.build_context
	$(UV) run --frozen python -m devtools.engine build --image $(IMAGE) --revision $$(git rev-parse HEAD) --base "$(PYTHON_IMAGE)"

image-test: install
	$(UV) run --frozen python -m devtools.image_test

push: install
	$(UV) run --frozen python -m devtools.engine push --image $(IMAGE)

deploy:
	@mkdir -p build
	sed "s|__IMAGE__|$(IMAGE)|g" deploy/jobs/$(ENV).yaml > build/job-$(ENV).yaml
	gcloud run jobs replace build/job-$(ENV).yaml --region $(REGION) --project $(PROJECT)

execute:
	deploy/execute.sh $(JOB) $(REGION) $(PROJECT)

format: install
	$(UV) run --frozen ruff format .
	$(UV) run --frozen ruff check --fix .
