"""Trace: what PostgreSQL does while each revision runs, read from its catalog on a scratch database.

The job applies the revisions as ``upgrade`` does (the service's env.py, one transaction per
revision, batching, job.ops helpers, autocommit blocks) and takes *readings* on the migrating
connection: the baseline before a revision's first statement, one after each statement, and one
before its commit. A reading holds, for each table that existed before the revision, its
``relfilenode`` (a new one: the table was rewritten), its count of full scans (shared plus this
backend's pending ``pg_stat_xact`` count, so that a stats flush between two readings changes
nothing), the relation locks the transaction holds (``pg_locks``) and the virtual transaction id.

* A statement the batch defers gets its reading inside the batch (``Batch.probe``): a
  ``set_config`` of the reading, read back before the commit. The round trip stays one.
* A statement sent on its own (``op.get_bind()``, parameters, the helpers, autocommit blocks) is
  read before and after, from SQLAlchemy's execute events.
* Outside the transaction (autocommit) a statement's locks are gone by the next reading, so a
  second connection watches ``pg_locks`` for the migrating backend while it runs
  (job.lockwatch); what it sees belongs to a statement by its virtual transaction id.

Between two readings lies one statement (or none); its scans count *under a lock* when the lock
its transaction holds on the table at the end of it blocks writes: a scan by ``VALIDATE`` before
the same revision's ``SET NOT NULL`` does not count under that later ACCESS EXCLUSIVE.
"""

from __future__ import annotations

import json
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from alembic.runtime.migration import MigrationContext, MigrationStep
    from sqlalchemy.engine import Connection

    from job.lockwatch import Sampler
    from job.plan import Step
    from job.services import Service

MARK = "migrate_job_trace"  # execution option of the tracer's own queries
SETTING = "migrate_job_trace.r"  # session settings that hold the readings taken inside a batch
JOB_TABLES = ("migrate_job_history", "migrate_job_executions")
# Statements that read, or set a session value: not read around (their scans count with the next).
QUERY_WORDS = ("SELECT", "SHOW", "SET", "RESET", "VALUES")

TABLES_SQL = """
SELECT c.oid::bigint, c.oid::regclass::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p', 'm') AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')
  AND c.relpersistence <> 't' AND NOT (c.relname = ANY({skip}))
ORDER BY 1
"""


def reading_sql(oids: list[int]) -> str:
    """Return the query of one reading (JSON text), for the given tables; no parameters."""
    among = f"ANY('{{{','.join(str(o) for o in oids)}}}'::oid[])"
    return (
        "SELECT json_build_object('pid', pg_backend_pid(), 'at', extract(epoch FROM clock_timestamp()), "
        "'vxid', (SELECT virtualtransaction FROM pg_locks WHERE pid = pg_backend_pid() "
        "AND locktype = 'virtualxid' LIMIT 1), "
        "'tables', (SELECT coalesce(json_object_agg(c.oid::text, json_build_array(c.relfilenode, "
        "pg_stat_get_numscans(c.oid) + pg_stat_get_xact_numscans(c.oid))), '{}') "
        f"FROM pg_class c WHERE c.oid = {among}), "
        "'locks', (SELECT coalesce(json_agg(json_build_array(l.relation::bigint, l.mode)), '[]') "
        "FROM pg_locks l WHERE l.pid = pg_backend_pid() AND l.locktype = 'relation' AND l.granted "
        f"AND l.relation = {among}))::text"
    )


def detail_sql(oids: list[int]) -> str:
    """Return the query of each table's columns, constraints and indexes (JSON text), to explain a finding."""
    among = f"ANY('{{{','.join(str(o) for o in oids)}}}'::oid[])"
    return (
        "SELECT coalesce(json_object_agg(c.oid::text, json_build_object("
        "'columns', (SELECT coalesce(json_agg(json_build_array(a.attname, format_type(a.atttypid, "
        "a.atttypmod), a.attnotnull, a.atthasdef) ORDER BY a.attnum), '[]') FROM pg_attribute a "
        "WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped), "
        "'constraints', (SELECT coalesce(json_agg(json_build_array(k.conname, k.contype, k.convalidated) "
        "ORDER BY k.conname), '[]') FROM pg_constraint k WHERE k.conrelid = c.oid), "
        "'indexes', (SELECT coalesce(json_agg(i.indexrelid::regclass::text ORDER BY i.indexrelid), '[]') "
        f"FROM pg_index i WHERE i.indrelid = c.oid))), '{{}}')::text FROM pg_class c WHERE c.oid = {among}"
    )


