"""What the bench runs against: its databases and login role, the manifest and URLs that reach them."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import asyncpg
from alembic.config import Config
from alembic.script import ScriptDirectory

from devtools.bench.measure import BenchError
from devtools.pgserver import PgServer

# The bench's own history: 30 revisions of a tenant schema (tables with indexes, added columns,
# partial indexes, backfills then NOT NULL, check constraints), as a fleet of tenant databases has.
SERVICES_DIR = Path(__file__).resolve().parent / "services"
SERVICES = ("tenants",)
ROLE = "bench_migrator"
# Every character that broke the old shell script, plus the ones that break TOML and conninfo quoting.
PASSWORD = 'B3nch p@ss:/#?%<>&()\' "w0rd"\\;='
PASSWORD_ENV = "BENCH_DB_PASSWORD"
PROJECT = "bench"
INSTANCE = "bench:us-central1:bench-db"
DB_PREFIX = "bench_"
# Databases every reset copies (CREATE DATABASE ... TEMPLATE): at head, and one revision before it.
TEMPLATES = {"head": "bench_template_head", "prev": "bench_template_prev"}


@dataclass(frozen=True)
class Database:
    """One benchmark database and the service whose history it carries."""

    name: str
    service: str


@dataclass(frozen=True)
class Endpoint:
    """How clients reach the server: a Cloud SQL-shaped socket directory, else TCP."""

    host: str
    port: int
    socket_root: Path | None = None

    @property
    def socket_dir(self) -> Path | None:
        """Return the instance's socket directory (holding .s.PGSQL.5432), if sockets are used."""
        return None if self.socket_root is None else self.socket_root / INSTANCE

    def libpq_host(self) -> tuple[str, int]:
        """Return the (host, port) a libpq client gives: the socket directory or the TCP address."""
        sock = self.socket_dir
        return (str(sock), 5432) if sock is not None else (self.host, self.port)


def bench_databases(count: int) -> list[Database]:
    """Return count databases named bench_<service>_NNN, services assigned round-robin."""
    width = max(3, len(str(count)))
    result = []
    for i in range(count):
        service = SERVICES[i % len(SERVICES)]
        result.append(Database(f"{DB_PREFIX}{service.replace('-', '_')}_{i + 1:0{width}d}", service))
    return result


def endpoint_for(server: PgServer, workdir: Path) -> Endpoint:
    """Return a Cloud SQL-shaped socket endpoint if the server has a socket, else TCP."""
    # Sockets as on Cloud Run, where the job reaches Cloud SQL through /cloudsql/<instance>.
    if server.socket_dir is not None:
        root = server.cloudsql_dir(workdir / "cloudsql", [INSTANCE])
        return Endpoint(server.host, server.port, root)
    return Endpoint(server.host or "127.0.0.1", server.port)


def toml_string(value: str) -> str:
    """Return value as a TOML basic string (JSON escapes are valid TOML escapes)."""
    return json.dumps(value, ensure_ascii=False)


def render_manifest(databases: Sequence[Database], endpoint: Endpoint, *, list_form: bool) -> str:
    """Return the job's manifest: one block per service (``databases = [...]``) or per database."""
    if endpoint.socket_root is not None:
        where = [f"instance = {toml_string(INSTANCE)}"]
    else:
        where = [f"host = {toml_string(endpoint.host)}", f"port = {endpoint.port}"]
    login = [f"user = {toml_string(ROLE)}", f"password = {toml_string('env://' + PASSWORD_ENV)}"]
    lines = [f"project = {toml_string(PROJECT)}"]
    if list_form:
        for service in SERVICES:
            names = [db.name for db in databases if db.service == service]
            if names:
                listed = ", ".join(toml_string(n) for n in names)
                head = [f"service = {toml_string(service)}", f"databases = [{listed}]"]
                lines += ["", "[[databases]]", *head, *where, *login]
    else:
        for db in databases:
            head = [f"service = {toml_string(db.service)}", f"database = {toml_string(db.name)}"]
            lines += ["", "[[databases]]", *head, *where, *login]
    return "\n".join(lines) + "\n"


def alembic_url(db: Database, endpoint: Endpoint) -> str:
    """Return DATABASE_URL for a stand-alone alembic run, every component percent-quoted."""
    return client_url(db, endpoint)


def client_url(
    db: Database,
    endpoint: Endpoint,
    *,
    scheme: str = "postgresql",
    socket_key: str = "host",
    tcp_query: str = "",
) -> str:
    """Return a client's URL for db, every component percent-quoted: socket as a query, or TCP."""
    userinfo = f"{quote(ROLE, safe='')}:{quote(PASSWORD, safe='')}"
    sock = endpoint.socket_dir
    if sock is not None:
        return f"{scheme}://{userinfo}@/{quote(db.name, safe='')}?{socket_key}={quote(str(sock), safe='/')}"
    return f"{scheme}://{userinfo}@{endpoint.host}:{endpoint.port}/{quote(db.name, safe='')}{tcp_query}"


def conninfo(db: Database, endpoint: Endpoint) -> str:
    """Return a libpq keyword/value conninfo for psql (the password goes in PGPASSWORD)."""
    host, port = endpoint.libpq_host()
    pairs = {"host": host, "port": str(port), "dbname": db.name, "user": ROLE}
    return " ".join(f"{key}={_conninfo_quote(value)}" for key, value in pairs.items())


