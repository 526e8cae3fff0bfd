"""Connection targets and connections: URLs built with ``URL.create``, asyncpg, bounded retries."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import SecretStr

from job import iam, logs, tls
from job.address import DRIVER, Address
from job.errors import ConfigError, ConnectError, MigrateJobError, SecretError
from job.pgerrors import causes, describe, is_transient, sqlstate

if TYPE_CHECKING:
    from sqlalchemy.engine import URL
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

    from job.manifest import DatabaseEntry, Manifest
    from job.secrets import SecretResolver

# The schema of every session's search_path, and of the job's tables when env.py names none.
DEFAULT_SCHEMA = "public"
SOCKET_FILE = ".s.PGSQL.5432"
# "Too many connections": the server asks the job to slow down (tasks x --jobs above its
# max_connections). Waited out far past the connect timeout: it never fails a database.
BUSY, BUSY_S = "53300", 900.0


@dataclass(frozen=True)
class Target:
    """A database ready to connect to; ``url`` holds the password, ``display`` never does.

    Made from a SQLAlchemy URL (given_url) or from its parts (parts): the URL is built on first use.
    """

    entry: DatabaseEntry
    given_url: URL | None = None
    ssl_root: str | None = None  # the CA certificate (PEM, public) the entry's sslrootcert names
    parts: Address | None = None

    def __post_init__(self) -> None:
        if self.parts is None:
            assert self.given_url is not None, "a target needs a URL or its parts"
            object.__setattr__(self, "parts", Address.of(self.given_url))

    @property
    def address(self) -> Address:
        """Return where and as whom to connect, without SQLAlchemy."""
        assert self.parts is not None
        return self.parts

    @functools.cached_property
    def url(self) -> URL:
        """Return the SQLAlchemy URL (built from the parts on first use)."""
        return self.given_url if self.given_url is not None else self.address.to_url()

    @property
    def service(self) -> str:
        """Return the service whose history this database follows."""
        return self.entry.service

    @property
    def database(self) -> str:
        """Return the database name."""
        return self.entry.name

    @property
    def display(self) -> str:
        """Return the URL with the password hidden."""
        return self.address.display()

    def fields(self) -> dict[str, Any]:
        """Return the fields that identify this database in log lines."""
        out: dict[str, Any] = {"service": self.service, "database": self.database}
        out["instance"] = self.entry.instance or self.entry.location
        return out


def resolve_target(
    entry: DatabaseEntry, manifest: Manifest, resolver: SecretResolver, socket_root: Path
) -> Target:
    """Return the entry's target with its secrets read; raise SecretError if one cannot be."""
    try:
        if entry.auth == "iam":  # no secret to read: the job's identity, a token per connection
            parts = build_address(entry, iam.identity(entry.user).user, None, socket_root)
        elif entry.url is not None:
            raw = resolver.resolve(manifest.reference(entry.url))
            parts = Address.of(url_from_secret(raw, entry))
        else:
            assert entry.user is not None and entry.password is not None
            user = resolver.resolve(manifest.reference(entry.user), secret=False).get_secret_value()
            password = resolver.resolve(manifest.reference(entry.password))
            parts = build_address(entry, user, password, socket_root)
        root = entry.sslrootcert and resolver.resolve(manifest.reference(entry.sslrootcert), secret=False)
    except SecretError as exc:
        exc.service, exc.database = entry.service, entry.database
        raise
    return Target(entry, None, root.get_secret_value() if root else None, parts)


def build_url(entry: DatabaseEntry, user: str, password: SecretStr | None, socket_root: Path) -> URL:
    """Return the asyncpg URL for an entry: Cloud SQL socket directory or TCP host."""
    return build_address(entry, user, password, socket_root).to_url()


def build_address(entry: DatabaseEntry, user: str, password: SecretStr | None, socket_root: Path) -> Address:
    """Return where an entry's database is: its Cloud SQL socket directory, or its TCP host."""
    secret = password.get_secret_value() if password is not None else None
    if entry.instance is not None:
        check_socket_path(entry, socket_root / entry.instance / SOCKET_FILE)
        return Address(user, secret, entry.database, query=(("host", str(socket_root / entry.instance)),))
    return Address(user, secret, entry.database, entry.host, entry.port)


