"""The job's commands as typed functions; the CLI and the Python API are thin layers on top."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy.exc import SQLAlchemyError

from job import db, logs, recorder, version
from job.errors import ConfigError, HistoryError, MigrateJobError, PendingMigrations
from job.executor import Execution, apply_with_retries, execute, render_sql
from job.lock import MigrationLock, lock_key
from job.manifest import NAME_PATTERN, DatabaseEntry, Manifest, load_manifest, shard, with_entries
from job.plan import DONE, RELATIVE, Direction, Step, as_tuple, compute_plan, resolve_revision
from job.report import DatabaseResult, RunReport, elapsed_ms
from job.secrets import SecretResolver
from job.services import Service, discover
from job.settings import CloudRun, Settings

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

    from job.workers import Pool

T = TypeVar("T")
# How long cleanup (unlock, close) may take after a failure or a signal.
CLEANUP_S = 2.0
# How many times a database is started over after the server dropped the connection.
RECONNECTS = 3
# How many databases the read-only preflight reads at once (one connection and query each).
PREFLIGHT_CONCURRENCY = 8


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
    resolver: SecretResolver = field(init=False)

    def __post_init__(self) -> None:
        self.resolver = SecretResolver(self.settings.secret_manager_endpoint)

    @property
    def socket_root(self) -> Path:
        """Return the root of the Cloud SQL sockets: MIGRATE_SOCKET_DIR over the manifest's."""
        return self.settings.socket_dir or self.manifest.socket_dir

    @property
    def undiscovered(self) -> list[DatabaseEntry]:
        """Return the manifest entries whose databases are listed from the server at run time."""
        return [e for e in self.manifest.databases if e.discover is not None]


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
    run = Run(settings, cloud_run, manifest, shipped, [], report, (services, databases), jobs)
    if not run.undiscovered:
        _select_share(run)
    return run


def _select_share(run: Run) -> None:
    """Set the run's entries: the selected ones, then this Cloud Run task's share of them."""
    services, databases = run.selectors
    selected = select(run.manifest, services=services, databases=databases)
    run.entries = shard(selected, run.cloud_run.task_index, run.cloud_run.task_count)
    run.report.shard = {
        "task_index": run.cloud_run.task_index,
        "task_count": run.cloud_run.task_count,
        "databases": len(run.entries),
        "of": len(selected),
    }


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
        entries.extend(entry.model_copy(update={"database": n, "discover": None}) for n in names)
    run.manifest = with_entries(run.manifest, entries)
    _select_share(run)


async def _discovered_names(run: Run, entry: DatabaseEntry) -> list[str]:
    """Run an entry's discover query in a read-only transaction; return the names, sorted."""
    import asyncpg

    assert entry.discover is not None
    where = entry.model_copy(update={"database": entry.discover_database, "discover": None})
    target = db.resolve_target(where, run.manifest, run.resolver, run.socket_root)
    connection = await _connect_raw(run, target)
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
        await _close_raw(connection)
    names = sorted({str(r[0]) for r in rows if r[0] is not None})
    bad = [n for n in names if not re.match(NAME_PATTERN, n)]
    if bad:
        raise ConfigError(
            f"the discover query of service {entry.service} returned invalid names: {bad[:5]}",
            service=entry.service,
        )
    return names


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


def preflight(run: Run, destination: str = "head") -> list[db.Target]:
    """Check every selected service's history and target, read every secret; return the targets."""
    for service in _selected_services(run):
        service.head()
        if not RELATIVE.match(destination):
            resolve_revision(service, destination)
    return [db.resolve_target(e, run.manifest, run.resolver, run.socket_root) for e in run.entries]


async def upgrade(run: Run, to: str = "head", *, allow_ahead: bool = False) -> None:
    """Check every selected database, then upgrade each in manifest order, stopping at a failure."""
    await _change(run, to, "up", allow_ahead=allow_ahead)


async def downgrade(run: Run, to: str, *, yes: bool = False) -> None:
    """Undo revisions down to ``to`` (a revision, -N or base), where the manifest allows it."""
    if not run.manifest.allow_downgrade:
        raise ConfigError(
            f"manifest {run.manifest.path} sets allow_downgrade = false: downgrades are refused here",
            hint="roll forward instead: ship a new revision that undoes the change",
        )
    _confirm(yes, f"downgrade to {to} undoes revisions and may drop data")
    await _change(run, to, "down")


async def stamp(run: Run, revision: str, *, yes: bool = False) -> None:
    """Set the recorded revision without running migrations (after a manual fix or a restore)."""
    _confirm(yes, f"stamp {revision} records a revision without running its migrations")
    await _change(run, revision, "stamp")


