"""check tenants plan

Revision ID: a112b5e8f0f4
Revises: 796385ef5258
Create Date: 2026-01-17 09:00:00.000000+00:00

"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "a112b5e8f0f4"
down_revision: str | Sequence[str] | None = "796385ef5258"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_check_constraint("ck_tenants_plan", "tenants", "plan IN ('free', 'team', 'enterprise')")


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_constraint("ck_tenants_plan", "tenants", type_="check")
