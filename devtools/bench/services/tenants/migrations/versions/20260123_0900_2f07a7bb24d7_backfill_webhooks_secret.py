"""backfill webhooks secret

Revision ID: 2f07a7bb24d7
Revises: 688978b91f41
Create Date: 2026-01-23 09:00:00.000000+00:00

"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "2f07a7bb24d7"
down_revision: str | Sequence[str] | None = "688978b91f41"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    op.execute("UPDATE webhooks SET secret = md5(random()::text) WHERE secret IS NULL")
    op.alter_column("webhooks", "secret", nullable=False)


def downgrade() -> None:
    """Downgrade schema."""
    op.alter_column("webhooks", "secret", nullable=True)
