"""add audit events actor

Revision ID: b4f3d0fed2e7
Revises: a4655b5ea188
Create Date: 2026-01-19 09:00:00.000000+00:00

"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "b4f3d0fed2e7"
down_revision: str | Sequence[str] | None = "a4655b5ea188"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    op.add_column("audit_events", sa.Column("actor_id", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_column("audit_events", "actor_id")
