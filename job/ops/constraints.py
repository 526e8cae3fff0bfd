"""Constraints without a long exclusive lock: NOT NULL by a NOT VALID check, foreign keys NOT VALID."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from job.ops._base import (
    CURRENT_XID,
    HelperRefused,
    _columns,
    _execute,
    _fetch_one,
    _identifier,
    _ignoring_duplicate,
    _log,
    _offline,
    _plpgsql,
    _qualified,
    _quote,
)
from job.ops._transaction import _outside, _without_statement_timeout

if TYPE_CHECKING:
    from sqlalchemy.engine import Row

ON_DELETE = frozenset({"CASCADE", "SET NULL", "SET DEFAULT", "RESTRICT", "NO ACTION"})


# --- NOT NULL on an existing column ------------------------------------------------------------


def add_not_null(table_name: str, column_name: str, *, schema: str | None = None) -> None:
    """Add ``CHECK (column IS NOT NULL) NOT VALID``, committed on its own (a brief lock, no scan).

    From then on new rows must not be NULL; validate_not_null (here or in a later revision)
    checks the existing rows and makes the column NOT NULL.
    """
    with _outside("add_not_null", table_name):
        if not _offline():
            state = _column_state("add_not_null", table_name, column_name, schema)
            if state.attnotnull or state.check_exists:
                _log("ops.skipped", f"{table_name}.{column_name} is NOT NULL or has its check already")
                return
        table, check = _qualified(table_name, schema), _quote(not_null_check_name(table_name, column_name))
        condition = f"{_quote(column_name)} IS NOT NULL"
        _execute(
            _ignoring_duplicate(f"ALTER TABLE {table} ADD CONSTRAINT {check} CHECK ({condition}) NOT VALID")
        )


def validate_not_null(table_name: str, column_name: str, *, schema: str | None = None) -> None:
    """Validate add_not_null's check, SET NOT NULL (no scan: PostgreSQL 12+ uses the check), drop it.

    Runs in the revision's transaction: VALIDATE scans under SHARE UPDATE EXCLUSIVE (reads and
    writes go on), SET NOT NULL then holds ACCESS EXCLUSIVE only until the revision commits.
    """
    check_name = not_null_check_name(table_name, column_name)
    if not _offline():
        state = _column_state("validate_not_null", table_name, column_name, schema)
        if state.attnotnull and not state.check_exists:
            _log("ops.skipped", f"{table_name}.{column_name} is NOT NULL already")
            return
        if not state.check_exists:
            raise HelperRefused(
                f"job.ops.validate_not_null on {table_name}: column {column_name} has no NOT VALID check "
                f"{check_name}; call job.ops.add_not_null({table_name!r}, {column_name!r}) first, earlier in "
                "this revision or in an earlier one"
            )
        _refuse_validating_own_add("validate_not_null", table_name, check_name, state.check_added_here)
    table, column = _qualified(table_name, schema), _quote(column_name)
    with _without_statement_timeout():
        _execute(f"ALTER TABLE {table} VALIDATE CONSTRAINT {_quote(check_name)}")
    _execute(f"ALTER TABLE {table} ALTER COLUMN {column} SET NOT NULL")
    # The check's guarantee is the column's NOT NULL now; in a DO block, as squawk's
    # ban-drop-constraint would take this drop for the loss of a guarantee.
    _execute(_plpgsql(f"ALTER TABLE {table} DROP CONSTRAINT IF EXISTS {_quote(check_name)}"))


def not_null_check_name(table_name: str, column_name: str) -> str:
    """Return the name of the temporary NOT NULL check (not PostgreSQL 18's own ``t_c_not_null``)."""
    return _identifier(f"ck_{table_name}_{column_name}_not_null")


class _ColumnState:
    """A column's nullability and its temporary NOT NULL check, as the catalog has them."""

    def __init__(self, row: Row[Any]) -> None:
        self.attnotnull: bool = row.attnotnull
        self.check_exists: bool = row.check_exists
        self.check_added_here: bool = row.check_added_here


def _column_state(helper: str, table_name: str, column_name: str, schema: str | None) -> _ColumnState:
    """Return the column's state; raise HelperRefused if the table or column does not exist."""
    row = _fetch_one(
        "SELECT a.attnotnull, c.oid IS NOT NULL AS check_exists, "
        f"coalesce(c.xmin::text = {CURRENT_XID}, false) AS check_added_here "
        "FROM pg_attribute a LEFT JOIN pg_constraint c ON c.conrelid = a.attrelid AND c.conname = :check "
        "WHERE a.attrelid = to_regclass(:table) AND a.attname = :column AND NOT a.attisdropped",
        table=_qualified(table_name, schema),
        column=column_name,
        check=not_null_check_name(table_name, column_name),
    )
    if row is None:
        raise HelperRefused(
            f"job.ops.{helper} on {table_name}: no column {column_name} in table {table_name}; "
            "check the names (and schema=)"
        )
    return _ColumnState(row)


# --- Foreign keys and other constraints --------------------------------------------------------


def add_foreign_key_not_valid(
    constraint_name: str,
    source_table: str,
    referent_table: str,
    local_cols: Sequence[str],
    remote_cols: Sequence[str],
    *,
    ondelete: str | None = None,
    schema: str | None = None,
    referent_schema: str | None = None,
) -> None:
    """Add a FOREIGN KEY ... NOT VALID, committed on its own (brief locks on both tables, no scan).

    New rows are checked from then on; validate_constraint checks the existing ones.
    """
    action = _on_delete(ondelete, source_table)
    with _outside("add_foreign_key_not_valid", source_table):
        if not _offline() and _constraint_row(constraint_name, source_table, schema) is not None:
            _log("ops.skipped", f"constraint {constraint_name} on {source_table} exists already")
            return
        source = _qualified(source_table, schema)
        referent = _qualified(referent_table, referent_schema if referent_schema is not None else schema)
        _execute(
            _ignoring_duplicate(
                f"ALTER TABLE {source} ADD CONSTRAINT {_quote(constraint_name)} FOREIGN KEY "
                f"({_columns(local_cols)}) REFERENCES {referent} ({_columns(remote_cols)}){action} NOT VALID"
            )
        )


def validate_constraint(table_name: str, constraint_name: str, *, schema: str | None = None) -> None:
    """VALIDATE a NOT VALID constraint in the revision's transaction (a scan that blocks no writes)."""
    if not _offline():
        row = _constraint_row(constraint_name, table_name, schema)
        if row is None:
            raise HelperRefused(
                f"job.ops.validate_constraint on {table_name}: no constraint {constraint_name} on "
                f"{table_name}; add it first (job.ops.add_foreign_key_not_valid, earlier in this "
                "revision or in an earlier one)"
            )
        if row.convalidated:
            _log("ops.skipped", f"constraint {constraint_name} on {table_name} is valid already")
            return
        _refuse_validating_own_add("validate_constraint", table_name, constraint_name, row.added_here)
    table = _qualified(table_name, schema)
    with _without_statement_timeout():
        _execute(f"ALTER TABLE {table} VALIDATE CONSTRAINT {_quote(constraint_name)}")


def _constraint_row(constraint_name: str, table_name: str, schema: str | None) -> Row[Any] | None:
    """Return the constraint's convalidated and whether this transaction added it, or None."""
    return _fetch_one(
        f"SELECT c.convalidated, c.xmin::text = {CURRENT_XID} AS added_here FROM pg_constraint c "
        "WHERE c.conrelid = to_regclass(:table) AND c.conname = :name",
        table=_qualified(table_name, schema),
        name=constraint_name,
    )


def _refuse_validating_own_add(helper: str, table_name: str, constraint: str, added_here: bool) -> None:
    """Raise HelperRefused if the constraint was added in this same transaction."""
    if added_here:
        raise HelperRefused(
            f"job.ops.{helper} on {table_name}: constraint {constraint} was added in this same "
            "transaction, whose lock from adding it would then block writes for the whole scan; add it "
            "with the job.ops helper (which commits it first) or in an earlier revision"
        )


def _on_delete(ondelete: str | None, table_name: str) -> str:
    """Return the ON DELETE clause, or raise ValueError for an action PostgreSQL does not have."""
    if ondelete is None:
        return ""
    action = " ".join(ondelete.upper().split())
    if action not in ON_DELETE:
        raise ValueError(
            f"job.ops.add_foreign_key_not_valid on {table_name}: ondelete={ondelete!r} is not one of "
            f"{', '.join(sorted(ON_DELETE))}"
        )
    return f" ON DELETE {action}"
