"""add escrows table

Revision ID: b277be36eb38
Revises: c81a6c877761
Create Date: 2025-10-25 09:00:00.000000+00:00

"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "b277be36eb38"
down_revision: str | Sequence[str] | None = "c81a6c877761"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# migrate-job: lint-ignore prefer-text-field -- these VARCHAR(n) columns belong to tables created in
# this revision; models.py bounds them on purpose, and widening one later is a catalog-only change
# (no rewrite) whose brief lock the job takes under lock_timeout.


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table(
        "escrows",
        sa.Column("address", sa.String(length=128), nullable=False),
        sa.Column("payer", sa.String(length=128), nullable=False),
        sa.Column("payee", sa.String(length=128), nullable=False),
        sa.Column("amount", sa.Numeric(precision=38, scale=18), nullable=False),
        sa.Column("chain_id", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.String(length=32), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint("amount >= 0", name=op.f("ck_escrows_amount_non_negative")),
        sa.PrimaryKeyConstraint("address", name=op.f("pk_escrows")),
    )
    op.create_index(op.f("ix_escrows_payer"), "escrows", ["payer"], unique=False)
    op.create_index(op.f("ix_escrows_payee"), "escrows", ["payee"], unique=False)
    op.create_index(op.f("ix_escrows_status"), "escrows", ["status"], unique=False)


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_index(op.f("ix_escrows_status"), table_name="escrows")
    op.drop_index(op.f("ix_escrows_payee"), table_name="escrows")
    op.drop_index(op.f("ix_escrows_payer"), table_name="escrows")
    op.drop_table("escrows")
