"""Tests for job/services.py and for the three services shipped under services/.

The services are tested the way their own developers use them, without the job: the plain Alembic
command line (online and ``--sql``) and the models against the schema their migrations build.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import MetaData
from sqlalchemy.engine import URL, Connection
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from devtools.pgserver import PgServer
from job.errors import ConfigError, HistoryError
from job.services import Service, discover
from tests.conftest import Database
from tests.support import FIXTURES, HEADS, SERVICES_DIR, TABLES, record_output

SERVICES = sorted(HEADS)

SECOND_HEAD = '''"""a second branch from widgets

Revision ID: bbbb00000002
Revises: aaaa00000001
Create Date: 2025-01-03 00:00:00
"""

from __future__ import annotations

revision = "bbbb00000002"
down_revision = "aaaa00000001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Nothing."""


def downgrade() -> None:
    """Nothing."""
'''


def database_url(pg: PgServer, db: Database, drivername: str = "postgresql") -> URL:
    """Return a URL to db as its own role, built with URL.create so any password character works."""
    where: dict[str, Any] = {"host": pg.host, "port": pg.port}
    if not pg.host:  # a socket-only server: the directory goes in the host= query key
        where = {"port": pg.port, "query": {"host": str(pg.socket_dir)}}
    return URL.create(drivername, username=db.role, password=db.password, database=db.name, **where)


def alembic_env(url: URL | None) -> dict[str, str]:
    """Return a developer's environment for the Alembic CLI, with DATABASE_URL set to url if given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIGRATE_") and k != "DATABASE_URL"}
    if url is not None:
        env["DATABASE_URL"] = url.render_as_string(hide_password=False)
    return env


def alembic_argv(service: str, *args: str) -> list[str]:
    """Return ``python -m alembic -c services/<service>/alembic.ini ARGS``."""
    return [sys.executable, "-m", "alembic", "-c", str(SERVICES_DIR / service / "alembic.ini"), *args]


def alembic_cli(service: str, *args: str, cwd: Path, url: URL | None) -> subprocess.CompletedProcess[str]:
    """Run the Alembic CLI on a service as a developer would, and keep its output for the leak check."""
    proc = subprocess.run(
        alembic_argv(service, *args),
        cwd=cwd,
        env=alembic_env(url),
        capture_output=True,
        text=True,
        timeout=60,
    )
    record_output(proc.stdout + proc.stderr)
    return proc


@pytest.fixture(scope="module")
def offline_sql(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int, str, str]]:
    """Return each service's `alembic upgrade head --sql` (code, stdout, stderr), run side by side."""
    cwd = tmp_path_factory.mktemp("offline")
    procs = {
        name: subprocess.Popen(
            alembic_argv(name, "upgrade", "head", "--sql"),
            cwd=cwd,
            env=alembic_env(None),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in SERVICES
    }
    results = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=60)
        record_output(stdout + stderr)
        results[name] = (proc.returncode, stdout, stderr)
    return results


def load_metadata(service: str) -> MetaData:
    """Import services/<service>/models.py by path under a module name of its own, as env.py does."""
    path = SERVICES_DIR / service / "models.py"
    name = f"test_services_models_{service.replace('-', '_')}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    metadata = sys.modules[name].metadata
    assert isinstance(metadata, MetaData)
    return metadata


def public_relations(db: Database) -> set[str]:
    """Return every table, index, sequence and view in the public schema, by name."""
    rows = db.pg.fetch(
        "SELECT relname FROM pg_class WHERE relnamespace = 'public'::regnamespace", database=db.name
    )
    return {r["relname"] for r in rows}


def test_discover_finds_the_three_shipped_services() -> None:
    """The job upgrades what discover() finds: exactly the shipped services, by folder name."""
    services = discover(SERVICES_DIR)
    assert list(services) == ["compliance", "risk-engine", "settlement"]
    for name, service in services.items():
        assert isinstance(service, Service)
        assert service.path == SERVICES_DIR / name
        assert service.ini.is_file()


def test_discover_missing_directory_is_a_config_error(tmp_path: Path) -> None:
    """A wrong MIGRATE_SERVICES_DIR must be a configuration error (exit 2), not an empty run."""
    missing = tmp_path / "no-such-services"
    with pytest.raises(ConfigError) as info:
        discover(missing)
    assert str(missing) in info.value.message
    assert info.value.hint and "MIGRATE_SERVICES_DIR" in info.value.hint


@pytest.mark.parametrize("name", SERVICES)
def test_each_service_has_one_known_head(name: str) -> None:
    """The heads the other tests and the deploy notes rely on are the heads the files define."""
    service = discover(SERVICES_DIR)[name]
    assert service.head() == HEADS[name]
    assert service.script.get_heads() == [HEADS[name]]


def test_two_heads_is_a_history_error_that_says_merge(tmp_path: Path) -> None:
    """Two branches merged without a merge revision must stop the job with a clear next step."""
    root = tmp_path / "services"
    shutil.copytree(
        FIXTURES / "services" / "broken",
        root / "forked",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    versions = root / "forked" / "migrations" / "versions"
    (versions / "20250103_0000_bbbb00000002_second_branch.py").write_text(SECOND_HEAD, encoding="utf-8")
    service = discover(root)["forked"]
    with pytest.raises(HistoryError) as info:
        service.head()
    err = info.value
    assert err.service == "forked"
    assert "aaaa00000002" in err.message and "bbbb00000002" in err.message
    assert err.hint and "merge" in err.hint


@pytest.mark.parametrize("name", SERVICES)
def test_plain_alembic_cli_upgrades_downgrades_and_upgrades_again(
    name: str, pg: PgServer, make_database: Callable[..., Database], tmp_path: Path
) -> None:
    """DESIGN.md: `alembic -c services/<name>/alembic.ini` keeps working on its own, from any cwd."""
    db = make_database(name)
    url = database_url(pg, db)

    def alembic(*args: str) -> None:
        proc = alembic_cli(name, *args, cwd=tmp_path, url=url)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert db.password not in proc.stdout + proc.stderr

    alembic("upgrade", "head")
    assert db.tables() == TABLES[name] | {"alembic_version"}
    assert db.version() == [HEADS[name]]

    alembic("downgrade", "base")
    assert db.tables() == {"alembic_version"}
    assert db.version() == []  # the table is there, but empty: alembic_version's own rule
    indexes = db.pg.fetch("SELECT indexname FROM pg_indexes WHERE schemaname = 'public'", database=db.name)
    assert {r["indexname"] for r in indexes} == {"alembic_version_pkc"}
    # Nothing else is left behind either: no sequence, view or stray relation.
    assert public_relations(db) == {"alembic_version", "alembic_version_pkc"}
    enums = db.pg.fetch(
        "SELECT typname FROM pg_type WHERE typnamespace = 'public'::regnamespace AND typtype = 'e'",
        database=db.name,
    )
    assert enums == []

    alembic("upgrade", "head")
    assert db.tables() == TABLES[name] | {"alembic_version"}
    assert db.version() == [HEADS[name]]


@pytest.mark.parametrize("name", SERVICES)
def test_models_match_migrations(name: str, pg: PgServer, make_database: Callable[..., Database]) -> None:
    """models.py and the migrations must agree, or `check` reports drift on a fresh deploy."""
    db = make_database(name)
    metadata = load_metadata(name)
    service = discover(SERVICES_DIR)[name]

    def upgrade(connection: Connection) -> None:
        # The cookbook shape every shipped env.py supports: the caller lends its connection.
        config: Config = service.config()
        config.attributes["connection"] = connection
        command.upgrade(config, "head")

    def compare(connection: Connection, target: MetaData) -> list[Any]:
        context = MigrationContext.configure(
            connection, opts={"compare_type": True, "compare_server_default": True}
        )
        return compare_metadata(context, target)

    async def run() -> tuple[list[Any], list[Any]]:
        engine = create_async_engine(database_url(pg, db, "postgresql+asyncpg"), poolclass=NullPool)
        try:
            async with engine.connect() as connection:
                await connection.run_sync(upgrade)
                await connection.commit()
                against_models = await connection.run_sync(compare, metadata)
                against_nothing = await connection.run_sync(compare, MetaData())
                return against_models, against_nothing
        finally:
            await engine.dispose()

    diffs, control = asyncio.run(run())
    assert db.version() == [HEADS[name]]
    assert diffs == []
    # The comparison is not vacuous: against empty metadata it sees every table to remove.
    removed = {diff[1].name for diff in control if diff[0] == "remove_table"}
    assert removed == TABLES[name]


@pytest.mark.parametrize("name", SERVICES)
def test_offline_sql_renders(name: str, offline_sql: dict[str, tuple[int, str, str]]) -> None:
    """`alembic upgrade head --sql` (for DBA review) must render every table without a database."""
    code, stdout, stderr = offline_sql[name]
    assert code == 0, stdout + stderr
    for table in TABLES[name]:
        assert f"CREATE TABLE {table} (" in stdout, table
    assert f"INSERT INTO alembic_version (version_num) VALUES ('{HEADS[name]}')" in stdout or (
        f"UPDATE alembic_version SET version_num='{HEADS[name]}'" in stdout
    )


@pytest.mark.parametrize(
    ("value", "held"),
    [
        # A raw URL (seed 000's env.py hands DATABASE_URL straight to set_main_option): % doubled.
        ("postgresql://u:p%40ss%25w@/db", "postgresql://u:p%%40ss%%25w@/db"),
        # Already doubled by a careful env.py, or interpolating on purpose: kept as written.
        ("postgresql://u:p%%40ss@/db", "postgresql://u:p%%40ss@/db"),
        ("sqlite:///%(here)s/app.db", "sqlite:///%(here)s/app.db"),
        ("postgresql://u@/db", "postgresql://u@/db"),
    ],
)
def test_the_config_env_py_gets_takes_a_url_whether_or_not_percent_is_doubled(value: str, held: str) -> None:
    """Under the job, set_main_option("sqlalchemy.url", raw_url) works; Alembic's own Config is unchanged."""
    service = Service("dburl", FIXTURES / "shapes" / "dburl")
    config = service.config()

    config.set_main_option("sqlalchemy.url", value)

    assert config.file_config.get(config.config_ini_section, "sqlalchemy.url", raw=True) == held
    assert "%%" not in (config.get_main_option("sqlalchemy.url") or "")
    if held != value:
        with pytest.raises(ValueError, match="invalid interpolation syntax"):
            Config(str(service.ini)).set_main_option("sqlalchemy.url", value)
