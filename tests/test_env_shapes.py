"""Every env.py shape teams ship runs unmodified under the job (DESIGN.md, Services)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from tests.conftest import Database, grant_membership
from tests.support import FIXTURES, IAM_USER, STALE_DATABASE_URL, run_job, write_manifest

SHAPES = FIXTURES / "shapes"
ALL_SHAPES = [
    # Alembic's generic template: builds a sync engine from sqlalchemy.url, calls fileConfig.
    "synctemplate",
    # Alembic's async template: calls asyncio.run itself, which cannot nest in the job's loop.
    "asynctemplate",
    # DATABASE_URL overrides sqlalchemy.url, with % doubled as Alembic documents.
    "dburl",
    # The same override as the teams wrote it (seed 000): the raw URL, % not doubled.
    "seeddburl",
    # The async template with the URL from the app's settings object, read at import (seed 004).
    "appsettings",
]
# Offline rendering reads only the dialect from a URL: a stale one must name a driver that does not
# exist for its use to show.
STALE_OFFLINE_URL = "postgresql+stale://wrong:wrong@127.0.0.1:1/wrong"


def shapes_env(job_env: dict[str, str], tmp_path: Path, entries: list[dict[str, Any]]) -> dict[str, str]:
    """Return the job's environment for a manifest of shape databases, with a stale DATABASE_URL."""
    manifest = write_manifest(tmp_path / "m.toml", entries)
    return {
        **job_env,
        "MIGRATE_MANIFEST": str(manifest),
        "MIGRATE_SERVICES_DIR": str(SHAPES),
        "DATABASE_URL": STALE_DATABASE_URL,
    }


def assert_at_head(database: Database, owner: str) -> None:
    """The shape's revision is applied to this very database, and every table belongs to owner."""
    assert database.version() == ["5a0e00000001"]
    owners = database.owners()
    assert f"shape_{database.service}" in owners
    assert set(owners.values()) == {owner}, owners


@pytest.mark.parametrize("shape", ["synctemplate", "asynctemplate", "dburl"])
def test_shape_upgrades_plans_and_keeps_the_logs_structured(
    shape: str, make_database: Callable[..., Database], tmp_path: Path, job_env: dict[str, str]
) -> None:
    """The shape applies its revision, plans read-only, and its fileConfig never hijacks the logs."""
    database = make_database(shape)
    manifest = write_manifest(tmp_path / "m.toml", [database.entry()])
    env = {**job_env, "MIGRATE_MANIFEST": str(manifest), "MIGRATE_SERVICES_DIR": str(SHAPES)}

    planned = run_job("plan", "--check", env=env)
    assert planned.code == 10, planned.stdout + planned.stderr
    assert database.tables() == set(), "plan stays read-only whoever opens the connection"

    first = run_job(env=env)
    assert first.code == 0, first.stdout + first.stderr
    assert first.stderr == "" and all(line["event"] for line in first.lines)
    assert [e["revision"] for e in first.events("migration.applied")] == ["5a0e00000001"]
    assert database.version() == ["5a0e00000001"] and f"shape_{shape}" in database.tables()

    again = run_job(env=env)
    assert again.code == 0 and again.events("migration.applied") == []


def test_every_shape_takes_the_target_url_whatever_password_and_stale_database_url(
    make_database: Callable[..., Database], tmp_path: Path, job_env: dict[str, str]
) -> None:
    """Each shape reaches its own database with the hard password, never a DATABASE_URL left behind.

    The seed's shape hands set_main_option a raw URL whose quoted password holds %, which plain
    Alembic's ConfigParser refuses; the offline SQL (sql, lint, show) must not read the stale URL either.
    """
    databases = [make_database(shape) for shape in ALL_SHAPES]
    env = shapes_env(job_env, tmp_path, [d.entry() for d in databases])

    rendered = run_job("sql", env={**env, "DATABASE_URL": STALE_OFFLINE_URL})
    assert rendered.code == 0 and rendered.stderr == "", rendered.stdout + rendered.stderr
    sql = {e["service"]: e["sql"] for e in rendered.events("db.sql")}
    assert all(f"CREATE TABLE shape_{shape}" in sql[shape] for shape in ALL_SHAPES), sql
    assert all(d.tables() == set() for d in databases), "sql renders, it changes nothing"

    upgraded = run_job(env=env)
    assert upgraded.code == 0 and upgraded.stderr == "", upgraded.stdout + upgraded.stderr
    for database in databases:
        assert_at_head(database, database.role)


def test_every_shape_logs_in_with_iam_and_creates_as_the_owner_role(
    make_database: Callable[..., Database], tmp_path: Path, iam_env: dict[str, str]
) -> None:
    """Engines env.py builds itself get a fresh token per connection and SET ROLE owner, as the job's do.

    The URL env.py is handed has no password at all: only the job's connect hook can log it in.
    """
    databases = [make_database(shape) for shape in ALL_SHAPES]
    for database in databases:
        grant_membership(database.pg, database.role)
    env = shapes_env(iam_env, tmp_path, [d.iam_entry() for d in databases])

    upgraded = run_job(env=env)
    assert upgraded.code == 0 and upgraded.stderr == "", upgraded.stdout + upgraded.stderr
    for database in databases:
        assert_at_head(database, database.role)
    login = f"postgresql+asyncpg://{quote(IAM_USER, safe='')}@/"  # a user and no password at all
    assert all(e["url"].startswith(login) for e in upgraded.events("db.connected")), login


def test_a_settings_object_that_kept_the_first_url_stops_before_the_wrong_database(
    make_database: Callable[..., Database], tmp_path: Path, job_env: dict[str, str]
) -> None:
    """Seed 004's settings read DATABASE_URL once per process: a second database would get the first's URL.

    The job refuses that connection (exit 7) instead of reporting the second database as migrated.
    """
    first, second = make_database("appsettings"), make_database("appsettings")
    env = shapes_env(job_env, tmp_path, [first.entry(), second.entry()])

    result = run_job(env=env)
    assert result.code == 7, result.stdout + result.stderr
    error = result.events("run.error")[0]
    assert f"connected to database {first.name}" in error["message"]
    assert f"migrating {second.name}" in error["message"] and "import" in error["hint"]
    assert first.version() == ["5a0e00000001"]
    assert second.version() == [] and "shape_appsettings" not in second.tables()
