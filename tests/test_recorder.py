"""migrate_job_history: what was applied, by whom, with which file; and edited history caught.

An applied migration edited afterwards means the databases of an environment no longer match
what the code says ran there; Flyway and Django stop on that, and so must the job.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from job import db
from job.errors import MigrationFailed
from job.recorder import Identity, Recorder
from job.services import Service
from tests.conftest import Database
from tests.support import FIXTURES, HEADS, PROJECT, SERVICES_DIR, run_job, write_manifest
from tests.test_executor import target_for

INITIAL = "c81a6c877761"


def history(database: Database) -> list[dict[str, object]]:
    """Return the database's migrate_job_history rows, oldest first."""
    return database.pg.fetch(
        "SELECT revision, direction, checksum, execution, image, job_version, recorded_by "
        "FROM migrate_job_history ORDER BY id",
        database=database.name,
    )


def services_copy(tmp_path: Path) -> Path:
    """Return a copy of the shipped services that a test may edit."""
    target = tmp_path / "services"
    shutil.copytree(SERVICES_DIR, target, ignore=shutil.ignore_patterns("__pycache__"))
    return target


def revision_file(services: Path, service: str, revision: str) -> Path:
    """Return the file of a revision."""
    (path,) = (services / service / "migrations" / "versions").glob(f"*_{revision}_*.py")
    return path


def env_for(
    job_env: dict[str, str], tmp_path: Path, databases: list[Database], **extra: str
) -> dict[str, str]:
    """Return the job's environment for these databases."""
    manifest = write_manifest(tmp_path / "env.toml", [d.entry() for d in databases], project=PROJECT)
    return {**job_env, "MIGRATE_MANIFEST": str(manifest), **extra}


