"""One SQLAlchemy engine per server and login, shared by every database the run reaches there.

An engine initialises its dialect on its first connection (server version, current schema,
isolation level, string quoting: five round trips) and keeps its own cache of compiled
statements. Made per database, a fleet run paid both once per database. Here the engine is made
once per server, login and session settings, and each connection names its database when it is
opened (``do_connect``), from the task that asked for it.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sqlalchemy.engine import URL, Dialect
    from sqlalchemy.ext.asyncio import AsyncEngine

# The database the current task is connecting to (each asyncio task has its own copy).
_database: ContextVar[str | None] = ContextVar("migrate_job_database", default=None)
# An open asyncpg connection the task's next connection adopts instead of logging in: in a list,
# emptied when adopted, so that a retry in the same task logs in afresh (whatever context copy
# SQLAlchemy's greenlet runs do_connect in).
_adopt: ContextVar[list[Any] | None] = ContextVar("migrate_job_adopt", default=None)
_engines: dict[tuple[str, str], AsyncEngine] = {}


def engine_for(url: URL, connect_args: dict[str, Any]) -> AsyncEngine:
    """Return the shared engine for the URL's server and login with these connection arguments."""
    from sqlalchemy import event
    from sqlalchemy.ext.asyncio import create_async_engine
    from sqlalchemy.pool import NullPool

    server = url.set(database=None)
    key = (server.render_as_string(hide_password=False), repr(sorted(connect_args.items())))
    engine = _engines.get(key)
    if engine is None:
        engine = create_async_engine(server, poolclass=NullPool, connect_args=connect_args)
        event.listen(engine.sync_engine, "do_connect", _name_database)
        _engines[key] = engine
    return engine


def connecting_to(database: str | None, adopt: Any = None) -> None:
    """Say which database the current task's next connections are for (and an open one to adopt)."""
    _database.set(database)
    _adopt.set([adopt] if adopt is not None else [])


def _name_database(dialect: Dialect, record: Any, cargs: Any, cparams: dict[str, Any]) -> None:
    """Open the connection on the database the task is connecting to (do_connect)."""
    database = _database.get()
    if database is None:
        raise RuntimeError("a shared engine connected without a database (call engines.connecting_to first)")
    cparams["database"] = database
    box = _adopt.get()
    if box:
        adopted = box.pop()

        async def handed_over(*args: Any, **kwargs: Any) -> Any:
            return adopted

        cparams["async_creator_fn"] = handed_over
