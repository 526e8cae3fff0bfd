"""Alembic projects as people have them: branches and merges, custom version tables, shared databases."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tests.conftest import Database
from tests.support import FIXTURES, run_job, scratch_url, write_manifest

COMPAT = str(FIXTURES / "compat")


def env_for(job_env: dict[str, str], tmp_path: Path, entries: list[dict]) -> dict[str, str]:
    """Return the job's environment for a manifest of compatibility fixtures."""
    manifest = write_manifest(tmp_path / "m.toml", entries)
    return {**job_env, "MIGRATE_MANIFEST": str(manifest), "MIGRATE_SERVICES_DIR": COMPAT}


def test_branched_history_with_a_merge_applies_every_branch_once(
    make_database: Callable[..., Database], tmp_path: Path, job_env: dict[str, str]
) -> None:
    """Two branches and their merge revision: all applied, the database ends at the merge."""
    database = make_database("branched")
    env = env_for(job_env, tmp_path, [database.entry()])
    run = run_job(env=env)
    assert run.code == 0, run.stdout
    applied = [e["revision"] for e in run.events("migration.applied")]
    assert applied[0] == "b0000000000a" and applied[-1] == "b0000000003d"
    assert sorted(applied[1:3]) == ["b0000000001b", "b0000000002c"]
    assert database.version() == ["b0000000003d"]
    assert {"trunk", "left_branch", "right_branch"} <= database.tables()
    back = run_job("downgrade", "--to", "b0000000000a", "--yes", env=env)
    assert back.code == 0, back.stdout
    assert database.version() == ["b0000000000a"] and "left_branch" not in database.tables()


def test_custom_version_table_and_schema_are_honoured(
    make_database: Callable[..., Database], tmp_path: Path, job_env: dict[str, str]
) -> None:
    """env.py names meta.versioned_history: the job reads and writes that table, never alembic_version."""
    database = make_database("versioned")
    database.pg.execute(f'CREATE SCHEMA meta AUTHORIZATION "{database.role}"', database=database.name)
    env = env_for(job_env, tmp_path, [database.entry()])
    assert run_job(env=env).code == 0
    rows = database.pg.fetch("SELECT version_num FROM meta.versioned_history", database=database.name)
    assert [r["version_num"] for r in rows] == ["c0000000000a"]
    assert "alembic_version" not in database.tables()
    current = run_job("current", env=env)
    assert current.events("db.current")[0]["revision"] == "c0000000000a"


def test_services_sharing_one_database_keep_separate_histories(
    make_database: Callable[..., Database], tmp_path: Path, job_env: dict[str, str]
) -> None:
    """Two services, one database, two version tables: both migrate, neither blocks the other."""
    database = make_database("shared_a")
    entry_a = database.entry()
    entry_b = {**entry_a, "service": "shared_b"}
    env = env_for(job_env, tmp_path, [entry_a, entry_b])
    run = run_job(env=env)
    assert run.code == 0, run.stdout
    assert [d["status"] for d in run.summary["databases"]] == ["applied", "applied"]
    tables = database.tables()
    assert {"shared_a_things", "shared_b_things", "shared_a_version", "shared_b_version"} <= tables
    assert run_job("plan", "--check", env=env).code == 0


def test_verify_passes_the_shipped_services_and_names_a_leaky_downgrade(
    pg: object, tmp_path: Path, job_env: dict[str, str]
) -> None:
    """verify walks every revision up, down and up on a scratch database, and names the first leak."""
    from devtools.pgserver import PgServer
    from tests.support import HEADS, SERVICES_DIR

    assert isinstance(pg, PgServer)

    def env_with(services: list[str], services_dir: str) -> dict[str, str]:
        """Return the environment for a manifest of these services (verify never connects to them)."""
        entries = [
            {"service": s, "database": s.replace("-", "_"), "host": "127.0.0.1", "user": "u", "password": "p"}
            for s in services
        ]
        manifest = write_manifest(tmp_path / f"{services[0]}.toml", entries)
        return {
            **job_env,
            "MIGRATE_MANIFEST": str(manifest),
            "MIGRATE_SERVICES_DIR": services_dir,
            "VERIFY_URL": scratch_url(pg),
        }

    shipped = run_job("verify", "--scratch", "env://VERIFY_URL", env=env_with(list(HEADS), str(SERVICES_DIR)))
    assert shipped.code == 0, shipped.stdout
    assert {d["status"] for d in shipped.summary["databases"]} == {"verified"}
    assert len(shipped.events("verify.revision")) == 5, "every revision of the three services"

    # Reverting one branch must not count the other branch's tables as a leak.
    branched = run_job("verify", "--scratch", "env://VERIFY_URL", env=env_with(["branched"], COMPAT))
    assert branched.code == 0, branched.stdout
    assert len(branched.events("verify.revision")) == 4

    leaky = run_job("verify", "--scratch", "env://VERIFY_URL", env=env_with(["leaky"], COMPAT))
    assert leaky.code == 7, leaky.stdout
    error = leaky.events("run.error")[0]
    assert error["error"] == "round_trip" and error["revision"] == "f0000000000a"
    left = pg.fetch("SELECT datname FROM pg_database WHERE datname LIKE 'mj_verify_%'")
    assert left == [], "scratch databases are dropped"


