"""Python API: the job's operations for release pipelines, and a start-up check for services.

Every function raises the same exceptions as the command line (``job.errors``), so a caller can
branch on them; ``job.cli.exit_code(exc)`` gives the matching exit code. Logging goes to the
``migrate_job`` logger and is left to the caller to configure.

    from job import api
    api.ensure_at_head(os.environ["DATABASE_URL"], "services/settlement")   # refuse to start if behind
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from job.errors import PendingMigrations

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Coroutine, Sequence
    from typing import Any

    from job.report import RunReport
    from job.run import Run
    from job.settings import Settings


@dataclass(frozen=True)
class DatabaseStatus:
    """Where one database is, against its service's head."""

    service: str
    database: str
    revision: str | None
    head: str | None

    @property
    def at_head(self) -> bool:
        """Return True when nothing is pending."""
        return self.revision == self.head


def upgrade(
    *, settings: Settings | None = None, services: Sequence[str] = (), databases: Sequence[str] = ()
) -> RunReport:
    """Upgrade the manifest's databases (as the Cloud Run job does); return the run's report."""
    from job import commands

    run = _prepare("upgrade", settings, services, databases)
    _run_sync(_listed_then(run, commands.upgrade))
    return run.report


def plan(
    *, settings: Settings | None = None, services: Sequence[str] = (), databases: Sequence[str] = ()
) -> RunReport:
    """Return what upgrade would apply to each database (``report.databases[i].pending``)."""
    from job import commands

    run = _prepare("plan", settings, services, databases)
    _run_sync(_listed_then(run, commands.plan))
    return run.report


async def _listed_then(run: Run, command: Callable[[Run], Awaitable[None]]) -> None:
    """List the manifest's ``discover`` databases, as the command line does, then run the command."""
    from job.run import discover_databases

    await discover_databases(run)
    await command(run)


async def database_status_async(url: str, service_dir: str | Path) -> DatabaseStatus:
    """Return one database's revision and its service's head, reading only (for async apps)."""
    from pydantic import SecretStr
    from sqlalchemy.engine import make_url

    from job import db
    from job.executor import Execution, execute
    from job.manifest import DatabaseEntry
    from job.services import Service

    service = Service(Path(service_dir).name, Path(service_dir))
    parsed = make_url(url)
    entry = DatabaseEntry(service=service.name, database=parsed.database or "", url=url)
    # The application's own URL, read with the application's own TLS behaviour: libpq's and
    # asyncpg's default (prefer) when it says none. The job's manifest entries never fall back.
    mode = str(parsed.query.get("sslmode", "prefer"))
    lenient = mode in ("allow", "prefer")
    if lenient:
        url = parsed.difference_update_query(["sslmode"]).render_as_string(hide_password=False)
    checked = db.url_from_secret(SecretStr(url), entry)
    target = db.Target(entry, checked.update_query_dict({"ssl": mode}) if lenient else checked)
    _, connection = await db.connect(target, timeout_s=30, application_name="migrate-job:check")
    try:
        execution = await execute(connection, Execution(service, target, quiet=True))
    finally:
        await connection.close()
    assert execution.plan is not None
    return DatabaseStatus(service.name, target.database, execution.plan.from_revision, service.head())


def database_status(url: str, service_dir: str | Path) -> DatabaseStatus:
    """Return one database's revision and its service's head, reading only."""
    return _run_sync(database_status_async(url, service_dir))


def ensure_at_head(url: str, service_dir: str | Path) -> DatabaseStatus:
    """Return the status if the database is at head; raise PendingMigrations if it is not."""
    return _ensure(database_status(url, service_dir))


async def ensure_at_head_async(url: str, service_dir: str | Path) -> DatabaseStatus:
    """Async form of ensure_at_head, for an application's start-up hook."""
    return _ensure(await database_status_async(url, service_dir))


def _ensure(status: DatabaseStatus) -> DatabaseStatus:
    """Raise PendingMigrations for a database behind its head."""
    if not status.at_head:
        raise PendingMigrations(
            f"database {status.database} is at {status.revision or 'base'}, "
            f"but service {status.service} needs {status.head}",
            hint="run the migration job (gcloud run jobs execute ... --wait) before starting the service",
            service=status.service,
            database=status.database,
            revision=status.revision,
        )
    return status


def _prepare(
    command: str, settings: Settings | None, services: Sequence[str], databases: Sequence[str]
) -> Run:
    """Return a run for the manifest the settings name."""
    from job.report import RunReport
    from job.run import prepare
    from job.settings import CloudRun, Settings

    return prepare(
        RunReport(command), settings or Settings(), CloudRun(), services=services, databases=databases
    )


def _run_sync(coroutine: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine to completion; refuse inside a running loop (use the *_async forms)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    coroutine.close()
    raise RuntimeError("called from a running event loop: use the *_async function instead")
