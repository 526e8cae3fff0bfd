"""Guards that cannot be talked around: reset, stamp, scratch databases, discovery, secrets, TLS.

Refusals are checked before any database is touched, so most tests here are one short job run or
an in-process call; docs/guards.md lists each guard.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from devtools.pgserver import PgServer
from job import logs
from job.errors import ConfigError
from job.lock import MigrationLock, lock_key
from job.manifest import DatabaseEntry, parse_manifest
from job.plan import compute_plan, stamps_forward
from job.run import kept_names
from job.services import discover
from tests.conftest import Database
from tests.support import (
    FIXTURES,
    HEADS,
    REPO,
    JobRun,
    job_environment,
    record_output,
    run_job,
    scratch_url,
    write_manifest,
)

# Test-only services of these guards: rolepw (a failing CREATE ROLE ... PASSWORD), tiny (one revision).
GUARDS = FIXTURES / "guards"


@pytest.mark.parametrize(
    ("current", "target", "forward"),
    [
        ((), "b0000000003d", True),  # from base: anything is forward
        (("b0000000001b",), "b0000000003d", True),  # onto the merge that descends from it
        (("b0000000001b",), "b0000000002c", False),  # sideways: the other branch
        (("b0000000003d",), "b0000000000a", False),  # backwards
        (("b0000000003d",), "base", False),
    ],
)
def test_stamp_is_forward_only_onto_a_descendant(
    current: tuple[str, ...], target: str, forward: bool
) -> None:
    """A stamp is forward when every current revision stays in the new revision's ancestry."""
    service = discover(FIXTURES / "compat")["branched"]
    plan = compute_plan(service, current, target, "stamp")
    assert stamps_forward(service, plan) is forward


def test_stamp_on_a_protected_database_only_moves_forward(
    make_database: Callable[..., Database], tmp_path: Path, job_env: dict[str, str]
) -> None:
    """Where allow_downgrade = false, stamp base and stamp backwards are refused; forward is not."""
    database = make_database("settlement")
    manifest = write_manifest(tmp_path / "p.toml", [database.entry()], allow_downgrade=False)
    env = {**job_env, "MIGRATE_MANIFEST": str(manifest)}
    assert run_job("upgrade", "--to", "c81a6c877761", env=env).code == 0
    _refused_stamp("base", env, database, ["c81a6c877761"])
    forward = run_job("stamp", "head", "--yes", env=env)
    assert forward.code == 0, forward.stdout
    assert database.version() == [HEADS["settlement"]]
    _refused_stamp("c81a6c877761", env, database, [HEADS["settlement"]])


def _refused_stamp(target: str, env: dict[str, str], database: Database, version: list[str]) -> None:
    """Assert that stamp target is refused (exit 2, naming allow_downgrade) and changes nothing."""
    refused = run_job("stamp", target, "--yes", env=env)
    assert refused.code == 2, refused.stdout
    (error,) = refused.events("run.error")
    assert "allow_downgrade" in error["message"] and "forward" in error["hint"]
    assert database.version() == version


def test_reset_needs_allow_reset_and_no_protected_entry_on_the_database(
    make_database: Callable[..., Database], tmp_path: Path, job_env: dict[str, str]
) -> None:
    """reset is refused without allow_reset, and when another service's entry on the database is protected."""
    database = make_database("risk-engine")
    local = {k: v for k, v in job_env.items() if not k.startswith("CLOUD_RUN_")}
    shared = [
        {**database.entry(), "allow_reset": True},
        {**database.entry(), "service": "compliance", "allow_downgrade": False},
    ]
    cases = {
        "no allow_reset": write_manifest(tmp_path / "a.toml", [database.entry()]),
        "shared with a protected entry": write_manifest(tmp_path / "b.toml", shared),
    }
    database.pg.execute("CREATE TABLE leftover (id int)", database=database.name)
    for why, manifest in cases.items():
        refused = run_job(
            "reset", "--service", "risk-engine", "--yes", env={**local, "MIGRATE_MANIFEST": str(manifest)}
        )
        assert refused.code == 2, (why, refused.stdout)
        (error,) = refused.events("run.error")
        assert "allow_reset" in error["message"] or "allow_downgrade" in error["message"], why
        assert refused.events("db.reset") == [], why
    assert "leftover" in database.tables(), "a refused reset touched the database"
    # Stamping back is refused through the shared database too (compliance's entry protects it).
    env = {**local, "MIGRATE_MANIFEST": str(cases["shared with a protected entry"])}
    assert run_job("upgrade", "--service", "risk-engine", env=env).code == 0
    stamped = run_job("stamp", "base", "--service", "risk-engine", "--yes", env=env)
    assert stamped.code == 2, stamped.stdout
    assert "allow_downgrade" in stamped.events("run.error")[0]["message"]
    assert database.version() == [HEADS["risk-engine"]]


