"""Tests for job/db.py: URLs built without string pasting, and connections to a real PostgreSQL.

Connections go through the Cloud SQL-shaped socket directory (``<root>/<instance>/.s.PGSQL.5432``)
with a password that holds every character that breaks hand-built URLs, and every failure must say
what went wrong without showing a password.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from pydantic import SecretStr
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from job.address import Address
from job.db import DRIVER, Target, build_url, connect, is_transient, url_from_secret
from job.errors import ConnectError, SecretError
from job.manifest import DatabaseEntry
from tests.conftest import INSTANCE, Database
from tests.support import ALL_PASSWORDS, PASSWORD, PROJECT

WRONG_PASSWORD = ALL_PASSWORDS[1]
URL_SECRET = "env://SETTLEMENT_DB_URL"


def socket_entry(database: str = "settlement", instance: str = INSTANCE, **extra: str) -> DatabaseEntry:
    """Return a manifest entry for a database behind a Cloud SQL instance socket."""
    values = {"user": "settlement_migrator", "password": "env://SETTLEMENT_DB_PASSWORD", **extra}
    return DatabaseEntry(service="settlement", database=database, instance=instance, **values)


def url_entry() -> DatabaseEntry:
    """Return a manifest entry whose whole URL is one secret."""
    return DatabaseEntry(service="settlement", database="settlement", url=URL_SECRET)


def socket_target(db: Database, socket_root: Path | None, password: str, **changes: str) -> Target:
    """Return the target for db over the instance socket, logging in with the given password."""
    if socket_root is None:
        pytest.skip("this PostgreSQL has no unix socket to lay out as /cloudsql")
    entry = DatabaseEntry.model_validate({**db.entry(), **changes})
    return Target(entry, build_url(entry, db.role, SecretStr(password), socket_root))


def assert_no_password(err: BaseException) -> None:
    """No test password appears in the error, its hint, its string or its log fields."""
    assert isinstance(err, ConnectError | SecretError)
    shown = [err.message, err.hint or "", str(err), repr(err), json.dumps(err.fields(), default=str)]
    for password in ALL_PASSWORDS:
        for form in (password, quote(password, safe=""), quote(password)):
            for text_ in shown:
                assert form not in text_


def timed_connect(target: Target, timeout_s: float) -> tuple[ConnectError, float]:
    """Run connect(), expecting it to fail; return the error and the seconds it took."""
    started = time.monotonic()
    with pytest.raises(ConnectError) as info:
        asyncio.run(connect(target, timeout_s=timeout_s, application_name="test-db"))
    return info.value, time.monotonic() - started


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short directory for socket paths, which the kernel caps near 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="mjdb", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


# --- build_url ------------------------------------------------------------------------------------


def test_build_url_for_an_instance_points_at_its_socket_directory() -> None:
    """Cloud SQL's connector mounts /cloudsql/<instance>; asyncpg takes that directory as host=."""
    entry = socket_entry()
    url = build_url(entry, "settlement_migrator", SecretStr(PASSWORD), Path("/cloudsql"))
    assert url.drivername == DRIVER
    assert url.query["host"] == f"/cloudsql/{INSTANCE}"
    assert url.host is None and url.port is None
    assert url.username == "settlement_migrator"
    assert url.database == "settlement"
    assert url.password == PASSWORD
    # The rendered form survives a round trip, and the hidden form shows nothing of the password.
    assert make_url(url.render_as_string(hide_password=False)).password == PASSWORD
    hidden = url.render_as_string(hide_password=True)
    assert "***" in hidden
    assert PASSWORD not in hidden and quote(PASSWORD, safe="") not in hidden
    assert Target(entry, url).display == hidden


def test_build_url_for_a_host_uses_tcp() -> None:
    """For local work an entry names host and port instead of an instance: plain TCP, no socket."""
    entry = DatabaseEntry(
        service="settlement", database="settlement", host="127.0.0.1", port=6543, user="u", password="x"
    )
    url = build_url(entry, "u", SecretStr(PASSWORD), Path("/cloudsql"))
    assert url.drivername == DRIVER
    assert (url.host, url.port) == ("127.0.0.1", 6543)
    assert "host" not in url.query
    assert url.password == PASSWORD


