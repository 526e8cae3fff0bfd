"""The per-database migration lock: a session-level PostgreSQL advisory lock, polled with backoff.

Alembic has no lock of its own; two runners racing on one database hit UniqueViolation on
alembic_version or apply a revision twice. The key is derived from the service and its version
table, so services sharing a database with separate version tables do not block each other.
Each poll is its own short transaction: a waiter never holds a snapshot that a holder's
``CREATE INDEX CONCURRENTLY`` would have to wait for.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from job import logs
from job.errors import LockTimeout

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection

    from job.db import Target

HOLDER_SQL = """
SELECT a.pid, a.application_name, a.backend_start, a.state, a.query_start
FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND l.classid = CAST(:classid AS oid) AND l.objid = CAST(:objid AS oid)
"""
# The error a revision's transaction raises when its lock's session is gone (guard_sql).
LOST = "migrate-job lost the migration lock before the commit"
# How often a waiter says again who it is waiting for.
REPORT_EVERY_S = 30.0


def lock_key(service: str, version_table: str, schema: str | None) -> int:
    """Return the signed 64-bit advisory lock key for a service's history.

    The schema is the resolved one: none and "public" are the same table (every session's
    search_path is public), so they give the same key, spelled as older images spelled none.
    """
    resolved = "" if schema in (None, "public") else schema
    name = f"migrate-job:{service}:{resolved}.{version_table}".encode()
    return int.from_bytes(hashlib.sha256(name).digest()[:8], "big", signed=True)


@dataclass(frozen=True)
class Holder:
    """The session holding a lock, as pg_stat_activity shows it."""

    pid: int
    application_name: str
    since: str
    state: str

    def fields(self) -> dict[str, Any]:
        """Return the holder as log fields."""
        return {
            "holder_pid": self.pid,
            "holder_application": self.application_name,
            "holder_since": self.since,
            "holder_state": self.state,
        }

    def __str__(self) -> str:
        return f"pid {self.pid} ({self.application_name or 'no application_name'}, since {self.since})"


class MigrationLock:
    """The advisory lock of one service's history in one database, held by one connection."""

    def __init__(self, connection: AsyncConnection, target: Target, key: int) -> None:
        self.connection = connection
        self.target = target
        self.key = key
        self.held = False

    async def acquire(self, wait_s: float) -> None:
        """Take the lock, polling with backoff for at most wait_s; raise LockTimeout past that."""
        from tenacity import AsyncRetrying, retry_if_result, stop_after_delay, wait_exponential_jitter

        self._reported_at: float | None = None
        backoff = wait_exponential_jitter(multiplier=0.05, max=2.0, jitter=0.1)
        retrying = AsyncRetrying(
            retry=retry_if_result(lambda taken: not taken),
            stop=stop_after_delay(wait_s),
            # The last sleep ends at the deadline, for one last try there: wait_s, not more or less.
            wait=lambda state: max(0.0, min(backoff(state), wait_s - (state.seconds_since_start or 0.0))),
            before_sleep=self._report_waiting,
            retry_error_callback=lambda state: False,
        )
        started = time.monotonic()
        if not await retrying(self._try):
            raise self._timeout(await self.holder(), wait_s)
        logs.event(
            "lock.acquired",
            f"took the migration lock of {self.target.entry.label}",
            waited_ms=int((time.monotonic() - started) * 1000),
            **self.target.fields(),
        )

    async def _report_waiting(self, state: Any) -> None:
        """Say who holds the lock, on the first wait and then every REPORT_EVERY_S."""
        now = time.monotonic()
        if self._reported_at is not None and now - self._reported_at < REPORT_EVERY_S:
            return
        self._reported_at = now
        holder = await self.holder()
        logs.event(
            "lock.waiting",
            f"waiting for the migration lock of {self.target.entry.label}, "
            f"held by {holder or 'another session'}",
            level=logging.WARNING,
            waited_s=round(state.seconds_since_start, 1),
            **(holder.fields() if holder else {}),
            **self.target.fields(),
        )

    async def _try(self) -> bool:
        """Return True if one non-blocking attempt took the lock (in its own short transaction)."""
        from job.db import driver

        # In autocommit on the driver's connection: one round trip, and no snapshot held between polls.
        taken = bool(
            await (await driver(self.connection)).fetchval("SELECT pg_try_advisory_lock($1)", self.key)
        )
        self.held = taken
        return taken

    async def holder(self) -> Holder | None:
        """Return who holds the lock now, if anyone."""
        from sqlalchemy import text

        unsigned = self.key & 0xFFFFFFFFFFFFFFFF
        result = await self.connection.execute(
            text(HOLDER_SQL), {"classid": unsigned >> 32, "objid": unsigned & 0xFFFFFFFF}
        )
        row = result.first()
        await self.connection.commit()
        if row is None:
            return None
        since = row.query_start or row.backend_start
        return Holder(
            row.pid, row.application_name or "", since.isoformat() if since else "", row.state or ""
        )

    def guard_sql(self, holder_pid: int) -> str:
        """Return a statement that fails unless session holder_pid still holds this lock.

        Run in each revision's transaction just before its commit (job.recorder): env.py shapes
        that open their own engine migrate on another connection than the lock's, and if that
        connection ended (idle_session_timeout, a proxy), the revision rolls back instead of
        committing without the lock.
        """
        unsigned = self.key & 0xFFFFFFFFFFFFFFFF
        return (
            "DO $migrate_job$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' "
            f"AND granted AND objsubid = 1 AND pid = {int(holder_pid)} "
            f"AND classid = CAST({unsigned >> 32} AS oid) AND objid = CAST({unsigned & 0xFFFFFFFF} AS oid) "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())) THEN "
            f"RAISE EXCEPTION '{LOST}' USING ERRCODE = 'lock_not_available', HINT = 'the revision rolled "
            "back; run the job again: it re-reads the revision under the lock'; END IF; END $migrate_job$"
        )

    async def release(self) -> None:
        """Release the lock if held; a broken connection releases it by closing."""
        from job.db import driver

        if not self.held:
            return
        self.held = False
        # A literal (the key is an int): one round trip on the simple protocol, nothing prepared.
        await (await driver(self.connection)).execute(f"SELECT pg_advisory_unlock({int(self.key)})")
        logs.event(
            "lock.released",
            f"released the migration lock of {self.target.entry.label}",
            **self.target.fields(),
        )

    def _timeout(self, holder: Holder | None, wait_s: float) -> LockTimeout:
        """Return the error for a lock still held after the wait."""
        who = str(holder) if holder else "another session"
        return LockTimeout(
            f"the migration lock of {self.target.entry.label} was held by {who} for longer than {wait_s:g}s",
            hint="another execution is migrating this database: let it finish and run again, or raise "
            "MIGRATE_LOCK_WAIT_S; if that session is stuck, end it with pg_terminate_backend(pid)",
            service=self.target.service,
            database=self.target.database,
            **(holder.fields() if holder else {}),
        )
