"""create tags

Revision ID: a4655b5ea188
Revises: a112b5e8f0f4
Create Date: 2026-01-18 09:00:00.000000+00:00

"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "a4655b5ea188"
down_revision: str | Sequence[str] | None = "a112b5e8f0f4"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table(
        "tags",
        sa.Column("id", sa.BigInteger(), sa.Identity(), primary_key=True),
        sa.Column("tenant_id", sa.BigInteger(), sa.ForeignKey("tenants.id"), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
    )
    op.create_table(
        "project_tags",
        sa.Column("project_id", sa.BigInteger(), sa.ForeignKey("projects.id"), primary_key=True),
        sa.Column("tag_id", sa.BigInteger(), sa.ForeignKey("tags.id"), primary_key=True),
    )
    op.create_index("ix_project_tags_tag_id", "project_tags", ["tag_id"])


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_table("project_tags")
    op.drop_table("tags")
