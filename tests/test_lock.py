"""The per-database migration lock, in process, on real connections to a real PostgreSQL."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from pydantic import SecretStr

from job import db
from job.errors import LockTimeout
from job.lock import MigrationLock, lock_key
from job.manifest import DatabaseEntry
from tests.conftest import Database
from tests.support import REPO

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

# The key of settlement's history: pinned, because two images that derive it differently would
# not exclude each other while a release rolls out (one execution of each may run at once).
SETTLEMENT_KEY = 892098179946036579


def target_for(database: Database, socket_root: Path | None) -> db.Target:
    """Return a connection target for a test database."""
    entry = DatabaseEntry.model_validate(database.entry())
    url = db.build_url(entry, database.role, SecretStr(database.password), socket_root or Path("/"))
    return db.Target(entry, url)


@dataclass
class Session:
    """One connection opened as the job opens it, with a migration lock on it."""

    engine: AsyncEngine
    lock: MigrationLock
    pid: int

    async def close(self) -> None:
        """Close the connection (which releases a session lock server-side) and the engine."""
        await self.lock.connection.close()
        await self.engine.dispose()


async def open_session(target: db.Target, application_name: str, key: int | None = None) -> Session:
    """Connect to target as the job does; the lock is its service's history's unless key is given."""
    engine, connection = await db.connect(target, timeout_s=5, application_name=application_name)
    pid = await db.backend_pid(connection)
    if key is None:
        key = lock_key(target.service, "alembic_version", None)
    return Session(engine, MigrationLock(connection, target, key), pid)


def test_lock_key_is_stable_and_distinct() -> None:
    """The key is the same in every process (no salted hash()) and separates histories.

    Two services sharing a database, or one service with two version tables, must not block
    each other; and every image ever released must compute the same key for the same history.
    """
    key = lock_key("settlement", "alembic_version", None)
    assert key == SETTLEMENT_KEY
    assert -(2**63) <= key < 2**63
    code = "from job.lock import lock_key; print(lock_key('settlement', 'alembic_version', None))"
    for seed in ("1", "2"):
        out = subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
            cwd=REPO,
        )
        assert int(out.stdout) == key
    others = {
        lock_key("risk-engine", "alembic_version", None),
        lock_key("settlement", "settlement_version", None),
        lock_key("settlement", "alembic_version", "ops"),
    }
    assert key not in others and len(others) == 3


def test_second_session_times_out_naming_the_holder_then_gets_the_lock(
    make_database: Callable[..., Database], socket_root: Path | None, caplog: pytest.LogCaptureFixture
) -> None:
    """A waiter gives up after wait_s naming who holds the lock; once released, it takes it.

    The error is what an operator reads when exit 5 happens: it must name the holding session's
    pid and application_name (which says the Cloud Run execution) so it can be found or ended.
    """
    target = target_for(make_database("settlement"), socket_root)

    async def go() -> None:
        first = await open_session(target, "lock-test-first")
        second = await open_session(target, "lock-test-second")
        try:
            await first.lock.acquire(0)
            assert first.lock.held
            holder = await second.lock.holder()
            assert holder is not None
            assert (holder.pid, holder.application_name) == (first.pid, "lock-test-first")

            started = time.monotonic()
            with pytest.raises(LockTimeout) as caught:
                await second.lock.acquire(0.5)
            waited = time.monotonic() - started
            assert 0.5 <= waited < 3.0, waited
            error = caught.value
            assert f"pid {first.pid}" in error.message and "lock-test-first" in error.message
            assert error.context["holder_pid"] == first.pid
            assert error.context["holder_application"] == "lock-test-first"
            assert error.database == target.database and not second.lock.held
            waiting = events(caplog, "lock.waiting")
            assert waiting and waiting[0]["holder_pid"] == first.pid, waiting

            await first.lock.release()
            assert not first.lock.held
            await second.lock.acquire(0.5)
            assert second.lock.held
            holder = await first.lock.holder()
            assert holder is not None
            assert (holder.pid, holder.application_name) == (second.pid, "lock-test-second")
            await second.lock.release()
            assert await first.lock.holder() is None
        finally:
            await first.close()
            await second.close()

    with caplog.at_level(logging.INFO, logger="migrate_job"):
        asyncio.run(go())


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[dict[str, Any]]:
    """Return the fields of the job's log records with this event name."""
    fields = [getattr(record, "json_fields", {}) for record in caplog.records]
    return [f for f in fields if f.get("event") == name]


