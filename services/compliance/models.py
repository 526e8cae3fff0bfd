"""SQLAlchemy models of the compliance service's database.

This module is the schema that the service's migrations build: ``migrations/env.py`` loads it by
path and uses ``metadata`` as Alembic's ``target_metadata``, so autogenerate against a database at
head must find no difference. Change a model only together with a new migration.

Tables: ``kyc_cases`` (identity verification), ``aml_alerts`` (anti-money-laundering alerts on
transactions), ``sanctions_checks`` (screenings against sanctions lists), ``compliance_cases``
(investigations assigned to officers), ``compliance_checks`` (automated checks on an entity) and
``watchlist_entries`` (internal and external watchlists). Scores run from 0 to 100.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Boolean, DateTime, MetaData, Numeric, String, Text, func
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION: dict[str, str] = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    """Declarative base whose constraints and indexes are named by ``NAMING_CONVENTION``."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class TimestampMixin:
    """``created_at`` and ``updated_at``, both set by the database."""

    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now(), onupdate=func.now()
    )


class KycCase(TimestampMixin, Base):
    """A know-your-customer verification of one user."""

    __tablename__ = "kyc_cases"
    __table_args__ = (
        sa.CheckConstraint(
            "verification_score >= 0 AND verification_score <= 100", name="verification_score_range"
        ),
        sa.Index(None, "created_at"),
    )

    case_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(128), nullable=False, index=True)
    status: Mapped[str] = mapped_column(String(32), nullable=False, index=True)
    document_data: Mapped[dict[str, Any]] = mapped_column(
        postgresql.JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")
    )
    personal_info: Mapped[dict[str, Any]] = mapped_column(
        postgresql.JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")
    )
    verification_score: Mapped[Decimal | None] = mapped_column(Numeric(5, 2), nullable=True)
    resolved_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class AmlAlert(TimestampMixin, Base):
    """An anti-money-laundering alert raised on a user or one of their transactions."""

    __tablename__ = "aml_alerts"
    __table_args__ = (
        sa.CheckConstraint("risk_score >= 0 AND risk_score <= 100", name="risk_score_range"),
        sa.Index(None, "created_at"),
        # The analysts' queue: unresolved alerts of a severity, newest first.
        sa.Index(
            "ix_aml_alerts_unresolved_severity_created_at",
            "severity",
            "created_at",
            postgresql_where=sa.text("resolved_at IS NULL"),
        ),
    )

    alert_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(128), nullable=False, index=True)
    transaction_id: Mapped[str | None] = mapped_column(String(128), nullable=True, index=True)
    alert_type: Mapped[str] = mapped_column(String(64), nullable=False)
    severity: Mapped[str] = mapped_column(String(16), nullable=False, index=True)
    status: Mapped[str] = mapped_column(String(32), nullable=False, index=True)
    risk_score: Mapped[Decimal | None] = mapped_column(Numeric(5, 2), nullable=True)
    flags: Mapped[list[str]] = mapped_column(
        postgresql.JSONB, nullable=False, server_default=sa.text("'[]'::jsonb")
    )
    details: Mapped[dict[str, Any]] = mapped_column(
        postgresql.JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")
    )
    resolved_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class SanctionsCheck(TimestampMixin, Base):
    """A screening of a subject (a user, or a name alone) against sanctions lists."""

    __tablename__ = "sanctions_checks"
    __table_args__ = (
        sa.CheckConstraint("risk_score >= 0 AND risk_score <= 100", name="risk_score_range"),
        sa.Index(None, "created_at"),
    )

    check_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    user_id: Mapped[str | None] = mapped_column(String(128), nullable=True, index=True)
    subject_name: Mapped[str] = mapped_column(String(512), nullable=False)
    lists_checked: Mapped[list[str]] = mapped_column(
        postgresql.JSONB, nullable=False, server_default=sa.text("'[]'::jsonb")
    )
    matches: Mapped[list[dict[str, Any]]] = mapped_column(
        postgresql.JSONB, nullable=False, server_default=sa.text("'[]'::jsonb")
    )
    status: Mapped[str] = mapped_column(String(32), nullable=False, index=True)
    risk_score: Mapped[Decimal | None] = mapped_column(Numeric(5, 2), nullable=True)


class ComplianceCase(TimestampMixin, Base):
    """An investigation opened on a user and worked by a compliance officer."""

    __tablename__ = "compliance_cases"
    __table_args__ = (sa.Index(None, "created_at"),)

    case_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(128), nullable=False, index=True)
    case_type: Mapped[str] = mapped_column(String(64), nullable=False)
    status: Mapped[str] = mapped_column(String(32), nullable=False, index=True)
    priority: Mapped[str] = mapped_column(String(16), nullable=False)
    assigned_to: Mapped[str | None] = mapped_column(String(128), nullable=True, index=True)
    description: Mapped[str | None] = mapped_column(Text, nullable=True)
    flags: Mapped[list[str]] = mapped_column(
        postgresql.JSONB, nullable=False, server_default=sa.text("'[]'::jsonb")
    )
    resolved_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class ComplianceCheck(TimestampMixin, Base):
    """An automated compliance check of one entity (a user, account or transaction)."""

    __tablename__ = "compliance_checks"
    __table_args__ = (sa.CheckConstraint("risk_score >= 0 AND risk_score <= 100", name="risk_score_range"),)

    check_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    entity_id: Mapped[str] = mapped_column(String(128), nullable=False, index=True)
    check_type: Mapped[str] = mapped_column(String(64), nullable=False)
    status: Mapped[str] = mapped_column(String(32), nullable=False, index=True)
    result: Mapped[dict[str, Any]] = mapped_column(
        postgresql.JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")
    )
    risk_score: Mapped[Decimal | None] = mapped_column(Numeric(5, 2), nullable=True)


class WatchlistEntry(TimestampMixin, Base):
    """An entity named on a watchlist, with the identifiers used to match it."""

    __tablename__ = "watchlist_entries"

    entry_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    list_name: Mapped[str] = mapped_column(String(128), nullable=False, index=True)
    entity_name: Mapped[str] = mapped_column(String(512), nullable=False, index=True)
    entity_type: Mapped[str] = mapped_column(String(32), nullable=False)
    identifiers: Mapped[dict[str, Any]] = mapped_column(
        postgresql.JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")
    )
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    active: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default=sa.text("true"), index=True)


metadata: MetaData = Base.metadata

__all__ = [
    "AmlAlert",
    "Base",
    "ComplianceCase",
    "ComplianceCheck",
    "KycCase",
    "SanctionsCheck",
    "WatchlistEntry",
    "metadata",
]
