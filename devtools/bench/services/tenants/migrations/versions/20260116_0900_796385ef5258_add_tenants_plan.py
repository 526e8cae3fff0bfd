"""add tenants plan

Revision ID: 796385ef5258
Revises: 79eca5267eb4
Create Date: 2026-01-16 09:00:00.000000+00:00

"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "796385ef5258"
down_revision: str | Sequence[str] | None = "79eca5267eb4"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    op.add_column("tenants", sa.Column("plan", sa.Text(), server_default="free", nullable=False))


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_column("tenants", "plan")
