"""The job's commands as typed functions; the CLI and the Python API are thin layers on top."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from job import db, logs
from job.errors import ConfigError, PendingMigrations
from job.executor import Execution, execute
from job.manifest import DatabaseEntry, Manifest, load_manifest
from job.report import DatabaseResult, RunReport, elapsed_ms
from job.secrets import SecretResolver
from job.services import Service, discover
from job.settings import CloudRun, Settings


@dataclass
class Run:
    """Everything one invocation works with, loaded and validated before any database is touched."""

    settings: Settings
    cloud_run: CloudRun
    manifest: Manifest
    services: dict[str, Service]
    entries: list[DatabaseEntry]
    report: RunReport
    resolver: SecretResolver = field(init=False)

    def __post_init__(self) -> None:
        self.resolver = SecretResolver(self.settings.secret_manager_endpoint)

    @property
    def socket_root(self) -> Path:
        """Return the root of the Cloud SQL sockets: MIGRATE_SOCKET_DIR over the manifest's."""
        return self.settings.socket_dir or self.manifest.socket_dir


def prepare(
    report: RunReport,
    settings: Settings,
    cloud_run: CloudRun,
    *,
    services: Sequence[str] = (),
    databases: Sequence[str] = (),
) -> Run:
    """Return the run for the selected databases; raise ConfigError for anything invalid."""
    shipped = discover(settings.services_dir)
    manifest = load_manifest(settings.manifest_path(), shipped)
    entries = select(manifest, services=services, databases=databases)
    return Run(settings, cloud_run, manifest, shipped, entries, report)


def select(
    manifest: Manifest, *, services: Sequence[str] = (), databases: Sequence[str] = ()
) -> list[DatabaseEntry]:
    """Return the manifest's entries that match the selectors, in manifest order."""
    known_services = sorted({e.service for e in manifest.databases})
    known_databases = sorted({e.database for e in manifest.databases})
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
                hint=f"the manifest has: {', '.join(known_databases)}",
            )
    return [
        e
        for e in manifest.databases
        if (not services or e.service in services) and (not databases or e.database in databases)
    ]


def preflight(run: Run) -> list[db.Target]:
    """Check every selected service's history and read every secret; return the targets."""
    for name in dict.fromkeys(e.service for e in run.entries):
        run.services[name].head()
    return [db.resolve_target(e, run.manifest, run.resolver, run.socket_root) for e in run.entries]


async def upgrade(run: Run, to: str = "head") -> None:
    """Upgrade every selected database in manifest order, stopping at the first failure."""
    await _each(run, apply=True, destination=to)


async def plan(run: Run, *, check: bool = False, to: str = "head") -> None:
    """Show what upgrade would run on each database; with check, raise if anything is pending."""
    await _each(run, apply=False, destination=to)
    pending = [r for r in run.report.databases if r.status == "pending"]
    if check and pending:
        raise PendingMigrations(
            f"{len(pending)} database(s) have migrations to apply: "
            + ", ".join(f"{r.service}/{r.database}" for r in pending),
            hint="run migrate-job upgrade (or execute the Cloud Run job)",
        )


async def _each(run: Run, *, apply: bool, destination: str) -> None:
    """Connect to each database in turn and run env.py on it, one connection at a time."""
    targets = preflight(run)
    results = [run.report.add(DatabaseResult(t.service, t.database, t.fields()["instance"])) for t in targets]
    for target, result in zip(targets, results, strict=True):
        await _one(run, target, result, apply=apply, destination=destination)


async def _one(run: Run, target: db.Target, result: DatabaseResult, *, apply: bool, destination: str) -> None:
    """Process one database, recording its outcome in result even when it fails."""
    started = time.monotonic()
    execution = Execution(run.services[target.service], target, destination, apply)
    try:
        engine, connection = await db.connect(
            target,
            timeout_s=run.settings.connect_timeout_s,
            application_name=run.cloud_run.application_name(),
        )
        logs.event(
            "db.connected",
            f"connected to {target.entry.label}",
            duration_ms=elapsed_ms(started),
            url=target.display,
            **target.fields(),
        )
        try:
            await execute(connection, execution)
        finally:
            await connection.close()
            await engine.dispose()
    except BaseException as exc:
        _record(result, execution, started, status="failed", error=str(exc))
        raise
    status = _status(execution, apply)
    _record(result, execution, started, status=status)
    logs.event(
        "db.done",
        f"{target.entry.label}: {status} at {result.to_revision or 'base'}",
        status=status,
        from_revision=result.from_revision,
        to_revision=result.to_revision,
        applied=result.applied,
        duration_ms=result.duration_ms,
        **target.fields(),
    )


def _status(execution: Execution, apply: bool) -> str:
    """Return the database's status word after a successful pass."""
    assert execution.plan is not None
    if apply:
        return "applied" if execution.applied else "current"
    return "pending" if execution.plan.pending else "current"


def _record(
    result: DatabaseResult,
    execution: Execution,
    started: float,
    *,
    status: str,
    error: str | None = None,
) -> None:
    """Fill in a database's result from what the execution saw."""
    result.status = status
    result.error = logs.scrub(error) if error else None
    result.duration_ms = elapsed_ms(started)
    result.applied = [s.revision for s in execution.applied]
    if execution.plan is not None:
        result.from_revision = execution.plan.from_revision
        result.to_revision = execution.revision_now
        done = {s.revision for s in execution.applied}
        result.pending = [s.revision for s in execution.plan.steps if s.revision not in done]
