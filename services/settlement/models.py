"""SQLAlchemy models of the settlement service's database.

This module is the schema that the service's migrations build: ``migrations/env.py`` loads it by
path and uses ``metadata`` as Alembic's ``target_metadata``, so autogenerate against a database at
head must find no difference. Change a model only together with a new migration.

Tables: ``settlement_commands`` (settlement instructions received from workflows),
``webhook_subscriptions`` (outbound event subscribers) and ``escrows`` (on-chain escrow contracts).
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

import sqlalchemy as sa
from sqlalchemy import BigInteger, Boolean, DateTime, MetaData, Numeric, String, func
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION: dict[str, str] = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# Money: 38 digits with 18 after the point holds any ERC-20 amount in whole-token units.
Money = Numeric(38, 18)


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


class SettlementCommand(TimestampMixin, Base):
    """A settlement instruction issued by a workflow for an account."""

    __tablename__ = "settlement_commands"
    __table_args__ = (
        sa.CheckConstraint("amount_numeric >= 0", name="amount_numeric_non_negative"),
        # Listing commands newest first is the service's main read path.
        sa.Index(None, "created_at"),
    )

    command_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    workflow_id: Mapped[str] = mapped_column(String(128), nullable=False, index=True)
    account_ref: Mapped[str] = mapped_column(String(128), nullable=False, index=True)
    payer: Mapped[str | None] = mapped_column(String(128), nullable=True)
    payee: Mapped[str | None] = mapped_column(String(128), nullable=True)
    asset_symbol: Mapped[str] = mapped_column(String(32), nullable=False)
    amount_numeric: Mapped[Decimal] = mapped_column(Money, nullable=False)
    status: Mapped[str] = mapped_column(String(32), nullable=False, index=True)


class WebhookSubscription(TimestampMixin, Base):
    """An endpoint that receives the settlement events it subscribed to."""

    __tablename__ = "webhook_subscriptions"

    subscription_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    url: Mapped[str] = mapped_column(String(2048), nullable=False)
    # A reference to the signing secret (e.g. a Secret Manager name), never the secret itself.
    secret: Mapped[str] = mapped_column(String(256), nullable=False)
    event_types: Mapped[list[str]] = mapped_column(
        postgresql.JSONB, nullable=False, server_default=sa.text("'[]'::jsonb")
    )
    enabled: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default=sa.text("true"), index=True)


class Escrow(TimestampMixin, Base):
    """An escrow contract, keyed by its on-chain address."""

    __tablename__ = "escrows"
    __table_args__ = (sa.CheckConstraint("amount >= 0", name="amount_non_negative"),)

    address: Mapped[str] = mapped_column(String(128), primary_key=True)
    payer: Mapped[str] = mapped_column(String(128), nullable=False, index=True)
    payee: Mapped[str] = mapped_column(String(128), nullable=False, index=True)
    amount: Mapped[Decimal] = mapped_column(Money, nullable=False)
    chain_id: Mapped[int] = mapped_column(BigInteger, nullable=False)
    status: Mapped[str] = mapped_column(String(32), nullable=False, index=True)


metadata: MetaData = Base.metadata

__all__ = ["Base", "Escrow", "SettlementCommand", "WebhookSubscription", "metadata"]
