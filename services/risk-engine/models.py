"""SQLAlchemy models of the risk-engine service's database.

This module is the schema that the service's migrations build: ``migrations/env.py`` loads it by
path and uses ``metadata`` as Alembic's ``target_metadata``, so autogenerate against a database at
head must find no difference. Change a model only together with a new migration.

Tables: ``escrows`` (the escrow contracts the engine scores, with their latest ``risk_score``).
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

import sqlalchemy as sa
from sqlalchemy import BigInteger, DateTime, MetaData, Numeric, String, func
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


class Escrow(TimestampMixin, Base):
    """An escrow contract, keyed by its on-chain address, and the engine's score for it."""

    __tablename__ = "escrows"
    __table_args__ = (
        sa.CheckConstraint("amount >= 0", name="amount_non_negative"),
        sa.CheckConstraint("amount_numeric >= 0", name="amount_numeric_non_negative"),
        sa.CheckConstraint("risk_score >= 0 AND risk_score <= 100", name="risk_score_range"),
        sa.Index(None, "created_at"),
    )

    address: Mapped[str] = mapped_column(String(128), primary_key=True)
    payer: Mapped[str] = mapped_column(String(128), nullable=False, index=True)
    payee: Mapped[str] = mapped_column(String(128), nullable=False, index=True)
    # The amount as reported by the chain event, and its normalised decimal value once known.
    amount: Mapped[Decimal] = mapped_column(Money, nullable=False)
    amount_numeric: Mapped[Decimal | None] = mapped_column(Money, nullable=True)
    asset_symbol: Mapped[str | None] = mapped_column(String(32), nullable=True)
    chain_id: Mapped[int] = mapped_column(BigInteger, nullable=False)
    status: Mapped[str] = mapped_column(String(32), nullable=False, index=True)
    # 0 (no risk) to 100; NULL until the escrow has been scored.
    risk_score: Mapped[Decimal | None] = mapped_column(Numeric(5, 2), nullable=True, index=True)


metadata: MetaData = Base.metadata

__all__ = ["Base", "Escrow", "metadata"]