# --- url_from_secret ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prefix", ["postgresql", "postgres", "postgresql+psycopg2", "postgresql+psycopg", "postgresql+asyncpg"]
)
def test_url_from_secret_accepts_any_postgresql_prefix(prefix: str) -> None:
    """A URL secret written for any driver (or Heroku's postgres://) is run with asyncpg."""
    raw = f"{prefix}://settlement_migrator:{quote(PASSWORD, safe='')}@/settlement?host=/cloudsql/{INSTANCE}"
    url = url_from_secret(SecretStr(raw), url_entry())
    assert url.drivername == DRIVER
    assert url.password == PASSWORD
    assert url.username == "settlement_migrator"
    assert url.database == "settlement"
    assert url.query["host"] == f"/cloudsql/{INSTANCE}"


@pytest.mark.parametrize("literal", [False, True], ids=["reference", "literal"])
@pytest.mark.parametrize("raw", [PASSWORD, f"postgresql://u:{PASSWORD}@/db", "postgresql://u:pw@h:port/db"])
def test_url_from_secret_rejects_a_value_that_is_not_a_url(raw: str, literal: bool) -> None:
    """A password stored where a URL belongs is a secret error that names the reference, not the value.

    With a literal in the manifest (local work) the reference is the value: it must not be shown either.
    """
    entry = DatabaseEntry(service="settlement", database="settlement", url=raw) if literal else url_entry()
    with pytest.raises(SecretError) as info:
        url_from_secret(SecretStr(raw), entry)
    err = info.value
    assert ("<literal>" if literal else URL_SECRET) in err.message
    for shown in (err.message, err.hint or "", str(err)):
        assert raw not in shown
        assert PASSWORD not in shown
    assert err.__cause__ is None  # the parser's message, which quotes the value, is dropped


def test_url_from_secret_rejects_another_database() -> None:
    """A MySQL URL is a mistake in the secret: refuse it before trying to connect."""
    raw = f"mysql+pymysql://u:{quote(PASSWORD, safe='')}@db.internal/settlement"
    with pytest.raises(SecretError) as info:
        url_from_secret(SecretStr(raw), url_entry())
    err = info.value
    assert "mysql" in err.message and URL_SECRET in err.message
    assert PASSWORD not in str(err) and quote(PASSWORD, safe="") not in str(err)


# --- connect: success -----------------------------------------------------------------------------


def test_connect_over_the_cloud_sql_socket_with_a_special_password(
    make_database: Callable[..., Database], socket_root: Path | None
) -> None:
    """The path Cloud Run takes: socket directory per instance, scram-sha-256, any password."""
    db = make_database("settlement")
    target = socket_target(db, socket_root, PASSWORD)
    assert target.url.query["host"] == str(socket_root / INSTANCE)  # type: ignore[operator]

    async def run() -> tuple[str, str, bool]:
        engine, connection = await connect(target, timeout_s=10, application_name="migrate-job/test")
        try:
            query = text("SELECT current_user, current_setting('application_name')")
            user, application_name = (await connection.execute(query)).one()
        finally:
            await connection.close()
            await engine.dispose()
        return user, application_name, connection.closed

    assert asyncio.run(run()) == (db.role, "migrate-job/test", True)
    # NullPool: once closed and disposed, no session of the role is left on the server (a backend
    # may take a moment to exit after the client's Terminate, hence the short wait).
    deadline = time.monotonic() + 5
    while db.pg.fetch("SELECT 1 FROM pg_stat_activity WHERE usename = $1", db.role):
        assert time.monotonic() < deadline, "the connection was left open"
        time.sleep(0.05)


# --- connect: failures ----------------------------------------------------------------------------


