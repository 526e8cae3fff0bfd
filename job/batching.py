"""One round trip per revision: the statements a revision sends through Alembic, sent together.

Through SQLAlchemy, each DDL statement costs two round trips (asyncpg prepares, then executes)
plus the Python of a prepared statement; a 30-revision history pays that about 300 times per
database. While the job applies a revision, ``BatchingImpl`` (Alembic's PostgreSQL impl, with
``_exec`` changed) keeps each statement whose result nobody can see: the DDL and ``op.execute``
of Alembic's operations, which return nothing. The revision's history row and the version-table
move close the batch, and the lot goes as one simple-protocol query inside the revision's own
transaction, version statement last, so that its row count is still checked.

What does not wait: a statement with bound parameters, one with execution options, anything run
on the connection directly (``op.get_bind()``, an inspector, SQLAlchemy's own queries), a
savepoint or commit, and every statement of a revision that runs outside its transaction
(``autocommit_block``, job.ops helpers): those send what is pending first, so the server sees
statements in the order the revision issued them. A failure in the batch fails the revision as
the statement alone would have (the transaction rolls back whole), with the server's message;
job.diagnosis then names the statement that failed and the revision line that issued it.

``trace`` keeps the batch and sets its ``probe``: after each statement it defers, the batch then
holds a query that notes what the server did so far (job.trace), sent in the same round trip.
"""

from __future__ import annotations

import re
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from alembic.ddl.postgresql import PostgresqlImpl
from alembic.util import CommandError
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql.elements import TextClause
from sqlalchemy.sql.schema import Table

from job import diagnosis

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from sqlalchemy.engine import Connection, CursorResult
    from sqlalchemy.engine.interfaces import DBAPICursor, ExecutionContext

# The execution option that marks the job's own batch (sent with the simple protocol).
MARK = "migrate_job_batch"
STATUS_COUNT = re.compile(r"(?:UPDATE|DELETE|INSERT \d+) (\d+)$")


@dataclass
class Batch:
    """What a revision has sent so far that has not reached the server yet."""

    statements: list[str] = field(default_factory=list)
    origins: list[diagnosis.Origin | None] = field(default_factory=list)  # the revision's line of each
    version: str | None = None  # the version table's move, sent last so its row count is checked
    open: bool = False  # only while a revision runs inside its own transaction
    probe: Callable[[str], str] | None = None  # job.trace: the statement to send after each deferred one
    file: str | None = None  # the running revision's file, as its code objects name it

    def pending(self) -> bool:
        """Return whether anything waits to be sent."""
        return bool(self.statements) or self.version is not None

    def flush(self, connection: Connection, trailing: Sequence[str] = ()) -> None:
        """Send what waits, then trailing statements (the history row), version move last."""
        statements = [*self.statements, *trailing]
        origins = [*self.origins, *(None for _ in trailing)]
        version, self.statements, self.origins, self.version = self.version, [], [], None
        if version is not None:
            statements.append(version)
            origins.append(None)
        if not statements:
            return
        adapter: Any = connection.connection.dbapi_connection
        # A batch that opens its transaction can be sent again from a new one if it fails; any
        # other starts with a savepoint to go back to (job.diagnosis).
        savepoint = getattr(adapter, "_transaction", None) is not None
        if savepoint:
            statements.insert(0, f"SAVEPOINT {diagnosis.SAVEPOINT}")
            origins.insert(0, None)
        try:
            result = connection.exec_driver_sql(
                diagnosis.JOINER.join(statements), execution_options={MARK: True}
            )
        except DBAPIError as exc:
            # Kept on the error even when unknown, so that the whole batch is never shown as "the statement".
            culprit = diagnosis.Culprit(None)
            if not exc.connection_invalidated:
                culprit = diagnosis.locate(exc, adapter, statements, origins, savepoint=savepoint)
            setattr(exc, diagnosis.ATTR, culprit)
            raise
        if version is not None and result.rowcount != 1:
            raise CommandError(
                f"the version table did not move by one row ({result.rowcount} matched {version!r}): "
                "another process changed it during the migration"
            )


class _Moved:
    """What ``_exec`` returns for a deferred version move: Alembic reads ``rowcount``; the batch checks it."""

    rowcount = 1