def test_revision_writes_timestamped_files_and_autogenerates_against_a_scratch_database(
    pg: object, tmp_path: Path, job_env: dict[str, str]
) -> None:
    """Authoring: a new revision follows the head with a sortable name; autogenerate sees a new column."""
    import shutil

    from devtools.pgserver import PgServer
    from tests.support import SERVICES_DIR

    assert isinstance(pg, PgServer)
    services = tmp_path / "services"
    shutil.copytree(SERVICES_DIR / "risk-engine", services / "risk-engine")
    manifest = write_manifest(
        tmp_path / "m.toml",
        [{"service": "risk-engine", "database": "risk", "host": "127.0.0.1", "user": "u", "password": "p"}],
    )
    env = {
        **{k: v for k, v in job_env.items() if not k.startswith("CLOUD_RUN_")},
        "MIGRATE_MANIFEST": str(manifest),
        "MIGRATE_SERVICES_DIR": str(services),
        "VERIFY_URL": scratch_url(pg),
    }
    on_cloud_run = run_job(
        "revision", "-m", "nope", "--service", "risk-engine", env={**env, "CLOUD_RUN_JOB": "j"}
    )
    assert on_cloud_run.code == 2, "never from the job's image on Cloud Run"

    plain = run_job("revision", "-m", "add notes", "--service", "risk-engine", env=env)
    assert plain.code == 0, plain.stdout
    (created,) = plain.events("revision.created")
    assert created["down_revision"] == ["9da4646821fb"]
    assert Path(created["path"]).name.endswith(f"_{created['revision']}_add_notes.py")
    assert Path(created["path"]).name[:13].replace("_", "").isdigit(), "YYYYMMDD_HHMM prefix"
    Path(created["path"]).unlink()

    models = services / "risk-engine" / "models.py"
    text = models.read_text()
    marker = "    risk_score: Mapped["
    assert marker in text
    models.write_text(
        text.replace(marker, "    review_note: Mapped[str | None] = mapped_column(String(200))\n" + marker, 1)
    )
    auto = run_job(
        "revision",
        "-m",
        "add review note",
        "--autogenerate",
        "--scratch",
        "env://VERIFY_URL",
        "--service",
        "risk-engine",
        env=env,
    )
    assert auto.code == 0, auto.stdout
    (generated,) = auto.events("revision.created")
    body = Path(generated["path"]).read_text()
    assert "add_column" in body and "review_note" in body
    assert pg.fetch("SELECT datname FROM pg_database WHERE datname LIKE 'mj_revision_%'") == []


def test_script_location_as_a_package_resource(
    make_database: Callable[..., Database], tmp_path: Path, job_env: dict[str, str]
) -> None:
    """A service whose alembic.ini says script_location = package:migrations upgrades and lists."""
    base = FIXTURES / "pkgsvc"
    database = make_database("pkgservice")
    env = {
        **env_for(job_env, tmp_path, [database.entry()]),
        "MIGRATE_SERVICES_DIR": str(base / "services"),
        "PYTHONPATH": str(base / "src"),
    }
    run = run_job(env=env)
    assert run.code == 0, run.stdout + run.stderr
    assert database.version() == ["a1b2c3d4e5f6"] and "pkg_things" in database.tables()
    listed = run_job("history", "--verbose", env=env)
    assert listed.code == 0 and listed.events("service.revision")[0]["path"].endswith(".py")