# The kernel's limit for a unix socket path (sun_path), including the final NUL.
MAX_SOCKET_PATH = 107
SSL_MODES = set(tls.MODES)  # not allow or prefer: they fall back to plain text


def check_socket_path(entry: DatabaseEntry, path: Path) -> None:
    """Raise ConfigError for a socket path too long to connect to (it would fail forever)."""
    size = len(str(path).encode())
    if size > MAX_SOCKET_PATH:
        raise ConfigError(
            f"the socket path {path} is too long: {size} bytes, over the {MAX_SOCKET_PATH}-byte "
            "limit of unix sockets",
            hint="set MIGRATE_SOCKET_DIR (or the manifest's socket_dir) to a shorter directory",
            service=entry.service,
            database=entry.database,
        )


def url_from_secret(raw: SecretStr, entry: DatabaseEntry) -> URL:
    """Return a whole-URL secret as an asyncpg URL, whatever driver prefix it was written with."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(raw.get_secret_value())
    except (ArgumentError, ValueError):
        # The parser's message would quote the value, password included.
        raise SecretError(
            f"secret {shown_reference(entry.url)} does not hold a database URL",
            hint="store postgresql://USER:PASSWORD@/DB?host=/cloudsql/P:R:I (password URL-quoted)",
        ) from None
    if not url.drivername.startswith("postgres"):
        raise SecretError(f"secret {shown_reference(entry.url)} holds a {url.drivername} URL, not PostgreSQL")
    if url.password:
        logs.redact(str(url.password))
    if url.database != entry.database:
        # Migrating a database other than the one the manifest (and so the logs) names is worse
        # than refusing: an empty database would even fall back to the driver's default.
        raise SecretError(
            f"secret {shown_reference(entry.url or '')} names database {url.database or '(none)'}, "
            f"but the manifest entry is for {entry.database}",
            hint="make the URL's database and the entry's database the same",
        )
    sslmode = url.query.get("sslmode")
    if sslmode is not None and sslmode not in SSL_MODES:
        raise SecretError(
            f"secret {shown_reference(entry.url or '')} has an unknown sslmode {sslmode!r}",
            hint=f"use one of {', '.join(sorted(SSL_MODES))}",
        )
    if "sslmode" in url.query:
        # libpq's (and psycopg's) sslmode is asyncpg's ssl, with the same mode names.
        url = url.difference_update_query(["sslmode"]).update_query_dict({"ssl": url.query["sslmode"]})
    return url.set(drivername=DRIVER)


def shown_reference(text: str | None) -> str:
    """Return a manifest's secret reference as messages may show it: a literal value never."""
    if text is not None and text.startswith(("secretmanager://", "env://", "file://")):
        return text
    return "<literal>"


def server_settings(target: Target, application_name: str | None = None) -> dict[str, str]:
    """Return the session settings every connection of the entry starts with."""
    settings = {
        "lock_timeout": str(int(target.entry.lock_timeout_s * 1000)),
        "statement_timeout": str(int(target.entry.statement_timeout_s * 1000)),
        # Not the default "$user", public: a schema named after the login cannot shadow anything.
        "search_path": quote_ident(DEFAULT_SCHEMA),
    }
    if application_name:
        settings["application_name"] = application_name
    if target.entry.owner:  # SET ROLE at login (RESET ROLE comes back to it); refused if not a member
        settings["role"] = target.entry.owner
    return settings


async def connect(
    target: Target, *, timeout_s: float, application_name: str, adopt: Any = None
) -> tuple[AsyncEngine, AsyncConnection]:
    """Return an open connection on the run's engine for its server, retrying transient failures.

    adopt: an open asyncpg connection to the target (the preflight's, job.handover) to use instead
    of logging in again; it was opened with the same login and session settings.
    """
    from job import engines

    settings = server_settings(target, application_name)
    login = {"timeout": min(10.0, timeout_s), "server_settings": settings, **iam.login_args(target.entry)}
    login.update(tls.connect_args(target))
    engine = engines.engine_for(target.url, login)
    engines.connecting_to(target.database, adopt)
    return engine, await with_retries(target, timeout_s, engine.connect)