def test_discovery_never_returns_templates_maintenance_or_its_own_databases(
    make_database: Callable[..., Database], tmp_path: Path, job_env: dict[str, str]
) -> None:
    """Over all of pg_database, discovery keeps neither template1 nor postgres; template1 stays untouched."""
    database = make_database("risk-engine")
    everything = [r["datname"] for r in database.pg.fetch("SELECT datname FROM pg_database")]
    entry = DatabaseEntry(
        service="risk-engine",
        discover="SELECT 1",
        host="h",
        user="u",
        password="p",
        coordination_database="coord",
    )
    kept = kept_names(entry, [*everything, "cloudsqladmin", "coord"])
    assert {"template0", "template1", "postgres", "cloudsqladmin", "coord"}.isdisjoint(kept)
    assert database.name in kept
    with pytest.raises(ConfigError, match="invalid names"):
        kept_names(entry, [f"{database.name}\n"])  # no `$` newline trap
    block = {k: v for k, v in database.entry().items() if k != "database"}
    query = f"SELECT datname FROM pg_database WHERE datname IN ('template1', 'postgres', '{database.name}')"
    manifest = write_manifest(tmp_path / "d.toml", [{**block, "discover": query}])
    run = run_job(env={**job_env, "MIGRATE_MANIFEST": str(manifest)})
    assert run.code == 0, run.stdout[-3000:]
    assert [d["database"] for d in run.summary["databases"]] == [database.name]
    assert sorted(e["excluded"] for e in run.events("manifest.excluded")) == ["postgres", "template1"]
    untouched = database.pg.fetch("SELECT to_regclass('alembic_version') AS t", database="template1")
    assert untouched[0]["t"] is None


def test_literal_passwords_are_refused_outside_local_and_in_url_flags(
    make_database: Callable[..., Database], tmp_path: Path, job_env: dict[str, str]
) -> None:
    """--scratch refuses a literal URL with a password; a non-local manifest refuses literal passwords."""
    database = make_database("settlement")
    manifest = write_manifest(tmp_path / "m.toml", [database.entry()])
    env = {**job_env, "MIGRATE_MANIFEST": str(manifest)}
    literal = f"postgresql://{database.role}:{database.password}@localhost/postgres"
    scratch = run_job("verify", "--scratch", literal, env=env)
    assert scratch.code == 2, scratch.stdout
    assert "--scratch" in scratch.events("run.error")[0]["message"]
    staging = run_job("plan", env={**env, "MIGRATE_ENV": "staging"})
    assert staging.code == 2, staging.stdout
    (error,) = staging.events("run.error")
    assert "databases[0].password" in error["message"] and "MIGRATE_ENV" in error["message"]
    assert staging.events("db.connected") == []


def test_a_failing_create_role_does_not_show_its_password(
    make_database: Callable[..., Database], tmp_path: Path, job_env: dict[str, str]
) -> None:
    """The SQL of a failed statement is masked for PASSWORD '...' clauses in every output."""
    database = make_database("rolepw")
    manifest = write_manifest(tmp_path / "m.toml", [database.entry()])
    env = {**job_env, "MIGRATE_MANIFEST": str(manifest), "MIGRATE_SERVICES_DIR": str(GUARDS)}
    failed = run_job(env=env)
    assert failed.code == 7, failed.stdout
    assert "mj_guard_no_such_role" in failed.stdout, "the error still shows the statement"
    assert "rolepw-Secret-4711" not in failed.stdout + failed.stderr


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("CREATE ROLE a LOGIN PASSWORD 'x1y2z3'", "CREATE ROLE a LOGIN PASSWORD '***'"),
        ("ALTER ROLE a ENCRYPTED PASSWORD 'it''s x1y2z3'", "ALTER ROLE a ENCRYPTED PASSWORD '***'"),
        ("CREATE ROLE a PASSWORD $p$x1y2z3$p$ LOGIN", "CREATE ROLE a PASSWORD '***' LOGIN"),
        ("postgresql+asyncpg://u:x1y2z3@h:5432/db", "postgresql+asyncpg://u:***@h:5432/db"),
        ("host=h password=x1y2z3 dbname=d", "host=h password=*** dbname=d"),
        ("postgresql://u@h/db", "postgresql://u@h/db"),
    ],
)
def test_scrub_masks_passwords_by_their_shape(text: str, shown: str) -> None:
    """Password clauses and connection strings are masked even when no secret was registered."""
    assert logs.scrub(text) == shown


