"""The executor, in process: env.py runs on the job's connection, one transaction per revision."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from job import db
from job.errors import MigrationFailed
from job.executor import Execution, execute
from job.manifest import DatabaseEntry
from job.services import discover
from tests.conftest import Database
from tests.support import FIXTURES, HEADS, SERVICES_DIR

SERVICES = {**discover(SERVICES_DIR), **discover(FIXTURES / "services")}


def target_for(database: Database, socket_root: Path | None) -> db.Target:
    """Return a connection target for a test database."""
    from pydantic import SecretStr

    entry = DatabaseEntry.model_validate(database.entry())
    url = db.build_url(entry, database.role, SecretStr(database.password), socket_root or Path("/"))
    return db.Target(entry, url)


def run(target: db.Target, *, apply: bool, destination: str = "head") -> Execution:
    """Run one execution on a fresh connection and return it (errors propagate)."""

    async def go() -> Execution:
        engine, connection = await db.connect(target, timeout_s=5, application_name="test")
        try:
            execution = Execution(SERVICES[target.service], target, destination, apply)
            return await execute(connection, execution)
        finally:
            await connection.close()
            await engine.dispose()

    return asyncio.run(go())


def test_read_only_pass_plans_without_writing(
    make_database: Callable[..., Database], socket_root: Path | None
) -> None:
    """A plan pass reads the revision through env.py but creates nothing, not even alembic_version."""
    database = make_database("settlement")
    execution = run(target_for(database, socket_root), apply=False)
    assert execution.plan is not None and len(execution.plan.steps) == 2
    assert execution.applied == [] and database.tables() == set()


def test_apply_pass_commits_each_revision(
    make_database: Callable[..., Database], socket_root: Path | None
) -> None:
    """An apply pass leaves the database at head with every revision recorded as applied."""
    database = make_database("compliance")
    execution = run(target_for(database, socket_root), apply=True)
    assert [s.revision for s in execution.applied] == ["ac845c92cc2a", HEADS["compliance"]]
    assert execution.revision_now == HEADS["compliance"] == database.version()[0]
    again = run(target_for(database, socket_root), apply=True)
    assert again.applied == [] and again.plan is not None and not again.plan.pending


def test_upgrade_to_an_intermediate_revision(
    make_database: Callable[..., Database], socket_root: Path | None
) -> None:
    """upgrade --to stops at the named revision."""
    database = make_database("settlement")
    execution = run(target_for(database, socket_root), apply=True, destination="c81a6c877761")
    assert database.version() == ["c81a6c877761"] and execution.revision_now == "c81a6c877761"
    assert "escrows" not in database.tables()


def test_failure_names_the_revision_and_keeps_earlier_ones(
    make_database: Callable[..., Database], socket_root: Path | None
) -> None:
    """The failing revision rolls back alone; the error says which one and where the database stays."""
    database = make_database("broken")
    with pytest.raises(MigrationFailed) as caught:
        run(target_for(database, socket_root), apply=True)
    error = caught.value
    assert error.revision == "aaaa00000002" and error.context["at_revision"] == "aaaa00000001"
    assert "UndefinedColumn" in error.message or "no_such_column" in error.message
    assert database.version() == ["aaaa00000001"] and "gadgets" not in database.tables()
