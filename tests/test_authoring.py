"""show, merge and reset: the authoring commands the teams ran with alembic and their own scripts.

show and merge stand for ``alembic show`` and ``alembic merge heads``; reset for a team's
``manage_db.py reset`` (development only, with every refusal that makes it safe to have around).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from tests.conftest import Database
from tests.support import FIXTURES, HEADS, SERVICES_DIR, TABLES, run_job, write_manifest


def offline_env(tmp_path: Path, job_env: dict[str, str], services: Path, service: str) -> dict[str, str]:
    """Return a local (not Cloud Run) environment whose manifest names one never-reached database."""
    entry = {"service": service, "database": "d", "host": "127.0.0.1", "user": "u", "password": "p"}
    local = {k: v for k, v in job_env.items() if not k.startswith("CLOUD_RUN_")}
    return {
        **local,
        "MIGRATE_MANIFEST": str(write_manifest(tmp_path / "m.toml", [entry])),
        "MIGRATE_SERVICES_DIR": str(services),
    }


def test_show_reports_a_revision_with_its_sql_and_needs_no_database(
    tmp_path: Path, job_env: dict[str, str]
) -> None:
    """A reviewer sees what one revision is and runs, by id or prefix, with no database at hand."""
    env = offline_env(tmp_path, job_env, SERVICES_DIR, "settlement")
    head = HEADS["settlement"]
    shown = run_job("show", head[:6], env=env)
    assert shown.code == 0, shown.stdout
    (line,) = shown.events("revision.shown")
    assert line["revision"] == head and line["is_head"] and line["down_revision"]
    assert line["path"].startswith("migrations/versions/") and line["path"].endswith(".py")
    assert "alembic_version" in line["sql"] and line["description"]
    assert shown.events("db.connected") == []
    first = run_job("history", env=env).events("service.revision")[-1]["revision"]
    base = run_job("show", first, env=env).events("revision.shown")[0]
    assert base["down_revision"] == [] and "CREATE TABLE" in base["sql"]
    missing = run_job("show", "ffffffffffff", env=env)
    assert missing.code == 2 and "ffffffffffff" in missing.events("run.error")[0]["message"]


def test_merge_joins_two_heads_in_one_revision_and_is_refused_where_it_does_not_apply(
    tmp_path: Path, job_env: dict[str, str], make_database: Callable[..., Database]
) -> None:
    """Two heads stop every run (exit 6); merge writes the revision that joins them, locally only."""
    services = tmp_path / "services"
    shutil.copytree(FIXTURES / "services_badhistory" / "twoheads", services / "twoheads")
    env = offline_env(tmp_path, job_env, services, "twoheads")
    on_cloud_run = run_job("merge", "--service", "twoheads", env={**env, "CLOUD_RUN_JOB": "migrate-job"})
    assert on_cloud_run.code == 2 and "Cloud Run" in on_cloud_run.events("run.error")[0]["message"]

    merged = run_job("merge", "--service", "twoheads", "-m", "join parts branches", env=env)
    assert merged.code == 0, merged.stdout
    (created,) = merged.events("revision.created")
    assert sorted(created["down_revision"]) == ["bbbb00000002", "bbbb00000003"] and created["merge"]
    assert "join parts branches" in Path(created["path"]).read_text()
    heads = run_job("heads", env=env).events("service.heads")[0]["heads"]
    assert heads == [created["revision"]]
    again = run_job("merge", "--service", "twoheads", env=env)
    assert again.code == 2 and "nothing to merge" in again.events("run.error")[0]["message"]

    database = make_database("twoheads")
    real = {**env, "MIGRATE_MANIFEST": str(write_manifest(tmp_path / "db.toml", [database.entry()]))}
    upgraded = run_job(env=real)
    assert upgraded.code == 0, upgraded.stdout
    assert database.version() == [created["revision"]]


def test_reset_drops_recreates_and_upgrades_a_development_database(
    tmp_path: Path, job_env: dict[str, str], make_database: Callable[..., Database]
) -> None:
    """reset gives a clean database at head; without --yes, on Cloud Run, or where downgrades are
    not allowed it is refused before anything is touched."""
    database = make_database("risk-engine")
    database.pg.execute(f'ALTER ROLE "{database.role}" CREATEDB')
    manifest = write_manifest(tmp_path / "dev.toml", [database.entry()], allow_reset=True)
    local = {k: v for k, v in job_env.items() if not k.startswith("CLOUD_RUN_")}
    env = {**local, "MIGRATE_MANIFEST": str(manifest)}
    assert run_job(env=env).code == 0
    database.pg.execute("CREATE TABLE leftover (id int)", database=database.name)

    refused = {
        "no --yes": run_job("reset", env=env),
        "Cloud Run": run_job("reset", "--yes", env=job_env | {"MIGRATE_MANIFEST": str(manifest)}),
        "allow_downgrade = false": run_job(
            "reset",
            "--yes",
            env={
                **env,
                "MIGRATE_MANIFEST": str(
                    write_manifest(
                        tmp_path / "prod.toml", [database.entry()], allow_downgrade=False, allow_reset=True
                    )
                ),
            },
        ),
    }
    for why, run in refused.items():
        assert run.code == 2, (why, run.stdout)
        assert run.events("db.reset") == [], why
    assert "leftover" in database.tables(), "a refused reset touched the database"

    reset = run_job("reset", "--yes", env=env)
    assert reset.code == 0, reset.stdout
    assert [line["database"] for line in reset.events("db.reset")] == [database.name]
    assert "leftover" not in database.tables()
    assert TABLES["risk-engine"] <= database.tables()
    assert database.version() == [HEADS["risk-engine"]]
    assert reset.summary["databases"][0]["applied"], "every revision ran again on the new database"
