"""The bench's tenant history has no models: ``make bench`` only upgrades and never autogenerates."""

from __future__ import annotations

from sqlalchemy import MetaData

metadata = MetaData()
