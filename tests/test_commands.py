"""Read-only operator commands (current, heads, history) as processes, with their JSON shapes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Database
from tests.support import HEADS, run_job, run_script, write_manifest


def test_current_reports_revision_and_head_without_writing(
    make_database: Callable[..., Database], tmp_path: Path, job_env: dict[str, str]
) -> None:
    """`current` answers "is my database at head?" for every database, and changes nothing."""
    fresh, done = make_database("settlement"), make_database("risk-engine")
    env = {
        **job_env,
        "MIGRATE_MANIFEST": str(write_manifest(tmp_path / "m.toml", [fresh.entry(), done.entry()])),
    }
    assert run_job("--database", done.name, env=env).code == 0
    run = run_job("current", env=env)
    assert run.code == 0, run.stdout
    lines = {line["database"]: line for line in run.events("db.current")}
    assert "revision" not in lines[fresh.name] and lines[fresh.name]["at_head"] is False
    assert lines[fresh.name]["head"] == HEADS["settlement"]
    assert lines[done.name] | {"revision": HEADS["risk-engine"], "at_head": True} == lines[done.name]
    assert run.events("db.plan") == [], "current says one line per database"
    assert {d["database"]: d["status"] for d in run.summary["databases"]} == {
        fresh.name: "pending",
        done.name: "current",
    }
    assert fresh.tables() == set()


def test_heads_and_history_need_no_database(tmp_path: Path, job_env: dict[str, str]) -> None:
    """heads and history read only the scripts: they work even when no database is reachable."""
    manifest = write_manifest(
        tmp_path / "m.toml",
        [
            {
                "service": s,
                "database": s.replace("-", "_"),
                "host": "127.0.0.1",
                "port": 1,
                "user": "u",
                "password": "p",
            }
            for s in HEADS
        ],
    )
    env = {**job_env, "MIGRATE_MANIFEST": str(manifest)}
    heads = run_job("heads", env=env)
    assert heads.code == 0
    assert {line["service"]: line["heads"] for line in heads.events("service.heads")} == {
        s: [h] for s, h in HEADS.items()
    }
    history = run_job("history", "--verbose", "--service", "settlement", env=env)
    assert history.code == 0
    revisions = history.events("service.revision")
    assert [r["revision"] for r in revisions] == [HEADS["settlement"], "c81a6c877761"], "newest first"
    assert revisions[0]["is_head"] and revisions[0]["down_revision"] == ["c81a6c877761"]
    assert revisions[1]["down_revision"] == [] and revisions[1]["description"] == "initial migration"
    assert revisions[0]["path"].startswith("migrations/versions/")


def test_downgrade_needs_yes_and_is_refused_where_the_manifest_forbids_it(
    make_database: Callable[..., Database], tmp_path: Path, job_env: dict[str, str]
) -> None:
    """A downgrade drops data: it needs --yes, and prod's allow_downgrade = false refuses it outright."""
    database = make_database("settlement")
    allowed = {**job_env, "MIGRATE_MANIFEST": str(write_manifest(tmp_path / "a.toml", [database.entry()]))}
    forbidden = {
        **job_env,
        "MIGRATE_MANIFEST": str(
            write_manifest(tmp_path / "p.toml", [database.entry()], allow_downgrade=False)
        ),
    }
    assert run_job(env=allowed).code == 0
    unconfirmed = run_job("downgrade", "--to", "-1", env=allowed)
    assert unconfirmed.code == 2 and "--yes" in unconfirmed.events("run.error")[0]["hint"]
    refused = run_job("downgrade", "--to", "base", "--yes", env=forbidden)
    assert refused.code == 2 and "allow_downgrade" in refused.events("run.error")[0]["message"]
    assert database.version() == [HEADS["settlement"]], "nothing was undone"


def test_allow_downgrade_on_one_entry_guards_only_its_databases(
    make_database: Callable[..., Database], tmp_path: Path, job_env: dict[str, str]
) -> None:
    """An entry's allow_downgrade = false (DESIGN.md: top level or per entry) refuses its databases only.

    A run that selects it is refused before anything changes; the other entry still downgrades.
    """
    guarded, free = make_database("settlement"), make_database("settlement")
    entries = [{**guarded.entry(), "allow_downgrade": False}, free.entry()]
    env = {**job_env, "MIGRATE_MANIFEST": str(write_manifest(tmp_path / "m.toml", entries))}
    assert run_job(env=env).code == 0
    refused = run_job("downgrade", "--to", "base", "--yes", env=env)
    assert refused.code == 2, refused.stdout
    assert guarded.name in refused.events("run.error")[0]["message"]
    assert guarded.version() == free.version() == [HEADS["settlement"]], "nothing was undone anywhere"
    allowed = run_job("downgrade", "--to", "base", "--yes", "--database", free.name, env=env)
    assert allowed.code == 0, allowed.stdout
    assert free.version() == [] and guarded.version() == [HEADS["settlement"]]