def test_a_scratch_reference_on_a_manifest_database_server_is_refused_unless_named(
    make_database: Callable[..., Database], tmp_path: Path, job_env: dict[str, str]
) -> None:
    """verify --scratch on the server of a manifest database is exit 2, unless scratch_server names it."""
    database = make_database("tiny")
    if not database.pg.host:
        pytest.skip("the test server has no TCP address to compare")
    entry = {**database.entry(), "host": database.pg.host, "port": database.pg.port}
    entry.pop("instance", None)
    env = {**job_env, "VERIFY_URL": scratch_url(database.pg), "MIGRATE_SERVICES_DIR": str(GUARDS)}
    refused = run_job(
        "verify",
        "--scratch",
        "env://VERIFY_URL",
        env={**env, "MIGRATE_MANIFEST": str(write_manifest(tmp_path / "a.toml", [entry]))},
    )
    assert refused.code == 2, refused.stdout
    (error,) = refused.events("run.error")
    assert "server of database" in error["message"] and "scratch_server" in error["hint"]
    named = write_manifest(tmp_path / "b.toml", [entry], scratch_server="env://VERIFY_URL")
    allowed = run_job("verify", "--scratch", "env://VERIFY_URL", env={**env, "MIGRATE_MANIFEST": str(named)})
    assert allowed.code == 0, allowed.stdout


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare for PID namespaces"
)
def test_two_verify_runs_each_as_pid_1_share_one_scratch_server(
    pg: PgServer, tmp_path: Path, job_env: dict[str, str]
) -> None:
    """Scratch names carry a random part: two runs as PID 1 (as in two containers) do not collide."""
    entry = {
        "service": "tiny",
        "database": "tiny",
        "host": "db.invalid",
        "user": "u",
        "password": "p",
    }
    manifest = write_manifest(tmp_path / "m.toml", [entry])
    env = job_environment(
        {
            **job_env,
            "MIGRATE_MANIFEST": str(manifest),
            "MIGRATE_SERVICES_DIR": str(GUARDS),
            "VERIFY_URL": scratch_url(pg),
        }
    )
    command = ["unshare", "--pid", "--fork", "--mount-proc", "sh", "-c", 'echo "pid=$$" >&2; exec "$@"', "sh"]
    command += [sys.executable, "-m", "job", "verify", "--scratch", "env://VERIFY_URL"]
    runs = [
        subprocess.Popen(
            command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outputs = [run.communicate(timeout=120) for run in runs]
    for run, (stdout, stderr) in zip(runs, outputs, strict=True):
        record_output(stdout + stderr)
        assert "pid=1" in stderr
        assert run.returncode == 0, stdout[-3000:]
    names = [JobRun(0, stdout, "").summary["databases"][0]["database"] for stdout, _ in outputs]
    assert names[0] != names[1] and all(n.startswith("mj_verify_tiny_") for n in names)


def test_a_tcp_entry_that_cannot_get_tls_fails_with_exit_4_naming_sslmode(
    make_database: Callable[..., Database], tmp_path: Path, job_env: dict[str, str]
) -> None:
    """Over TCP, TLS is required by default; a server without it is exit 4 at once, not retried."""
    database = make_database("tiny")
    if not database.pg.host:
        pytest.skip("the test server has no TCP address")
    entry = {k: v for k, v in database.entry().items() if k not in ("instance", "sslmode")}
    entry |= {"host": database.pg.host, "port": database.pg.port}
    env = {**job_env, "MIGRATE_SERVICES_DIR": str(GUARDS), "MIGRATE_CONNECT_TIMEOUT_S": "30"}
    for extra in ({}, {"sslmode": "require"}):
        manifest = write_manifest(tmp_path / "m.toml", [{**entry, **extra}])
        run = run_job("plan", env={**env, "MIGRATE_MANIFEST": str(manifest)})
        assert run.code == 4, run.stdout
        (error,) = run.events("run.error")
        assert "sslmode" in error["hint"], error
        assert run.events("db.connect_retry") == [], "a refused TLS upgrade is not retried"
    plain = write_manifest(tmp_path / "m.toml", [{**entry, "sslmode": "disable"}])
    assert run_job("plan", env={**env, "MIGRATE_MANIFEST": str(plain)}).code == 0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"instance": "p:r:i", "sslmode": "require"}, "a Cloud SQL socket needs no TLS"),
        ({"host": "h", "sslmode": "require", "sslrootcert": "env://CA"}, "sslrootcert needs"),
        ({"host": "h", "sslmode": "prefer"}, "sslmode"),
    ],
)
def test_tls_keys_that_cannot_apply_are_configuration_errors(extra: dict[str, str], message: str) -> None:
    """sslmode on a socket entry, sslrootcert without verification, or a weak mode: exit 2."""
    raw = {"databases": [{"service": "settlement", "database": "d", "user": "u", "password": "p", **extra}]}
    with pytest.raises(ConfigError, match=message):
        parse_manifest(raw, {"settlement"}, path=Path("m.toml"))


