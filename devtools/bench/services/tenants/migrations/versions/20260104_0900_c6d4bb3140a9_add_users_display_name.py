"""add users display_name

Revision ID: c6d4bb3140a9
Revises: 7b3f7d327665
Create Date: 2026-01-04 09:00:00.000000+00:00

"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "c6d4bb3140a9"
down_revision: str | Sequence[str] | None = "7b3f7d327665"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    op.add_column("users", sa.Column("display_name", sa.Text(), nullable=True))


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_column("users", "display_name")
