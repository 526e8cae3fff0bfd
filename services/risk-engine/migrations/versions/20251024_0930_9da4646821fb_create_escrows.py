"""create escrows

Revision ID: 9da4646821fb
Revises:
Create Date: 2025-10-24 09:30:00.000000+00:00

"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "9da4646821fb"
down_revision: str | Sequence[str] | None = None
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
        sa.Column("amount_numeric", sa.Numeric(precision=38, scale=18), nullable=True),
        sa.Column("asset_symbol", sa.String(length=32), nullable=True),
        sa.Column("chain_id", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.String(length=32), nullable=False),
        sa.Column("risk_score", sa.Numeric(precision=5, scale=2), nullable=True),
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
        sa.CheckConstraint("amount_numeric >= 0", name=op.f("ck_escrows_amount_numeric_non_negative")),
        sa.CheckConstraint("risk_score >= 0 AND risk_score <= 100", name=op.f("ck_escrows_risk_score_range")),
        sa.PrimaryKeyConstraint("address", name=op.f("pk_escrows")),
    )
    op.create_index(op.f("ix_escrows_payer"), "escrows", ["payer"], unique=False)
    op.create_index(op.f("ix_escrows_payee"), "escrows", ["payee"], unique=False)
    op.create_index(op.f("ix_escrows_status"), "escrows", ["status"], unique=False)
    op.create_index(op.f("ix_escrows_risk_score"), "escrows", ["risk_score"], unique=False)
    op.create_index(op.f("ix_escrows_created_at"), "escrows", ["created_at"], unique=False)


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_index(op.f("ix_escrows_created_at"), table_name="escrows")
    op.drop_index(op.f("ix_escrows_risk_score"), table_name="escrows")
    op.drop_index(op.f("ix_escrows_status"), table_name="escrows")
    op.drop_index(op.f("ix_escrows_payee"), table_name="escrows")
    op.drop_index(op.f("ix_escrows_payer"), table_name="escrows")
    op.drop_table("escrows")
