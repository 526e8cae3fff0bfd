"""Commands that check migration authors' work: verify (round trips) and check (models vs schema)."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from job import db, logs
from job.errors import DriftFound, PendingMigrations, RoundTripFailed
from job.executor import Execution, execute
from job.plan import Direction, Step, compute_plan
from job.report import DatabaseResult, elapsed_ms
from job.run import Run, close
from job.scratch import admin_url, scratch_target

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection

    from job.drift import Difference
    from job.services import Service

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
    admin = admin_url(run, scratch)
    for service in run.selected_services:
        async with scratch_target(admin, scratch, service, "verify", run.report) as (target, result):
            await _round_trip(run, service, target, result)


class _Walker:
    """Moves a scratch database one revision at a time and reads its schema (less version tables)."""

    def __init__(self, service: Service, target: db.Target, connection: AsyncConnection) -> None:
        self.service, self.target, self.connection = service, target, connection
        self.version_tables: set[str] = set()

    async def catalog(self) -> list[tuple[Any, ...]]:
        """Return the schema, less the version table (it appears with the first revision)."""
        from sqlalchemy import text

        rows = (await self.connection.execute(text(CATALOG_SQL))).all()
        await self.connection.commit()
        return [tuple(r) for r in rows if r.owner not in self.version_tables]

    async def move(self, destination: str, direction: Direction) -> None:
        """Apply (up) or revert exactly one revision."""
        execution = Execution(
            self.service, self.target, destination, True, quiet=True, direction=direction, offline=True
        )
        await execute(self.connection, execution)
        schema = execution.version_schema or "public"
        self.version_tables.update({execution.version_table, f"{schema}.{execution.version_table}"})


async def _round_trip(run: Run, service: Service, target: db.Target, result: DatabaseResult) -> None:
    """Walk the history from base: for each revision, up, down, up, comparing the catalog."""
    started = time.monotonic()
    _, connection = await run.connect(target)
    try:
        walker = _Walker(service, target, connection)
        before = await walker.catalog()
        for step in compute_plan(service, ()).steps:
            await walker.move(step.revision, "up")
            after = await walker.catalog()
            await walker.move(step.revision, "revert")
            _same(
                await walker.catalog() == before,
                service,
                step,
                f"the downgrade of {step.revision} ({step.message}) does not restore the schema it "
                "started from",
                "make downgrade() drop exactly what upgrade() creates (indexes, types too)",
            )
            await walker.move(step.revision, "up")
            _same(
                await walker.catalog() == after,
                service,
                step,
                f"{step.revision} ({step.message}) gives a different schema when applied again after "
                "its downgrade",
                "downgrade() leaves something behind that upgrade() then works around",
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
        await close(connection)
        result.duration_ms = elapsed_ms(started)


def _same(same: bool, service: Service, step: Step, problem: str, hint: str) -> None:
    """Raise RoundTripFailed naming the revision unless the schema came out the same."""
    if not same:
        raise RoundTripFailed(
            f"service {service.name}: {problem}", hint=hint, service=service.name, revision=step.revision
        )


async def check(run: Run, scratch: str | None = None) -> None:
    """Compare each selected service's models.py with a database at head; raise DriftFound on a difference.

    With scratch (a URL reference whose role may create databases), a fresh database per service
    is upgraded to head, compared and dropped: what CI runs. Without, the manifest's databases are
    compared read-only; one that is not at head cannot be compared and is reported as behind.
    """
    found: list[Difference] = []
    if scratch is not None:
        admin = admin_url(run, scratch)
        for service in run.selected_services:
            async with scratch_target(admin, scratch, service, "check", run.report) as (target, result):
                found += await _check_one(run, target, result, upgrade=True)
    else:
        for target in run.preflight():
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


async def _check_one(
    run: Run, target: db.Target, result: DatabaseResult, *, upgrade: bool
) -> list[Difference]:
    """Compare one database with its service's models (after upgrading it, for a scratch database)."""
    from job import drift

    service = run.services[target.service]
    started = time.monotonic()
    _, connection = await run.connect(target)
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
        await close(connection)
        result.duration_ms = elapsed_ms(started)
    _report_drift(target, result, service.name, differences)
    return differences


def _report_drift(
    target: db.Target, result: DatabaseResult, service: str, differences: list[Difference]
) -> None:
    """Set the database's status and log each difference, or that it is clean."""
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
            f"{service}: models.py matches {target.entry.label} at {result.to_revision or 'base'}",
            revision=result.to_revision,
            **target.fields(),
        )
