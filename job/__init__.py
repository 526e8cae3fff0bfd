"""migrate-job: run every service's Alembic migrations as one Cloud Run job."""

from __future__ import annotations


def version() -> str:
    """Return the installed package version."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("migrate-job")
    except PackageNotFoundError:
        return "unknown"
