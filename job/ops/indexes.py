"""Indexes built and dropped CONCURRENTLY, outside the revision's transaction, rebuilt if INVALID."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from job.ops._base import HelperRefused, _escape, _fetch_one, _log, _offline, _qualified
from job.ops._transaction import _outside, _without_statement_timeout

# --- Creating and dropping indexes -------------------------------------------------------------


def create_index_concurrently(
    index_name: str,
    table_name: str,
    columns: Sequence[str | sa.TextClause],
    *,
    unique: bool = False,
    where: str | None = None,
    schema: str | None = None,
) -> None:
    """Build an index with CREATE INDEX CONCURRENTLY, outside the revision's transaction.

    Writes to the table go on while it builds. A valid index of that name on the table is kept;
    an INVALID one (a build that failed or was killed) is dropped and built again.
    """
    with _outside("create_index_concurrently", table_name):
        if not _offline() and not _needs_build(index_name, table_name, schema):
            return
        with _without_statement_timeout():
            op.create_index(
                index_name,
                table_name,
                list(columns),
                schema=schema,
                unique=unique,
                if_not_exists=True,
                postgresql_concurrently=True,
                postgresql_where=sa.text(_escape(where)) if where else None,
            )


def drop_index_concurrently(index_name: str, *, schema: str | None = None) -> None:
    """Drop an index with DROP INDEX CONCURRENTLY IF EXISTS, outside the revision's transaction."""
    with _outside("drop_index_concurrently", f"index {index_name}"), _without_statement_timeout():
        op.drop_index(index_name, schema=schema, if_exists=True, postgresql_concurrently=True)


def _needs_build(index_name: str, table_name: str, schema: str | None) -> bool:
    """Return whether the index must be built; drop an INVALID leftover of an earlier build first."""
    index, table = _qualified(index_name, schema), _qualified(table_name, schema)
    row = _fetch_one(
        "SELECT i.indisvalid AS valid, i.indrelid = to_regclass(:table) AS same_table, "
        "i.indrelid::regclass::text AS on_table FROM pg_index i WHERE i.indexrelid = to_regclass(:index)",
        table=table,
        index=index,
    )
    if row is None:
        return True
    if not row.same_table:
        raise HelperRefused(
            f"job.ops.create_index_concurrently on {table_name}: an index named {index_name} already "
            f"exists on {row.on_table}; give the new index another name"
        )
    if row.valid:
        _log("ops.skipped", f"index {index_name} on {table_name} exists and is valid: kept", index=index_name)
        return False
    _log(
        "ops.invalid_index_dropped",
        f"index {index_name} on {table_name} is INVALID (an earlier build failed or was killed): "
        "dropping it to build it again",
        level=logging.WARNING,
        index=index_name,
    )
    with _without_statement_timeout():
        op.drop_index(index_name, schema=schema, if_exists=True, postgresql_concurrently=True)
    return True