async def sql(run: Run, *, start: str | None = None, to: str = "head", output: Path | None = None) -> None:
    """Render, per database, the SQL that upgrade would run (from its revision, or from start)."""
    if start is None:
        inspected = await _inspect_all(run, destination=to, allow_ahead=False, quiet=True)
        pairs = [(r, e, e.plan.current if e.plan else ()) for r, e in inspected]
    else:
        targets = preflight(run, to)
        if start != "base":
            for service in _selected_services(run):
                resolve_revision(service, start)
        begin: tuple[str, ...] = () if start == "base" else (start,)
        pairs = [
            (
                run.report.add(DatabaseResult(t.service, t.database, t.fields()["instance"])),
                Execution(run.services[t.service], t, to, quiet=True),
                begin,
            )
            for t in targets
        ]
    for result, execution, begin in pairs:
        rendered = Execution(execution.service, execution.target, to, apply=True, quiet=True, offline=True)
        text = logs.scrub(render_sql(rendered, begin))
        path = None
        if output is not None:
            output.mkdir(parents=True, exist_ok=True)
            path = output / f"{execution.target.service}__{execution.target.database}.sql"
            path.write_text(text, encoding="utf-8")
        result.status = "pending" if rendered.plan and rendered.plan.pending else "current"
        result.from_revision = "+".join(begin) or None
        result.to_revision = rendered.plan.target if rendered.plan else result.from_revision
        result.pending = [s.revision for s in rendered.plan.steps] if rendered.plan else []
        logs.event(
            "db.sql",
            f"SQL for {execution.target.entry.label} from {result.from_revision or 'base'} "
            f"to {result.to_revision or 'base'}" + (f" written to {path}" if path else ""),
            from_revision=result.from_revision,
            to_revision=result.to_revision,
            path=str(path) if path else None,
            sql=None if path else text,
            **execution.target.fields(),
        )


CATALOG_SQL = """
SELECT 'column' AS kind, table_schema || '.' || table_name AS owner, column_name AS name,
       data_type || ' ' || is_nullable || ' ' || coalesce(column_default, '') AS definition
FROM information_schema.columns WHERE table_schema NOT IN ('pg_catalog', 'information_schema')
UNION ALL
SELECT 'index', schemaname || '.' || tablename, indexname, indexdef
FROM pg_indexes WHERE schemaname NOT IN ('pg_catalog', 'information_schema')
UNION ALL
SELECT 'constraint', conrelid::regclass::text, conname, pg_get_constraintdef(oid)
FROM pg_constraint WHERE connamespace NOT IN ('pg_catalog'::regnamespace, 'information_schema'::regnamespace)
UNION ALL
SELECT 'type', typnamespace::regnamespace::text, typname, typtype::text
FROM pg_type WHERE typnamespace NOT IN ('pg_catalog'::regnamespace, 'information_schema'::regnamespace)
  AND typtype IN ('e', 'd', 'c') AND typrelid = 0
ORDER BY 1, 2, 3
"""


async def verify(run: Run, scratch: str) -> None:
    """On a scratch database per service: each revision up, down, up again, with the same schema.

    ``scratch`` is a secret reference to a URL whose role may create databases; the scratch
    databases are created and dropped here, never the manifest's.
    """
    admin_url = _scratch_admin_url(run, scratch)
    for service in _selected_services(run):
        async with _scratch_target(admin_url, scratch, service, "verify", run.report) as (target, result):
            await _round_trip(run, service, target, result)


@contextlib.asynccontextmanager
async def _scratch_target(
    admin_url: Any, scratch: str, service: Service, purpose: str, report: RunReport | None = None
) -> AsyncIterator[tuple[db.Target, DatabaseResult]]:
    """Create a scratch database for one service (reported in report, if given); drop it after."""
    name = f"mj_{purpose}_{service.name.replace('-', '_')}_{os.getpid()}"
    entry = DatabaseEntry(service=service.name, database=name, url=scratch)
    result = DatabaseResult(service.name, name, "scratch")
    if report is not None:
        report.add(result)
    await _scratch_database(admin_url, name, create=True)
    try:
        yield db.Target(entry, admin_url.set(database=name)), result
    finally:
        await _scratch_database(admin_url, name, create=False)


