"""Batching: a revision's statements, history row and version move reach the server as one query.

These tests exist because batching changes when statements reach the server, not what they do:
order is kept around reads, a failure still rolls the revision back whole, the version move is
still checked, and SQL text that only worked statement by statement (a trailing comment, a
colon, a percent sign) still works.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import event
from sqlalchemy.engine import Engine

from job import db
from job.errors import MigrationFailed
from job.executor import Execution, execute
from job.recorder import Identity, Recorder
from job.services import Service
from tests.conftest import Database
from tests.support import FIXTURES
from tests.test_executor import target_for

REVISIONS = {
    "create_items": """
    op.create_table("items", sa.Column("id", sa.Integer, primary_key=True), sa.Column("name", sa.Text))
    op.create_index("ix_items_name", "items", ["name"])
    op.execute("INSERT INTO items (name) VALUES ('a') -- a trailing comment ends the line")
    op.execute("INSERT INTO items (name) VALUES ('100% sure: yes')")
""",
    "reads_what_it_wrote": """
    op.add_column("items", sa.Column("flag", sa.Boolean))
    seen = op.get_bind().execute(
        sa.text("SELECT count(*) FROM information_schema.columns WHERE column_name = 'flag'")
    ).scalar()
    if seen != 1:
        raise RuntimeError("the column added above is not visible to the read that follows it")
    op.execute(sa.text("INSERT INTO items (name) VALUES (:name)").bindparams(name="bound"))
    op.execute("UPDATE items SET flag = true")
""",
}
# A helper the job cannot see from the file's text opens an autocommit block mid-revision.
HIDDEN_AUTOCOMMIT = """
    op.create_table("jobs", sa.Column("id", sa.Integer, primary_key=True), sa.Column("state", sa.Text))
    block = getattr(op.get_context(), "autocommit" + "_block")
    with block():
        op.execute("CREATE INDEX CONCURRENTLY ix_jobs_state ON jobs (state)")
    op.add_column("jobs", sa.Column("done", sa.Boolean))
"""
SABOTAGE = """
    op.create_table("never", sa.Column("id", sa.Integer, primary_key=True))
    op.get_bind().execute(sa.text("DELETE FROM alembic_version"))
"""


def write_service(root: Path, revisions: dict[str, str]) -> Service:
    """Write an Alembic project with the given revisions (linear, in order); return it as a Service."""
    path = root / "batched"
    source = FIXTURES / "services" / "broken"
    shutil.copytree(source, path, ignore=shutil.ignore_patterns("versions", "__pycache__"))
    versions = path / "migrations" / "versions"
    versions.mkdir()
    previous = None
    for number, (slug, body) in enumerate(revisions.items(), 1):
        revision = f"ba7c{number:08d}"
        (versions / f"{number:04d}_{revision}_{slug}.py").write_text(
            f'"""{slug}"""\n\nimport sqlalchemy as sa\nfrom alembic import op\n\n'
            f"revision = {revision!r}\ndown_revision = {previous!r}\n"
            "branch_labels = None\ndepends_on = None\n\n\n"
            f"def upgrade() -> None:{body}\n\ndef downgrade() -> None:\n    pass\n"
        )
        previous = revision
    return Service("batched", path)


def apply(service: Service, target: db.Target, execution_name: str = "migrate-job-abc12") -> Execution:
    """Apply the service's history as the job does (with its recorder), on one connection."""

    async def go() -> Execution:
        _, connection = await db.connect(target, timeout_s=5, application_name="test")
        try:
            recorder = Recorder(service, Identity(execution=execution_name), "up")
            return await execute(connection, Execution(service, target, "head", True, recorder=recorder))
        finally:
            await connection.close()

    return asyncio.run(go())


@pytest.fixture
def sent() -> Iterator[list[str]]:
    """Collect every statement text sent to a server while the test runs."""
    statements: list[str] = []

    def collect(conn: object, cursor: object, statement: str, *args: object) -> None:
        statements.append(statement)

    event.listen(Engine, "before_cursor_execute", collect)
    yield statements
    event.remove(Engine, "before_cursor_execute", collect)


def entry_database(make_database: Callable[..., Database]) -> Database:
    """Return a fresh database for the test service."""
    return make_database("batched")


