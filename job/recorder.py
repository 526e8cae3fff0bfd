"""The job's own records: ``migrate_job_history``, one row per applied, reverted, stamped or failed revision.

This module is the only one that writes the table. Each row is written by Alembic's
``on_version_apply`` hook, inside the revision's own transaction, right after the version table
moved: the record and the migration commit together or not at all. A row keeps the revision
file's checksum, so a later run can tell that an applied revision was edited afterwards (its
file no longer matches what ran), and who applied it: execution, task, image, job version.

A revision that fails gets a row too (direction ``failed``, with its SQLSTATE and the failing
statement's first line), written after its rollback in a transaction of its own; a failed row
never counts as applied. Tables made before failed rows existed gain their columns then.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from job.errors import HistoryError

if TYPE_CHECKING:
    from alembic.runtime.migration import MigrationContext, MigrationInfo
    from sqlalchemy.engine import Connection
    from sqlalchemy.ext.asyncio import AsyncConnection

    from job.errors import MigrationFailed
    from job.services import Service

TABLE = "migrate_job_history"
COLUMNS = (
    "service",
    "revision",
    "direction",
    "checksum",
    "execution",
    "task_index",
    "image",
    "image_revision",
    "job_version",
)
# Recorded as applied (or its edit acknowledged): the checksum to compare with the file.
COUNTS = ("up", "acknowledge")
DIRECTIONS = ("up", "down", "stamp", "acknowledge", "failed")
# Only failed rows fill these; tables made before them get them when a revision first fails.
FAILURE_COLUMNS = ("sqlstate", "statement")
# How long writing a failed attempt's row may take (the connection may be gone).
FAILURE_WRITE_S = 10.0

Fetch = Callable[..., Awaitable[Sequence[Any]]]


def table_name(schema: str | None) -> str:
    """Return the history table's qualified name, in the version table's schema (default: public)."""
    from job.db import DEFAULT_SCHEMA, quote_ident

    return f"{quote_ident(schema or DEFAULT_SCHEMA)}.{quote_ident(TABLE)}"


def create_sql(schema: str | None) -> str:
    """Return the CREATE TABLE IF NOT EXISTS of the history table."""
    return f"""CREATE TABLE IF NOT EXISTS {table_name(schema)} (
    id bigserial PRIMARY KEY,
    service text NOT NULL,
    revision text NOT NULL,
    direction text NOT NULL CHECK (direction IN ({_directions()})),
    checksum text,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    recorded_by text NOT NULL DEFAULT session_user,
    execution text,
    task_index integer,
    image text,
    image_revision text,
    job_version text,
    sqlstate text,
    statement text
)"""


def _directions() -> str:
    """Return the directions a row may have, as an SQL list."""
    return ", ".join(f"'{d}'" for d in DIRECTIONS)


def upgrade_sql(schema: str | None) -> str:
    """Return the ALTER TABLE that lets a table made before failed rows existed take them."""
    return (
        f"ALTER TABLE {table_name(schema)} ADD COLUMN IF NOT EXISTS sqlstate text, "
        "ADD COLUMN IF NOT EXISTS statement text, "
        f"DROP CONSTRAINT IF EXISTS {TABLE}_direction_check, "
        f"ADD CONSTRAINT {TABLE}_direction_check CHECK (direction IN ({_directions()}))"
    )


def insert_sql(schema: str | None, placeholders: Sequence[str], columns: Sequence[str] = COLUMNS) -> str:
    """Return the INSERT of one history row, with the given placeholder for each of columns.

    recorded_by is the login (session_user), not the owner role a manifest entry may SET ROLE to.
    """
    names, values = ", ".join(columns), ", ".join(placeholders)
    return f"INSERT INTO {table_name(schema)} ({names}, recorded_by) VALUES ({values}, session_user)"


def literal_insert(schema: str | None, values: dict[str, Any]) -> str:
    """Return the INSERT of one history row with its values as SQL literals (for a batch)."""
    return insert_sql(schema, [_literal(v) for v in values.values()])


def _literal(value: str | int | None) -> str:
    """Return a value as a PostgreSQL literal, right whatever standard_conforming_strings says."""
    if value is None:
        return "NULL"
    if isinstance(value, int):
        return str(value)
    text = value.replace("'", "''")
    # E'' reads backslashes as escapes under either setting; without one, a plain literal is the same.
    return "E'" + text.replace("\\", "\\\\") + "'" if "\\" in text else "'" + text + "'"


def row(service: str, revision: str, direction: str, digest: str | None, who: Identity) -> dict[str, Any]:
    """Return one history row's values by column, in COLUMNS order."""
    values = (
        *(service, revision, direction, digest),
        *(who.execution, who.task_index, who.image, who.image_revision, who.job_version),
    )
    return dict(zip(COLUMNS, values, strict=True))