async def _scratch_database(admin_url: Any, name: str, *, create: bool) -> None:
    """Create or drop a scratch database (autocommit, as PostgreSQL requires)."""
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine
    from sqlalchemy.pool import NullPool

    engine = create_async_engine(admin_url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as connection:
            await connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            if create:
                await connection.execute(text(f'CREATE DATABASE "{name}"'))
    except SQLAlchemyError as exc:
        raise ConfigError(
            f"cannot {'create' if create else 'drop'} scratch database {name}: {db.describe(exc)}",
            hint="verify needs a URL whose role may CREATE DATABASE (a throwaway server is best)",
        ) from None
    finally:
        await engine.dispose()


async def _round_trip(run: Run, service: Service, target: db.Target, result: DatabaseResult) -> None:
    """Walk the history from base: for each revision, up, down, up, comparing the catalog."""
    from sqlalchemy import text

    from job.errors import RoundTripFailed

    started = time.monotonic()
    engine, connection = await _connect(run, target)
    try:
        version_tables: set[str] = set()

        async def catalog() -> list[tuple[Any, ...]]:
            """Return the schema, less the version table (it appears with the first revision)."""
            rows = (await connection.execute(text(CATALOG_SQL))).all()
            await connection.commit()
            return [tuple(r) for r in rows if r.owner not in version_tables]

        async def move(destination: str, direction: Direction) -> None:
            execution = Execution(
                service, target, destination, True, quiet=True, direction=direction, offline=True
            )
            await execute(connection, execution)
            schema = execution.version_schema or "public"
            version_tables.update({execution.version_table, f"{schema}.{execution.version_table}"})

        plan_steps = compute_plan(service, ()).steps
        before = await catalog()
        for step in plan_steps:
            await move(step.revision, "up")
            after = await catalog()
            await move(step.revision, "revert")
            if await catalog() != before:
                raise RoundTripFailed(
                    f"service {service.name}: the downgrade of {step.revision} ({step.message}) "
                    "does not restore the schema it started from",
                    hint="make downgrade() drop exactly what upgrade() creates (indexes, types too)",
                    service=service.name,
                    revision=step.revision,
                )
            await move(step.revision, "up")
            if await catalog() != after:
                raise RoundTripFailed(
                    f"service {service.name}: {step.revision} ({step.message}) gives a different "
                    "schema when applied again after its downgrade",
                    hint="downgrade() leaves something behind that upgrade() then works around",
                    service=service.name,
                    revision=step.revision,
                )
            before = after
            result.applied.append(step.revision)
            logs.event(
                "verify.revision",
                f"{service.name}: {step.revision} ({step.message}) round-trips",
                service=service.name,
                revision=step.revision,
            )
        result.status = "verified"
    except BaseException:
        result.status = "failed"
        raise
    finally:
        await _close(engine, connection)
        result.duration_ms = elapsed_ms(started)


async def revision(run: Run, message: str, *, autogenerate: bool = False, scratch: str | None = None) -> None:
    """Write a new revision file for one service (local authoring; refused on Cloud Run).

    With autogenerate, the models are compared with a scratch database upgraded to head, so
    nothing is ever generated against a real database.
    """
    if run.cloud_run.job:
        raise ConfigError(
            "revision is for local authoring and is refused on Cloud Run",
            hint="write revisions on a workstation, review them, and ship them in the image",
        )
    services = _selected_services(run)
    if len(services) != 1:
        raise ConfigError(
            "revision needs exactly one service",
            hint="add --service NAME (known: " + ", ".join(sorted(run.services)) + ")",
        )
    service = services[0]
    if not autogenerate:
        _write_revision(service, message, None)
        return
    if scratch is None:
        raise ConfigError(
            "revision --autogenerate needs --scratch REF", hint="a URL whose role may CREATE DATABASE"
        )
    admin_url = _scratch_admin_url(run, scratch)
    async with _scratch_target(admin_url, scratch, service, "revision") as (target, _):
        engine, connection = await _connect(run, target)
        try:
            await execute(connection, Execution(service, target, "head", True, quiet=True, offline=True))
            await connection.run_sync(lambda sync: _write_revision(service, message, sync))
            await connection.commit()
        finally:
            await _close(engine, connection)


def _write_revision(service: Service, message: str, connection: Any) -> None:
    """Write the revision file with Alembic (autogenerated when given a connection) and log it."""
    import argparse

    from alembic import command

    config = service.config()
    # Alembic would print "Generating ..." on stdout, where every line must be a JSON log line.
    config.cmd_opts = argparse.Namespace(quiet=True, x=None)
    if connection is not None:
        config.attributes["connection"] = connection
    script = command.revision(config, message=message, autogenerate=connection is not None)
    scripts = script if isinstance(script, list) else [script]
    for created in scripts:
        if created is None:
            continue
        logs.event(
            "revision.created",
            f"{service.name}: wrote {Path(created.path).name}; review it before committing",
            service=service.name,
            revision=created.revision,
            down_revision=list(as_tuple(created.down_revision)),
            path=str(created.path),
            autogenerate=connection is not None,
        )


def _scratch_admin_url(run: Run, scratch: str) -> Any:
    """Return the URL (from a secret reference) of a server where scratch databases are made."""
    from sqlalchemy.engine import make_url

    raw = run.resolver.resolve(run.manifest.reference(scratch))
    try:
        database = make_url(raw.get_secret_value()).database or "postgres"
    except Exception:
        database = "postgres"  # url_from_secret reports the malformed URL without showing it
    return db.url_from_secret(raw, DatabaseEntry(service="scratch", database=database, url=scratch))


def _confirm(yes: bool, what: str) -> None:
    """Raise ConfigError unless the operator confirmed a command that changes history."""
    if not yes:
        raise ConfigError(f"{what}; nothing was done", hint="run it again with --yes to confirm")


async def _change(run: Run, destination: str, direction: Direction, *, allow_ahead: bool = False) -> None:
    """Check every selected database, then move each in manifest order, stopping at a failure."""
    from job.workers import pool_for

    starting: asyncio.Future[Pool | None] | None = None

    def work_found() -> None:
        # Start the workers now, while the rest of the preflight runs. In a thread: starting a
        # fork-server process blocks until the server has imported the job.
        nonlocal starting
        if starting is None:
            starting = asyncio.ensure_future(asyncio.to_thread(pool_for, run, len(run.entries)))

    try:
        inspected = await _inspect_all(
            run, destination=destination, allow_ahead=allow_ahead, direction=direction, on_work=work_found
        )
    except BaseException:
        if starting is not None and (started := await starting) is not None:
            started.close()
        raise
    pool = await starting if starting is not None else None
    work = [(r, e) for r, e in inspected if r.status != "ahead" and e.plan is not None and e.plan.pending]
    if pool is not None and len(work) < 2:
        pool.close()
        pool = None
    # Only when there is work for several: a no-op run must not pay for starting workers.
    pool = pool or pool_for(run, len(work))
    pending = {id(execution) for _, execution in work}
    if pool is None:
        for result, execution in inspected:
            if result.status != "ahead":
                if id(execution) in pending:
                    await _apply(run, result, execution)
                _finish(result, execution, "current")
        return
    try:
        for result, execution in inspected:
            if result.status != "ahead" and id(execution) not in pending:
                _finish(result, execution, "current")
        await pool.apply(work)
    finally:
        pool.close()


async def plan(run: Run, *, check: bool = False, to: str = "head", allow_ahead: bool = False) -> None:
    """Show what upgrade would run on each database; with check, raise if anything is pending."""
    inspected = await _inspect_all(run, destination=to, allow_ahead=allow_ahead)
    for result, execution in inspected:
        if result.status != "ahead":
            assert execution.plan is not None
            _finish(result, execution, "pending" if execution.plan.pending else "current")
    pending = [r for r in run.report.databases if r.status == "pending"]
    if check and pending:
        raise PendingMigrations(
            f"{len(pending)} database(s) have migrations to apply: "
            + ", ".join(f"{r.service}/{r.database}" for r in pending),
            hint="run migrate-job upgrade (or execute the Cloud Run job)",
        )


async def current(run: Run, *, allow_ahead: bool = False) -> None:
    """Report each selected database's revision and whether it is at its service's head."""
    inspected = await _inspect_all(run, destination="head", allow_ahead=allow_ahead, quiet=True)
    for result, execution in inspected:
        if result.status == "ahead":
            continue
        assert execution.plan is not None
        head = execution.plan.target
        at_head = not execution.plan.pending
        result.status = "current" if at_head else "pending"
        logs.event(
            "db.current",
            f"{execution.target.entry.label} is at {execution.plan.from_revision or 'base'}"
            + (" (head)" if at_head else f"; head is {head}"),
            revision=execution.plan.from_revision,
            head=head,
            at_head=at_head,
            **execution.target.fields(),
        )


def heads(run: Run) -> None:
    """Report each selected service's head revision(s); touches no database."""
    for service in _selected_services(run):
        found = service.script.get_heads()
        logs.event(
            "service.heads",
            f"{service.name}: head {', '.join(found) or '(empty history)'}",
            service=service.name,
            heads=list(found),
        )


def history(run: Run, *, verbose: bool = False) -> None:
    """Report each selected service's revisions, newest first; touches no database."""
    for service in _selected_services(run):
        script = service.script
        head_set = set(script.get_heads())
        for rev in script.walk_revisions():
            fields: dict[str, Any] = {
                "service": service.name,
                "revision": rev.revision,
                "down_revision": list(as_tuple(rev.down_revision)),
                "description": (rev.doc or "").strip(),
                "is_head": rev.revision in head_set,
                "is_merge": rev.is_merge_point,
                "is_branch_point": rev.is_branch_point,
            }
            if verbose:
                path = Path(rev.path)
                # A script_location given as a package resource lives outside the service folder.
                shown = path.relative_to(service.path) if path.is_relative_to(service.path) else path
                fields.update(path=str(shown), branch_labels=sorted(rev.branch_labels))
            logs.event(
                "service.revision",
                f"{service.name}: {', '.join(as_tuple(rev.down_revision)) or '<base>'} -> {rev.revision}"
                + (" (head)" if rev.revision in head_set else "")
                + f", {(rev.doc or '').strip()}",
                **fields,
            )


async def acknowledge(run: Run, revisions: Sequence[str], *, yes: bool = False) -> None:
    """Record edited revisions' files as they are now, so runs accept the edit (an audited row)."""
    _confirm(yes, "acknowledge accepts edited revision files as if they had been applied as they are now")
    services = _selected_services(run)
    for revision in revisions:
        if not any(_known(s, revision) for s in services):
            raise ConfigError(
                f"revision {revision} is not in the history of {', '.join(s.name for s in services)}",
                hint="name a revision as migrate-job history shows it, with --service",
                revision=revision,
            )
    inspected = await _inspect_all(run, destination="head", allow_ahead=False, quiet=True, check_edits=False)
    who = identity(run)
    for result, execution in inspected:
        ours = [r for r in revisions if _known(execution.service, r)]
        done = await _with_history(
            run,
            execution,
            lambda fetch, schema, e=execution, o=ours: recorder.acknowledge(fetch, e.service, schema, o, who),
        )
        result.status = "acknowledged" if done else "current"
        result.applied = list(done or [])
        logs.event(
            "history.acknowledged",
            f"{execution.target.entry.label}: "
            + (f"acknowledged edited {', '.join(done)}" if done else "nothing edited to acknowledge"),
            revisions=list(done or []),
            **execution.target.fields(),
        )


async def applied_history(run: Run) -> None:
    """Report each database's migrate_job_history rows, oldest first: the audit trail (read-only)."""
    inspected = await _inspect_all(run, destination="head", allow_ahead=True, quiet=True, check_edits=False)
    for result, execution in inspected:
        service = execution.service
        found = await _with_history(
            run, execution, lambda fetch, schema, s=service: recorder.rows(fetch, s.name, schema)
        )
        for row in found or []:
            now = recorder.file_checksum(service, row["revision"])
            at = row["recorded_at"]
            logs.event(
                "db.history",
                f"{execution.target.entry.label}: {row['direction']} {row['revision']} at "
                f"{at.isoformat(timespec='seconds')} by {row['execution'] or row['recorded_by']}"
                + ("" if now == row["checksum"] or row["direction"] == "down" else " (file edited since)"),
                **{**row, "recorded_at": at.isoformat()},
                edited=now != row["checksum"] if row["direction"] in recorder.COUNTS else None,
                **execution.target.fields(),
            )
        result.status = "current" if result.status != "ahead" else "ahead"


def _known(service: Service, revision: str) -> bool:
    """Return whether a revision id is in the service's scripts."""
    try:
        return service.script.get_revision(revision) is not None
    except Exception:
        return False


async def _with_history(run: Run, execution: Execution, action: Any) -> Any:
    """Run action(fetch, schema) on the database if its history table exists; else return None."""
    schema = execution.version_schema
    connection = await _connect_raw(run, execution.target)
    try:
        if not await connection.fetchval("SELECT to_regclass($1) IS NOT NULL", recorder.table_name(schema)):
            return None
        return await action(connection.fetch, schema)
    finally:
        await _close_raw(connection)


def _selected_services(run: Run) -> list[Service]:
    """Return the services of the selected manifest entries, in manifest order, each once."""
    return [run.services[name] for name in dict.fromkeys(e.service for e in run.entries)]


def identity(run: Run) -> recorder.Identity:
    """Return who this run is, for the history rows it writes."""
    return recorder.Identity(
        execution=run.cloud_run.execution,
        task_index=run.cloud_run.task_index if run.cloud_run.execution else None,
        image=run.settings.image,
        image_revision=run.settings.image_revision,
        job_version=version(),
    )


async def _inspect_all(
    run: Run,
    *,
    destination: str,
    allow_ahead: bool,
    quiet: bool = False,
    direction: Direction = "up",
    check_edits: bool = True,
    on_work: Callable[[], None] | None = None,
) -> list[tuple[DatabaseResult, Execution]]:
    """Preflight: read every database's revision before anything changes anywhere.

    The first database of each service is read through its env.py, which tells where the version
    table is; the others are read with one query each, several at a time.
    """
    targets = preflight(run, destination)
    inspected = []
    who = identity(run)
    for target in targets:
        result = run.report.add(DatabaseResult(target.service, target.database, target.fields()["instance"]))
        service = run.services[target.service]
        execution = Execution(
            service,
            target,
            destination,
            quiet=quiet,
            direction=direction,
            recorder=recorder.Recorder(service, who, direction),
            check_edits=check_edits,
        )
        inspected.append((result, execution))
    first: dict[str, Execution] = {}
    for result, execution in inspected:
        if execution.service.name not in first:
            first[execution.service.name] = execution
            await _inspect_or_skip(run, result, execution, allow_ahead)
    if on_work is not None and any(e.plan is not None and e.plan.pending for e in first.values()):
        on_work()
    limit = asyncio.Semaphore(PREFLIGHT_CONCURRENCY)

    async def quick(result: DatabaseResult, execution: Execution) -> None:
        async with limit:
            known = first[execution.service.name]
            execution.version_table, execution.version_schema = known.version_table, known.version_schema
            await _inspect_or_skip(run, result, execution, allow_ahead, quick=True)

    rest = [(r, e) for r, e in inspected if first[e.service.name] is not e]
    tasks = [asyncio.ensure_future(quick(r, e)) for r, e in rest]
    try:
        # The first failure in manifest order is the one reported, whatever finished first.
        results = await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        for task in tasks:
            task.cancel()
    for outcome in results:
        if isinstance(outcome, BaseException):
            raise outcome
    return inspected


async def _inspect_or_skip(
    run: Run, result: DatabaseResult, execution: Execution, allow_ahead: bool, *, quick: bool = False
) -> None:
    """Inspect one database; with allow_ahead, mark one at an unknown revision as skipped."""
    try:
        await (_inspect_quick if quick else _inspect)(run, result, execution)
    except HistoryError as exc:
        if not (allow_ahead and exc.revision and exc.context.get("unknown_revision")):
            raise
        result.status, result.from_revision, result.error = "ahead", exc.revision, exc.message
        logs.event(
            "db.ahead",
            f"skipping {execution.target.entry.label}: {exc.message}",
            level=logging.WARNING,
            revision=exc.revision,
            **execution.target.fields(),
        )


async def _failing(result: DatabaseResult, opening: Awaitable[T]) -> T:
    """Return what opening gives; on a connection error, mark the database failed and raise."""
    try:
        return await opening
    except MigrateJobError as exc:
        result.status, result.error = "failed", exc.message
        raise


def _log_connected(target: db.Target, started: float) -> None:
    """Log that a database was reached, and how long that took."""
    logs.event(
        "db.connected",
        f"connected to {target.entry.label}",
        duration_ms=elapsed_ms(started),
        url=target.display,
        **target.fields(),
    )


async def _inspect_quick(run: Run, result: DatabaseResult, execution: Execution) -> None:
    """Read a database's revision with one query (version table known) and plan; change nothing."""
    target = execution.target
    started = time.monotonic()
    connection = await _failing(result, _connect_raw(run, target))
    try:
        _log_connected(target, started)
        schema = execution.version_schema
        heads, has_history = await db.read_version(
            connection, execution.version_table, schema, recorder.table_name(schema)
        )
        execution.history_exists = has_history
        if has_history and heads and execution.check_edits:
            await recorder.check(connection.fetch, execution.service, schema, heads, target.entry.label)
    except MigrateJobError as exc:
        result.status, result.error = "failed", exc.message
        raise
    except Exception as exc:
        result.status, result.error = "failed", db.describe(exc)
        raise db.connect_error(target, exc, time.monotonic() - started) from exc
    finally:
        await _close_raw(connection)
        result.duration_ms += elapsed_ms(started)
    execution.plan_from(heads)
    result.from_revision = execution.plan.from_revision if execution.plan else None
    _record(result, execution, [])


async def _inspect(run: Run, result: DatabaseResult, execution: Execution) -> None:
    """Connect, read the database's revision through env.py and plan; change nothing."""
    target = execution.target
    started = time.monotonic()
    engine, connection = await _failing(result, _connect(run, target))
    try:
        _log_connected(target, started)
        await execute(connection, execution)
        if execution.check_edits and execution.plan is not None and execution.plan.current:
            await _check_edits(connection, execution)
    except MigrateJobError as exc:
        result.status, result.error = "failed", exc.message
        raise
    finally:
        await _close(engine, connection)
        result.duration_ms += elapsed_ms(started)
    # Where the database was when this run first looked; later passes must not move it.
    result.from_revision = execution.plan.from_revision if execution.plan else None
    _record(result, execution, [])


async def _check_edits(connection: AsyncConnection, execution: Execution) -> None:
    """Raise HistoryError if an applied revision was edited (read-only; rolls back after)."""
    schema = execution.version_schema
    fetch = _sa_fetch(connection)
    try:
        exists = await fetch("SELECT to_regclass($1) IS NOT NULL", recorder.table_name(schema))
        execution.history_exists = bool(exists[0][0])
        if exists[0][0]:
            assert execution.plan is not None
            await recorder.check(
                fetch, execution.service, schema, execution.plan.current, execution.target.entry.label
            )
    finally:
        await connection.rollback()


def _sa_fetch(connection: AsyncConnection) -> recorder.Fetch:
    """Return a fetch(sql, *args) over a SQLAlchemy connection, like asyncpg's ($1 parameters)."""

    async def fetch(sql: str, *args: Any) -> list[Any]:
        found = await connection.exec_driver_sql(sql, args)
        return list(found.all()) if found.returns_rows else []

    return fetch


async def _apply(run: Run, result: DatabaseResult, expected: Execution) -> None:
    """Apply one database; if the server drops the connection (restart, failover), start it over."""
    applied: list[Step] = []
    for attempt in range(1, RECONNECTS + 2):
        try:
            await _apply_once(run, result, expected, applied)
            return
        except MigrateJobError as exc:
            if attempt > RECONNECTS or not db.is_connection_lost(exc):
                raise
            # The server rolled back the running revision; the next pass re-reads under the lock.
            logs.event(
                "db.reconnect",
                f"lost the connection to {expected.target.entry.label} ({db.describe(exc)}); "
                "starting it over",
                level=logging.WARNING,
                attempt=attempt,
                **expected.target.fields(),
            )


async def _apply_once(run: Run, result: DatabaseResult, expected: Execution, applied: list[Step]) -> None:
    """Connect, take the lock, re-read and apply; record what committed even on failure."""
    target = expected.target
    started = time.monotonic()
    engine, connection = await _connect(run, target)
    lock = MigrationLock(
        connection, target, lock_key(target.service, expected.version_table, expected.version_schema)
    )
    execution = expected
    try:
        await db.watch_client(connection)
        await lock.acquire(run.settings.lock_wait_s)
        if not expected.history_exists:
            await recorder.ensure_table(await db.driver(connection), expected.version_schema)
        execution = await apply_with_retries(engine, connection, expected, applied)
    except (SQLAlchemyError, OSError) as exc:
        # Taking or polling the lock failed below the migration: the connection broke.
        result.status, result.error = "failed", db.describe(exc)
        raise db.connect_error(target, exc, time.monotonic() - started) from exc
    except BaseException as exc:
        status = "interrupted" if isinstance(exc, asyncio.CancelledError) else "failed"
        result.status, result.error = status, logs.scrub(str(exc)) or status
        raise
    finally:
        await _release(lock)
        await _close(engine, connection)
        result.duration_ms += elapsed_ms(started)
        _record(result, execution, applied)
    result.status, result.error = (DONE[expected.direction] if applied else "current"), None


def _finish(result: DatabaseResult, execution: Execution, status: str) -> None:
    """Set a database's final status (unless applying set it) and log that it is done."""
    if result.status == "skipped":
        result.status = status
    logs.event(
        "db.done",
        f"{execution.target.entry.label}: {result.status} at {result.to_revision or 'base'}",
        status=result.status,
        from_revision=result.from_revision,
        to_revision=result.to_revision,
        applied=result.applied,
        duration_ms=result.duration_ms,
        **execution.target.fields(),
    )


async def _connect(run: Run, target: db.Target) -> tuple[AsyncEngine, AsyncConnection]:
    """Open a connection to a target with the run's timeout and application_name."""
    return await db.connect(
        target,
        timeout_s=run.settings.connect_timeout_s,
        application_name=run.cloud_run.application_name(),
    )


async def _connect_raw(run: Run, target: db.Target) -> Any:
    """Open a plain asyncpg connection (read-only checks) with the run's timeout and application_name."""
    return await db.connect_raw(
        target, timeout_s=run.settings.connect_timeout_s, application_name=run.cloud_run.application_name()
    )


async def _release(lock: MigrationLock) -> None:
    """Release the lock; if the connection is broken, closing it releases the lock anyway."""
    try:
        await asyncio.wait_for(lock.release(), CLEANUP_S)
    except (Exception, asyncio.CancelledError) as exc:
        logs.event(
            "lock.release_failed",
            f"could not release the lock of {lock.target.entry.label} ({type(exc).__name__}); "
            "closing the connection releases it",
            level=logging.WARNING,
            **lock.target.fields(),
        )


async def _close_raw(connection: Any) -> None:
    """Close a plain asyncpg connection, bounded in time; a failure to close is not the error."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(connection.close(), CLEANUP_S)


async def _close(engine: AsyncEngine, connection: AsyncConnection) -> None:
    """Close the connection and engine, bounded in time (after a cancel it may be unusable)."""
    with contextlib.suppress(Exception, asyncio.CancelledError):
        await asyncio.wait_for(connection.close(), CLEANUP_S)
    with contextlib.suppress(Exception, asyncio.CancelledError):
        await asyncio.wait_for(engine.dispose(), CLEANUP_S)


def _record(result: DatabaseResult, execution: Execution, applied: list[Step]) -> None:
    """Fill in a database's revisions from what its passes saw and what committed."""
    plan = execution.plan or execution.expected
    result.applied = [s.revision for s in applied] or result.applied
    if applied:
        result.to_revision = applied[-1].lands_at
    elif plan is not None and result.to_revision is None:
        result.to_revision = plan.from_revision
    if plan is not None:
        done = set(result.applied)
        result.pending = [s.revision for s in plan.steps if s.revision not in done]


async def check(run: Run, scratch: str | None = None) -> None:
    """Compare each selected service's models.py with a database at head; raise DriftFound on a difference.

    With scratch (a URL reference whose role may create databases), a fresh database per service
    is upgraded to head, compared and dropped: what CI runs. Without, the manifest's databases are
    compared read-only; one that is not at head cannot be compared and is reported as behind.
    """
    from job.drift import Difference
    from job.errors import DriftFound

    found: list[Difference] = []
    if scratch is not None:
        admin_url = _scratch_admin_url(run, scratch)
        for service in _selected_services(run):
            async with _scratch_target(admin_url, scratch, service, "check", run.report) as (target, result):
                found += await _check_one(run, target, result, upgrade=True)
    else:
        for target in preflight(run):
            result = run.report.add(
                DatabaseResult(target.service, target.database, target.fields()["instance"])
            )
            found += await _check_one(run, target, result, upgrade=False)
    if found:
        services = sorted({d.service for d in found})
        first = f"{found[0].detail}" + (f" (and {len(found) - 1} more)" if len(found) > 1 else "")
        raise DriftFound(
            f"models.py and the schema the migrations build differ in {', '.join(services)}: {first}",
            hint="add a migration for each change (migrate-job revision --autogenerate --scratch REF "
            "--service NAME, then review it), or correct models.py; each check.drift line names one",
            service=services[0] if len(services) == 1 else None,
        )
    behind = [r for r in run.report.databases if r.status == "behind"]
    if behind:
        raise PendingMigrations(
            f"{len(behind)} database(s) are not at head, so their schema was not compared: "
            + ", ".join(f"{r.service}/{r.database}" for r in behind),
            hint="upgrade them first, or compare a scratch database with check --scratch REF",
        )


async def _check_one(run: Run, target: db.Target, result: DatabaseResult, *, upgrade: bool) -> list[Any]:
    """Compare one database with its service's models (after upgrading it, for a scratch database)."""
    from job import drift

    service = run.services[target.service]
    started = time.monotonic()
    engine, connection = await _connect(run, target)
    try:
        if upgrade:
            await execute(connection, Execution(service, target, "head", True, quiet=True, offline=True))
        found = await drift.read_models(connection, drift.MetadataProbe(service, target, quiet=True))
        assert found.plan is not None
        result.from_revision = result.to_revision = found.plan.from_revision
        if found.plan.pending:
            result.status, result.pending = "behind", [s.revision for s in found.plan.steps]
            logs.event(
                "check.behind",
                f"{target.entry.label} is at {found.plan.from_revision or 'base'}, not at head "
                f"{found.plan.target}: not compared",
                level=logging.WARNING,
                revision=found.plan.from_revision,
                head=found.plan.target,
                **target.fields(),
            )
            return []
        differences = await drift.compare(connection, found)
    finally:
        await _close(engine, connection)
        result.duration_ms = elapsed_ms(started)
    result.status = "drift" if differences else "clean"
    for difference in differences:
        logs.event(
            "check.drift",
            difference.description,
            level=logging.WARNING,
            **{**target.fields(), **difference.fields()},
        )
    if not differences:
        logs.event(
            "check.clean",
            f"{service.name}: models.py matches {target.entry.label} at {result.to_revision or 'base'}",
            revision=result.to_revision,
            **target.fields(),
        )
    return differences


async def lint(run: Run, *, start: str | None = None, to: str = "head", fail_on: str = "warning") -> None:
    """Lint the offline SQL of each selected service's revisions with squawk; raise LintFindings.

    Needs no database: the SQL is rendered from start (default base) to ``to``.
    """
    from sqlalchemy.engine import URL

    from job import lint as linting
    from job.errors import LintFindings

    squawk = linting.find_squawk()
    failed: list[linting.Finding] = []
    for service in _selected_services(run):
        service.head()
        if start not in (None, "base"):
            resolve_revision(service, str(start))
        entry = DatabaseEntry(service=service.name, database="lint", url="offline")
        target = db.Target(entry, URL.create(db.DRIVER, database="lint"))
        for chunk in linting.lint_service(service, target, start=start, to=to, squawk=squawk):
            exempted: dict[str, list[linting.Finding]] = {}
            for finding in chunk.findings:
                if finding.exempted is not None:
                    exempted.setdefault(finding.rule, []).append(finding)
                    continue
                logs.event(
                    "lint.finding",
                    finding.description,
                    level=logging.ERROR if finding.level == "error" else logging.WARNING,
                    **finding.fields(),
                )
            for rule, waived in exempted.items():
                # One line per rule: a CREATE TABLE can break a rule once per column.
                logs.event(
                    "lint.exempted",
                    f"{service.name}: revision {chunk.revision} is exempt from {rule} "
                    f"({len(waived)} finding(s)): {waived[0].exempted}",
                    service=service.name,
                    revision=chunk.revision,
                    rule=rule,
                    reason=waived[0].exempted,
                    count=len(waived),
                    statements=list(dict.fromkeys(f.fields()["statement"] for f in waived)),
                    path=chunk.path,
                )
            bad = linting.failing(chunk.findings, fail_on)
            failed += bad
            logs.event(
                "lint.revision",
                f"{service.name}: revision {chunk.revision} "
                + (f"has {len(bad)} finding(s) at or above {fail_on}" if bad else "lints clean"),
                service=service.name,
                revision=chunk.revision,
                findings=len(bad),
                exempted=sum(1 for f in chunk.findings if f.exempted is not None),
            )
    if failed:
        revisions = list(dict.fromkeys(f"{f.service} {f.revision}" for f in failed))
        raise LintFindings(
            f"{len(failed)} lint finding(s) at or above {fail_on} in " + ", ".join(revisions),
            hint="make each statement safe as its lint.finding help says, or, where the rule does not "
            "apply, add to the revision file: # migrate-job: lint-ignore RULE -- reason",
            service=failed[0].service if len({f.service for f in failed}) == 1 else None,
            revision=failed[0].revision if len(revisions) == 1 else None,
        )


def new_service(run: Run, name: str) -> None:
    """Write services/NAME/ from the blessed template (local authoring; refused on Cloud Run)."""
    from job import scaffold

    if run.cloud_run.job:
        raise ConfigError(
            "new-service is for local authoring and is refused on Cloud Run",
            hint="create the service on a workstation, commit it, and ship it in the image",
        )
    path = scaffold.create_service(run.settings.services_dir, name)
    logs.event(
        "service.created",
        f"wrote {path}: define the tables in models.py, then migrate-job revision --autogenerate "
        f"--service {name}, and add the service's databases to the manifests",
        service=name,
        path=str(path),
    )
