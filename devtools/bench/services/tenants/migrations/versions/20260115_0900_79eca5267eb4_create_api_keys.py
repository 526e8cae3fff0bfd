"""create api keys

Revision ID: 79eca5267eb4
Revises: d11734fa4490
Create Date: 2026-01-15 09:00:00.000000+00:00

"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "79eca5267eb4"
down_revision: str | Sequence[str] | None = "d11734fa4490"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table(
        "api_keys",
        sa.Column("id", sa.BigInteger(), sa.Identity(), primary_key=True),
        sa.Column("user_id", sa.BigInteger(), sa.ForeignKey("users.id"), nullable=False),
        sa.Column("hash", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index(
        "ix_api_keys_live", "api_keys", ["user_id"], postgresql_where=sa.text("revoked_at IS NULL")
    )


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_table("api_keys")