def file_checksum(service: Service, revision: str) -> str | None:
    """Return the checksum of a revision's file in the image (None for no such revision)."""
    if service.index is not None and revision in service.index.files:
        return checksum(service.index.files[revision])
    try:
        script = service.script.get_revision(revision)
    except Exception:
        return None  # an unknown or malformed id: there is no file to compare
    return checksum(script.path if script else None)


def checksum(path: str | Path | None) -> str | None:
    """Return the sha256 of a revision file (line endings normalised), or None without a file."""
    from job.services import revision_file

    data = revision_file(path) if path is not None else None
    if data is None:
        return None
    # Every database of a fleet compares the same files: each version of a file is hashed once.
    if data not in _digests:
        _digests[data] = hashlib.sha256(data.replace(b"\r\n", b"\n")).hexdigest()
    return _digests[data]


_digests: dict[bytes, str] = {}


@dataclass(frozen=True)
class Identity:
    """Who records: the Cloud Run execution and task, the image, the job's version."""

    execution: str | None = None
    task_index: int | None = None
    image: str | None = None
    image_revision: str | None = None
    job_version: str | None = None


class Recorder:
    """Writes one history row per step that Alembic applies, in the step's transaction."""

    def __init__(self, service: Service, identity: Identity, direction: str) -> None:
        self.service = service
        self.identity = identity
        self.direction = direction
        # A statement that fails unless the migration lock is still held (job.lock.guard_sql), and
        # the server process that holds it: a migration on that very session needs no guard.
        self.guard: str | None = None
        self.holder_pid: int | None = None
        self.schema: str | None = None

    async def record_failure(
        self, connection: AsyncConnection, revision: str, error: MigrationFailed
    ) -> None:
        """Record a failed attempt (after its rollback) in its own transaction; on any trouble, only warn.

        Never raises: the migration's own error is what the operator must get, even when the
        connection is gone.
        """
        import asyncio
        import contextlib
        import logging

        from job import logs

        try:
            await asyncio.wait_for(self._write_failure(connection, revision, error), FAILURE_WRITE_S)
        except Exception as exc:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.rollback(), FAILURE_WRITE_S)
            logs.event(
                "history.not_recorded",
                f"could not record the failed attempt of {revision} in {TABLE} ({type(exc).__name__})",
                level=logging.WARNING,
                revision=revision,
                service=self.service.name,
                database=error.database,
            )

    async def _write_failure(
        self, connection: AsyncConnection, revision: str, error: MigrationFailed
    ) -> None:
        """Insert the failed row (creating or widening the table first if need be), then commit."""
        from sqlalchemy import text

        schema, table = self.schema, table_name(self.schema)
        await connection.execute(text(create_sql(schema)))
        found = await connection.execute(
            text("SELECT count(*) FROM pg_attribute WHERE attrelid = to_regclass(:t) AND attname = :c"),
            {"t": table, "c": FAILURE_COLUMNS[0]},
        )
        if not found.scalar():
            await connection.execute(text(upgrade_sql(schema)))
        digest = file_checksum(self.service, revision)
        values = {
            **row(self.service.name, revision, "failed", digest, self.identity),
            "sqlstate": error.context.get("sqlstate"),
            "statement": error.statement_line,
        }
        columns = [*COLUMNS, *FAILURE_COLUMNS]
        await connection.execute(text(insert_sql(schema, [":" + c for c in columns], columns)), values)
        await connection.commit()

    def attach(self, context: MigrationContext, *, create_table: bool = False) -> None:
        """Register with the migration context (its on_version_apply hook).

        With create_table (the preflight did not see the table), the first step creates it in its
        own transaction: no separate round trip, and no table without the row it was made for.
        """
        missing = [create_table]
        self.schema = context.version_table_schema

        def on_version_apply(*, ctx: MigrationContext, step: MigrationInfo, **_: Any) -> None:
            """Record the step; create the table first if it may be missing."""
            self._on_version_apply(ctx=ctx, step=step, create_table=missing[0])
            missing[0] = False

        context.on_version_apply_callbacks = (*context.on_version_apply_callbacks, on_version_apply)

    def _on_version_apply(self, *, ctx: MigrationContext, step: MigrationInfo, create_table: bool) -> None:
        """Insert the step's row on the migration's own connection, before its commit."""
        connection = ctx.connection
        assert connection is not None
        schema = ctx.version_table_schema
        direction = "stamp" if step.is_stamp else ("up" if step.is_upgrade else "down")
        if step.is_stamp:
            # A stamp records where the version table now points ("base" for none).
            revision = "+".join(step.destination_revision_ids) or "base"
        else:
            revision = step.up_revision_id or ""
        single = revision not in ("", "base") and "+" not in revision
        digest = file_checksum(self.service, revision) if single else None
        from sqlalchemy import text

        from job import batching

        values = row(self.service.name, revision, direction, digest, self.identity)
        create = [create_sql(schema)] if create_table else []
        if self.guard and not same_session(connection, self.holder_pid):
            # env.py migrates on a connection of its own: the lock's session may have ended.
            create.append(self.guard)
        batch = batching.batch_of(connection)
        if batch is not None and batch.open:
            # Sent with the revision's statements and its version move: one round trip in all.
            batch.flush(connection, trailing=[*create, literal_insert(schema, values)])
            return
        # Bound parameters through SQLAlchemy, whatever driver the service's env.py connected with.
        for statement in create:
            connection.execute(text(statement))
        connection.execute(text(insert_sql(schema, [":" + c for c in COLUMNS])), values)