def test_a_revision_its_history_row_and_its_version_move_are_one_query(
    make_database: Callable[..., Database], socket_root: Path | None, tmp_path: Path, sent: list[str]
) -> None:
    """The DDL, op.execute, the history row and the version move of a revision travel together."""
    plain = '\n    op.add_column("items", sa.Column("z", sa.Text))\n'
    service = write_service(tmp_path, {"create_items": REVISIONS["create_items"], "plain": plain})
    database = entry_database(make_database)
    apply(service, target_for(database, socket_root))
    (batch,) = [s for s in sent if "CREATE TABLE items" in s]
    (second,) = [s for s in sent if "ADD COLUMN z" in s]
    for part in ("CREATE INDEX ix_items_name", "INSERT INTO items", "migrate_job_history"):
        assert part in batch, part
    # The history table comes with the first revision, and the version move is last (its count is checked).
    history = 'INSERT INTO "public"."migrate_job_history"'
    assert batch.index("CREATE TABLE IF NOT EXISTS") < batch.index(history)
    assert batch.rstrip().splitlines()[-1].startswith("INSERT INTO alembic_version")
    # A batch that opens its revision's transaction needs no savepoint for a failure to go back
    # to; the first revision's follows the version table's creation, so it begins with one.
    assert batch.startswith("SAVEPOINT") and not second.startswith("SAVEPOINT")
    rows = database.pg.fetch("SELECT name FROM items ORDER BY id", database=database.name)
    assert [r["name"] for r in rows] == ["a", "100% sure: yes"]


def test_statements_keep_their_order_around_reads_and_bound_parameters(
    make_database: Callable[..., Database], socket_root: Path | None, tmp_path: Path
) -> None:
    """A read through op.get_bind() sees the DDL issued before it; a bound statement runs in turn."""
    service = write_service(tmp_path, REVISIONS)
    database = entry_database(make_database)
    execution = apply(service, target_for(database, socket_root))
    assert len(execution.applied) == 2
    rows = database.pg.fetch("SELECT name, flag FROM items ORDER BY id", database=database.name)
    assert [(r["name"], r["flag"]) for r in rows] == [("a", True), ("100% sure: yes", True), ("bound", True)]


def test_a_failing_statement_in_a_batch_rolls_the_revision_back(
    make_database: Callable[..., Database], socket_root: Path | None
) -> None:
    """The broken fixture's second revision fails in its batch: nothing of it stays, not its history row."""
    service = Service("broken", FIXTURES / "services" / "broken")
    database = make_database("broken")
    with pytest.raises(MigrationFailed) as caught:
        apply(service, target_for(database, socket_root))
    assert "aaaa00000002" in caught.value.message and "no_such_column" in caught.value.message
    assert database.version() == ["aaaa00000001"] and "gadgets" not in database.tables()
    rows = database.pg.fetch("SELECT revision, direction FROM migrate_job_history", database=database.name)
    # Only the failed attempt's own row, written after the rollback, names the failed revision.
    expected = [("aaaa00000001", "up"), ("aaaa00000002", "failed")]
    assert [(r["revision"], r["direction"]) for r in rows] == expected


def test_a_version_table_changed_under_the_migration_fails_it(
    make_database: Callable[..., Database], socket_root: Path | None, tmp_path: Path
) -> None:
    """Alembic checks that its version move matched one row; batched, the job checks it instead."""
    service = write_service(tmp_path, {"create_items": REVISIONS["create_items"], "sabotage": SABOTAGE})
    database = entry_database(make_database)
    with pytest.raises(MigrationFailed) as caught:
        apply(service, target_for(database, socket_root))
    assert "version table did not move by one row" in caught.value.message
    assert database.version() == ["ba7c00000001"] and "never" not in database.tables()


def test_history_values_are_quoted_whatever_they_hold(
    make_database: Callable[..., Database], socket_root: Path | None, tmp_path: Path
) -> None:
    """The history row goes as SQL literals in the batch: quotes and backslashes arrive intact."""
    service = write_service(tmp_path, {"create_items": REVISIONS["create_items"]})
    database = entry_database(make_database)
    awkward = "ex-'1\\x; DROP TABLE items; --"
    apply(service, target_for(database, socket_root), execution_name=awkward)
    rows = database.pg.fetch("SELECT execution FROM migrate_job_history", database=database.name)
    assert [r["execution"] for r in rows] == [awkward] and "items" in database.tables()


def test_a_commit_the_job_did_not_expect_sends_what_waits_first(
    make_database: Callable[..., Database], socket_root: Path | None, tmp_path: Path
) -> None:
    """An autocommit block opened by code the job cannot see commits what came before it, in order."""
    service = write_service(tmp_path, {"hidden_autocommit": HIDDEN_AUTOCOMMIT})
    database = entry_database(make_database)
    apply(service, target_for(database, socket_root))
    valid = database.pg.fetch(
        "SELECT indisvalid FROM pg_index WHERE indexrelid = 'ix_jobs_state'::regclass", database=database.name
    )
    columns = database.pg.fetch(
        "SELECT column_name FROM information_schema.columns WHERE table_name = 'jobs' ORDER BY 1",
        database=database.name,
    )
    assert [r["indisvalid"] for r in valid] == [True]
    assert [r["column_name"] for r in columns] == ["done", "id", "state"]
    assert database.version() == ["ba7c00000001"]