@dataclass
class Reading:
    """One reading on the migrating connection, after the statement it names (if any)."""

    kind: str  # baseline, probe (in a batch), before, after (a statement sent alone), end
    statement: str | None
    in_tx: bool
    data: dict[str, Any] | None = None
    setting: str | None = None  # where a probe left its reading

    @property
    def at(self) -> float:
        """Return the server's clock at the reading (seconds)."""
        return float(self.data["at"]) if self.data else 0.0

    @property
    def xid(self) -> int:
        """Return the local part of the reading's virtual transaction id (``3/1207`` -> 1207)."""
        vxid = str((self.data or {}).get("vxid") or "0/0")
        return int(vxid.rsplit("/", 1)[-1])

    def table(self, oid: int) -> tuple[int, int] | None:
        """Return (relfilenode, scans) of a table, or None if it is gone."""
        found = (self.data or {}).get("tables", {}).get(str(oid))
        return (int(found[0]), int(found[1])) if found else None


@dataclass
class Observed:
    """One revision's readings, as taken while it ran."""

    step: Step
    path: str | None
    tables: dict[int, str]
    started: float
    readings: list[Reading] = field(default_factory=list)
    before: dict[str, Any] = field(default_factory=dict)  # detail_sql at the baseline
    after: dict[str, Any] = field(default_factory=dict)  # and before the commit
    duration_ms: int = 0


class Tracer:
    """The executor's step observer: takes the readings of each revision it runs."""

    def __init__(self, service: Service, sampler: Sampler | None = None) -> None:
        self.service = service
        self.sampler = sampler
        self.observed: list[Observed] = []
        self.current: Observed | None = None
        self.context: MigrationContext | None = None
        self.running = False  # inside the revision's upgrade(), where statements are read around
        self.busy = False  # taking a reading (its own query must not be read around)
        self.pending: str | None = None  # the statement sent alone that is running now
        self.settings = 0
        self._reading_sql = self._detail_sql = ""

    def attach(self, context: MigrationContext) -> None:
        """Take the end reading in Alembic's on_version_apply hook, after the history row."""
        self.context = context
        _listen()

        def on_version_apply(**_: Any) -> None:
            self._end()

        context.on_version_apply_callbacks = (*context.on_version_apply_callbacks, on_version_apply)

    def wrap(self, shown: Step, step: MigrationStep) -> MigrationStep:
        """Return the step with its upgrade() run between the baseline and the last statement's reading."""
        return _Traced(step, lambda: self._begin(shown), self._stop)  # type: ignore[return-value]

    # --- the readings (on the migration's own connection) -------------------------------------

    def _connection(self) -> Connection:
        assert self.context is not None and self.context.connection is not None
        return self.context.connection

    def _begin(self, shown: Step) -> None:
        """Take the baseline: the tables that exist now (less the job's), then a reading of them."""
        from job import batching

        context = self.context
        assert context is not None
        connection = self._connection()
        skip = [context.version_table, *JOB_TABLES]
        rows = self._query(connection, TABLES_SQL.format(skip=_array(skip))).all()
        tables = {int(r[0]): str(r[1]) for r in rows}
        script = self.service.script.get_revision(shown.revision)
        self.current = Observed(shown, script.path if script else None, tables, time.monotonic())
        watch(connection, self)
        self._reading_sql, self._detail_sql = reading_sql(list(tables)), detail_sql(list(tables))
        self._read(connection, "baseline", None)
        assert self.current.readings[0].data is not None
        if self.sampler is not None:
            self.sampler.pid = int(self.current.readings[0].data["pid"])
        self.current.before = json.loads(self._query(connection, self._detail_sql).scalar_one())
        batch = batching.batch_of(connection)
        if batch is not None:
            batch.probe = self._probe
        self.running = True

    def _stop(self) -> None:
        """upgrade() returned (or raised): nothing more is read around or probed."""
        from job import batching

        self.running = False
        batch = batching.batch_of(self._connection())
        if batch is not None:
            batch.probe = None

    def _probe(self, statement: str) -> str:
        """Return the statement that leaves a reading in a session setting, after a deferred one."""
        assert self.current is not None
        self.settings += 1
        name = f"{SETTING}{self.settings}"
        self.current.readings.append(Reading("probe", statement, True, setting=name))
        return f"SELECT set_config('{name}', ({self._reading_sql}), false)"

    def _end(self) -> None:
        """Before the commit: the last reading, the probes' readings, the tables' detail."""
        current = self.current
        if current is None:
            return
        connection = self._connection()
        self._read(connection, "end", None)
        probes = {r.setting: r for r in current.readings if r.setting}
        if probes:
            names = _array(list(probes))
            found = self._query(connection, f"SELECT n, current_setting(n, true) FROM unnest({names}) n")
            for name, value in found.all():
                probes[name].data = json.loads(value) if value else None
        current.after = json.loads(self._query(connection, self._detail_sql).scalar_one())
        current.duration_ms = int((time.monotonic() - current.started) * 1000)
        self.observed.append(current)
        self.current = None

    def _read(self, connection: Connection, kind: str, statement: str | None) -> None:
        """Take one reading now."""
        assert self.current is not None
        value = self._query(connection, self._reading_sql).scalar_one()
        self.current.readings.append(Reading(kind, statement, not _autocommit(connection), json.loads(value)))

    def _query(self, connection: Connection, sql: str) -> Any:
        """Run one of the tracer's own queries (not read around)."""
        self.busy = True
        try:
            return connection.exec_driver_sql(sql, execution_options={MARK: True})
        finally:
            self.busy = False

    # --- statements sent on their own (SQLAlchemy's execute events) ---------------------------

    def before(self, connection: Connection, clause: Any) -> None:
        """Read before a statement the revision sends on its own; watch it if it runs outside."""
        if not self.running or self.busy or self.current is None:
            return
        text = statement_text(clause, connection)
        if text.lstrip("( \n").upper().startswith(QUERY_WORDS):
            return
        self._read(connection, "before", None)
        self.pending = text
        if self.sampler is not None and _autocommit(connection):
            assert self.current is not None
            self.sampler.gate(list(self.current.tables))
            self.sampler.watch()

    def after(self, connection: Connection) -> None:
        """Read after the statement read before."""
        if self.pending is None or self.busy or self.current is None:
            return
        if self.sampler is not None:
            self.sampler.unwatch()
            self.sampler.ungate()
        text, self.pending = self.pending, None
        self._read(connection, "after", text)


