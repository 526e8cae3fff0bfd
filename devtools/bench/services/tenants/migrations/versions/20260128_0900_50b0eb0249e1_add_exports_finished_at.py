"""add exports finished_at

Revision ID: 50b0eb0249e1
Revises: bf649ef650f3
Create Date: 2026-01-28 09:00:00.000000+00:00

"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "50b0eb0249e1"
down_revision: str | Sequence[str] | None = "bf649ef650f3"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    op.add_column("exports", sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index(
        "ix_exports_unfinished", "exports", ["tenant_id"], postgresql_where=sa.text("finished_at IS NULL")
    )


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_index("ix_exports_unfinished", table_name="exports")
    op.drop_column("exports", "finished_at")
