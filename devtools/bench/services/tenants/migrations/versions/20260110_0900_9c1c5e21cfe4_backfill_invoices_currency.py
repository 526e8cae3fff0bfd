"""backfill invoices currency

Revision ID: 9c1c5e21cfe4
Revises: bb9127d3dc92
Create Date: 2026-01-10 09:00:00.000000+00:00

"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "9c1c5e21cfe4"
down_revision: str | Sequence[str] | None = "bb9127d3dc92"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    op.execute("UPDATE invoices SET currency = 'EUR' WHERE currency IS NULL")
    op.alter_column("invoices", "currency", nullable=False, server_default="EUR")


def downgrade() -> None:
    """Downgrade schema."""
    op.alter_column("invoices", "currency", nullable=True, server_default=None)
