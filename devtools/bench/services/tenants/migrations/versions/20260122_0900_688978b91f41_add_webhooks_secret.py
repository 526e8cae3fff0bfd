"""add webhooks secret

Revision ID: 688978b91f41
Revises: 891cf0266884
Create Date: 2026-01-22 09:00:00.000000+00:00

"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "688978b91f41"
down_revision: str | Sequence[str] | None = "891cf0266884"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    op.add_column("webhooks", sa.Column("secret", sa.Text(), nullable=True))


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_column("webhooks", "secret")
