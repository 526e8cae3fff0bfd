"""check invoices amount

Revision ID: 62b23451b7f7
Revises: 9c1c5e21cfe4
Create Date: 2026-01-11 09:00:00.000000+00:00

"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "62b23451b7f7"
down_revision: str | Sequence[str] | None = "9c1c5e21cfe4"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_check_constraint("ck_invoices_amount_non_negative", "invoices", "amount >= 0")


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_constraint("ck_invoices_amount_non_negative", "invoices", type_="check")
