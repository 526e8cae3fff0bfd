"""What every helper shares: its error, the SQL it sends or renders, the events it logs."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from alembic import op

if TYPE_CHECKING:
    from sqlalchemy.engine import Row

# The job prints this logger's events as lines of its own log (job.logs.OPS_LOGGER_NAME).
logger = logging.getLogger("job.ops")

MAX_IDENTIFIER = 63  # PostgreSQL's NAMEDATALEN - 1
# The current transaction's id as pg_class.xmin spells it (32 bits), NULL if it wrote nothing yet.
CURRENT_XID = "(pg_current_xact_id_if_assigned()::text::bigint % 4294967296)::text"


class HelperRefused(RuntimeError):
    """A helper was called where it cannot work safely; the message says what to do instead."""


# --- SQL text ----------------------------------------------------------------------------------


def _offline() -> bool:
    """Return whether the migration renders SQL (``--sql``) instead of running it."""
    return bool(op.get_context().as_sql)


def _execute(sql: str) -> None:
    """Run one statement online, or write it to the script offline."""
    statement = sa.text(_escape(sql))
    if _offline():
        op.execute(statement)
    else:
        op.get_bind().execute(statement)


def _fetch_one(sql: str, **params: Any) -> Row[Any] | None:
    """Return the first row of a query with bound parameters (online only)."""
    return op.get_bind().execute(sa.text(sql), params).first()


def _fetch_value(sql: str, **params: Any) -> Any:
    """Return the single value a query with bound parameters returns (online only)."""
    return op.get_bind().execute(sa.text(sql), params).scalar_one()


def _escape(sql: str) -> str:
    """Return SQL with its colons escaped, so that text() takes none of them for a parameter."""
    return sql.replace(":", "\\:")


def _quote(name: str) -> str:
    """Return an identifier quoted where PostgreSQL needs it."""
    return str(op.get_context().dialect.identifier_preparer.quote(name))


def _qualified(name: str, schema: str | None) -> str:
    """Return ``schema.name`` (or ``name``), quoted where needed."""
    return f"{_quote(schema)}.{_quote(name)}" if schema else _quote(name)


def _columns(names: Sequence[str]) -> str:
    """Return a quoted column list."""
    return ", ".join(_quote(n) for n in names)


def _identifier(name: str) -> str:
    """Return name, or a shortened form with a hash if PostgreSQL would truncate it."""
    if len(name.encode()) <= MAX_IDENTIFIER:
        return name
    digest = hashlib.sha1(name.encode()).hexdigest()[:8]
    return name.encode()[: MAX_IDENTIFIER - 9].decode(errors="ignore") + "_" + digest


def _dollar_quoted(body: str) -> str:
    """Return ``DO $$ body $$`` with a dollar tag the body does not contain."""
    tag = "$$" if "$$" not in body else "$ops$"
    return f"DO {tag}\n{body}\n{tag}"


def _plpgsql(statement: str) -> str:
    """Return a DO block that runs one statement."""
    return _dollar_quoted(f"BEGIN\n    {statement};\nEND")


def _ignoring_duplicate(statement: str) -> str:
    """Return a DO block that runs the statement and ignores an object of that name existing already."""
    return _dollar_quoted(f"BEGIN\n    {statement};\nEXCEPTION WHEN duplicate_object THEN\n    NULL;\nEND")


def _log(event: str, message: str, *, level: int = logging.INFO, **fields: Any) -> None:
    """Log one event online (the job prints it as a line of its own); nothing when rendering SQL."""
    if _offline():
        return
    payload = {"event": event, **{k: v for k, v in fields.items() if v is not None}}
    logger.log(level, message, extra={"json_fields": payload})
