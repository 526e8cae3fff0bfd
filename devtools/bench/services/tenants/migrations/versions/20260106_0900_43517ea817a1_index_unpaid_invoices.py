"""index unpaid invoices

Revision ID: 43517ea817a1
Revises: 078d9531041b
Create Date: 2026-01-06 09:00:00.000000+00:00

"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "43517ea817a1"
down_revision: str | Sequence[str] | None = "078d9531041b"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_index(
        "ix_invoices_unpaid", "invoices", ["status"], postgresql_where=sa.text("status <> 'paid'")
    )


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_index("ix_invoices_unpaid", table_name="invoices")
