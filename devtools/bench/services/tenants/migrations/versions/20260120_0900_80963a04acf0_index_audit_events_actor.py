"""index audit events actor

Revision ID: 80963a04acf0
Revises: b4f3d0fed2e7
Create Date: 2026-01-20 09:00:00.000000+00:00

"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "80963a04acf0"
down_revision: str | Sequence[str] | None = "b4f3d0fed2e7"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_index("ix_audit_events_actor_id", "audit_events", ["actor_id"])


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_index("ix_audit_events_actor_id", table_name="audit_events")
