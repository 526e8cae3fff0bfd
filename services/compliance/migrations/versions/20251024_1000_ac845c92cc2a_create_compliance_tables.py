"""create compliance tables

Revision ID: ac845c92cc2a
Revises:
Create Date: 2025-10-24 10:00:00.000000+00:00

"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

# revision identifiers, used by Alembic.
revision: str = "ac845c92cc2a"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# migrate-job: lint-ignore prefer-text-field -- these VARCHAR(n) columns belong to tables created in
# this revision; models.py bounds them on purpose, and widening one later is a catalog-only change
# (no rewrite) whose brief lock the job takes under lock_timeout.


def _timestamps(*, resolved_at: bool) -> list[sa.Column]:
    """Return created_at and updated_at (set by the database), and resolved_at if asked."""
    columns = [
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
    ]
    if resolved_at:
        columns.append(sa.Column("resolved_at", sa.DateTime(timezone=True), nullable=True))
    return columns


def _jsonb(name: str, default: str) -> sa.Column:
    """Return a NOT NULL JSONB column whose server default is the literal ``default``."""
    return sa.Column(
        name,
        postgresql.JSONB(astext_type=sa.Text()),
        server_default=sa.text(f"'{default}'::jsonb"),
        nullable=False,
    )


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table(
        "kyc_cases",
        sa.Column("case_id", sa.String(length=128), nullable=False),
        sa.Column("user_id", sa.String(length=128), nullable=False),
        sa.Column("status", sa.String(length=32), nullable=False),
        _jsonb("document_data", "{}"),
        _jsonb("personal_info", "{}"),
        sa.Column("verification_score", sa.Numeric(precision=5, scale=2), nullable=True),
        *_timestamps(resolved_at=True),
        sa.CheckConstraint(
            "verification_score >= 0 AND verification_score <= 100",
            name=op.f("ck_kyc_cases_verification_score_range"),
        ),
        sa.PrimaryKeyConstraint("case_id", name=op.f("pk_kyc_cases")),
    )
    op.create_index(op.f("ix_kyc_cases_user_id"), "kyc_cases", ["user_id"], unique=False)
    op.create_index(op.f("ix_kyc_cases_status"), "kyc_cases", ["status"], unique=False)
    op.create_index(op.f("ix_kyc_cases_created_at"), "kyc_cases", ["created_at"], unique=False)

    op.create_table(
        "aml_alerts",
        sa.Column("alert_id", sa.String(length=128), nullable=False),
        sa.Column("user_id", sa.String(length=128), nullable=False),
        sa.Column("transaction_id", sa.String(length=128), nullable=True),
        sa.Column("alert_type", sa.String(length=64), nullable=False),
        sa.Column("severity", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=32), nullable=False),
        sa.Column("risk_score", sa.Numeric(precision=5, scale=2), nullable=True),
        _jsonb("flags", "[]"),
        _jsonb("details", "{}"),
        *_timestamps(resolved_at=True),
        sa.CheckConstraint(
            "risk_score >= 0 AND risk_score <= 100", name=op.f("ck_aml_alerts_risk_score_range")
        ),
        sa.PrimaryKeyConstraint("alert_id", name=op.f("pk_aml_alerts")),
    )
    op.create_index(op.f("ix_aml_alerts_user_id"), "aml_alerts", ["user_id"], unique=False)
    op.create_index(op.f("ix_aml_alerts_transaction_id"), "aml_alerts", ["transaction_id"], unique=False)
    op.create_index(op.f("ix_aml_alerts_severity"), "aml_alerts", ["severity"], unique=False)
    op.create_index(op.f("ix_aml_alerts_status"), "aml_alerts", ["status"], unique=False)
    op.create_index(op.f("ix_aml_alerts_created_at"), "aml_alerts", ["created_at"], unique=False)

    op.create_table(
        "sanctions_checks",
        sa.Column("check_id", sa.String(length=128), nullable=False),
        sa.Column("user_id", sa.String(length=128), nullable=True),
        sa.Column("subject_name", sa.String(length=512), nullable=False),
        _jsonb("lists_checked", "[]"),
        _jsonb("matches", "[]"),
        sa.Column("status", sa.String(length=32), nullable=False),
        sa.Column("risk_score", sa.Numeric(precision=5, scale=2), nullable=True),
        *_timestamps(resolved_at=False),
        sa.CheckConstraint(
            "risk_score >= 0 AND risk_score <= 100",
            name=op.f("ck_sanctions_checks_risk_score_range"),
        ),
        sa.PrimaryKeyConstraint("check_id", name=op.f("pk_sanctions_checks")),
    )
    op.create_index(op.f("ix_sanctions_checks_user_id"), "sanctions_checks", ["user_id"], unique=False)
    op.create_index(op.f("ix_sanctions_checks_status"), "sanctions_checks", ["status"], unique=False)
    op.create_index(op.f("ix_sanctions_checks_created_at"), "sanctions_checks", ["created_at"], unique=False)

    op.create_table(
        "compliance_cases",
        sa.Column("case_id", sa.String(length=128), nullable=False),
        sa.Column("user_id", sa.String(length=128), nullable=False),
        sa.Column("case_type", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=32), nullable=False),
        sa.Column("priority", sa.String(length=16), nullable=False),
        sa.Column("assigned_to", sa.String(length=128), nullable=True),
        sa.Column("description", sa.Text(), nullable=True),
        _jsonb("flags", "[]"),
        *_timestamps(resolved_at=True),
        sa.PrimaryKeyConstraint("case_id", name=op.f("pk_compliance_cases")),
    )
    op.create_index(op.f("ix_compliance_cases_user_id"), "compliance_cases", ["user_id"], unique=False)
    op.create_index(op.f("ix_compliance_cases_status"), "compliance_cases", ["status"], unique=False)
    op.create_index(
        op.f("ix_compliance_cases_assigned_to"), "compliance_cases", ["assigned_to"], unique=False
    )
    op.create_index(op.f("ix_compliance_cases_created_at"), "compliance_cases", ["created_at"], unique=False)

    op.create_table(
        "compliance_checks",
        sa.Column("check_id", sa.String(length=128), nullable=False),
        sa.Column("entity_id", sa.String(length=128), nullable=False),
        sa.Column("check_type", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=32), nullable=False),
        _jsonb("result", "{}"),
        sa.Column("risk_score", sa.Numeric(precision=5, scale=2), nullable=True),
        *_timestamps(resolved_at=False),
        sa.CheckConstraint(
            "risk_score >= 0 AND risk_score <= 100",
            name=op.f("ck_compliance_checks_risk_score_range"),
        ),
        sa.PrimaryKeyConstraint("check_id", name=op.f("pk_compliance_checks")),
    )
    op.create_index(op.f("ix_compliance_checks_entity_id"), "compliance_checks", ["entity_id"], unique=False)
    op.create_index(op.f("ix_compliance_checks_status"), "compliance_checks", ["status"], unique=False)

    op.create_table(
        "watchlist_entries",
        sa.Column("entry_id", sa.String(length=128), nullable=False),
        sa.Column("list_name", sa.String(length=128), nullable=False),
        sa.Column("entity_name", sa.String(length=512), nullable=False),
        sa.Column("entity_type", sa.String(length=32), nullable=False),
        _jsonb("identifiers", "{}"),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("active", sa.Boolean(), server_default=sa.text("true"), nullable=False),
        *_timestamps(resolved_at=False),
        sa.PrimaryKeyConstraint("entry_id", name=op.f("pk_watchlist_entries")),
    )
    op.create_index(op.f("ix_watchlist_entries_list_name"), "watchlist_entries", ["list_name"], unique=False)
    op.create_index(
        op.f("ix_watchlist_entries_entity_name"),
        "watchlist_entries",
        ["entity_name"],
        unique=False,
    )
    op.create_index(op.f("ix_watchlist_entries_active"), "watchlist_entries", ["active"], unique=False)


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_index(op.f("ix_watchlist_entries_active"), table_name="watchlist_entries")
    op.drop_index(op.f("ix_watchlist_entries_entity_name"), table_name="watchlist_entries")
    op.drop_index(op.f("ix_watchlist_entries_list_name"), table_name="watchlist_entries")
    op.drop_table("watchlist_entries")

    op.drop_index(op.f("ix_compliance_checks_status"), table_name="compliance_checks")
    op.drop_index(op.f("ix_compliance_checks_entity_id"), table_name="compliance_checks")
    op.drop_table("compliance_checks")

    op.drop_index(op.f("ix_compliance_cases_created_at"), table_name="compliance_cases")
    op.drop_index(op.f("ix_compliance_cases_assigned_to"), table_name="compliance_cases")
    op.drop_index(op.f("ix_compliance_cases_status"), table_name="compliance_cases")
    op.drop_index(op.f("ix_compliance_cases_user_id"), table_name="compliance_cases")
    op.drop_table("compliance_cases")

    op.drop_index(op.f("ix_sanctions_checks_created_at"), table_name="sanctions_checks")
    op.drop_index(op.f("ix_sanctions_checks_status"), table_name="sanctions_checks")
    op.drop_index(op.f("ix_sanctions_checks_user_id"), table_name="sanctions_checks")
    op.drop_table("sanctions_checks")

    op.drop_index(op.f("ix_aml_alerts_created_at"), table_name="aml_alerts")
    op.drop_index(op.f("ix_aml_alerts_status"), table_name="aml_alerts")
    op.drop_index(op.f("ix_aml_alerts_severity"), table_name="aml_alerts")
    op.drop_index(op.f("ix_aml_alerts_transaction_id"), table_name="aml_alerts")
    op.drop_index(op.f("ix_aml_alerts_user_id"), table_name="aml_alerts")
    op.drop_table("aml_alerts")

    op.drop_index(op.f("ix_kyc_cases_created_at"), table_name="kyc_cases")
    op.drop_index(op.f("ix_kyc_cases_status"), table_name="kyc_cases")
    op.drop_index(op.f("ix_kyc_cases_user_id"), table_name="kyc_cases")
    op.drop_table("kyc_cases")