def test_downgrade_then_upgrade_by_steps(
    make_database: Callable[..., Database], tmp_path: Path, job_env: dict[str, str]
) -> None:
    """downgrade --to -1 / base really undo, and upgrade --to +1 moves one revision at a time."""
    database = make_database("settlement")
    env = {**job_env, "MIGRATE_MANIFEST": str(write_manifest(tmp_path / "m.toml", [database.entry()]))}
    assert run_job(env=env).code == 0
    one = run_job("downgrade", "--to", "-1", "--yes", env=env)
    assert one.code == 0, one.stdout
    assert database.version() == ["c81a6c877761"] and "escrows" not in database.tables()
    assert (
        one.by_database()[database.name] | {"status": "reverted", "to_revision": "c81a6c877761"}
        == (one.by_database()[database.name])
    )
    assert run_job("downgrade", "--to", "base", "--yes", env=env).code == 0
    assert database.version() == [] and database.tables() <= {"alembic_version", "migrate_job_history"}
    step = run_job("upgrade", "--to", "+1", env=env)
    assert step.code == 0 and database.version() == ["c81a6c877761"]


def test_stamp_records_a_revision_without_running_it(
    make_database: Callable[..., Database], tmp_path: Path, job_env: dict[str, str]
) -> None:
    """stamp (after a restore or a manual fix) writes alembic_version only, and needs --yes."""
    database = make_database("risk-engine")
    env = {**job_env, "MIGRATE_MANIFEST": str(write_manifest(tmp_path / "m.toml", [database.entry()]))}
    assert run_job("stamp", "head", env=env).code == 2
    stamped = run_job("stamp", "head", "--yes", env=env)
    assert stamped.code == 0, stamped.stdout
    assert database.version() == [HEADS["risk-engine"]]
    assert database.tables() == {"alembic_version", "migrate_job_history"}, "no migration ran"
    assert stamped.by_database()[database.name]["status"] == "stamped"


# The job's own migrate_job_history is left out: a hand-applied script does not write it.
CATALOG = """
SELECT * FROM (
SELECT table_name::text AS t, column_name::text, data_type::text, is_nullable::text, column_default::text,
       character_maximum_length::int
FROM information_schema.columns WHERE table_schema = 'public'
UNION ALL
SELECT tablename, indexname, indexdef, '', '', NULL FROM pg_indexes WHERE schemaname = 'public'
UNION ALL
SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid), '', '', NULL
FROM pg_constraint WHERE connamespace = 'public'::regnamespace
) catalog WHERE t <> 'migrate_job_history'
ORDER BY 1, 2, 3
"""


@pytest.mark.long
def test_offline_sql_builds_the_same_schema_as_upgrade(
    make_database: Callable[..., Database], tmp_path: Path, job_env: dict[str, str]
) -> None:
    """What a DBA reviews (`sql`) is what upgrade does: applied by hand it gives the same catalog."""
    for service in HEADS:
        by_job, by_hand = make_database(service), make_database(service)
        env = {
            **job_env,
            "MIGRATE_MANIFEST": str(write_manifest(tmp_path / f"{service}.toml", [by_job.entry()])),
        }
        assert run_job(env=env).code == 0
        rendered = run_job("sql", "--from", "base", "--output", str(tmp_path / service), env=env)
        assert rendered.code == 0, rendered.stdout
        assert rendered.events("migration.applied") == [], "rendering applies nothing"
        (path,) = (tmp_path / service).glob("*.sql")
        run_script(by_hand.pg.admin_dsn(by_hand.name), path.read_text())
        assert by_hand.version() == by_job.version() == [HEADS[service]]
        assert by_hand.pg.fetch(CATALOG, database=by_hand.name) == by_job.pg.fetch(
            CATALOG, database=by_job.name
        )


def test_sql_without_from_starts_at_the_database_revision(
    make_database: Callable[..., Database], tmp_path: Path, job_env: dict[str, str]
) -> None:
    """Without --from, sql reads each database's revision and renders only what is pending."""
    database = make_database("settlement")
    env = {**job_env, "MIGRATE_MANIFEST": str(write_manifest(tmp_path / "m.toml", [database.entry()]))}
    assert run_job("upgrade", "--to", "c81a6c877761", env=env).code == 0
    rendered = run_job("sql", env=env)
    assert rendered.code == 0
    (line,) = rendered.events("db.sql")
    assert line["from_revision"] == "c81a6c877761" and line["to_revision"] == HEADS["settlement"]
    assert "CREATE TABLE escrows" in line["sql"] and "settlement_commands" not in line["sql"]
    assert database.version() == ["c81a6c877761"], "sql never writes"
