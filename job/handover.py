"""Preflight connections kept open and handed to the apply: one connection per database, where allowed.

Every database is read before any is changed (the preflight), so a run that opened a connection
to read a database and another to change it paid two backend forks and two logins per database,
the costliest part of a release that adds one revision. A sequential run now keeps the preflight
connection of each database with work open and applies on it, for as many databases as a budget
of open connections allows; past the budget, and with ``--jobs`` (whose workers are other
processes), the apply opens its own connection as before. The guarantee is unchanged: nothing
is applied before every selected database was read.

The budget is per server: a quarter of its ``max_connections`` (read once, with the first
connection kept there), at most ``MAX_HELD``, shared by every manifest entry on that server, so
that the services' own connections keep the rest.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

# At most this many connections are kept open on one server, whatever its max_connections.
MAX_HELD = 100
# The share of a server's max_connections the run may keep open between preflight and apply.
SHARE = 4


@dataclass
class Handover:
    """The preflight connections kept for the apply, by execution, within each server's budget."""

    enabled: bool
    kept: dict[int, Any] = field(default_factory=dict)
    budgets: dict[str, int] = field(default_factory=dict)
    used: dict[str, int] = field(default_factory=dict)

    async def keep(self, key: int, server: str, connection: Any) -> bool:
        """Keep the connection for the execution's apply if the server's budget allows; say if kept."""
        if not self.enabled or connection.is_closed():
            return False
        if server not in self.budgets:
            self.budgets[server] = await _budget(connection)
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

    def close(self) -> None:
        """Close every connection not handed over (the run stopped before applying them)."""
        for connection in self.kept.values():
            with contextlib.suppress(Exception):
                connection.terminate()
        self.kept.clear()


async def _budget(connection: Any) -> int:
    """Return how many connections the run may keep open on this connection's server."""
    try:
        limit = int(await connection.fetchval("SELECT current_setting('max_connections')::int"))
    except Exception:
        return 0  # nothing kept where the limit cannot be read
    return min(MAX_HELD, limit // SHARE)
