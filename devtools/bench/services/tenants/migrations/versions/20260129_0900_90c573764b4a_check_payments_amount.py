"""check payments amount

Revision ID: 90c573764b4a
Revises: 50b0eb0249e1
Create Date: 2026-01-29 09:00:00.000000+00:00

"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "90c573764b4a"
down_revision: str | Sequence[str] | None = "50b0eb0249e1"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_check_constraint("ck_payments_amount_positive", "payments", "amount > 0")


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_constraint("ck_payments_amount_positive", "payments", type_="check")