async def connect_raw(target: Target, *, timeout_s: float, application_name: str) -> Any:
    """Return a plain asyncpg connection (no SQLAlchemy), for the one-query read-only checks."""
    import asyncpg

    where = target.address
    kwargs: dict[str, Any] = {
        "user": where.username,
        "password": where.password,
        "database": where.database,
        "host": where.get("host") or where.host,
        "port": where.port,
        "timeout": min(10.0, timeout_s),
        "server_settings": server_settings(target, application_name),
        **iam.login_args(target.entry),
        **tls.connect_args(target),
    }
    return await with_retries(target, timeout_s, lambda: asyncpg.connect(**kwargs))


T = TypeVar("T")


async def with_retries(target: Target, timeout_s: float, opener: Callable[[], Awaitable[T]]) -> T:
    """Return opener()'s connection, retrying transient failures (bounded by timeout_s; BUSY_S if busy)."""
    from tenacity import AsyncRetrying, retry_if_exception, wait_exponential_jitter, wait_random_exponential

    loop = asyncio.get_running_loop()
    started = loop.time()
    backoff = wait_exponential_jitter(multiplier=0.2, max=5.0, jitter=0.3)
    # Full jitter: tasks refused together must not all come back at the same moment.
    busy = wait_random_exponential(multiplier=0.2, max=2.0)

    def left(state: Any) -> tuple[bool, float]:
        waiting = sqlstate(state.outcome.exception() if state.outcome else None) == BUSY
        return waiting, max(timeout_s, BUSY_S if waiting else 0) - (state.seconds_since_start or 0.0)

    def pause(state: Any) -> float:
        # The last sleep ends at the deadline, so the whole wait is the deadline, not more.
        waiting, remaining = left(state)
        return max(0.0, min((busy if waiting else backoff)(state), remaining))

    try:
        async for attempt in AsyncRetrying(
            retry=retry_if_exception(is_transient),
            stop=lambda state: left(state)[1] <= 0 or state.attempt_number >= 1000,
            wait=pause,
            before_sleep=lambda state: _log_retry(target, state),
            reraise=True,
        ):
            with attempt:
                return await opener()
    except MigrateJobError:
        raise  # no token for an IAM login (SecretError): already says what to do
    except Exception as exc:
        raise connect_error(target, exc, loop.time() - started) from None
    raise AssertionError("unreachable: tenacity either returns or raises")


def quote_ident(name: str) -> str:
    """Return a PostgreSQL identifier quoted (names here come from env.py, never from input)."""
    return '"' + name.replace('"', '""') + '"'


async def read_version(
    connection: Any, table: str, schema: str | None, history: str
) -> tuple[tuple[str, ...], bool]:
    """Return the revisions in a version table and whether the table ``history`` exists, at once.

    One round trip; no version table yet is ``()``.
    """
    import asyncpg

    where = f"{quote_ident(schema or DEFAULT_SCHEMA)}.{quote_ident(table)}"
    try:
        sql = f"SELECT version_num, to_regclass($1) IS NOT NULL FROM {where}"
        rows = await connection.fetch(sql, history)
    except (asyncpg.UndefinedTableError, asyncpg.InvalidSchemaNameError):
        return (), False
    return tuple(sorted(r[0] for r in rows)), bool(rows and rows[0][1])


async def driver(connection: AsyncConnection) -> Any:
    """Return the asyncpg connection under a SQLAlchemy one, for single statements in autocommit.

    The job's own bookkeeping (lock polls, session settings) goes this way: one round trip each,
    where SQLAlchemy's BEGIN, prepare, execute and COMMIT would cost four.
    """
    raw = await connection.get_raw_connection()
    return raw.driver_connection


