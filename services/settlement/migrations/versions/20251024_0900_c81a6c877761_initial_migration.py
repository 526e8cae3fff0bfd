"""initial migration

Revision ID: c81a6c877761
Revises:
Create Date: 2025-10-24 09:00:00.000000+00:00

"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

# revision identifiers, used by Alembic.
revision: str = "c81a6c877761"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# migrate-job: lint-ignore prefer-text-field -- these VARCHAR(n) columns belong to tables created in
# this revision; models.py bounds them on purpose, and widening one later is a catalog-only change
# (no rewrite) whose brief lock the job takes under lock_timeout.


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table(
        "settlement_commands",
        sa.Column("command_id", sa.String(length=128), nullable=False),
        sa.Column("workflow_id", sa.String(length=128), nullable=False),
        sa.Column("account_ref", sa.String(length=128), nullable=False),
        sa.Column("payer", sa.String(length=128), nullable=True),
        sa.Column("payee", sa.String(length=128), nullable=True),
        sa.Column("asset_symbol", sa.String(length=32), nullable=False),
        sa.Column("amount_numeric", sa.Numeric(precision=38, scale=18), nullable=False),
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
        sa.CheckConstraint(
            "amount_numeric >= 0",
            name=op.f("ck_settlement_commands_amount_numeric_non_negative"),
        ),
        sa.PrimaryKeyConstraint("command_id", name=op.f("pk_settlement_commands")),
    )
    op.create_index(
        op.f("ix_settlement_commands_workflow_id"),
        "settlement_commands",
        ["workflow_id"],
        unique=False,
    )
    op.create_index(
        op.f("ix_settlement_commands_account_ref"),
        "settlement_commands",
        ["account_ref"],
        unique=False,
    )
    op.create_index(op.f("ix_settlement_commands_status"), "settlement_commands", ["status"], unique=False)
    op.create_index(
        op.f("ix_settlement_commands_created_at"),
        "settlement_commands",
        ["created_at"],
        unique=False,
    )

    op.create_table(
        "webhook_subscriptions",
        sa.Column("subscription_id", sa.String(length=128), nullable=False),
        sa.Column("url", sa.String(length=2048), nullable=False),
        sa.Column("secret", sa.String(length=256), nullable=False),
        sa.Column(
            "event_types",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'[]'::jsonb"),
            nullable=False,
        ),
        sa.Column("enabled", sa.Boolean(), server_default=sa.text("true"), nullable=False),
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
        sa.PrimaryKeyConstraint("subscription_id", name=op.f("pk_webhook_subscriptions")),
    )
    op.create_index(
        op.f("ix_webhook_subscriptions_enabled"),
        "webhook_subscriptions",
        ["enabled"],
        unique=False,
    )


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_index(op.f("ix_webhook_subscriptions_enabled"), table_name="webhook_subscriptions")
    op.drop_table("webhook_subscriptions")

    op.drop_index(op.f("ix_settlement_commands_created_at"), table_name="settlement_commands")
    op.drop_index(op.f("ix_settlement_commands_status"), table_name="settlement_commands")
    op.drop_index(op.f("ix_settlement_commands_account_ref"), table_name="settlement_commands")
    op.drop_index(op.f("ix_settlement_commands_workflow_id"), table_name="settlement_commands")
    op.drop_table("settlement_commands")
