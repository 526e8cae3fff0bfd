# syntax=docker/dockerfile:1
# migrate-job: one image that carries every service's migrations and runs them as a Cloud Run job.
# `make image-check` lints this file and rebuilds the builder stage's environment without Docker
# (same files, same uv command) to prove the image is complete; keep the two in step.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- builder: resolve the locked runtime dependencies into /app/.venv ---------------------------
FROM ${PYTHON_IMAGE} AS builder

# Bytecode is compiled here once, so each execution does not pay for it (about 1.5 s per start).
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_NO_CACHE=1 \
    UV_PYTHON_DOWNLOADS=never \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN pip install --no-cache-dir uv==0.13.9

WORKDIR /app

# Dependencies first: this layer is reused until pyproject.toml or uv.lock changes (nothing else is
# copied before it, so a README or code edit does not reinstall them).
COPY pyproject.toml uv.lock ./
RUN uv sync --frozen --no-dev --no-install-project

# The job and everything it reads at run time, nothing else (see .dockerignore).
COPY job/ job/
COPY services/ services/
COPY deploy/environments/ deploy/environments/
# The project is installed editable: the job finds services/ and deploy/environments/ next to job/.
# uv's lock file is world-writable (0666): it goes, so that nothing under /app is writable at run time.
RUN uv sync --frozen --no-dev \
    && python -m compileall -q job services \
    && rm pyproject.toml uv.lock .venv/.lock

# ---- runtime: the slim Python image, the venv and the three folders, a non-root user -----------
FROM ${PYTHON_IMAGE}

ARG SOURCE_URL=unknown
ARG REVISION=unknown
LABEL org.opencontainers.image.title="migrate-job" \
      org.opencontainers.image.description="Alembic migrations of every service, run as a Cloud Run job" \
      org.opencontainers.image.source="${SOURCE_URL}" \
      org.opencontainers.image.revision="${REVISION}"

RUN groupadd --system --gid 10001 migrate \
    && useradd --system --uid 10001 --gid migrate --no-create-home --shell /usr/sbin/nologin migrate

# The venv's paths are absolute, so it lives at the same path as in the builder.
COPY --from=builder --chown=root:root /app /app

ENV PATH=/app/.venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MIGRATE_LOG_FORMAT=json \
    MIGRATE_IMAGE_REVISION=${REVISION}

WORKDIR /app
USER 10001:10001

# Exec form: the job is PID 1 and receives Cloud Run's SIGTERM itself.
ENTRYPOINT ["migrate-job"]
