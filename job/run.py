"""The run context: settings, manifest, selected databases, secrets and report of one invocation.

Commands and ``--jobs`` workers both work on a ``Run``; it is built once, before any database is
touched, and also opens the run's connections (its timeout and ``application_name``).
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from job import db, logs, recorder, version
from job.errors import ConfigError
from job.handover import Handover
from job.manifest import (
    NAME_PATTERN,
    DatabaseEntry,
    Manifest,
    load_manifest,
    refuse_literal_passwords,
    shard,
    with_entries,
)
from job.plan import RELATIVE, resolve_revision
from job.report import RunReport
from job.secrets import SecretResolver
from job.services import Service, discover
from job.settings import CloudRun, Settings

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

# How long cleanup (unlock, close) may take after a failure or a signal.
CLEANUP_S = 2.0


@dataclass
class Run:
    """Everything one invocation works with, loaded and validated before any database is touched."""

    settings: Settings
    cloud_run: CloudRun
    manifest: Manifest
    services: dict[str, Service]
    entries: list[DatabaseEntry]
    report: RunReport
    selectors: tuple[Sequence[str], Sequence[str]] = ((), ())
    jobs: int = 1
    # Every task's selection (all shares): what the tasks of one execution share a canary over.
    selected: list[DatabaseEntry] = field(default_factory=list)
    resolver: SecretResolver = field(init=False)
    # Preflight connections kept for the apply (job.handover); a command that applies enables it.
    handover: Handover = field(init=False)

    def __post_init__(self) -> None:
        self.resolver = SecretResolver(self.settings.secret_manager_endpoint)
        self.handover = Handover(enabled=False)

    @property
    def socket_root(self) -> Path:
        """Return the root of the Cloud SQL sockets: MIGRATE_SOCKET_DIR over the manifest's."""
        return self.settings.socket_dir or self.manifest.socket_dir

    @property
    def undiscovered(self) -> list[DatabaseEntry]:
        """Return the manifest entries whose databases are listed from the server at run time."""
        return [e for e in self.manifest.databases if e.discover is not None]

    @property
    def selected_services(self) -> list[Service]:
        """Return the services of the selected manifest entries, in manifest order, each once."""
        return [self.services[name] for name in dict.fromkeys(e.service for e in self.entries)]

    def identity(self) -> recorder.Identity:
        """Return who this run is, for the history rows it writes."""
        return recorder.Identity(
            execution=self.cloud_run.execution,
            task_index=self.cloud_run.task_index if self.cloud_run.execution else None,
            image=self.settings.image,
            image_revision=self.settings.image_revision,
            job_version=version(),
        )

    def preflight(self, destination: str = "head") -> list[db.Target]:
        """Check every selected service's history and target, read every secret; return the targets."""
        for service in self.selected_services:
            service.head()
            if not RELATIVE.match(destination):
                resolve_revision(service, destination)
        return [db.resolve_target(e, self.manifest, self.resolver, self.socket_root) for e in self.entries]

    async def connect(self, target: db.Target, adopt: Any = None) -> tuple[AsyncEngine, AsyncConnection]:
        """Open a connection to a target with the run's timeout and application_name (or adopt one)."""
        return await db.connect(
            target,
            timeout_s=self.settings.connect_timeout_s,
            application_name=self.cloud_run.application_name(),
            adopt=adopt,
        )

    async def connect_raw(self, target: db.Target) -> Any:
        """Open a plain asyncpg connection (read-only checks) with the run's timeout and application_name."""
        return await db.connect_raw(
            target,
            timeout_s=self.settings.connect_timeout_s,
            application_name=self.cloud_run.application_name(),
        )


def prepare(
    report: RunReport,
    settings: Settings,
    cloud_run: CloudRun,
    *,
    services: Sequence[str] = (),
    databases: Sequence[str] = (),
    jobs: int = 1,
) -> Run:
    """Return the run for the selected databases; raise ConfigError for anything invalid."""
    shipped = discover(settings.services_dir)
    manifest = load_manifest(settings.manifest_path(), shipped)
    refuse_literal_passwords(manifest, settings.env)
    run = Run(settings, cloud_run, manifest, shipped, [], report, (services, databases), jobs)
    if not run.undiscovered:
        _select_share(run)
    return run


def _select_share(run: Run) -> None:
    """Set the run's entries: the selected ones, then this Cloud Run task's share of them."""
    services, databases = run.selectors
    selected = run.selected = select(run.manifest, services=services, databases=databases)
    run.entries = shard(selected, run.cloud_run.task_index, run.cloud_run.task_count)
    run.report.shard = {
        "task_index": run.cloud_run.task_index,
        "task_count": run.cloud_run.task_count,
        "databases": len(run.entries),
        "of": len(selected),
        "attempt": run.cloud_run.task_attempt,
    }


