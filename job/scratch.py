"""Scratch databases for verify, check and revision --autogenerate: created, used, dropped.

They live on a server named by a secret reference to a URL whose role may CREATE DATABASE; the
manifest's databases are never used for this.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
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

# Scratch databases this process created (and has not dropped yet): the only ones it drops.
_made: set[str] = set()
LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})


def admin_url(run: Run, scratch: str) -> Any:
    """Return the URL (from a secret reference) of a server where scratch databases are made.

    Refused (ConfigError) for a literal URL with a password, and for a server that holds one of
    the manifest's databases, unless the manifest's scratch_server names that same reference.
    """
    from sqlalchemy.engine import make_url

    refuse_literal_url(scratch, "--scratch")
    raw = run.resolver.resolve(run.manifest.reference(scratch))
    try:
        database = make_url(raw.get_secret_value()).database or "postgres"
    except Exception:
        database = "postgres"  # url_from_secret reports the malformed URL without showing it
    url = db.url_from_secret(raw, DatabaseEntry(service="scratch", database=database, url=scratch))
    _refuse_manifest_server(run, scratch, url)
    return url


def _refuse_manifest_server(run: Run, scratch: str, url: Any) -> None:
    """Raise ConfigError when the scratch server is the server of a database of the manifest."""
    ref = run.manifest.reference(scratch)
    allowed = run.manifest.scratch_server
    if allowed is not None and run.manifest.reference(allowed) == ref:
        return
    mine = _url_servers(url) | {f"ref:{ref.display}"}
    for entry in run.manifest.databases:
        if mine & _entry_servers(run, entry):
            raise ConfigError(
                f"--scratch {ref.display} points at the server of database {entry.label} "
                f"({entry.location}) of manifest {run.manifest.path}: every revision would run up, "
                "down and up there, roles and other cluster-wide statements included",
                hint="use a throwaway server for scratch databases; if this server is one on "
                f'purpose, set scratch_server = "{ref.display}" at the top of the manifest',
                service=entry.service,
                database=entry.database,
            )


def _url_servers(url: Any) -> set[str]:
    """Return the names of the server a URL reaches: host and port, or socket directory and instance."""
    socket = url.query.get("host")
    if isinstance(socket, str) and socket.startswith("/"):
        return {f"socket:{os.path.normpath(socket)}", f"instance:{os.path.basename(socket.rstrip('/'))}"}
    return {_tcp(url.host or "localhost", url.port or 5432)}


def _entry_servers(run: Run, entry: DatabaseEntry) -> set[str]:
    """Return the names of the server a manifest entry reaches (its URL reference, if it has one)."""
    if entry.instance:
        path = os.path.normpath(str(run.socket_root / entry.instance))
        return {f"instance:{entry.instance}", f"socket:{path}"}
    if entry.host:
        return {_tcp(entry.host, entry.port)}
    return {f"ref:{run.manifest.reference(entry.url).display}"} if entry.url else set()


def _tcp(host: str, port: int) -> str:
    """Return a TCP server's name; every spelling of the loopback address is the same server."""
    host = host.lower().strip("[]")
    return f"tcp:{'loopback' if host in LOOPBACK or host.startswith('127.') else host}:{port}"


def scratch_name(purpose: str, service: str) -> str:
    """Return a new scratch database name: purpose, service, and a random part (PID 1 in every container)."""
    tail = secrets.token_hex(5)
    stem = re.sub(r"[^a-z0-9_]", "_", f"mj_{purpose}_{service}".lower())
    return f"{stem[: 63 - len(tail) - 1]}_{tail}"


@contextlib.asynccontextmanager
async def scratch_target(
    admin: Any, scratch: str, service: Service, purpose: str, report: RunReport | None = None
) -> AsyncIterator[tuple[db.Target, DatabaseResult]]:
    """Create a scratch database for one service (reported in report, if given); drop it after."""
    name = scratch_name(purpose, service.name)
    entry = DatabaseEntry(service=service.name, database=name, url=scratch)
    result = DatabaseResult(service.name, name, "scratch")
    if report is not None:
        report.add(result)
    await create_scratch(admin, name)
    try:
        yield db.Target(entry, admin.set(database=name)), result
    finally:
        await drop_scratch(admin, name)


async def create_scratch(admin: Any, name: str) -> None:
    """Create an empty scratch database, remembered as this run's own (so it may be dropped)."""
    await recreate(admin, name, create=True)
    _made.add(name)


async def drop_scratch(admin: Any, name: str) -> None:
    """Drop a scratch database this run created; any other name is left alone."""
    if name in _made:
        await recreate(admin, name, create=False)
        _made.discard(name)


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
            await connection.execute(text(f"DROP DATABASE IF EXISTS {db.quote_ident(name)} WITH (FORCE)"))
            if create:
                await connection.execute(text(f"CREATE DATABASE {db.quote_ident(name)}"))
    except SQLAlchemyError as exc:
        raise ConfigError(
            f"cannot {'create' if create else 'drop'} {what} database {name}: {db.describe(exc)}",
            hint=hint,
        ) from None
    finally:
        await engine.dispose()
