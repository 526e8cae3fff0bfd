"""add invoices due_date

Revision ID: 8063b6f72f2c
Revises: 13114470e9e4
Create Date: 2026-01-25 09:00:00.000000+00:00

"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "8063b6f72f2c"
down_revision: str | Sequence[str] | None = "13114470e9e4"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    op.add_column("invoices", sa.Column("due_date", sa.Date(), nullable=True))


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_column("invoices", "due_date")
