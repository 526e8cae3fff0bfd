"""Tests for devtools.pgserver: the password-protected local PostgreSQL for tests and the demo."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from devtools import pgserver
from devtools.pgserver import PgServer, start_local_server

# Characters that break naive URL building or SQL quoting: @ : / # ? % < > & ( ) ' and a space.
NASTY_PASSWORD = "p@ss:/#?%<>&()' w0rd"
INSTANCE = "demo-project:europe-west1:main-db"


@pytest.fixture(scope="module")
def server() -> Iterator[PgServer]:
    """One local server for the whole module, since starting one costs about a second."""
    started = time.monotonic()
    srv = start_local_server()
    print(f"local PostgreSQL start took {time.monotonic() - started:.2f}s")
    yield srv
    srv.stop()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short /tmp directory: unix socket paths must stay under ~100 characters."""
    path = Path(tempfile.mkdtemp(prefix="mjcs"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def _whoami(**connect_kwargs: object) -> str:
    """Connect with the given asyncpg arguments and return current_user."""
    conn = await asyncpg.connect(timeout=10, **connect_kwargs)
    try:
        return await conn.fetchval("SELECT current_user")
    finally:
        await conn.close()


def test_superuser_connects_over_tcp(server: PgServer) -> None:
    """The TCP path is what testcontainers-style DSNs and the demo use."""
    user = asyncio.run(
        _whoami(
            host=server.host,
            port=server.port,
            user=server.superuser,
            password=server.password,
            database="postgres",
        )
    )
    assert user == server.superuser
    assert server.kind == "local"


def test_superuser_connects_over_unix_socket(server: PgServer) -> None:
    """The job talks to Cloud SQL only over unix sockets, so the socket must work too."""
    assert server.socket_dir is not None
    assert (server.socket_dir / f".s.PGSQL.{server.port}").exists()
    user = asyncio.run(
        _whoami(
            host=str(server.socket_dir),
            port=server.port,
            user=server.superuser,
            password=server.password,
            database="postgres",
        )
    )
    assert user == server.superuser


def test_admin_dsn_connects(server: PgServer) -> None:
    """admin_dsn() is what other code passes around; it must be a working asyncpg DSN."""
    assert asyncio.run(_whoami(dsn=server.admin_dsn())) == server.superuser


@pytest.mark.parametrize("via", ["tcp", "socket"])
def test_wrong_password_is_refused(server: PgServer, via: str) -> None:
    """Password handling is only tested if the server really checks passwords (no trust auth)."""
    host = server.host if via == "tcp" else str(server.socket_dir)
    with pytest.raises(asyncpg.InvalidPasswordError):
        asyncio.run(
            _whoami(
                host=host,
                port=server.port,
                user=server.superuser,
                password=server.password + "-wrong",
                database="postgres",
            )
        )


def test_role_with_nasty_password_logs_in_through_cloudsql_dir(server: PgServer, short_dir: Path) -> None:
    """Secrets with URL/SQL metacharacters must survive role creation and a Cloud SQL socket."""
    server.create_role("app_user", "first password")
    server.create_role("app_user", NASTY_PASSWORD)  # second call must reset, not fail
    server.create_database("app_db", owner="app_user")
    server.create_database("app_db", owner="app_user")  # recreating an existing db is allowed

    root = server.cloudsql_dir(short_dir / "cloudsql", [INSTANCE])
    link = root / INSTANCE / ".s.PGSQL.5432"
    assert link.is_symlink()

    user = asyncio.run(
        _whoami(
            host=str(root / INSTANCE),
            port=5432,
            user="app_user",
            password=NASTY_PASSWORD,
            database="app_db",
        )
    )
    assert user == "app_user"
    owners = server.fetch(
        "SELECT pg_get_userbyid(datdba) AS owner FROM pg_database WHERE datname = $1", "app_db"
    )
    assert owners == [{"owner": "app_user"}]

    server.drop_database("app_db")
    assert server.fetch("SELECT 1 FROM pg_database WHERE datname = 'app_db'") == []


def test_execute_runs_in_the_named_database(server: PgServer) -> None:
    """execute()/fetch() take a database so tests can prepare schemas in service databases."""
    server.create_database("scratch")
    server.execute("CREATE TABLE t (x int); INSERT INTO t VALUES (1), (2)", database="scratch")
    rows = server.fetch("SELECT sum(x) AS total FROM t", database="scratch")
    assert rows == [{"total": 2 + 1}]
    server.drop_database("scratch")


def test_server_process_does_not_run_as_root(server: PgServer) -> None:
    """PostgreSQL refuses root, and the module must not weaken that by running as root."""
    rows = server.fetch("SELECT current_setting('data_directory') AS datadir")
    datadir = Path(rows[0]["datadir"])
    # The first line of postmaster.pid is the running postmaster's PID.
    pid = int((datadir / "postmaster.pid").read_text().splitlines()[0])
    server_uid = os.stat(f"/proc/{pid}").st_uid
    assert server_uid == datadir.stat().st_uid
    assert server_uid != 0
    if os.geteuid() != 0:
        assert server_uid == os.geteuid()


def test_password_is_not_in_repr(server: PgServer) -> None:
    """pytest prints reprs in failure output; the superuser password must not leak there."""
    assert server.password not in repr(server)


def test_env_url_describes_existing_server(server: PgServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """acquire_server() must prefer MIGRATE_TEST_DATABASE_URL, including socket-only URLs."""
    socket_only = PgServer(
        host="",
        port=server.port,
        socket_dir=server.socket_dir,
        superuser=server.superuser,
        password=server.password,
        kind="env",
    )
    monkeypatch.setenv(pgserver.ENV_URL, socket_only.admin_dsn())
    acquired = pgserver.acquire_server()
    assert acquired.kind == "env"
    assert acquired.socket_dir == server.socket_dir
    assert acquired.password == server.password
    assert acquired.fetch("SELECT 1 AS one") == [{"one": 1}]
    acquired.stop()  # env servers belong to someone else: stop() must leave them running
    assert server.fetch("SELECT 1 AS one") == [{"one": 1}]


def test_docker_probe_is_fast() -> None:
    """The probe runs on every test session, so a missing engine must not cost seconds."""
    started = time.monotonic()
    pgserver.docker_available()
    assert time.monotonic() - started < 1.0


def test_stop_removes_the_server() -> None:
    """stop() must leave no postmaster and no files behind, and be safe to call twice."""
    srv = start_local_server()
    assert srv.socket_dir is not None
    datadir = Path(srv.fetch("SELECT current_setting('data_directory') AS d")[0]["d"])
    socket_dir = srv.socket_dir
    srv.stop()
    srv.stop()
    assert not datadir.exists()
    assert not socket_dir.exists()
    with pytest.raises(OSError):
        asyncio.run(
            _whoami(
                host=srv.host,
                port=srv.port,
                user=srv.superuser,
                password=srv.password,
                database="postgres",
            )
        )
