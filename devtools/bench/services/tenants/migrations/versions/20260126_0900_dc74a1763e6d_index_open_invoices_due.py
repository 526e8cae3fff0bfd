"""index open invoices due

Revision ID: dc74a1763e6d
Revises: 8063b6f72f2c
Create Date: 2026-01-26 09:00:00.000000+00:00

"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "dc74a1763e6d"
down_revision: str | Sequence[str] | None = "8063b6f72f2c"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_index(
        "ix_invoices_open_due", "invoices", ["due_date"], postgresql_where=sa.text("status = 'open'")
    )


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_index("ix_invoices_open_due", table_name="invoices")
