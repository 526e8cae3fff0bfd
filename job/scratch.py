"""Scratch databases for verify, check and revision --autogenerate: created, used, dropped.

They live on a server named by a secret reference to a URL whose role may CREATE DATABASE; the
manifest's databases are never used for this.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from job import db
from job.errors import ConfigError
from job.manifest import DatabaseEntry
from job.report import DatabaseResult, RunReport
from job.run import Run
from job.secrets import refuse_literal_url
from job.services import Service


def admin_url(run: Run, scratch: str) -> Any:
    """Return the URL (from a secret reference) of a server where scratch databases are made."""
    from sqlalchemy.engine import make_url

    refuse_literal_url(scratch, "--scratch")
    raw = run.resolver.resolve(run.manifest.reference(scratch))
    try:
        database = make_url(raw.get_secret_value()).database or "postgres"
    except Exception:
        database = "postgres"  # url_from_secret reports the malformed URL without showing it
    return db.url_from_secret(raw, DatabaseEntry(service="scratch", database=database, url=scratch))


@contextlib.asynccontextmanager
async def scratch_target(
    admin: Any, scratch: str, service: Service, purpose: str, report: RunReport | None = None
) -> AsyncIterator[tuple[db.Target, DatabaseResult]]:
    """Create a scratch database for one service (reported in report, if given); drop it after."""
    name = f"mj_{purpose}_{service.name.replace('-', '_')}_{os.getpid()}"
    entry = DatabaseEntry(service=service.name, database=name, url=scratch)
    result = DatabaseResult(service.name, name, "scratch")
    if report is not None:
        report.add(result)
    await recreate(admin, name, create=True)
    try:
        yield db.Target(entry, admin.set(database=name)), result
    finally:
        await recreate(admin, name, create=False)


SCRATCH_HINT = "verify needs a URL whose role may CREATE DATABASE (a throwaway server is best)"


async def recreate(
    admin: Any,
    name: str,
    *,
    create: bool,
    hint: str = SCRATCH_HINT,
    what: str = "scratch",
    login: dict[str, Any] | None = None,
) -> None:
    """Drop a database if it exists and, with create, create it empty (autocommit, as required).

    login holds extra connect arguments (an IAM entry's token function).
    """
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine
    from sqlalchemy.pool import NullPool

    engine = create_async_engine(
        admin, poolclass=NullPool, isolation_level="AUTOCOMMIT", connect_args=login or {}
    )
    try:
        async with engine.connect() as connection:
            await connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            if create:
                await connection.execute(text(f'CREATE DATABASE "{name}"'))
    except SQLAlchemyError as exc:
        raise ConfigError(
            f"cannot {'create' if create else 'drop'} {what} database {name}: {db.describe(exc)}",
            hint=hint,
        ) from None
    finally:
        await engine.dispose()