def same_session(connection: Connection, pid: int | None) -> bool:
    """Return whether the connection is the server session pid (the lock's): False if unknown.

    On the lock's own session the lock cannot be lost while the revision runs (the session
    ending rolls the revision back), so the guard statement (a plpgsql block, some 2 ms on a
    fresh session) is left out.
    """
    if pid is None:
        return False
    try:
        driver = connection.connection.driver_connection
    except Exception:
        return False
    for read in ("get_server_pid", "get_backend_pid"):  # asyncpg, psycopg2
        if callable(getattr(driver, read, None)):
            return bool(getattr(driver, read)() == pid)
    info = getattr(driver, "info", None)  # psycopg 3
    return getattr(info, "backend_pid", None) == pid


@dataclass(frozen=True)
class Record:
    """The latest history row of one revision."""

    revision: str
    direction: str
    checksum: str | None
    recorded_at: datetime | None
    execution: str | None


@dataclass(frozen=True)
class Edit:
    """An applied revision whose file changed since it ran."""

    revision: str
    recorded: str
    now: str | None
    recorded_at: datetime | None
    execution: str | None

    def describe(self) -> str:
        """Return one line for the error message."""
        when = self.recorded_at.isoformat(timespec="seconds") if self.recorded_at else "an earlier run"
        by = f" by {self.execution}" if self.execution else ""
        now = f"{self.now[:12]}" if self.now else "(file gone)"
        return f"{self.revision} (applied {when}{by}; checksum then {self.recorded[:12]}, now {now})"


