"""What a driver error means: its SQLSTATE, whether another try may cure it, whether the connection
was lost, and a one-line reason without secrets or driver noise."""

from __future__ import annotations

import asyncio
import errno

from job import logs, tls
from job.errors import MigrateJobError

# SQLSTATEs that will not change by trying again: wrong password, no such role or database.
FATAL_SQLSTATES = {
    "28P01": "the password was refused",
    "28000": "the login was refused",
    "3D000": "the database does not exist",
}
# SQLSTATEs worth another try: starting up, shutting down, too many connections.
TRANSIENT_SQLSTATES = {"57P03", "57P01", "57P02", "53300", "53400", "08000", "08001", "08006"}


def causes(exc: BaseException | None) -> list[BaseException]:
    """Return exc and what it wraps (SQLAlchemy's .orig, __cause__, __context__), outermost first."""
    seen: list[BaseException] = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = getattr(exc, "orig", None) or exc.__cause__ or exc.__context__
    return seen


def sqlstate(exc: BaseException | None) -> str | None:
    """Return the PostgreSQL SQLSTATE behind an exception, if any."""
    for cause in causes(exc):
        code = getattr(cause, "sqlstate", None) or getattr(cause, "pgcode", None)
        if isinstance(code, str):
            return code
    return None


def is_transient(exc: BaseException) -> bool:
    """Return True for failures that another connection attempt may cure."""
    if isinstance(exc, MigrateJobError) or tls.refused(exc, causes(exc)):
        return False
    state = sqlstate(exc)
    if state is not None:
        return state in TRANSIENT_SQLSTATES
    for cause in causes(exc):
        if isinstance(cause, (OSError, asyncio.TimeoutError, TimeoutError, ConnectionError)):
            return True
        if type(cause).__name__ in {"ConnectionDoesNotExistError", "InternalClientError"}:
            return True
    return False


# The server went away under a live connection: shut down, crashed, restarted, connection reset.
LOST_SQLSTATES = {"57P01", "57P02", "57P03", "08000", "08003", "08006"}


def is_connection_lost(exc: BaseException) -> bool:
    """Return True when a failure came from losing the connection, not from the statement itself.

    Such a failure rolled back the running transaction on the server, so redoing the database
    after re-reading its revision under the lock is safe.
    """
    state = sqlstate(exc)
    if state is not None:
        return state in LOST_SQLSTATES
    for cause in causes(exc):
        if isinstance(cause, (ConnectionError, OSError)):
            return True
        # asyncpg's protocol broke: typically the server's FATAL (shutdown, terminate) arrived
        # while the connection sat idle between two statements. The connection is unusable.
        if type(cause).__name__ == "InternalClientError":
            return True
        if type(cause).__name__ in {"ConnectionDoesNotExistError", "InterfaceError"} and (
            "closed" in str(cause) or "connection" in str(cause).lower()
        ):
            return True
    return False


def describe(exc: BaseException | None) -> str:
    """Return a one-line reason for a connection failure, without secrets or driver noise."""
    if exc is None:
        return "unknown"
    state = sqlstate(exc)
    if state in FATAL_SQLSTATES:
        return f"{FATAL_SQLSTATES[state]} (SQLSTATE {state})"
    root = causes(exc)[-1]
    if isinstance(root, FileNotFoundError) or getattr(root, "errno", None) == errno.ENOENT:
        return "no socket at that path"
    if isinstance(root, ConnectionRefusedError):
        return "connection refused"
    if isinstance(root, (asyncio.TimeoutError, TimeoutError)):
        return "timed out"
    text = str(root).splitlines()[0] if str(root) else type(root).__name__
    return logs.scrub(f"{text} (SQLSTATE {state})" if state else text)
