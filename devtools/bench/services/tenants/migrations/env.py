"""Alembic environment: the blessed shape every migrate-job service ships.

Under migrate-job the live connection arrives in ``config.attributes["connection"]`` and this file
only configures the context. Run on its own (``alembic -c services/<name>/alembic.ini upgrade head``)
it connects with asyncpg to ``DATABASE_URL`` (any ``postgresql`` driver prefix) or ``sqlalchemy.url``.
It configures logging from alembic.ini only in that stand-alone case: the job owns its logging.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import os
import sys
from logging.config import fileConfig
from pathlib import Path
from types import ModuleType
from typing import Any

from alembic import context
from sqlalchemy import MetaData, pool
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import create_async_engine

config = context.config
SERVICE_DIR = Path(__file__).resolve().parent.parent


def load_models() -> ModuleType:
    """Return the service's models.py, imported once under a name unique to its path."""
    path = SERVICE_DIR / "models.py"
    name = "migrate_job_models_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


target_metadata: MetaData = load_models().metadata

CONFIGURE: dict[str, Any] = {
    "target_metadata": target_metadata,
    "compare_type": True,
    "compare_server_default": True,
    # One transaction per revision: a failure leaves the database at the last good revision.
    "transaction_per_migration": True,
}


def database_url() -> str:
    """Return the URL to connect to when run outside the job, forced to the asyncpg driver."""
    raw = os.environ.get("DATABASE_URL") or config.get_main_option("sqlalchemy.url")
    if not raw:
        raise SystemExit("set DATABASE_URL or sqlalchemy.url to the database to migrate")
    return make_url(raw).set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)


def run_migrations_offline() -> None:
    """Emit the migrations as SQL (``alembic upgrade --sql``)."""
    context.configure(
        url=database_url(), literal_binds=True, dialect_opts={"paramstyle": "named"}, **CONFIGURE
    )
    with context.begin_transaction():
        context.run_migrations()


def do_run_migrations(connection: Connection) -> None:
    """Run the migrations on a live synchronous connection."""
    context.configure(connection=connection, **CONFIGURE)
    with context.begin_transaction():
        context.run_migrations()


async def run_async_migrations(url: str) -> None:
    """Connect with asyncpg and run the migrations (stand-alone Alembic CLI use)."""
    engine = create_async_engine(url, poolclass=pool.NullPool)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(do_run_migrations)
    finally:
        await engine.dispose()


def run_migrations_online() -> None:
    """Use the job's connection when given one, else open our own."""
    connection = config.attributes.get("connection")
    if connection is not None:
        do_run_migrations(connection)
        return
    if config.config_file_name is not None:
        fileConfig(config.config_file_name, disable_existing_loggers=False)
    asyncio.run(run_async_migrations(database_url()))


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
