"""Preflight connections kept open and handed to the apply: one connection per database, where allowed.

Every database is read before any is changed (the preflight), so a run that opened a connection
to read a database and another to change it paid two backend forks and two logins per database,
the costliest part of a release that adds one revision. A sequential run now keeps the preflight
connection of each database with work open and applies on it, for as many databases as a budget
of open connections allows; past the budget, and with ``--jobs`` (whose workers are other
processes), the apply opens its own connection as before. The guarantee is unchanged: nothing
is applied before every selected database was read.

The budget is per server: a quarter of its ``max_connections`` (read once, with the first
connection kept there), at most ``MAX_HELD``, shared by every manifest entry on that server and
divided among the Cloud Run tasks of the execution (each holds its share at the same time), so
that the services' own connections keep the rest. Reaching ``max_connections`` would make every
login wait (SQLSTATE 53300), the services' included.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from job import db

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from job.executor import Execution

    # Run.connect: (target, adopt=connection) -> (engine, connection)
    Connect = Callable[..., Awaitable[tuple[Any, Any]]]

# At most this many connections are kept open on one server, whatever its max_connections.
MAX_HELD = 100
# The share of a server's max_connections the run may keep open between preflight and apply.
SHARE = 4
# How long dropping a connection opened ahead may take (job.run.CLEANUP_S for the same).
DROP_S = 2.0


@dataclass
class Handover:
    """The preflight connections kept for the apply, by execution, within each server's budget."""

    enabled: bool
    tasks: int = 1  # the Cloud Run tasks of the execution, each with its share of the budget
    kept: dict[int, Any] = field(default_factory=dict)
    budgets: dict[str, int] = field(default_factory=dict)
    used: dict[str, int] = field(default_factory=dict)
    # The apply connections being opened ahead, while the database before migrates.
    opening: dict[int, asyncio.Future[Any]] = field(default_factory=dict)

    async def keep(self, key: int, server: str, connection: Any) -> bool:
        """Keep the connection for the execution's apply if the server's budget allows; say if kept."""
        if not self.enabled or connection.is_closed():
            return False
        if server not in self.budgets:
            self.budgets[server] = await _budget(connection) // max(1, self.tasks)
        if self.used.get(server, 0) >= self.budgets[server]:
            return False
        self.used[server] = self.used.get(server, 0) + 1
        self.kept[key] = connection
        return True

    def take(self, key: int) -> Any | None:
        """Return the kept connection for the execution (once), if it is still open."""
        connection = self.kept.pop(key, None)
        if connection is not None and connection.is_closed():
            return None
        return connection

    def prepare(self, connect: Connect, execution: Execution) -> None:
        """Start opening the execution's apply connection now (the run applies it next).

        A sequential run waits on the server while a revision's statements run and commit; the
        next database's login (or the wrapping of its kept connection) is done in that time.
        """
        key = id(execution)
        if self.enabled and key not in self.opening:
            adopt = self.take(key)
            self.opening[key] = asyncio.ensure_future(connect(execution.target, adopt=adopt))

    async def connection_for(self, connect: Connect, execution: Execution) -> tuple[Any, Any]:
        """Return the execution's apply (engine, connection): opened ahead, kept, or opened now."""
        opening = self.opening.pop(id(execution), None)
        if opening is not None:
            opened: tuple[Any, Any] = await opening
            return opened
        return await connect(execution.target, adopt=self.take(id(execution)))

    async def close(self) -> None:
        """Close every connection not handed over (the run stopped before applying them)."""
        for connection in self.kept.values():
            with contextlib.suppress(Exception):
                connection.terminate()
        self.kept.clear()
        for opening in self.opening.values():
            opening.cancel()
            with contextlib.suppress(BaseException):
                _, connection = await opening
                await db.drop(connection, DROP_S)
        self.opening.clear()


async def _budget(connection: Any) -> int:
    """Return how many connections the run may keep open on this connection's server."""
    try:
        limit = int(await connection.fetchval("SELECT current_setting('max_connections')::int"))
    except Exception:
        return 0  # nothing kept where the limit cannot be read
    return min(MAX_HELD, limit // SHARE)