async def latest(fetch: Fetch, service: str, schema: str | None) -> dict[str, Record]:
    """Return each revision's latest history row for a service (the table must exist)."""
    rows = await fetch(
        f"SELECT DISTINCT ON (revision) revision, direction, checksum, recorded_at, execution "
        f"FROM {table_name(schema)} WHERE service = $1 AND direction <> 'failed' ORDER BY revision, id DESC",
        service,
    )
    return {r[0]: Record(r[0], r[1], r[2], r[3], r[4]) for r in rows}


def edits(service: Service, records: dict[str, Record], applied: set[str]) -> list[Edit]:
    """Return the applied revisions whose file no longer has the checksum recorded for it."""
    found = []
    for revision in sorted(applied):
        record = records.get(revision)
        if record is None or record.direction not in COUNTS or record.checksum is None:
            continue
        now = file_checksum(service, revision)
        if now != record.checksum:
            found.append(Edit(revision, record.checksum, now, record.recorded_at, record.execution))
    return found


def applied_revisions(service: Service, heads: tuple[str, ...]) -> set[str]:
    """Return every revision at or below the heads (what the database has applied)."""
    found: set[str] = set()
    index = service.index
    if index is not None and all(h in index.parents for h in heads):
        for head in heads:
            found |= index.ancestry(head)
        return found
    for head in heads:
        try:
            found.update(s.revision for s in service.script.revision_map.iterate_revisions(head, "base"))
        except Exception:
            continue  # an unknown revision is reported by the plan, with its own hint
    return found


def edited_error(service: Service, label: str, found: list[Edit], **where: Any) -> HistoryError:
    """Return exit 6 for applied revisions that were edited after they ran."""
    revisions = " ".join(e.revision for e in found)
    return HistoryError(
        f"{label}: applied revision(s) edited since they ran: " + "; ".join(e.describe() for e in found),
        hint=(
            "restore the file(s) as they were applied and ship the change as a new revision; if the "
            "edit changes nothing in the database (a comment, a typo), record that with "
            f"migrate-job acknowledge {revisions} --service {service.name} --yes"
        ),
        service=service.name,
        revision=found[0].revision,
        edited=[e.revision for e in found],
        **where,
    )


async def check(
    fetch: Fetch, service: Service, schema: str | None, heads: tuple[str, ...], label: str, **where: Any
) -> None:
    """Raise HistoryError if an applied revision of the database was edited since it ran."""
    records = await latest(fetch, service.name, schema)
    found = edits(service, records, applied_revisions(service, heads))
    if found:
        raise edited_error(service, label, found, **where)


async def acknowledge(
    fetch: Fetch, service: Service, schema: str | None, revisions: Sequence[str], identity: Identity
) -> list[str]:
    """Record the current checksum of edited revisions as acknowledged; return those recorded."""
    records = await latest(fetch, service.name, schema)
    done = []
    for revision in revisions:
        record = records.get(revision)
        now = file_checksum(service, revision)
        if record is None or record.checksum == now:
            continue
        values = row(service.name, revision, "acknowledge", now, identity)
        await fetch(insert_sql(schema, [f"${i}" for i in range(1, len(COLUMNS) + 1)]), *values.values())
        done.append(revision)
    return done


async def rows(fetch: Fetch, service: str, schema: str | None) -> list[dict[str, Any]]:
    """Return a service's whole history in a database, oldest first (the audit trail)."""
    # A table made before failed rows existed lacks their columns: read them through to_jsonb.
    found = await fetch(
        f"SELECT id, revision, direction, checksum, recorded_at, recorded_by, execution, task_index, image, "
        f"image_revision, job_version, to_jsonb(h) ->> 'sqlstate', to_jsonb(h) ->> 'statement' "
        f"FROM {table_name(schema)} h WHERE service = $1 ORDER BY id",
        service,
    )
    keys = [
        "id",
        "revision",
        "direction",
        "checksum",
        "recorded_at",
        "recorded_by",
        "execution",
        "task_index",
        "image",
        "image_revision",
        "job_version",
        *FAILURE_COLUMNS,
    ]
    return [dict(zip(keys, r, strict=True)) for r in found]