def _conninfo_quote(value: str) -> str:
    """Quote one conninfo value: single quotes, with backslash and quote escaped."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def mask(text: str) -> str:
    """Hide the benchmark password (raw and URL-quoted) in output we print."""
    for secret in (PASSWORD, quote(PASSWORD, safe=""), quote(PASSWORD, safe="/")):
        text = text.replace(secret, "***")
    return text


def alembic_ini(service: str) -> Path:
    """Return a bench service's alembic.ini."""
    return SERVICES_DIR / service / "alembic.ini"


def revisions(service: str) -> list[str]:
    """Return a service's revisions, oldest first (the bench's histories are linear)."""
    script = ScriptDirectory.from_config(Config(str(alembic_ini(service))))
    return [s.revision for s in reversed(list(script.walk_revisions()))]


def service_heads() -> dict[str, str]:
    """Return each service's single head revision, read from its scripts."""
    return {service: revisions(service)[-1] for service in SERVICES}


def quote_ident(name: str) -> str:
    """Return a double-quoted SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


def _drop(db: Database) -> str:
    """Return the statement that drops db; FORCE ends sessions a variant may have left."""
    return f"DROP DATABASE IF EXISTS {quote_ident(db.name)} WITH (FORCE)"


async def _execute(server: PgServer, statements: Sequence[str], database: str = "postgres") -> None:
    """Run statements in order as the admin, over one connection to database."""
    conn = await asyncpg.connect(server.admin_dsn(database), timeout=30)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


def create_database(name: str, template: str | None = None, *, file_copy: bool = False) -> str:
    """Return the CREATE DATABASE of a bench database, empty or a copy of a template."""
    copy = f" TEMPLATE {quote_ident(template)}" if template else ""
    # FILE_COPY (PostgreSQL 15+) writes a copy once; the default WAL_LOG also writes it to the WAL,
    # which makes a thousand copies, and dropping them, many times slower.
    strategy = " STRATEGY FILE_COPY" if file_copy else ""
    return f"CREATE DATABASE {quote_ident(name)}{copy} OWNER {quote_ident(ROLE)}{strategy}"


def reset_databases(server: PgServer, databases: Sequence[Database], template: str | None = None) -> float:
    """Drop and create every database, empty or from template; return the seconds taken."""
    start = time.perf_counter()
    file_copy = int(server.fetch("SHOW server_version_num")[0]["server_version_num"]) >= 150000
    statements = []
    for db in databases:
        statements += [_drop(db), create_database(db.name, template, file_copy=file_copy)]
    asyncio.run(_execute(server, statements))
    return time.perf_counter() - start


def drop_all(server: PgServer, databases: Sequence[Database]) -> None:
    """Drop every bench database, the templates and the bench role."""
    templates = [Database(name, "") for name in TEMPLATES.values()]
    drops = [*map(_drop, [*databases, *templates]), f"DROP ROLE IF EXISTS {quote_ident(ROLE)}"]
    asyncio.run(_execute(server, drops))


def record_dbmate(server: PgServer, database: str, versions: Sequence[str]) -> None:
    """Record versions in dbmate's schema_migrations of database, as dbmate itself would."""
    table = "schema_migrations"
    rows = ", ".join(f"('{v}')" for v in versions)
    statements = [
        f"CREATE TABLE {table} (version varchar(128) PRIMARY KEY)",
        f"ALTER TABLE {table} OWNER TO {quote_ident(ROLE)}",
        f"INSERT INTO {table} (version) VALUES {rows}",
    ]
    execute(server, statements, database)


async def _revisions(server: PgServer, databases: Sequence[Database]) -> dict[str, list[str]]:
    """Return each database's alembic_version rows (empty if the table is missing)."""
    found: dict[str, list[str]] = {}
    for db in databases:
        conn = await asyncpg.connect(server.admin_dsn(db.name), timeout=30)
        try:
            exists = await conn.fetchval("SELECT to_regclass('public.alembic_version') IS NOT NULL")
            rows = await conn.fetch("SELECT version_num FROM alembic_version") if exists else []
            found[db.name] = [row["version_num"] for row in rows]
        finally:
            await conn.close()
    return found


def check_at_head(server: PgServer, databases: Sequence[Database], heads: Mapping[str, str]) -> None:
    """Raise BenchError unless every database is at its service's head (untimed check)."""
    found = asyncio.run(_revisions(server, databases))
    wrong = [f"{db.name}={found[db.name]}" for db in databases if found[db.name] != [heads[db.service]]]
    if wrong:
        raise BenchError(f"{len(wrong)} database(s) not at head: {', '.join(wrong[:5])}")


def execute(server: PgServer, statements: Sequence[str], database: str = "postgres") -> None:
    """Run statements in order as the admin on database."""
    asyncio.run(_execute(server, statements, database))


async def _dbmate_counts(server: PgServer, databases: Sequence[Database]) -> dict[str, int]:
    """Return how many versions each database's schema_migrations holds."""
    found: dict[str, int] = {}
    for db in databases:
        conn = await asyncpg.connect(server.admin_dsn(db.name), timeout=30)
        try:
            found[db.name] = await conn.fetchval("SELECT count(*) FROM schema_migrations")
        finally:
            await conn.close()
    return found


def check_dbmate(server: PgServer, databases: Sequence[Database], count: int) -> None:
    """Raise BenchError unless dbmate recorded count versions in every database (untimed check)."""
    found = asyncio.run(_dbmate_counts(server, databases))
    wrong = [f"{name}={n}" for name, n in found.items() if n != count]
    if wrong:
        raise BenchError(
            f"{len(wrong)} database(s) without all {count} dbmate versions: {', '.join(wrong[:5])}"
        )