class _Traced:
    """An Alembic step whose upgrade() runs between the tracer's begin and stop."""

    def __init__(self, step: Any, begin: Callable[[], None], stop: Callable[[], None]) -> None:
        self._step, self._begin, self._stop = step, begin, stop

    def __getattr__(self, name: str) -> Any:
        return getattr(self._step, name)

    def __str__(self) -> str:
        return str(self._step)

    @property
    def migration_fn(self) -> Callable[..., None]:
        """Return upgrade() (or downgrade()) wrapped by the tracer."""
        fn = self._step.migration_fn

        def run(**kw: Any) -> None:
            self._begin()
            try:
                fn(**kw)
            finally:
                self._stop()

        return run


# --- SQLAlchemy's execute events, for every connection a tracer watches ------------------------

_watched: weakref.WeakKeyDictionary[Connection, Tracer] = weakref.WeakKeyDictionary()
_listening: list[bool] = []


def watch(connection: Connection, tracer: Tracer) -> None:
    """Read around the statements sent on this connection while the tracer runs a revision."""
    _watched[connection] = tracer


def _listen() -> None:
    """Register the engine-wide execute hooks once."""
    if _listening:
        return
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    event.listen(Engine, "before_execute", _before_execute)
    event.listen(Engine, "after_execute", _after_execute)
    _listening.append(True)


def _before_execute(connection: Connection, clause: Any, multiparams: Any, params: Any, options: Any) -> None:
    from job import batching

    tracer = _watched.get(connection)
    if tracer is not None and not options.get(MARK) and not options.get(batching.MARK):
        tracer.before(connection, clause)


def _after_execute(
    connection: Connection, clause: Any, multiparams: Any, params: Any, options: Any, result: Any
) -> None:
    from job import batching

    tracer = _watched.get(connection)
    if tracer is not None and not options.get(MARK) and not options.get(batching.MARK):
        tracer.after(connection)


def statement_text(clause: Any, connection: Connection) -> str:
    """Return a statement as SQL text (compiled for the connection's dialect), for reports."""
    if isinstance(clause, str):
        return clause
    try:
        return str(clause.compile(dialect=connection.dialect)).strip()
    except Exception:
        return type(clause).__name__


def _autocommit(connection: Connection) -> bool:
    """Return whether the connection runs each statement on its own now (an autocommit block)."""
    return connection.get_execution_options().get("isolation_level") == "AUTOCOMMIT"


def _array(values: list[str]) -> str:
    """Return a text[] literal of plain names (identifiers and setting names; quotes doubled)."""
    return "ARRAY[" + ", ".join("'" + v.replace("'", "''") + "'" for v in values) + "]::text[]"