def test_waiter_takes_the_lock_when_released_and_polls_outside_a_transaction(
    make_database: Callable[..., Database], socket_root: Path | None
) -> None:
    """A waiter gets the lock soon after it is released, and never sits in an open transaction.

    CREATE INDEX CONCURRENTLY, run by the holder, waits for every older transaction in the
    database: a waiter that polled inside one long transaction would stall the holder until the
    wait ran out. pg_stat_activity must show the waiter idle, not idle in transaction.
    """
    database = make_database("settlement")
    target = target_for(database, socket_root)

    async def go() -> None:
        holder = await open_session(target, "lock-test-holder")
        waiter = await open_session(target, "lock-test-waiter")
        try:
            await holder.lock.acquire(0)
            task = asyncio.create_task(waiter.lock.acquire(10))
            seen = set()
            for _ in range(10):
                await asyncio.sleep(0.05)
                rows = await asyncio.to_thread(
                    database.pg.fetch,
                    "SELECT state, backend_xmin IS NULL AS no_snapshot FROM pg_stat_activity WHERE pid = $1",
                    waiter.pid,
                )
                seen.update((r["state"], r["no_snapshot"]) for r in rows)
            assert not task.done()
            assert seen == {("idle", True)}, seen
            released = time.monotonic()
            await holder.lock.release()
            await asyncio.wait_for(task, 5)
            # The backoff is capped at 2 s: a released lock is taken within one poll.
            assert time.monotonic() - released < 3.0
            assert waiter.lock.held
        finally:
            await holder.close()
            await waiter.close()

    asyncio.run(go())


def test_closing_the_connection_releases_the_lock(
    make_database: Callable[..., Database], socket_root: Path | None
) -> None:
    """A session-level lock dies with its session: a job killed mid-run never leaves it behind."""
    target = target_for(make_database("settlement"), socket_root)

    async def go() -> None:
        first = await open_session(target, "lock-test-first")
        second = await open_session(target, "lock-test-second")
        try:
            await first.lock.acquire(0)
            with pytest.raises(LockTimeout):
                await second.lock.acquire(0)
            await first.close()
            # The server ends the session just after the client goes away: allow a few polls.
            await second.lock.acquire(3)
            assert second.lock.held
        finally:
            await second.close()

    asyncio.run(go())


def test_locks_are_per_history_and_per_database(
    make_database: Callable[..., Database], socket_root: Path | None
) -> None:
    """Another history in the same database, or the same history in another database, is free.

    Tenants of one service live in separate databases: executions migrating different tenants
    must run side by side, as must two services that share one database.
    """
    one = target_for(make_database("settlement"), socket_root)
    other = target_for(make_database("settlement"), socket_root)

    async def go() -> None:
        held = await open_session(one, "lock-test-held")
        other_history = await open_session(
            one, "lock-test-b", lock_key("risk-engine", "alembic_version", None)
        )
        other_database = await open_session(other, "lock-test-c")
        try:
            await held.lock.acquire(0)
            await other_history.lock.acquire(0)
            await other_database.lock.acquire(0)
            assert held.lock.held and other_history.lock.held and other_database.lock.held
            holder = await other_database.lock.holder()
            assert holder is not None and holder.application_name == "lock-test-c"
        finally:
            for session in (held, other_history, other_database):
                await session.close()

    asyncio.run(go())
