"""Who blocks a migration: a second connection watches ``pg_blocking_pids`` while it waits.

PostgreSQL's lock_timeout error does not say who held the lock; the watch does, so the error
line can name the session to wait for or end.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from job.background import Background
from job.errors import MigrationFailed

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

LOCK_NOT_AVAILABLE = "55P03"

# usename and application_name are visible to every role; state and xact_start only with
# pg_read_all_stats (or to the same role), so they may be NULL.
BLOCKERS_SQL = """
SELECT pid, usename, application_name, state, xact_start
FROM pg_stat_activity WHERE pid = ANY(pg_blocking_pids(:pid))
"""


def is_lock_timeout(exc: BaseException) -> bool:
    """Return True for a migration that gave up waiting for a table lock (safe to retry)."""
    return (
        isinstance(exc, MigrationFailed)
        and exc.context.get("sqlstate") == LOCK_NOT_AVAILABLE
        and exc.context.get("retryable", True)
    )


class BlockerWatch(Background):
    """Watch, from a second connection, which sessions block the migration's connection.

    PostgreSQL's lock_timeout error does not say who held the lock; this does.
    """

    def __init__(self, engine: AsyncEngine, pid: int, delay_s: float = 0.25) -> None:
        self.engine = engine
        self.pid = pid
        # Most migrations finish at once: only one still running after delay_s gets a watcher
        # (and its second connection).
        self.delay_s = delay_s
        self.blockers: list[dict[str, Any]] = []

    async def _run(self) -> None:
        """Poll pg_blocking_pids until cancelled, keeping the last non-empty answer."""
        from sqlalchemy import text

        await asyncio.sleep(self.delay_s)
        async with self.engine.connect() as connection:
            while True:
                rows = (await connection.execute(text(BLOCKERS_SQL), {"pid": self.pid})).mappings().all()
                await connection.commit()
                if rows:
                    self.blockers = [_blocker(row) for row in rows]
                await asyncio.sleep(0.2)

    def describe(self) -> str:
        """Return the blockers seen last, for an error message."""
        return ", ".join(_describe_blocker(b) for b in self.blockers)


def _blocker(row: Any) -> dict[str, Any]:
    """Return a blocking session as plain fields."""
    xact = row["xact_start"]
    return {
        "pid": row["pid"],
        "user": row["usename"],
        "application_name": row["application_name"],
        "state": row["state"],
        "xact_start": xact.isoformat() if xact else None,
    }


def _describe_blocker(blocker: dict[str, Any]) -> str:
    """Return ``pid N (app, user U, state, transaction since T)`` with what the role may see."""
    parts = [blocker["application_name"] or "no application_name"]
    if blocker["user"]:
        parts.append(f"user {blocker['user']}")
    if blocker["state"]:
        parts.append(blocker["state"])
    if blocker["xact_start"]:
        parts.append(f"transaction since {blocker['xact_start']}")
    return f"pid {blocker['pid']} ({', '.join(parts)})"
