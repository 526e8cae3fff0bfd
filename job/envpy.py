"""What env.py meets when the job runs it: the target's URL, its login, the job's logging, known heads.

env.py is the service's own file; the job runs it unmodified, and surrounds it so that whatever
shape it has (the blessed one, Alembic's templates, a settings module) it migrates the target
the job chose, with the job's login and logs, and does not re-read what the job read under the lock.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from job import db, iam, tls
from job.errors import MigrationFailed

if TYPE_CHECKING:
    from alembic.config import Config
    from alembic.runtime.environment import EnvironmentContext
    from alembic.script import ScriptDirectory
    from sqlalchemy.engine import Dialect

    from job.db import Target


def environment_context(
    config: Config,
    script: ScriptDirectory,
    known: tuple[str, ...] | None,
    table: tuple[str, str | None],
    **options: Any,
) -> EnvironmentContext:
    """Return Alembic's EnvironmentContext for env.py, told the heads the job read (known) under the lock.

    Alembic would read them again (a catalog query for the table, then its rows: four round trips
    on a fresh connection, and some 7 ms a database). Only for the table the job read, and only
    when env.py configures exactly that table: any other table Alembic reads itself.
    """
    from alembic.runtime.environment import EnvironmentContext

    environment = EnvironmentContext(config, script, **options)
    configure = environment.configure

    def configure_then_start_from_known(*args: Any, **kwargs: Any) -> None:
        configure(*args, **kwargs)
        context = environment.get_context()
        if known is not None and (context.version_table, context.version_table_schema) == table:
            context.get_current_heads = lambda: known  # type: ignore[method-assign]

    # On the instance: Alembic's context module proxies each method of the instance it installs.
    environment.configure = configure_then_start_from_known  # type: ignore[method-assign]
    return environment


@contextlib.contextmanager
def handing_url(config: Config, url: str) -> Iterator[None]:
    """Give env.py the target's URL both ways shapes read it: ``sqlalchemy.url`` and ``DATABASE_URL``.

    Set for offline rendering too, so a ``DATABASE_URL`` left in the job's environment is never read.
    """
    config.set_main_option("sqlalchemy.url", url)  # the job's Config doubles the URL's % for ConfigParser
    with environment(DATABASE_URL=url):
        yield


class EnvConnections:
    """While env.py runs, connections it opens itself get the entry's login and session settings.

    A class-level SQLAlchemy ``do_connect`` listener (registered once) gives them the IAM token
    (a fresh one per connection), the owner role and the timeouts, as the job's own connections
    have them. It also refuses a connection to another database than the target, e.g. from a URL
    that a settings module read at import and kept for the next database.
    """

    current: ContextVar[Target | None] = ContextVar("migrate_job_env_target", default=None)
    listening = False

    def __init__(self, target: Target) -> None:
        self.target = target
        self.token: Any = None

    def __enter__(self) -> None:
        if not EnvConnections.listening:
            from sqlalchemy import event
            from sqlalchemy.engine import Engine

            event.listen(Engine, "do_connect", EnvConnections.on_connect)
            EnvConnections.listening = True
        self.token = self.current.set(self.target)

    def __exit__(self, *exc: object) -> None:
        self.current.reset(self.token)

    @classmethod
    def on_connect(cls, dialect: Dialect, record: Any, cargs: Any, cparams: dict[str, Any]) -> None:
        """Add the target's login to the arguments of a connection env.py opens (do_connect)."""
        target = cls.current.get()
        if target is None:
            return
        entry = target.entry
        where = (cparams.get("database"), cparams.get("user"))
        if where != (target.database, target.url.username):
            raise MigrationFailed(
                f"env.py of service {entry.service} connected to database {where[0]} as {where[1]}, "
                f"but the job is migrating {target.database} as {target.url.username}",
                hint="env.py must connect with the URL the job hands it when it runs (sqlalchemy.url or "
                "DATABASE_URL), not one read earlier (a settings object made at import keeps the first)",
                service=entry.service,
                database=entry.database,
            )
        if dialect.driver == "asyncpg":
            cparams.update(iam.login_args(entry))
            cparams.setdefault("ssl", tls.connect_args(target)["ssl"])
            cparams["server_settings"] = {**db.server_settings(target), **cparams.get("server_settings", {})}
        elif entry.auth == "iam" or entry.owner:
            raise MigrationFailed(
                f'env.py of service {entry.service} connects with {dialect.driver}; auth = "iam" and owner '
                "need asyncpg, the driver of the URL the job hands env.py",
                hint="build the engine from sqlalchemy.url or DATABASE_URL as given",
                service=entry.service,
                database=entry.database,
            )


@contextlib.contextmanager
def environment(**values: str) -> Iterator[None]:
    """Set environment variables for the duration (env.py files that read DATABASE_URL)."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, old in saved.items():
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old


@contextlib.contextmanager
def job_owns_logging() -> Iterator[None]:
    """Make logging.config.fileConfig a no-op while env.py runs: it would replace the job's logs."""
    import logging.config

    original = logging.config.fileConfig
    logging.config.fileConfig = lambda *args, **kwargs: None
    try:
        yield
    finally:
        logging.config.fileConfig = original
