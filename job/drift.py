"""Drift: what ``models.py`` describes that the migrations do not build, found by Alembic's autogenerate.

The comparison runs on a database at its service's head (a scratch database upgraded here, or a
real one read without writing): any difference means a model changed without a migration, or a
migration changed the schema without the model.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from job.errors import ConfigError
from job.executor import Execution, execute

if TYPE_CHECKING:
    from alembic.runtime.migration import MigrationContext, MigrationStep
    from sqlalchemy.engine import Connection
    from sqlalchemy.ext.asyncio import AsyncConnection

# Where each autogenerate operation says the object is: only in models.py, or only in the database.
ONLY_IN_MODELS = "is in models.py but no migration creates it"
ONLY_IN_DATABASE = "is in the database (a migration creates it) but not in models.py"


@dataclass(frozen=True)
class Difference:
    """One difference between a service's models and its migrated database."""

    service: str
    kind: str  # Alembic's operation name: add_column, remove_index, modify_type, ...
    table: str | None
    column: str | None
    detail: str  # what differs, for people

    @property
    def description(self) -> str:
        """Return a sentence naming the service, the table and the column."""
        return f"{self.service}: {self.detail}"

    def fields(self) -> dict[str, Any]:
        """Return the difference as log fields."""
        return {
            "service": self.service,
            "kind": self.kind,
            "table": self.table,
            "column": self.column,
            "detail": self.detail,
        }


@dataclass
class MetadataProbe(Execution):
    """A read-only pass of env.py that keeps what env.py configured: its target_metadata."""

    metadata: Any = None

    def __call__(self, heads: tuple[str, ...], context: MigrationContext) -> Iterator[MigrationStep]:
        """Alembic's ``fn``: remember env.py's target_metadata, then plan as usual (nothing applied)."""
        self.metadata = context.opts.get("target_metadata")
        return super().__call__(heads, context)


async def read_models(connection: AsyncConnection, probe: MetadataProbe) -> MetadataProbe:
    """Run env.py read-only on the connection; return the probe with its plan and metadata."""
    await execute(connection, probe)
    if probe.metadata is None:
        service = probe.service.name
        raise ConfigError(
            f"service {service}: its env.py sets no target_metadata, so there are no models to compare",
            hint=f"pass target_metadata=<models.py metadata> to context.configure in services/{service}"
            "/migrations/env.py",
            service=service,
        )
    return probe


async def compare(connection: AsyncConnection, found: MetadataProbe) -> list[Difference]:
    """Return the differences between the probe's metadata and the connected database (read-only)."""
    metadata = found.metadata
    from job.recorder import TABLE

    # The version table and migrate_job_history are the job's bookkeeping, not part of any model.
    bookkeeping = {(found.version_schema, found.version_table), (found.version_schema, TABLE)}

    def run(sync: Connection) -> list[Any]:
        from alembic.autogenerate import compare_metadata
        from alembic.runtime.migration import MigrationContext

        def include_object(obj: Any, name: str | None, type_: str, reflected: bool, other: Any) -> bool:
            return not (type_ == "table" and (getattr(obj, "schema", None), name) in bookkeeping)

        context = MigrationContext.configure(
            connection=sync,
            opts={
                "compare_type": True,
                "compare_server_default": True,
                "include_object": include_object,
                "version_table": found.version_table,
                "version_table_schema": found.version_schema,
                "target_metadata": metadata,
            },
        )
        diffs: list[Any] = []
        for one in metadata if isinstance(metadata, Sequence) else [metadata]:
            diffs.extend(compare_metadata(context, one))
        return diffs

    try:
        raw = await connection.run_sync(run)
    finally:
        await connection.rollback()
    return [describe(found.service.name, op) for op in flatten(raw)]


def flatten(diffs: list[Any]) -> Iterator[tuple[Any, ...]]:
    """Yield each operation: Alembic groups a column's modify_* operations in a list."""
    for item in diffs:
        if isinstance(item, list):
            yield from (tuple(op) for op in item)
        else:
            yield tuple(item)


def describe(service: str, op: tuple[Any, ...]) -> Difference:
    """Return the difference for one autogenerate operation tuple."""
    kind = op[0]
    table: str | None
    if kind in ("add_table", "remove_table"):
        table = _qualified(op[1].schema, op[1].name)
        where = ONLY_IN_MODELS if kind == "add_table" else ONLY_IN_DATABASE
        return Difference(service, kind, table, None, f"table {table} {where}")
    if kind in ("add_column", "remove_column"):
        table, column = _qualified(op[1], op[2]), op[3].name
        where = ONLY_IN_MODELS if kind == "add_column" else ONLY_IN_DATABASE
        return Difference(service, kind, table, column, f"column {table}.{column} {where}")
    if kind.startswith("modify_") and len(op) == 7:
        return _modified(service, op)
    if kind in ("add_index", "remove_index", "add_constraint", "remove_constraint", "add_fk", "remove_fk"):
        obj = op[1]
        table = _qualified(obj.table.schema, obj.table.name) if obj.table is not None else None
        what = {"index": "index", "constraint": "constraint", "fk": "foreign key"}[kind.split("_", 1)[1]]
        columns = ", ".join(c.name for c in getattr(obj, "columns", ()))
        where = ONLY_IN_MODELS if kind.startswith("add_") else ONLY_IN_DATABASE
        name = f"{obj.name} " if obj.name else ""
        return Difference(service, kind, table, None, f"{what} {name}on {table}({columns}) {where}")
    table = _qualified(op[1], op[2]) if len(op) > 2 and isinstance(op[2], str) else None
    return Difference(service, kind, table, None, f"{kind.replace('_', ' ')} differs: {op[1:]!r}")


def _modified(service: str, op: tuple[Any, ...]) -> Difference:
    """Return the difference for a modify_type / modify_nullable / modify_default / modify_comment."""
    kind, schema, name, column, _existing, in_database, in_models = op
    table = _qualified(schema, name)
    what = {
        "modify_type": "type",
        "modify_nullable": "nullable",
        "modify_default": "server default",
        "modify_comment": "comment",
    }.get(kind, kind)
    detail = (
        f"column {table}.{column} has {what} {_shown(in_database)} in the database "
        f"but {_shown(in_models)} in models.py"
    )
    return Difference(service, kind, table, column, detail)


def _shown(value: Any) -> str:
    """Return a type, default or flag as people write it."""
    arg = getattr(value, "arg", None)  # a server default: show its SQL text
    if arg is not None:
        value = getattr(arg, "text", arg)
    return "none" if value is None else str(value)


def _qualified(schema: str | None, name: str) -> str:
    """Return schema.name, or name in the default schema."""
    return f"{schema}.{name}" if schema else name