class BatchingImpl(PostgresqlImpl):
    """Alembic's PostgreSQL impl whose ``_exec`` defers statements whose result nobody can see."""

    __dialect__ = "postgresql"  # replaces Alembic's own in its registry (same behaviour when not batching)

    batch: Batch | None = None

    def _exec(
        self,
        construct: Any,
        execution_options: Mapping[str, Any] | None = None,
        multiparams: Sequence[Mapping[str, Any]] | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> CursorResult[Any] | None:
        """Defer the statement when it can wait; else send what waits, then run it as Alembic does."""
        batch = self.batch
        params = params or {}
        if batch is not None and batch.open and not self.as_sql and not _autocommit(self._connection()):
            sql = None if execution_options or multiparams or params else _render(self, construct)
            if sql is not None:
                if isinstance(construct, TextClause) or not _moves_version(self, construct):
                    batch.statements.append(sql)
                    batch.origins.append(diagnosis.caller(batch.file))
                    if batch.probe is not None:
                        # The probe is the job's, not the revision's: no line of the revision issued it.
                        batch.statements.append(batch.probe(sql))
                        batch.origins.append(None)
                    return None
                if batch.version is not None:
                    # A merge moves two rows (a delete, an update): each count is checked, so one goes now.
                    batch.flush(self._connection())
                batch.version = sql
                return _Moved()  # type: ignore[return-value]
            if batch.pending():
                batch.flush(self._connection())
        return super()._exec(construct, execution_options, multiparams, params)

    def _connection(self) -> Connection:
        """Return the migration's connection (always set when applying)."""
        assert self.connection is not None
        return self.connection


def _autocommit(connection: Connection) -> bool:
    """Return whether the connection runs each statement on its own (an autocommit_block)."""
    return connection.get_execution_options().get("isolation_level") == "AUTOCOMMIT"


def _render(impl: BatchingImpl, construct: Any) -> str | None:
    """Return the statement as SQL text if it can be sent as is (no parameters), else None."""
    if isinstance(construct, str):
        from sqlalchemy import text

        construct = text(construct)  # as Alembic does: a colon may be a bound parameter
    if isinstance(construct, TextClause):
        # text() with bound parameters, or a colon that SQLAlchemy would read as one, goes as is.
        return None if construct._bindparams else str(construct.compile(dialect=impl.dialect))
    compiled = construct.compile(dialect=impl.dialect)
    if compiled.params:
        return None
    return str(compiled).strip()


def _moves_version(impl: BatchingImpl, construct: Any) -> bool:
    """Return whether the construct inserts, updates or deletes a row of the version table."""
    table = getattr(construct, "table", None)
    return isinstance(table, Table) and table.name == getattr(impl, "version_table", None)


def batch_of(connection: Connection) -> Batch | None:
    """Return the batch of a connection's running migration, if the job is batching on it."""
    return _batches.get(connection)


def start(impl: Any, connection: Connection, version_table: str) -> Batch | None:
    """Batch the statements of this migration context, if its impl and driver allow; return the batch."""
    if (
        not isinstance(impl, BatchingImpl)
        or not impl.transactional_ddl
        or connection.dialect.driver != "asyncpg"
    ):
        return None
    _listen()
    impl.batch = Batch()
    impl.version_table = version_table  # type: ignore[attr-defined]
    _batches[connection] = impl.batch
    return impl.batch


def stop(connection: Connection) -> None:
    """Stop batching on the connection (what waits was sent or rolled back with its revision)."""
    _batches.pop(connection, None)


# By connection object, not in its info: looking a batch up must never touch the connection.
_batches: weakref.WeakKeyDictionary[Connection, Batch] = weakref.WeakKeyDictionary()


_listening: list[bool] = []


def _listen() -> None:
    """Register the engine-wide hooks once: flush before other statements, send batches simply."""
    if _listening:
        return
    event.listen(Engine, "before_execute", _before_execute)
    event.listen(Engine, "do_execute", _do_execute)
    # A commit the job did not expect (an autocommit_block opening) and a savepoint send what waits
    # first; a rollback drops it, as the server would.
    event.listen(Engine, "commit", _send_pending)
    event.listen(Engine, "savepoint", _send_pending)
    event.listen(Engine, "rollback", _drop_pending)
    _listening.append(True)


def _before_execute(connection: Connection, clause: Any, multiparams: Any, params: Any, options: Any) -> None:
    """Send what waits before any other statement on the connection, so order is kept."""
    if options.get(MARK):
        return
    batch = batch_of(connection)
    if batch is not None and batch.pending():
        batch.flush(connection)


def _send_pending(connection: Connection, *args: Any) -> None:
    """Send what waits on the connection (before a commit or a savepoint)."""
    batch = batch_of(connection)
    if batch is not None and batch.pending():
        batch.flush(connection)


def _drop_pending(connection: Connection) -> None:
    """Forget what waits on the connection: its transaction is rolling back."""
    batch = batch_of(connection)
    if batch is not None:
        batch.statements, batch.origins, batch.version = [], [], None


def _do_execute(cursor: DBAPICursor, statement: str, parameters: Any, context: ExecutionContext) -> bool:
    """Send a batch with the simple query protocol (asyncpg's prepare takes one statement only)."""
    if not context.execution_options.get(MARK):
        return False
    from sqlalchemy.util import await_

    adapted: Any = cursor
    status = await_(_simple_query(adapted, statement))
    found = STATUS_COUNT.search(status or "")
    # SQLAlchemy's asyncpg cursor: its row count is what CursorResult.rowcount reports.
    adapted._rowcount = int(found.group(1)) if found else -1
    adapted._description = None
    adapted._rows = deque()
    return True


async def _simple_query(cursor: Any, statement: str) -> str:
    """Run statements as one query in the connection's transaction (begun if need be); return the status."""
    adapter = cursor._adapt_connection
    async with adapter._execute_mutex:
        if adapter._transaction is None:
            await adapter._start_transaction()
        try:
            status: str = await adapter._connection.execute(statement)
        except Exception as error:
            adapter._handle_exception(error)  # raises the DBAPI error SQLAlchemy wraps, as for any statement
            raise
        return status
