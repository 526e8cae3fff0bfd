"""check: models.py against the schema its migrations build, on a scratch database or a real one read-only."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from devtools.pgserver import PgServer
from job.drift import Difference, describe
from tests.conftest import Database
from tests.support import HEADS, SERVICES_DIR, run_job, scratch_url, write_manifest


def test_a_model_column_without_a_migration_is_drift_naming_the_column(
    pg: PgServer, tmp_path: Path, job_env: dict[str, str]
) -> None:
    """A column added to models.py and no migration: exit 8, and the line names table and column."""
    services = tmp_path / "services"
    shutil.copytree(SERVICES_DIR / "settlement", services / "settlement")
    models = services / "settlement" / "models.py"
    marker = "    chain_id: Mapped[int]"
    text = models.read_text(encoding="utf-8")
    assert marker in text
    models.write_text(
        text.replace(marker, "    note: Mapped[str | None] = mapped_column(String(200))\n" + marker, 1),
        encoding="utf-8",
    )
    manifest = write_manifest(
        tmp_path / "m.toml",
        [
            {
                "service": "settlement",
                "database": "settlement",
                "host": "127.0.0.1",
                "user": "u",
                "password": "p",
            }
        ],
    )
    env = {
        **job_env,
        "MIGRATE_MANIFEST": str(manifest),
        "MIGRATE_SERVICES_DIR": str(services),
        "SCRATCH_URL": scratch_url(pg),
    }
    run = run_job("check", "--scratch", "env://SCRATCH_URL", env=env)
    assert run.code == 8, run.stdout
    (drift,) = run.events("check.drift")
    assert (drift["kind"], drift["table"], drift["column"]) == ("add_column", "escrows", "note")
    assert drift["message"] == "settlement: column escrows.note is in models.py but no migration creates it"
    error = run.events("run.error")[0]
    assert error["error"] == "drift" and "escrows.note" in error["message"] and "revision" in error["hint"]
    assert run.summary["databases"][0]["status"] == "drift"
    assert pg.fetch("SELECT datname FROM pg_database WHERE datname LIKE 'mj_check_%'") == []


def test_without_scratch_real_databases_are_compared_read_only_and_only_at_head(
    make_database: Callable[..., Database], tmp_path: Path, job_env: dict[str, str]
) -> None:
    """At head: compared (clean); behind: not compared, exit 10; nothing is ever written."""
    at_head, behind = make_database("risk-engine"), make_database("settlement")
    manifest = write_manifest(tmp_path / "m.toml", [at_head.entry(), behind.entry()])
    env = {**job_env, "MIGRATE_MANIFEST": str(manifest)}
    assert run_job("upgrade", "--service", "risk-engine", env=env).code == 0

    run = run_job("check", env=env)
    assert run.code == 10, run.stdout
    assert [e["database"] for e in run.events("check.clean")] == [at_head.name]
    (late,) = run.events("check.behind")
    assert late["database"] == behind.name and late["head"] == HEADS["settlement"]
    assert "check --scratch" in run.events("run.error")[0]["hint"]
    assert behind.tables() == set(), "check only reads: not even alembic_version is created"
    statuses = {d["database"]: d["status"] for d in run.summary["databases"]}
    assert statuses == {at_head.name: "clean", behind.name: "behind"}


def test_each_kind_of_difference_reads_as_a_sentence() -> None:
    """Autogenerate's operations become one sentence each, naming table and column."""
    import sqlalchemy as sa

    metadata = sa.MetaData()
    table = sa.Table("escrows", metadata, sa.Column("note", sa.String(20)), sa.Index("ix_note", "note"))
    removed = describe("s", ("remove_column", None, "escrows", table.c.note))
    assert removed == Difference(
        "s",
        "remove_column",
        "escrows",
        "note",
        "column escrows.note is in the database (a migration creates it) but not in models.py",
    )
    typed = describe("s", ("modify_type", None, "escrows", "note", {}, sa.String(10), sa.String(20)))
    assert (
        typed.detail
        == "column escrows.note has type VARCHAR(10) in the database but VARCHAR(20) in models.py"
    )
    index = describe("s", ("add_index", next(iter(table.indexes))))
    assert index.detail == "index ix_note on escrows(note) is in models.py but no migration creates it"
    assert describe("s", ("add_table", table)).description == (
        "s: table escrows is in models.py but no migration creates it"
    )