async def drop(connection: AsyncConnection, bound_s: float) -> None:
    """Close a SQLAlchemy connection at once, without the pool's rollback; never raises.

    The socket is dropped first: SQLAlchemy's own terminate closes gracefully, waiting for the
    backend to exit (about 2 ms). Each step is bounded by bound_s (after a cancel it may hang).
    """
    with contextlib.suppress(Exception, asyncio.CancelledError):
        (await driver(connection)).terminate()
    with contextlib.suppress(Exception, asyncio.CancelledError):
        await asyncio.wait_for(connection.invalidate(), bound_s)
    with contextlib.suppress(Exception, asyncio.CancelledError):
        await asyncio.wait_for(connection.close(), bound_s)


async def watch_client(connection: AsyncConnection) -> None:
    """Ask the server to notice a vanished client mid-statement (PostgreSQL 14+).

    Without it, a backend running a long migration for a SIGKILLed job keeps its transaction
    and the lock until the statement ends; with it, the backend aborts within seconds.
    """
    raw = await driver(connection)
    if raw.get_server_version() >= (14,):
        # Nor may the server end the lock's session while env.py migrates on its own connection.
        await raw.execute("SET client_connection_check_interval = '2s'; SET idle_session_timeout = 0")


async def backend_pid(connection: AsyncConnection) -> int:
    """Return the server process id serving this connection (known since the login; no query)."""
    return int((await driver(connection)).get_server_pid())


def _log_retry(target: Target, state: Any) -> None:
    """Log one connection retry with its reason and the wait before the next."""
    exc = state.outcome.exception() if state.outcome else None
    logs.event(
        "db.connect_retry",
        f"cannot connect to {target.entry.label} yet ({describe(exc)}); retrying",
        level=30,
        attempt=state.attempt_number,
        wait_s=round(state.next_action.sleep, 2) if state.next_action else None,
        reason=describe(exc),
        **target.fields(),
    )


def _where(target: Target) -> str:
    """Return host:port or the socket directory a target connects to."""
    url = target.url
    if url.host:
        return f"{url.host}:{url.port or 5432}"
    socket = url.query.get("host")
    return str(socket) if socket else target.entry.location


def connect_error(target: Target, exc: BaseException, elapsed_s: float) -> ConnectError:
    """Return the operator-facing error for a connection that failed for good."""
    reason = describe(exc)
    state = sqlstate(exc)
    entry = target.entry
    if state in ("28P01", "28000") and entry.auth == "iam":
        hint = iam.refused_hint(entry, target.url.username or "")
    elif state in ("42501", "22023") and entry.owner and "role" in reason:
        user, owner = quote_ident(target.url.username or ""), quote_ident(entry.owner)
        hint = f"the login must be a member of the owner role: GRANT {owner} TO {user}"
        hint += f" (first CREATE ROLE {owner} NOLOGIN if it does not exist)" if state == "22023" else ""
    elif state == "28P01":
        hint = (
            f"check that the password secret {shown_reference(entry.password or entry.url)} "
            f"matches role {target.url.username}"
        )
    elif state == "3D000":
        hint = f"create database {entry.database} on {entry.location} or fix the manifest"
    elif state == "28000":
        hint = f"check that role {target.url.username} exists and may log in"
    elif tls.refused(exc, causes(exc)):
        hint = tls.hint(target)
    elif entry.instance:
        socket = Path(target.url.query["host"]) / SOCKET_FILE  # type: ignore[arg-type]
        hint = (
            f"no answer on {socket} after {elapsed_s:.0f}s: add the instance to the job "
            f"(--set-cloudsql-instances {entry.instance}) and check that it is running"
        )
    else:
        hint = f"no answer from {_where(target)} after {elapsed_s:.0f}s: check the host and network"
    return ConnectError(
        f"cannot connect to database {entry.database} of service {entry.service}: {reason}",
        hint=hint,
        service=entry.service,
        database=entry.database,
        instance=entry.instance or entry.location,
        url=target.display,
        sqlstate=state,
    )
