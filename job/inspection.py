"""The read-only preflight: every selected database's revision and plan, before anything changes.

The first database of each service is read through its ``env.py`` (which says where the version
table is) unless the service ships the blessed env.py (Alembic's default table); every other one
with one query on a plain connection, several at a time. Applied
revisions edited since they ran stop the run here (``migrate_job_history`` checksums).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from job import db, logs, recorder
from job.errors import HistoryError, MigrateJobError
from job.executor import Execution, execute
from job.plan import Direction
from job.report import DatabaseResult, elapsed_ms
from job.run import Run, close, close_raw

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection

    from job.failures import Failures

T = TypeVar("T")
# How many databases the read-only preflight reads at once (one connection and query each).
PREFLIGHT_CONCURRENCY = 8

Inspected = list[tuple[DatabaseResult, Execution]]


async def inspect_all(
    run: Run,
    *,
    destination: str,
    allow_ahead: bool,
    quiet: bool = False,
    direction: Direction = "up",
    check_edits: bool = True,
    on_work: Callable[[], None] | None = None,
    failures: Failures | None = None,
) -> Inspected:
    """Return every selected database's result and planned pass, read before anything changes.

    on_work is called as soon as the first database with work is known (to start workers early).
    With failures, a database whose entry says on_failure = "continue" may fail here alone: it is
    recorded as failed, left out of the work, and the others go on.
    """
    inspected = _passes(run, destination, quiet, direction, check_edits)
    first: dict[str, Execution] = {}
    read: set[int] = set()
    for result, execution in inspected:
        # A service that ships the blessed env.py keeps Alembic's default version table: its
        # databases are all read with one query, and a run at head never runs env.py at all.
        if execution.service.name not in first and not execution.service.env_is_blessed:
            read.add(id(execution))
            # A tolerated failure of a service's first database: the next one is read through env.py.
            if await _inspect_or_skip(run, result, execution, allow_ahead, failures):
                first[execution.service.name] = execution
    if on_work is not None and any(e.plan is not None and e.plan.pending for e in first.values()):
        on_work()
    limit = asyncio.Semaphore(PREFLIGHT_CONCURRENCY)

    async def quick(result: DatabaseResult, execution: Execution) -> None:
        async with limit:
            known = first.get(execution.service.name)
            if known is not None:
                execution.version_table, execution.version_schema = known.version_table, known.version_schema
            await _inspect_or_skip(run, result, execution, allow_ahead, failures, quick=True)
        if on_work is not None and execution.plan is not None and execution.plan.pending:
            on_work()

    rest = [(r, e) for r, e in inspected if id(e) not in read]
    tasks = [asyncio.ensure_future(quick(r, e)) for r, e in rest]
    try:
        # The first failure in manifest order is the one reported, whatever finished first.
        results = await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        for task in tasks:
            task.cancel()
    for outcome in results:
        if isinstance(outcome, BaseException):
            raise (failures.error() if failures is not None and failures.own(outcome) else None) or outcome
    return inspected


def _passes(run: Run, destination: str, quiet: bool, direction: Direction, check_edits: bool) -> Inspected:
    """Return a result (in the run's report) and an unplanned pass for each selected database."""
    who = run.identity()
    inspected = []
    for target in run.preflight(destination):
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
    return inspected


async def _inspect_or_skip(
    run: Run,
    result: DatabaseResult,
    execution: Execution,
    allow_ahead: bool,
    failures: Failures | None,
    *,
    quick: bool = False,
) -> bool:
    """Inspect one database; return False if it failed and the run goes on without it.

    With allow_ahead, a database at an unknown revision is marked ahead (skipped), not failed.
    """
    try:
        await (_inspect_quick if quick else _inspect)(run, result, execution)
    except HistoryError as exc:
        if not (allow_ahead and exc.revision and exc.context.get("unknown_revision")):
            return await _tolerated(result, execution, exc, failures)
        result.status, result.from_revision, result.error = "ahead", exc.revision, exc.message
        logs.event(
            "db.ahead",
            f"skipping {execution.target.entry.label}: {exc.message}",
            level=logging.WARNING,
            revision=exc.revision,
            **execution.target.fields(),
        )
    except MigrateJobError as exc:
        return await _tolerated(result, execution, exc, failures)
    return True


async def _tolerated(
    result: DatabaseResult, execution: Execution, exc: MigrateJobError, failures: Failures | None
) -> bool:
    """Return False if the manifest lets the run go on without this database; else raise exc."""
    if failures is None or not failures.own(exc):
        raise exc
    result.status, result.error = "failed", result.error or exc.message
    if not await failures.settle(execution.target.entry, exc, result):
        raise exc
    # No plan: the database is left out of the work, and its result stays failed.
    execution.plan = None
    return False


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
    connection = await _failing(result, run.connect_raw(target))
    kept = False
    try:
        _log_connected(target, started)
        schema = execution.version_schema
        heads, has_history = await db.read_version(
            connection, execution.version_table, schema, recorder.table_name(schema)
        )
        execution.history_exists = has_history
        if has_history and heads and execution.check_edits:
            await recorder.check(connection.fetch, execution.service, schema, heads, target.entry.label)
        if heads != (execution.service.head(),):
            await execution.service.load_script()  # work to plan: the others are read meanwhile
        plan = execution.plan_from(heads)
        # With work to do, the apply may use this connection (job.handover) instead of its own.
        kept = plan.pending and await run.handover.keep(id(execution), target.entry.location, connection)
    except MigrateJobError as exc:
        result.status, result.error = "failed", exc.message
        raise
    except Exception as exc:
        result.status, result.error = "failed", db.describe(exc)
        raise db.connect_error(target, exc, time.monotonic() - started) from exc
    finally:
        if not kept:
            await close_raw(connection)
        result.duration_ms += elapsed_ms(started)
    result.from_revision = plan.from_revision
    result.record(plan, [])


async def _inspect(run: Run, result: DatabaseResult, execution: Execution) -> None:
    """Connect, read the database's revision through env.py and plan; change nothing."""
    target = execution.target
    started = time.monotonic()
    _, connection = await _failing(result, run.connect(target))
    try:
        _log_connected(target, started)
        await execute(connection, execution)
        if execution.check_edits and execution.plan is not None and execution.plan.current:
            await _check_edits(connection, execution)
    except MigrateJobError as exc:
        result.status, result.error = "failed", exc.message
        raise
    finally:
        await close(connection)
        result.duration_ms += elapsed_ms(started)
    # Where the database was when this run first looked; later passes must not move it.
    result.from_revision = execution.plan.from_revision if execution.plan else None
    result.record(execution.plan, [])


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


async def with_history(run: Run, execution: Execution, action: Any) -> Any:
    """Run action(fetch, schema) on the database if its history table exists; else return None."""
    schema = execution.version_schema
    connection = await run.connect_raw(execution.target)
    try:
        if not await connection.fetchval("SELECT to_regclass($1) IS NOT NULL", recorder.table_name(schema)):
            return None
        return await action(connection.fetch, schema)
    finally:
        await close_raw(connection)