def select(
    manifest: Manifest, *, services: Sequence[str] = (), databases: Sequence[str] = ()
) -> list[DatabaseEntry]:
    """Return the manifest's entries that match the selectors, in manifest order."""
    known_services = sorted({e.service for e in manifest.databases})
    known_databases = sorted({e.name for e in manifest.databases})
    for name in services:
        if name not in known_services:
            raise ConfigError(
                f"unknown service {name!r} in --service",
                hint=f"the manifest has: {', '.join(known_services)}",
            )
    for name in databases:
        if name not in known_databases:
            raise ConfigError(
                f"unknown database {name!r} in --database",
                hint=f"the manifest has: {', '.join(known_databases[:50])}",
            )
    return [
        e
        for e in manifest.databases
        if (not services or e.service in services) and (not databases or e.database in databases)
    ]


async def discover_databases(run: Run) -> None:
    """List the databases of every ``discover`` entry (read-only), then select this task's share."""
    if not run.undiscovered:
        return
    entries: list[DatabaseEntry] = []
    for entry in run.manifest.databases:
        if entry.discover is None:
            entries.append(entry)
            continue
        names = await _discovered_names(run, entry)
        logs.event(
            "manifest.discovered",
            f"{entry.service}: {len(names)} database(s) on {entry.location} from its discover query",
            level=logging.INFO if names else logging.WARNING,
            service=entry.service,
            instance=entry.location,
            count=len(names),
        )
        found = {"discover": None, "coordination_database": entry.coordination}
        entries.extend(entry.model_copy(update={"database": n, **found}) for n in names)
    run.manifest = with_entries(run.manifest, entries)
    _select_share(run)


async def _discovered_names(run: Run, entry: DatabaseEntry) -> list[str]:
    """Run an entry's discover query in a read-only transaction; return the names, sorted."""
    import asyncpg

    assert entry.discover is not None
    where = entry.model_copy(update={"database": entry.discover_database, "discover": None})
    target = db.resolve_target(where, run.manifest, run.resolver, run.socket_root)
    connection = await run.connect_raw(target)
    try:
        async with connection.transaction(readonly=True):
            rows = await connection.fetch(entry.discover)
    except asyncpg.PostgresError as exc:
        raise ConfigError(
            f"the discover query of service {entry.service} on {entry.location} failed: {exc}",
            hint="it must be a read-only query whose first column is a database name",
            service=entry.service,
        ) from None
    finally:
        await close_raw(connection)
    return kept_names(entry, [r[0] for r in rows])


def kept_names(entry: DatabaseEntry, found: Sequence[Any]) -> list[str]:
    """Return a discover query's names, sorted, less the databases never migrated (each logged once).

    A name must match NAME_PATTERN in full: a trailing newline is as invalid as any other character.
    """
    names = sorted({str(n) for n in found if n is not None})
    bad = [n for n in names if not re.fullmatch(NAME_PATTERN.strip("^$"), n)]
    if bad:
        raise ConfigError(
            f"the discover query of service {entry.service} returned invalid names: {bad[:5]}",
            hint="make the query return only database names (letters, digits, _ $ -; at most 63)",
            service=entry.service,
        )
    excluded = entry.never_discovered
    for name in (n for n in names if n in excluded):
        logs.event(
            "manifest.excluded",
            f"{entry.service}: the discover query returned {name}, which is never migrated "
            "(a template, a maintenance database, or the discover or coordination database)",
            level=logging.WARNING,
            service=entry.service,
            instance=entry.location,
            excluded=name,
        )
    return [n for n in names if n not in excluded]


async def close_raw(connection: Any) -> None:
    """Close a plain asyncpg connection at once; a failure to close is not the error.

    Closed by dropping the socket: a graceful close waits for the backend to exit (about 1.5 ms,
    twice per database), and nothing of the session outlives it either way (an open transaction
    rolls back, session locks are released).
    """
    with contextlib.suppress(Exception):
        connection.terminate()


async def close(connection: AsyncConnection) -> None:
    """Close the connection at once (as close_raw), without the pool's rollback on return.

    Its engine stays: the run shares one per server and login (job.engines), and holds no pool.
    """
    await db.drop(connection, CLEANUP_S)


def confirm(yes: bool, what: str) -> None:
    """Raise ConfigError unless the operator confirmed a command that changes history."""
    if not yes:
        raise ConfigError(f"{what}; nothing was done", hint="run it again with --yes to confirm")