def test_sessions_use_an_explicit_search_path_and_the_lock_key_the_resolved_schema(
    make_database: Callable[..., Database], tmp_path: Path, job_env: dict[str, str]
) -> None:
    """A version table planted in a schema named after the login ("$user") is never read or used."""
    database = make_database("tiny")
    planted = f'CREATE SCHEMA "{database.role}" AUTHORIZATION "{database.role}"; '
    planted += f'CREATE TABLE "{database.role}".alembic_version (version_num varchar(32) PRIMARY KEY); '
    planted += f"INSERT INTO \"{database.role}\".alembic_version VALUES ('planted00001')"
    database.pg.execute(planted, database=database.name)
    manifest = write_manifest(tmp_path / "m.toml", [database.entry()])
    env = {**job_env, "MIGRATE_MANIFEST": str(manifest), "MIGRATE_SERVICES_DIR": str(GUARDS)}
    run = run_job(env=env)
    assert run.code == 0, run.stdout[-3000:]
    assert run.summary["databases"][0]["from_revision"] is None
    assert database.version() == ["tiny00000001"], "the version table is public's"
    assert lock_key("tiny", "alembic_version", None) == lock_key("tiny", "alembic_version", "public")
    assert lock_key("tiny", "alembic_version", "ops") != lock_key("tiny", "alembic_version", None)


def test_a_revision_cannot_commit_once_its_lock_session_is_gone(
    make_database: Callable[..., Database],
) -> None:
    """The guard each revision runs before its commit fails when the lock's session has ended."""
    import asyncio

    import asyncpg

    database = make_database("tiny")
    dsn = database.pg.admin_dsn(database.name)
    lock = MigrationLock(None, None, lock_key("tiny", "alembic_version", None))  # type: ignore[arg-type]

    async def scenario() -> None:
        holder, migrating = await asyncpg.connect(dsn), await asyncpg.connect(dsn)
        try:
            assert await holder.fetchval("SELECT pg_try_advisory_lock($1)", lock.key)
            guard = lock.guard_sql(holder.get_server_pid())
            async with migrating.transaction():
                await migrating.execute(guard)  # held: the revision may commit
            await migrating.execute("SELECT pg_terminate_backend($1)", holder.get_server_pid())
            await asyncio.sleep(0.2)
            with pytest.raises(asyncpg.LockNotAvailableError, match="lost the migration lock"):
                async with migrating.transaction():
                    await migrating.execute("CREATE TABLE never_committed (id int)")
                    await migrating.execute(guard)
            gone = await migrating.fetchval("SELECT to_regclass('never_committed')")
            assert gone is None, "the revision rolled back"
        finally:
            await holder.close()
            await migrating.close()

    asyncio.run(scenario())


def test_tls_mode_defaults_by_transport() -> None:
    """TCP requires TLS unless the entry or URL says otherwise; Cloud SQL sockets need none."""
    from sqlalchemy.engine import make_url

    from job import tls
    from job.db import Target

    def mode(url: str, **entry: str) -> str:
        where = entry or {"url": "env://U"}
        built = DatabaseEntry(
            service="s", database="d", **({"user": "u", "password": "p"} if entry else {}), **where
        )
        return tls.mode(Target(built, make_url(url)))

    assert mode("postgresql+asyncpg://u@h/d", host="h") == "require"
    assert mode("postgresql+asyncpg://u@h/d", host="h", sslmode="disable") == "disable"
    assert mode("postgresql+asyncpg://u@/d?host=/cloudsql/p:r:i", instance="p:r:i") == "disable"
    assert mode("postgresql+asyncpg://u@/d?host=/cloudsql/p:r:i") == "disable"
    assert mode("postgresql+asyncpg://u@h/d") == "require"
    assert mode("postgresql+asyncpg://u@h/d?ssl=verify-full") == "verify-full"


def test_the_guard_is_left_out_only_on_the_locks_own_session(make_database: Callable[..., Database]) -> None:
    """On the lock's session the revision cannot outlive the lock: the guard (2 ms a revision) is not run.

    On any other session (an env.py with its own engine), or when the session cannot be told, it is.
    """
    import asyncio

    from sqlalchemy.ext.asyncio import create_async_engine

    from job.recorder import same_session

    database = make_database("tiny")
    url = database.pg.admin_dsn(database.name).replace("postgresql://", "postgresql+asyncpg://", 1)

    async def scenario() -> tuple[bool, bool, bool]:
        engine = create_async_engine(url)
        try:
            async with engine.connect() as connection:
                raw = await connection.get_raw_connection()
                pid = raw.driver_connection.get_server_pid()  # type: ignore[union-attr]
                return (
                    await connection.run_sync(same_session, pid),
                    await connection.run_sync(same_session, pid + 1),
                    await connection.run_sync(same_session, None),
                )
        finally:
            await engine.dispose()

    assert asyncio.run(scenario()) == (True, False, False)
