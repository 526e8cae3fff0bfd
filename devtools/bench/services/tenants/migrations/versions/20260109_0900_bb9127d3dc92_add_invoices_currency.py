"""add invoices currency

Revision ID: bb9127d3dc92
Revises: 6c7e80d60498
Create Date: 2026-01-09 09:00:00.000000+00:00

"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "bb9127d3dc92"
down_revision: str | Sequence[str] | None = "6c7e80d60498"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    op.add_column("invoices", sa.Column("currency", sa.Text(), nullable=True))


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_column("invoices", "currency")