def test_each_applied_revision_is_recorded_with_its_checksum_and_execution(
    make_database: Callable[..., Database], tmp_path: Path, job_env: dict[str, str]
) -> None:
    database = make_database("settlement")
    env = env_for(job_env, tmp_path, [database], MIGRATE_IMAGE="europe-docker.example/mj:abc123")
    assert run_job(env=env).code == 0
    rows = history(database)
    assert [(r["revision"], r["direction"]) for r in rows] == [(INITIAL, "up"), (HEADS["settlement"], "up")]
    for row in rows:
        path = revision_file(SERVICES_DIR, "settlement", str(row["revision"]))
        assert row["checksum"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert row["execution"] == "migrate-job-abc12"
        assert row["image"] == "europe-docker.example/mj:abc123"
        assert row["recorded_by"] == database.role
    # A no-op run records nothing; read-only commands never create the table.
    assert run_job(env=env).code == 0
    assert len(history(database)) == 2
    fresh = make_database("compliance")
    assert run_job("plan", env=env_for(job_env, tmp_path, [fresh])).code == 0
    assert fresh.tables() == set()


# migrate_job_history as the job created it before failed attempts were recorded.
OLD_TABLE = """CREATE TABLE migrate_job_history (
    id bigserial PRIMARY KEY, service text NOT NULL, revision text NOT NULL,
    direction text NOT NULL CHECK (direction IN ('up', 'down', 'stamp', 'acknowledge')),
    checksum text, recorded_at timestamptz NOT NULL DEFAULT now(),
    recorded_by text NOT NULL DEFAULT session_user, execution text, task_index integer,
    image text, image_revision text, job_version text)"""


def test_a_failed_revision_leaves_only_its_failed_row_which_never_counts_as_applied(
    make_database: Callable[..., Database], tmp_path: Path, job_env: dict[str, str]
) -> None:
    # The revision's own row rolls back with it; the failed attempt's row is written after, on
    # its own, into a table made before failed rows existed (it gains their columns).
    database = make_database("broken")
    database.pg.execute(f'SET ROLE "{database.role}"; {OLD_TABLE}', database=database.name)
    env = env_for(job_env, tmp_path, [database], MIGRATE_SERVICES_DIR=str(FIXTURES / "services"))
    assert run_job(env=env).code == 7
    assert [(r["revision"], r["direction"]) for r in history(database)] == [
        ("aaaa00000001", "up"),
        ("aaaa00000002", "failed"),
    ]
    (failed,) = database.pg.fetch(
        "SELECT sqlstate, statement FROM migrate_job_history WHERE direction = 'failed'",
        database=database.name,
    )
    assert dict(failed) == {"sqlstate": "42703", "statement": "UPDATE widgets SET no_such_column = 1"}
    # Applied since by other means, the revision's only row is the failed one, whose checksum the
    # file no longer has: it is no record of what ran, so nothing counts as edited.
    database.pg.execute(
        "UPDATE migrate_job_history SET checksum = 'other' WHERE direction = 'failed'; "
        "UPDATE alembic_version SET version_num = 'aaaa00000002'",
        database=database.name,
    )
    plan = run_job("plan", env=env)
    assert plan.code == 0, plan.stdout[-2000:]


def test_an_edited_applied_revision_stops_the_next_run_until_acknowledged(
    make_database: Callable[..., Database], tmp_path: Path, job_env: dict[str, str]
) -> None:
    services = services_copy(tmp_path)
    # Two databases: the first is read through env.py, the second with the one-query preflight.
    databases = [make_database("settlement"), make_database("settlement")]
    env = env_for(job_env, tmp_path, databases, MIGRATE_SERVICES_DIR=str(services))
    assert run_job(env=env).code == 0
    path = revision_file(services, "settlement", INITIAL)
    path.write_text(path.read_text().replace("def upgrade()", "# tweaked after release\ndef upgrade()", 1))

    for command in ((), ("plan",), ("current",)):
        run = run_job(*command, env=env)
        assert run.code == 6, run.stdout[-2000:]
        (error,) = run.events("run.error")
        assert INITIAL in error["message"] and "edited since they ran" in error["message"]
        assert f"migrate-job acknowledge {INITIAL} --service settlement --yes" in error["hint"]
        assert error["edited"] == [INITIAL]

    assert run_job("acknowledge", INITIAL, "--service", "settlement", env=env).code == 2, "needs --yes"
    ack = run_job("acknowledge", INITIAL, "--service", "settlement", "--yes", env=env)
    assert ack.code == 0, ack.stdout[-2000:]
    assert [e["revisions"] for e in ack.events("history.acknowledged")] == [[INITIAL], [INITIAL]]
    assert run_job(env=env).code == 0
    trail = run_job("history", "--applied", "--database", databases[1].name, env=env)
    assert trail.code == 0
    assert [(e["revision"], e["direction"], e["edited"]) for e in trail.events("db.history")] == [
        (INITIAL, "up", True),
        (HEADS["settlement"], "up", False),
        (INITIAL, "acknowledge", False),
    ]


def test_downgrades_and_stamps_are_recorded_and_a_reverted_revision_may_change(
    make_database: Callable[..., Database], tmp_path: Path, job_env: dict[str, str]
) -> None:
    services = services_copy(tmp_path)
    database = make_database("settlement")
    env = env_for(job_env, tmp_path, [database], MIGRATE_SERVICES_DIR=str(services))
    assert run_job(env=env).code == 0
    assert run_job("downgrade", "--to", "-1", "--yes", env=env).code == 0
    # The reverted revision is not applied any more: editing it before re-applying is normal work.
    path = revision_file(services, "settlement", HEADS["settlement"])
    path.write_text(path.read_text() + "\n# reviewed\n")
    assert run_job(env=env).code == 0
    assert run_job("stamp", "base", "--yes", env=env).code == 0
    directions = [(r["revision"], r["direction"]) for r in history(database)]
    assert directions[2:] == [
        (HEADS["settlement"], "down"),
        (HEADS["settlement"], "up"),
        ("base", "stamp"),
    ]


def test_recording_a_failed_attempt_on_a_lost_connection_only_warns(
    make_database: Callable[..., Database], socket_root: Path | None, caplog: pytest.LogCaptureFixture
) -> None:
    # The migration's own error is what the operator must get: writing its row may fail, quietly.
    database = make_database("broken")
    service = Service("broken", FIXTURES / "services" / "broken")

    async def go() -> None:
        engine, connection = await db.connect(
            target_for(database, socket_root), timeout_s=5, application_name="t"
        )
        await connection.close()
        error = MigrationFailed("boom", service="broken", database=database.name, sqlstate="42703")
        await Recorder(service, Identity(), "up").record_failure(connection, "aaaa00000002", error)
        await engine.dispose()

    asyncio.run(go())
    assert [r.json_fields["event"] for r in caplog.records] == ["history.not_recorded"]  # type: ignore[attr-defined]
