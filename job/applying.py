"""Apply one database's planned pass: connect, lock, re-read under the lock, migrate, record.

Shared by the sequential path and the ``--jobs`` workers, so both give the same guarantees: the
per-database lock, one transaction per revision with its history row, a migration that hit
``lock_timeout`` run again (bounded), and a database started over when the server dropped the
connection (restart, failover).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from job import db, logs, pgerrors
from job.blockers import BlockerWatch, is_lock_timeout
from job.errors import MigrateJobError, MigrationFailed
from job.executor import Execution, execute
from job.lock import MigrationLock, lock_key
from job.plan import DONE, Step
from job.report import DatabaseResult, elapsed_ms
from job.run import CLEANUP_S, Run, close

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

    from job.db import Target

# How many times a database is started over after the server dropped the connection.
RECONNECTS = 3


async def apply(run: Run, result: DatabaseResult, expected: Execution) -> None:
    """Apply one database; if the server drops the connection (restart, failover), start it over."""
    applied: list[Step] = []
    for attempt in range(1, RECONNECTS + 2):
        try:
            await _apply_once(run, result, expected, applied)
            return
        except MigrateJobError as exc:
            if attempt > RECONNECTS or not pgerrors.is_connection_lost(exc):
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
    engine, connection = await run.handover.connection_for(run.connect, expected)
    lock = MigrationLock(
        connection, target, lock_key(target.service, expected.version_table, expected.version_schema)
    )
    execution = expected
    try:
        await db.watch_client(connection)
        await lock.acquire(run.settings.lock_wait_s)
        if expected.recorder is not None:
            holder = await db.backend_pid(connection)
            expected.recorder.guard, expected.recorder.holder_pid = lock.guard_sql(holder), holder
        execution = await apply_with_retries(engine, connection, expected, applied)
    except (_sqlalchemy_error(), OSError) as exc:
        # Taking or polling the lock failed below the migration: the connection broke.
        result.status, result.error = "failed", db.describe(exc)
        raise db.connect_error(target, exc, time.monotonic() - started) from exc
    except BaseException as exc:
        status = "interrupted" if isinstance(exc, asyncio.CancelledError) else "failed"
        result.status, result.error = status, logs.scrub(str(exc)) or status
        raise
    finally:
        await _release(lock)
        await close(connection)
        result.duration_ms += elapsed_ms(started)
        result.record(execution.plan or execution.expected, applied)
    result.status, result.error = (DONE[expected.direction] if applied else "current"), None


def _sqlalchemy_error() -> type[Exception]:
    """Return SQLAlchemy's base error (imported when a database is applied, not at start-up)."""
    from sqlalchemy.exc import SQLAlchemyError

    return SQLAlchemyError


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


async def apply_with_retries(
    engine: AsyncEngine,
    connection: AsyncConnection,
    expected: Execution,
    applied: list[Step],
) -> Execution:
    """Apply the plan under the lock already held; retry a migration that hit lock_timeout.

    Only a lock timeout is retried: the migration's transaction rolled back whole, so running it
    again is safe. Attempts and total time are both bounded by the manifest entry. Steps that
    commit are appended to applied as they go, whatever happens after.
    """
    from tenacity import (
        AsyncRetrying,
        retry_if_exception,
        stop_after_attempt,
        stop_before_delay,
        wait_exponential_jitter,
    )

    entry = expected.target.entry
    pid = await db.backend_pid(connection)
    last: Execution | None = None

    async def attempt() -> Execution:
        nonlocal last
        assert expected.plan is not None
        last = expected.again()
        await _read_under_lock(connection, last)
        try:
            # Start watching well before lock_timeout fires, so the blocker is known by then.
            delay = min(0.25, entry.lock_timeout_s / 4) if entry.lock_timeout_s else 0.25
            async with BlockerWatch(engine, pid, delay) as watch:
                return await execute(connection, last)
        except MigrationFailed as exc:
            if is_lock_timeout(exc):
                if watch.blockers:
                    exc.message += f"; blocked by {watch.describe()}"
                    exc.context["blockers"] = watch.blockers
                blocker = f"pg_terminate_backend({watch.blockers[0]['pid']})" if watch.blockers else "it"
                exc.hint = (
                    f"the migration is fine; another session held the table: let it finish or end {blocker}, "
                    "then run again (or raise lock_retries / lock_retry_s in the manifest)"
                )
            raise
        finally:
            applied.extend(last.applied)

    retrying = AsyncRetrying(
        retry=retry_if_exception(is_lock_timeout),
        stop=stop_after_attempt(entry.lock_retries + 1) | stop_before_delay(entry.lock_retry_s),
        wait=wait_exponential_jitter(multiplier=0.5, max=10.0, jitter=0.5),
        before_sleep=lambda state: _log_lock_retry(expected.target, state),
        reraise=True,
    )
    return await retrying(attempt)


async def _read_under_lock(connection: AsyncConnection, execution: Execution) -> None:
    """Read the version table once, under the lock, for Alembic to start from (job.envpy).

    Read again for each attempt: a retried attempt starts where the last one's commits left it.
    """
    from job import recorder

    schema = execution.version_schema
    heads, has_history = await db.read_version(
        await db.driver(connection), execution.version_table, schema, recorder.table_name(schema)
    )
    execution.known_heads = heads
    execution.history_exists = execution.history_exists or has_history


def _log_lock_retry(target: Target, state: Any) -> None:
    """Log a migration that hit lock_timeout and will run again."""
    exc = state.outcome.exception() if state.outcome else None
    logs.event(
        "migration.lock_timeout",
        f"{exc.message if exc else 'lock timeout'}; retrying in {state.upcoming_sleep:.1f}s",
        level=logging.WARNING,
        revision=getattr(exc, "revision", None),
        attempt=state.attempt_number,
        wait_s=round(state.upcoming_sleep, 2),
        blockers=exc.context.get("blockers") if exc else None,
        **target.fields(),
    )
