"""index unresolved aml alerts

Revision ID: 3ae732a7860c
Revises: ac845c92cc2a
Create Date: 2025-11-01 09:00:00.000000+00:00

The analysts' queue lists the unresolved alerts of a severity, newest first. aml_alerts grows with
every monitored transaction, so the index is built with CREATE INDEX CONCURRENTLY, outside the
revision's transaction: alerts keep being written while it builds, and a build that fails or is
killed leaves an INVALID index that the next run drops and builds again.
"""

from __future__ import annotations

from collections.abc import Sequence

from job.ops import create_index_concurrently, drop_index_concurrently

# revision identifiers, used by Alembic.
revision: str = "3ae732a7860c"
down_revision: str | Sequence[str] | None = "ac845c92cc2a"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Index the unresolved alerts by severity and age, without blocking writes to aml_alerts."""
    create_index_concurrently(
        "ix_aml_alerts_unresolved_severity_created_at",
        "aml_alerts",
        ["severity", "created_at"],
        where="resolved_at IS NULL",
    )


def downgrade() -> None:
    """Drop the index, again without blocking writes."""
    drop_index_concurrently("ix_aml_alerts_unresolved_severity_created_at")
