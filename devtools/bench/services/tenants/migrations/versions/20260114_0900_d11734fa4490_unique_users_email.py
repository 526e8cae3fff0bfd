"""unique users email

Revision ID: d11734fa4490
Revises: f7515601f454
Create Date: 2026-01-14 09:00:00.000000+00:00

"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "d11734fa4490"
down_revision: str | Sequence[str] | None = "f7515601f454"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_index("ux_users_tenant_email", "users", ["tenant_id", "email"], unique=True)


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_index("ux_users_tenant_email", table_name="users")
