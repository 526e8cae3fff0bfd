"""Leaving the revision's transaction safely: refuse after other changes, lift statement_timeout."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import TYPE_CHECKING

from alembic import op

from job.ops._base import CURRENT_XID, HelperRefused, _execute, _fetch_one, _fetch_value, _offline, _qualified

if TYPE_CHECKING:
    from alembic.runtime.migration import MigrationContext

MIN_SERVER_VERSION = (13,)  # pg_current_xact_id_if_assigned()
# True while a helper runs outside the revision's transaction (a helper that calls another).
_outside_now: contextvars.ContextVar[bool] = contextvars.ContextVar("job_ops_outside", default=False)


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
