"""Zero-downtime helpers for revisions: ``from job.ops import create_index_concurrently, ...``.

Each helper does one risky schema change the way that keeps the application running: a statement
that takes a lock the application's reads or writes need is brief, and waits for that lock at most
``lock_timeout`` (so the queries queued behind it wait no longer), and long work (an index build,
a validation scan, a backfill) runs under locks that the application's queries do not conflict
with. This module imports only the standard library, Alembic and
SQLAlchemy, so a tree that uses it still runs with plain ``alembic upgrade`` (the job installed).
The helpers need PostgreSQL 13 or newer.

Two kinds of helper, and where they go in a revision:

* Helpers that leave the revision's transaction (Alembic's ``autocommit_block()``), each of their
  statements committed on its own: ``create_index_concurrently``, ``drop_index_concurrently``,
  ``add_not_null``, ``add_foreign_key_not_valid``, ``backfill`` and the first part of
  ``add_column_with_default``. Leaving commits what the revision's transaction did so far, so they
  refuse to run after the revision changed anything (``HelperRefused``): put them first in a
  revision, or in a revision of their own.
* Helpers that stay in the revision's transaction: ``validate_not_null``, ``validate_constraint``
  (and the end of ``add_column_with_default`` for a NOT NULL column). Their work commits with the
  version table, so they go after the first kind, as do the revision's plain ``op.*`` calls.

A run killed at any point leaves the database at the previous revision (the version row moves
only at the end), and running the revision again finishes the work: every step checks the catalog
first (an index that exists and is valid is kept, an INVALID one left by a killed build is dropped
and built again, a constraint that exists is not added twice, a backfill updates only the rows its
``where`` still selects).

Offline (``alembic upgrade --sql``, and the job's ``sql`` and ``lint``) the helpers render the same
statements without the catalog checks, in forms that can run again: ``IF [NOT] EXISTS`` where
PostgreSQL has it, and a ``DO`` block where it has not (adding a constraint that may exist,
dropping the helper's own temporary check, setting a default outside a transaction, the batched
backfill loop), so that squawk's ``prefer-robust-stmts`` and ``ban-drop-constraint`` have nothing
to flag.

Timeouts: the statements that take a lock the application waits for (ADD CONSTRAINT ... NOT
VALID, SET NOT NULL, ADD COLUMN, SET DEFAULT, DROP of the temporary check, each backfill batch's
row locks) keep the session's ``lock_timeout`` (the job sets it from the manifest; set it in
env.py when running plain Alembic). The long ones that take only SHARE UPDATE EXCLUSIVE (CREATE or
DROP INDEX CONCURRENTLY, VALIDATE CONSTRAINT) and the backfill's row counts run with
``statement_timeout`` lifted for that one statement, then restored: a timeout there would only
throw the work away (and leave an INVALID index behind) while blocking nobody. They keep
``lock_timeout``: a build that waits too long for an old transaction fails, the job retries the
revision, and the retry drops the INVALID index and builds it again.

Progress is logged through the ``job.ops`` logger with a ``json_fields`` event (``backfill.start``,
``backfill.progress``, ``backfill.done``, ``ops.skipped``, ``ops.invalid_index_dropped``); the job
prints each as a line of its own log, with the run's context.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import logging
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from alembic import op

if TYPE_CHECKING:
    from alembic.runtime.migration import MigrationContext
    from sqlalchemy.engine import Row

__all__ = [
    "HelperRefused",
    "add_column_with_default",
    "add_foreign_key_not_valid",
    "add_not_null",
    "backfill",
    "create_index_concurrently",
    "drop_index_concurrently",
    "validate_constraint",
    "validate_not_null",
]

logger = logging.getLogger(__name__)

MAX_IDENTIFIER = 63  # PostgreSQL's NAMEDATALEN - 1
PROGRESS_EVERY_S = 2.0
MIN_SERVER_VERSION = (13,)  # pg_current_xact_id_if_assigned()
ON_DELETE = frozenset({"CASCADE", "SET NULL", "SET DEFAULT", "RESTRICT", "NO ACTION"})
# The current transaction's id as pg_class.xmin spells it (32 bits), NULL if it wrote nothing yet.
CURRENT_XID = "(pg_current_xact_id_if_assigned()::text::bigint % 4294967296)::text"

# True while a helper runs outside the revision's transaction (a helper that calls another).
_outside_now: contextvars.ContextVar[bool] = contextvars.ContextVar("job_ops_outside", default=False)


class HelperRefused(RuntimeError):
    """A helper was called where it cannot work safely; the message says what to do instead."""


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


# --- Backfills ---------------------------------------------------------------------------------


def backfill(
    table_name: str,
    set_sql: str,
    *,
    where: str,
    key: str = "id",
    batch_size: int = 1000,
    max_batch_ms: int = 500,
    pause_ms: int = 0,
    schema: str | None = None,
) -> None:
    """Run ``UPDATE table SET set_sql WHERE where`` in batches by key, each committed on its own.

    ``where`` must stop selecting a row once it is updated (``new_col IS NULL``): that is what
    makes the backfill resumable after a kill (a rerun finds only the rows left) and keeps any row
    from being updated twice. ``key`` is a unique, ordered column (the primary key). A batch that
    takes longer than max_batch_ms halves the batch size; pause_ms sleeps between batches. The rows
    to do are counted first and what is left at the end (one scan each), for the progress events.
    """
    if batch_size < 1:
        raise ValueError(f"job.ops.backfill on {table_name}: batch_size must be at least 1")
    with _outside("backfill", table_name):
        if _offline():
            _execute(_backfill_loop(table_name, set_sql, where, key, batch_size, schema))
            return
        _Backfill(table_name, set_sql, where, key, batch_size, max_batch_ms, pause_ms, schema).run()


class _Backfill:
    """One online backfill: batches by key, progress events, halving slow batches."""

    def __init__(
        self,
        table_name: str,
        set_sql: str,
        where: str,
        key: str,
        batch_size: int,
        max_batch_ms: int,
        pause_ms: int,
        schema: str | None,
    ) -> None:
        self.table_name = table_name
        self.table = _qualified(table_name, schema)
        self.set_sql, self.where, self.key = _escape(set_sql), _escape(where), _quote(key)
        self.batch_size, self.max_batch_ms, self.pause_ms = batch_size, max_batch_ms, pause_ms
        self.done = 0
        self.total = 0
        self.started = time.monotonic()
        self.logged_at = 0.0

    def run(self) -> None:
        """Update every row ``where`` selects: a pass in key order, and another if rows were left behind."""
        self.total = self._left()
        _log(
            "backfill.start",
            f"backfill of {self.table_name}: {self.total} row(s) to update, {self.batch_size} at a time",
            table=self.table_name,
            rows_left=self.total,
            batch_size=self.batch_size,
        )
        self._pass()
        left = self._left()
        if left:
            # Rows behind the pass's cursor: keys that do not increase (UUIDs), or rows set back.
            self._pass()
            left = self._left()
        elapsed, rate = time.monotonic() - self.started, self._rate()
        _log(
            "backfill.done",
            f"backfill of {self.table_name} done: {self.done} row(s) updated in {_duration(elapsed)}, "
            f"{rate} rows/s"
            + (f"; {left} row(s) match where again: the application still writes them" if left else ""),
            level=logging.WARNING if left else logging.INFO,
            table=self.table_name,
            rows_done=self.done,
            rows_left=left,
            rate=rate,
            duration_ms=int(elapsed * 1000),
        )

    def _left(self) -> int:
        """Return how many rows ``where`` selects now (one scan, with statement_timeout lifted)."""
        with _without_statement_timeout():
            return int(_fetch_value(f"SELECT count(*) FROM {self.table} WHERE ({self.where})"))

    def _pass(self) -> None:
        """Run batches over the table's keys in order, from the first to the last."""
        last: Any = None
        while True:
            started = time.monotonic()
            row = _fetch_one(self._batch_sql(first=last is None), last=last, size=self.batch_size)
            elapsed_ms = int((time.monotonic() - started) * 1000)
            if row is None or row.picked == 0:
                return
            last, self.done = row.last, self.done + int(row.updated)
            self._after_batch(elapsed_ms)
            if self.pause_ms:
                time.sleep(self.pause_ms / 1000)

    def _batch_sql(self, *, first: bool) -> str:
        """Return one batch: the next batch_size keys, the rows among them that ``where`` selects updated.

        Keys are taken whatever ``where`` says, so that each batch reads batch_size index entries
        however few rows are left to update. ``where`` on the UPDATE re-checks a row the
        application changed meanwhile (READ COMMITTED re-evaluates it): no row is updated twice.
        """
        after = "" if first else f" WHERE {self.key} > :last"
        return (
            f"WITH batch AS MATERIALIZED (SELECT {self.key} FROM {self.table}{after} "
            f"ORDER BY {self.key} LIMIT :size), "
            f"done AS (UPDATE {self.table} SET {self.set_sql} "
            f"WHERE {self.key} IN (SELECT {self.key} FROM batch) AND ({self.where}) RETURNING 1) "
            f"SELECT (SELECT count(*) FROM batch) AS picked, (SELECT count(*) FROM done) AS updated, "
            f"(SELECT {self.key} FROM batch ORDER BY {self.key} DESC LIMIT 1) AS last"
        )

    def _after_batch(self, elapsed_ms: int) -> None:
        """Halve the batch if it was slow; log progress every PROGRESS_EVERY_S (and on the first batch)."""
        halved = elapsed_ms > self.max_batch_ms and self.batch_size > 1
        if halved:
            self.batch_size = max(1, self.batch_size // 2)
        now = time.monotonic()
        if not halved and self.logged_at and now - self.logged_at < PROGRESS_EVERY_S:
            return
        self.logged_at = now
        left, rate = max(0, self.total - self.done), self._rate()
        note = f"; the batch took {elapsed_ms} ms, next ones {self.batch_size} rows" if halved else ""
        _log(
            "backfill.progress",
            f"backfill of {self.table_name}: {self.done} row(s) done, {left} left, {rate} rows/s{note}",
            table=self.table_name,
            rows_done=self.done,
            rows_left=left,
            rate=rate,
            batch_size=self.batch_size,
            batch_ms=elapsed_ms,
        )

    def _rate(self) -> float:
        """Return the rows updated per second so far."""
        return round(self.done / max(time.monotonic() - self.started, 1e-3), 1)


def _duration(seconds: float) -> str:
    """Return a duration for people: milliseconds under ten seconds, else seconds."""
    return f"{seconds * 1000:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"


def _backfill_loop(
    table_name: str, set_sql: str, where: str, key: str, batch_size: int, schema: str | None
) -> str:
    """Return the offline backfill: a DO block that runs the same batches, committing each."""
    table, key_q = _qualified(table_name, schema), _quote(key)

    def batch(after: str) -> str:
        return (
            f"WITH batch AS MATERIALIZED (SELECT {key_q} FROM {table}{after} "
            f"ORDER BY {key_q} LIMIT {int(batch_size)}), "
            f"done AS (UPDATE {table} SET {set_sql} WHERE {key_q} IN (SELECT {key_q} FROM batch) "
            f"AND ({where}) RETURNING 1) "
            f"SELECT (SELECT {key_q} FROM batch ORDER BY {key_q} DESC LIMIT 1) INTO next_key"
        )

    body = (
        f"DECLARE\n    last_key {table}.{key_q}%TYPE;\n    next_key {table}.{key_q}%TYPE;\nBEGIN\n"
        f"    LOOP\n        IF last_key IS NULL THEN\n            {batch('')};\n        ELSE\n"
        f"            {batch(f' WHERE {key_q} > last_key')};\n        END IF;\n"
        "        EXIT WHEN next_key IS NULL;\n        last_key := next_key;\n        COMMIT;\n"
        "    END LOOP;\nEND"
    )
    return _dollar_quoted(body)


# --- Leaving the revision's transaction --------------------------------------------------------


@contextlib.contextmanager
def _outside(helper: str, table_name: str) -> Iterator[None]:
    """Run the block outside the revision's transaction, refusing where leaving it is unsafe."""
    if _outside_now.get() or (not _offline() and _autocommit()):
        yield  # a helper inside another, or inside the revision's own autocommit_block()
        return
    context = op.get_context()
    if not context.as_sql:
        _check_can_leave(context, helper, table_name)
    token = _outside_now.set(True)
    try:
        with context.autocommit_block():
            yield
    finally:
        _outside_now.reset(token)


WRITES_SQL = f"""
WITH x AS (SELECT {CURRENT_XID} AS xid), vt AS (SELECT to_regclass(:version_table) AS oid)
SELECT x.xid,
  EXISTS (SELECT 1 FROM pg_class c, vt WHERE c.oid = vt.oid AND c.xmin::text = x.xid) AS version_table_new,
  ARRAY(SELECT c.oid::regclass::text FROM pg_class c, vt WHERE c.xmin::text = x.xid AND c.relkind <> 't'
        AND c.oid IS DISTINCT FROM vt.oid
        AND NOT EXISTS (SELECT 1 FROM pg_index i WHERE i.indexrelid = c.oid AND i.indrelid = vt.oid)
        ORDER BY 1) AS changed,
  ARRAY(SELECT s.relid::regclass::text FROM pg_stat_xact_user_tables s, vt
        WHERE s.n_tup_ins + s.n_tup_upd + s.n_tup_del > 0 AND s.relid IS DISTINCT FROM vt.oid
        ORDER BY 1) AS written
FROM x
"""


def _check_can_leave(context: MigrationContext, helper: str, table_name: str) -> None:
    """Raise HelperRefused if leaving the revision's transaction now would commit its changes early."""
    where = f"job.ops.{helper} on {table_name}"
    if context.dialect.name != "postgresql":
        raise HelperRefused(f"{where}: the job.ops helpers are for PostgreSQL, not {context.dialect.name}")
    version = context.dialect.server_version_info or (0,)
    if tuple(version) < MIN_SERVER_VERSION:
        raise HelperRefused(f"{where}: the job.ops helpers need PostgreSQL 13 or newer (server {version})")
    if getattr(context, "_in_external_transaction", False):
        raise HelperRefused(
            f"{where}: env.py began the transaction itself (connection.begin() before "
            "context.configure), so Alembic cannot leave it; configure with a connection that has "
            "no transaction open and transaction_per_migration=True, as the shipped env.py does"
        )
    changed = _written_so_far(context)
    if changed is not None:
        raise HelperRefused(
            f"{where}: this revision's transaction already changed {changed}, and the helper would "
            "commit that early (running outside the transaction), out of step with the version table; "
            f"put job.ops.{helper} in a revision of its own, or before the revision's other operations "
            "(validate_not_null and validate_constraint go after it)"
        )


def _written_so_far(context: MigrationContext) -> str | None:
    """Return what the revision's transaction has changed so far, or None if nothing.

    Alembic creates the version table in the first revision's transaction: that alone is fine.
    """
    version_table = _qualified(context.version_table, context.version_table_schema)
    row = _fetch_one(WRITES_SQL, version_table=version_table)
    if row is None or row.xid is None:
        return None
    changed, written = list(row.changed), list(row.written)
    if row.version_table_new and not changed and not written:
        return None
    parts = [f"the definition of {', '.join(changed)}"] if changed else []
    parts += [f"rows of {', '.join(written)}"] if written else []
    return " and ".join(parts) or "the database (DDL or data)"


def _autocommit() -> bool:
    """Return whether the migration's connection is in autocommit now (an autocommit_block())."""
    options = op.get_bind().get_execution_options()
    return options.get("isolation_level") == "AUTOCOMMIT"


@contextlib.contextmanager
def _without_statement_timeout() -> Iterator[None]:
    """Lift statement_timeout for the block's statements, then put the previous value back."""
    if _offline():
        inside = not _outside_now.get()
        _execute("SET LOCAL statement_timeout = 0" if inside else "SET statement_timeout = 0")
        yield
        _execute("SET LOCAL statement_timeout TO DEFAULT" if inside else "RESET statement_timeout")
        return
    local = not _autocommit()  # in the revision's transaction: the value reverts at its end anyway
    before = _fetch_value("SELECT current_setting('statement_timeout')")
    restore = "SELECT set_config('statement_timeout', :value, :local)"
    _fetch_value(restore, value="0", local=local)
    try:
        yield
    except Exception:
        # The connection may be gone (a terminated backend): the original error is what matters.
        with contextlib.suppress(Exception):
            _fetch_value(restore, value=before, local=local)
        raise
    _fetch_value(restore, value=before, local=local)


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