def test_wrong_password_fails_fast_and_says_so(
    make_database: Callable[..., Database], socket_root: Path | None
) -> None:
    """A refused password will not change by retrying: fail at once, name the cause, show no secret."""
    db = make_database("settlement")
    target = socket_target(db, socket_root, WRONG_PASSWORD)
    err, elapsed = timed_connect(target, timeout_s=30)
    assert elapsed < 5
    assert "the password was refused" in err.message
    assert err.hint and db.role in err.hint
    assert "<literal>" in err.hint  # the manifest holds the password itself: name no value
    assert err.database == db.name and err.service == "settlement"
    assert_no_password(err)


def test_missing_database_fails_fast_and_says_so(
    make_database: Callable[..., Database], socket_root: Path | None
) -> None:
    """A database that was never created is a manifest or setup mistake: no retries."""
    db = make_database("settlement")
    target = socket_target(db, socket_root, PASSWORD, database="no_such_database")
    err, elapsed = timed_connect(target, timeout_s=30)
    assert elapsed < 5
    assert "does not exist" in err.message
    assert err.hint and "no_such_database" in err.hint
    assert_no_password(err)


def test_missing_socket_retries_until_the_timeout(short_dir: Path) -> None:
    """No socket means the job lacks --set-cloudsql-instances (or the proxy is slow): retry, then say so."""
    entry = socket_entry(instance=f"{PROJECT}:us-central1:not-attached")
    target = Target(entry, build_url(entry, "settlement_migrator", SecretStr(PASSWORD), short_dir))
    err, elapsed = timed_connect(target, timeout_s=1.5)
    assert 1 <= elapsed <= 10
    assert "no socket" in err.message
    assert err.hint and f"--set-cloudsql-instances {entry.instance}" in err.hint
    assert str(short_dir / entry.instance / ".s.PGSQL.5432") in err.hint  # type: ignore[operator]
    assert_no_password(err)


def test_closed_tcp_port_retries_until_the_timeout() -> None:
    """A host entry whose server is down is retried for timeout_s, then reported with its address."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    entry = DatabaseEntry(
        service="settlement", database="settlement", host="127.0.0.1", port=port, user="u", password="x"
    )
    target = Target(entry, build_url(entry, "u", SecretStr(PASSWORD), Path("/cloudsql")))
    err, elapsed = timed_connect(target, timeout_s=1.5)
    assert 1 <= elapsed <= 10
    assert "connection refused" in err.message
    assert err.hint and f"127.0.0.1:{port}" in err.hint
    assert_no_password(err)


def test_is_transient_tells_network_trouble_from_a_refused_login(
    make_database: Callable[..., Database], socket_root: Path | None
) -> None:
    """Only failures that may cure themselves are retried; a wrong password is final."""
    assert is_transient(FileNotFoundError(2, "No such file or directory"))
    assert is_transient(ConnectionRefusedError(111, "Connection refused"))
    db = make_database("settlement")
    target = socket_target(db, socket_root, WRONG_PASSWORD)

    async def refused() -> BaseException:
        engine = create_async_engine(target.url, poolclass=NullPool)
        try:
            await engine.connect()
        except Exception as exc:
            return exc
        finally:
            await engine.dispose()
        raise AssertionError("the wrong password was accepted")

    assert is_transient(asyncio.run(refused())) is False


@pytest.mark.parametrize(
    "url",
    [
        "postgresql+asyncpg://u%40x:p%3As@/db%2Fname?host=%2Fcloudsql%2Fp%3Ar%3Ai",
        "postgresql+asyncpg://user:pw@10.0.0.5:5433/app?ssl=require",
        "postgresql+asyncpg://user@[::1]:5432/app",
        "postgresql+asyncpg://user:a%20b+c@host/db%20name?ssl=disable&host=%2Ftmp%2Fx",
        "postgresql+asyncpg:///db",
    ],
)
def test_the_displayed_url_is_sqlalchemys_without_loading_it(url: str) -> None:
    """db.connected shows the URL before SQLAlchemy is imported: its rendering must stay SQLAlchemy's."""
    parsed = make_url(url)
    assert Address.of(parsed).display() == parsed.render_as_string(hide_password=True)
    assert Address.of(parsed).to_url() == parsed
