"""``python -m job``: the same entry point as the ``migrate-job`` console script."""

from __future__ import annotations

from job.cli import entry

entry()
