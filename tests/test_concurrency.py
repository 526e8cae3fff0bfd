"""Executions that overlap, and migrations that meet the application's traffic: real processes, real locks."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import asyncpg

from tests import support
from tests.conftest import Database
from tests.support import FIXTURES, HEADS, PROJECT, JobRun, record_output, write_manifest

SLOW_REVISIONS = ["bbbb00000001", "bbbb00000002", "bbbb00000003"]
ALTERING_FIRST, ALTERING_HEAD = "cccc00000001", "cccc00000002"
INDEXING_REVISIONS = ["dddd00000001", "dddd00000002", "dddd00000003"]
FIXTURE_SERVICES = str(FIXTURES / "services")
# The advisory locks that the first revisions of the slow and indexing fixtures wait for.
SLOW_GATE, INDEXING_GATE = 74_700_001, 74_700_002
# The session waiting for a gate: the execution that holds the migration lock.
GATE_WAITER_SQL = """
SELECT a.pid, a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND NOT l.granted AND l.classid = 0 AND l.objid = $1 AND l.objsubid = 1
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
"""
# Sessions queued for a table lock on widgets that they have not been granted yet.
QUEUED_DDL_SQL = """
SELECT count(*) FROM pg_locks
WHERE relation = 'widgets'::regclass AND mode = 'AccessExclusiveLock' AND NOT granted
"""


@dataclass
class Started:
    """A job process started in the background, its output going to files."""

    name: str
    proc: Any  # a job process: subprocess.Popen's interface (tests.support.start_job)
    stdout: IO[bytes]
    stderr: IO[bytes]
    stdout_path: Path

    def logged(self, event: str) -> bool:
        """Return True if the process has logged this event so far (the job flushes every line)."""
        return f'"event": "{event}"' in self.stdout_path.read_text(encoding="utf-8")

    def finish(self, timeout: float = 60) -> JobRun:
        """Wait for the process and return its run; its output goes to the session's leak check."""
        try:
            code = self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.stdout.seek(0)
            self.stderr.seek(0)
            out = self.stdout.read().decode()
            err = self.stderr.read().decode()
            self.stdout.close()
            self.stderr.close()
            record_output(out + err)
        return JobRun(code, out, err)


def start_job(*args: str, env: dict[str, str], name: str, out_dir: Path) -> Started:
    """Start ``python -m job ARGS`` with the environment support.run_job builds, without waiting."""
    # Each execution says who it is, so a lock holder named in an error can be traced to its run.
    stdout_path = out_dir / f"{name}.out"
    stdout = stdout_path.open("w+b")
    stderr = (out_dir / f"{name}.err").open("w+b")
    proc = support.start_job(*args, env={**env, "CLOUD_RUN_EXECUTION": name}, stdout=stdout, stderr=stderr)
    return Started(name, proc, stdout, stderr, stdout_path)


def run_at_once(count: int, env: dict[str, str], out_dir: Path, prefix: str) -> dict[str, JobRun]:
    """Start count executions together and return their runs by execution name."""
    started = [start_job(env=env, name=f"{prefix}-{i}", out_dir=out_dir) for i in range(count)]
    return {s.name: s.finish() for s in started}


def run_one(*args: str, env: dict[str, str], out_dir: Path, name: str) -> JobRun:
    """Run one execution to its end."""
    return start_job(*args, env=env, name=name, out_dir=out_dir).finish()


def applied_counts(runs: list[JobRun]) -> Counter[tuple[str, str]]:
    """Return how many times each (database, revision) was applied across runs."""
    return Counter((e["database"], e["revision"]) for run in runs for e in run.events("migration.applied"))


def assert_no_race_errors(runs: list[JobRun]) -> None:
    """No run tripped over another one in alembic_version, and nothing escaped the JSON log."""
    for run in runs:
        for text in (run.stdout, run.stderr):
            assert "UniqueViolation" not in text and "duplicate key" not in text, text
        assert run.stderr == "", run.stderr
        assert run.summary["exit_code"] == run.code


def environment(
    job_env: dict[str, str], tmp_path: Path, databases: list[Database], **entry: Any
) -> dict[str, str]:
    """Return the job's environment with a manifest of these databases (entry keys added to each)."""
    manifest = write_manifest(
        tmp_path / "env.toml", [{**d.entry(), **entry} for d in databases], project=PROJECT
    )
    return {**job_env, "MIGRATE_MANIFEST": str(manifest), "MIGRATE_SERVICES_DIR": FIXTURE_SERVICES}


def test_eight_executions_at_once_apply_each_revision_exactly_once(
    make_database: Callable[..., Database], tmp_path: Path, job_env: dict[str, str]
) -> None:
    """Eight executions of one manifest race on three fresh databases; the lock serialises them.

    Cloud Build retries, a manual `gcloud run jobs execute` and a release pipeline can overlap.
    Without the lock two of them would both read base and both apply the first revision: one
    fails on alembic_version's primary key, or worse, a non-idempotent revision runs twice.
    """
    databases = [make_database(s) for s in ("settlement", "risk-engine", "compliance")]
    manifest = write_manifest(tmp_path / "env.toml", [d.entry() for d in databases], project=PROJECT)
    env = {**job_env, "MIGRATE_MANIFEST": str(manifest), "MIGRATE_LOCK_WAIT_S": "60"}

    runs = run_at_once(8, env, tmp_path, "race")

    assert {name: run.code for name, run in runs.items()} == dict.fromkeys(runs, 0), {
        n: r.stdout[-2000:] for n, r in runs.items() if r.code
    }
    assert_no_race_errors(list(runs.values()))
    counts = applied_counts(list(runs.values()))
    expected = {
        (databases[0].name, "c81a6c877761"),
        (databases[0].name, HEADS["settlement"]),
        (databases[1].name, HEADS["risk-engine"]),
        (databases[2].name, "ac845c92cc2a"),
        (databases[2].name, HEADS["compliance"]),
    }
    assert set(counts) == expected and set(counts.values()) == {1}, counts
    # A run that planned work, then found it done once it held the lock, re-read and said so.
    late = [
        (name, e["database"])
        for name, run in runs.items()
        for e in run.events("lock.acquired")
        if not any(a["database"] == e["database"] for a in run.events("migration.applied"))
    ]
    # How many overlap depends on the machine's load; the gated test below forces contention.
    for name, database_name in late:
        replanned = [e for e in runs[name].events("db.plan") if e.get("replanned")]
        assert any(e["database"] == database_name and e["pending"] == [] for e in replanned), name
    for database in databases:
        assert database.version() == [HEADS[database.service]]
        statuses = [run.by_database()[database.name]["status"] for run in runs.values()]
        assert statuses.count("applied") <= 1 and set(statuses) <= {"applied", "current"}, statuses


class Gate:
    """The advisory lock a fixture's first revision waits for, held by the test.

    While the gate is shut, the execution that took the migration lock stays inside that
    revision: the test decides how long the lock is held, whatever the machine's load.
    """

    def __init__(self, dsn: str, key: int) -> None:
        self.dsn = dsn
        self.key = key
        self.connection: asyncpg.Connection | None = None

    async def __aenter__(self) -> Gate:
        self.connection = await asyncpg.connect(self.dsn, server_settings={"application_name": "gate"})
        await self.connection.fetchval("SELECT pg_advisory_lock($1)", self.key)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.open()

    async def open(self) -> None:
        """Let the waiting revision through (closing the session releases the lock)."""
        if self.connection is not None:
            await self.connection.close()
            self.connection = None

    async def waiter(self) -> dict[str, Any] | None:
        """Return the pid and application_name of the session stopped at the gate, if any."""
        assert self.connection is not None
        row = await self.connection.fetchrow(GATE_WAITER_SQL, self.key)
        return dict(row) if row else None

    async def reached(self, timeout: float) -> dict[str, Any] | None:
        """Return the session stopped at the gate, waiting up to timeout for one to get there."""
        deadline = time.monotonic() + timeout
        while (found := await self.waiter()) is None and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return found


def waiting(started: list[Started]) -> list[str]:
    """Return the executions that have logged that they wait for the migration lock."""
    return [s.name for s in started if s.logged("lock.waiting")]


async def finish_all(started: list[Started]) -> dict[str, JobRun]:
    """Wait for every started process (off the event loop) and return their runs by name."""
    return {s.name: await asyncio.to_thread(s.finish) for s in started}


def test_executions_that_find_the_lock_taken_exit_5_naming_the_holder(
    make_database: Callable[..., Database], tmp_path: Path, job_env: dict[str, str]
) -> None:
    """With MIGRATE_LOCK_WAIT_S=0 a loser exits 5 at once, naming the execution that holds the lock.

    The first to take the lock is held at the slow fixture's gate until the seven others have
    ended, so the race has one outcome whatever the machine's load: each loser's one error names
    the winner's pid and application_name (its Cloud Run execution); a final run finds head.
    """
    database = make_database("slow")
    env = {
        **environment(job_env, tmp_path, [database], lock_timeout_s=30),
        "MIGRATE_LOCK_WAIT_S": "0",
    }

    async def scenario() -> tuple[dict[str, JobRun], dict[str, Any] | None]:
        started: list[Started] = []
        try:
            async with Gate(database.pg.admin_dsn(database.name), SLOW_GATE) as gate:
                started.extend(start_job(env=env, name=f"wait0-{i}", out_dir=tmp_path) for i in range(8))
                await wait_until(lambda: sum(s.proc.poll() is not None for s in started) >= 7, 60)
                # The losers may end before the winner reaches the gate (it still has to run env.py).
                winner = await gate.reached(60)
        finally:
            runs = await finish_all(started)
        return runs, winner

    runs, winner = asyncio.run(scenario())

    codes = {name: run.code for name, run in runs.items()}
    assert set(codes.values()) <= {0, 5}, {
        n: r.stdout[-2000:] for n, r in runs.items() if r.code not in (0, 5)
    }
    assert winner is not None, codes
    winner_name = winner["application_name"].removeprefix("migrate-job:").removesuffix(":0")
    assert codes == {name: 0 if name == winner_name else 5 for name in runs}, (winner, codes)
    assert_no_race_errors(list(runs.values()))
    assert [e["revision"] for e in runs[winner_name].events("migration.applied")] == SLOW_REVISIONS
    for name, run in runs.items():
        if name == winner_name:
            continue
        errors = run.events("run.error")
        assert len(errors) == 1 and errors[0]["error"] == "lock_timeout", errors
        error = errors[0]
        assert error["holder_pid"] == winner["pid"] and f"pid {winner['pid']}" in error["message"], error
        assert error["holder_application"] == winner["application_name"], error
        assert winner["application_name"] in error["message"] and "MIGRATE_LOCK_WAIT_S" in error["hint"]
        assert run.events("migration.applied") == [] and run.events("lock.acquired") == []
        assert run.by_database()[database.name]["status"] == "failed"

    final = run_one(env=env, out_dir=tmp_path, name="wait0-final")
    assert final.code == 0, final.stdout
    assert final.events("migration.applied") == [] and final.summary["databases"][0]["status"] == "current"
    counts = applied_counts([*runs.values(), final])
    assert counts == Counter({(database.name, rev): 1 for rev in SLOW_REVISIONS}), counts
    assert database.version() == [SLOW_REVISIONS[-1]]
    assert {"slow_one", "slow_two", "slow_three"} <= database.tables()


@dataclass
class Probe:
    """One application query on widgets: was the migration's DDL queued when it was sent, how long it took."""

    ddl_queued: bool
    seconds: float


async def probe_widgets(dsn: str, job: Started, probes: list[Probe]) -> None:
    """Query widgets as the application would, over and over, until the job's process ends."""
    connection = await asyncpg.connect(dsn)
    try:
        while job.proc.poll() is None:
            queued = bool(await connection.fetchval(QUEUED_DDL_SQL))
            started = time.monotonic()
            await connection.fetchval("SELECT count(*) FROM widgets")
            probes.append(Probe(queued, time.monotonic() - started))
            await asyncio.sleep(0.02)
    finally:
        await connection.close()


async def wait_until(condition: Callable[[], bool], timeout: float) -> None:
    """Wait, without blocking the event loop, until condition holds or timeout passes."""
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)


async def wait_for_exit(job: Started, timeout: float) -> None:
    """Wait for the job's process without blocking the event loop."""
    await wait_until(lambda: job.proc.poll() is not None, timeout)


async def block_widgets(dsn: str) -> tuple[asyncpg.Connection, int]:
    """Open a transaction that read widgets and stays open: a long report, a forgotten session."""
    connection = await asyncpg.connect(dsn, server_settings={"application_name": "nightly-report"})
    pid = await connection.fetchval("SELECT pg_backend_pid()")
    await connection.execute("BEGIN")
    await connection.execute("LOCK TABLE widgets IN ACCESS SHARE MODE")
    return connection, pid


def prepare_altering(
    make_database: Callable[..., Database],
    socket_root: Path | None,
    tmp_path: Path,
    job_env: dict[str, str],
    retries: int,
) -> tuple[Database, dict[str, str]]:
    """Return a database at the altering fixture's first revision, and the environment to upgrade it.

    The first revision is applied in process with the job's own executor: a job process costs
    about two seconds of imports, and this step is not what the test is about.
    """
    from pydantic import SecretStr

    from job import db
    from job.executor import Execution, execute
    from job.manifest import DatabaseEntry
    from job.services import discover

    database = make_database("altering")
    entry = DatabaseEntry.model_validate(database.entry())
    url = db.build_url(entry, database.role, SecretStr(database.password), socket_root or Path("/"))
    target = db.Target(entry, url)

    async def first_revision() -> None:
        engine, connection = await db.connect(target, timeout_s=5, application_name="test")
        try:
            service = discover(FIXTURES / "services")["altering"]
            await execute(connection, Execution(service, target, ALTERING_FIRST, apply=True))
        finally:
            await connection.close()
            await engine.dispose()

    asyncio.run(first_revision())
    assert database.version() == [ALTERING_FIRST]
    env = environment(
        job_env, tmp_path, [database], lock_timeout_s=0.5, lock_retries=retries, lock_retry_s=30
    )
    return database, env


def colour_exists(database: Database) -> bool:
    """Return True if the second revision's column is there."""
    rows = database.pg.fetch(
        "SELECT 1 FROM information_schema.columns WHERE table_name = 'widgets' AND column_name = 'colour'",
        database=database.name,
    )
    return bool(rows)


def test_ddl_behind_a_reader_gives_way_to_traffic_and_retries_until_it_gets_the_lock(
    make_database: Callable[..., Database],
    socket_root: Path | None,
    tmp_path: Path,
    job_env: dict[str, str],
) -> None:
    """An ALTER TABLE behind an open transaction times out after lock_timeout, retries, and lands.

    While an ALTER waits for its ACCESS EXCLUSIVE lock, every new query on the table queues behind
    it: without lock_timeout one idle-in-transaction session turns a migration into an outage. The
    probe proves the application's queries wait at most about lock_timeout, and the job still
    applies the revision once the reader is gone.
    """
    database, env = prepare_altering(make_database, socket_root, tmp_path, job_env, retries=20)
    dsn = database.pg.admin_dsn(database.name)
    probes: list[Probe] = []

    async def scenario() -> tuple[JobRun, int]:
        blocker, blocker_pid = await block_widgets(dsn)
        job = start_job(env=env, name="altering-retry", out_dir=tmp_path)
        try:
            probing = asyncio.create_task(probe_widgets(dsn, job, probes))
            # The reader stays for 2 s after the ALTER first queued: several lock timeouts.
            await wait_until(lambda: any(p.ddl_queued for p in probes), 15)
            await asyncio.sleep(2.0)
            await blocker.execute("ROLLBACK")
            await wait_for_exit(job, 30)
            await probing
        finally:
            await blocker.close()
            run = await asyncio.to_thread(job.finish, 30)
        return run, blocker_pid

    run, blocker_pid = asyncio.run(scenario())

    assert run.code == 0, run.stdout
    assert_no_race_errors([run])
    retried = run.events("migration.lock_timeout")
    assert retried and all(e["revision"] == ALTERING_HEAD for e in retried), retried
    assert any(b["pid"] == blocker_pid for e in retried for b in e.get("blockers") or []), retried
    assert [e["revision"] for e in run.events("migration.applied")] == [ALTERING_HEAD]
    assert database.version() == [ALTERING_HEAD] and colour_exists(database)
    queued = [p.seconds for p in probes if p.ddl_queued]
    assert queued, "the probe never ran while the ALTER was queued"
    assert max(queued) > 0.1, "queries sent while the ALTER was queued should have waited behind it"
    assert max(p.seconds for p in probes) < 1.5, sorted(p.seconds for p in probes)[-5:]


def test_ddl_blocked_for_good_fails_naming_the_blocking_session(
    make_database: Callable[..., Database],
    socket_root: Path | None,
    tmp_path: Path,
    job_env: dict[str, str],
) -> None:
    """When the retries run out the run is exit 7 and says which session held the table.

    PostgreSQL's own lock_timeout error names nobody; the operator needs the pid to find the
    session (and its application) that kept the migration out. The revision rolled back.
    """
    database, env = prepare_altering(make_database, socket_root, tmp_path, job_env, retries=2)
    dsn = database.pg.admin_dsn(database.name)

    async def scenario() -> tuple[JobRun, int]:
        blocker, blocker_pid = await block_widgets(dsn)
        job = start_job(env=env, name="altering-blocked", out_dir=tmp_path)
        try:
            await wait_for_exit(job, 30)
        finally:
            await blocker.close()
            run = await asyncio.to_thread(job.finish, 30)
        return run, blocker_pid

    run, blocker_pid = asyncio.run(scenario())

    assert run.code == 7, run.stdout
    assert_no_race_errors([run])
    errors = run.events("run.error")
    assert len(errors) == 1 and errors[0]["error"] == "migration_failed", errors
    assert errors[0]["revision"] == ALTERING_HEAD
    assert f"blocked by pid {blocker_pid} (nightly-report" in errors[0]["message"], errors[0]["message"]
    assert len(run.events("migration.lock_timeout")) == 2
    assert run.events("migration.applied") == []
    assert database.version() == [ALTERING_FIRST] and not colour_exists(database)


def test_create_index_concurrently_under_three_executions(
    make_database: Callable[..., Database], tmp_path: Path, job_env: dict[str, str]
) -> None:
    """A revision that builds an index CONCURRENTLY (autocommit_block) works while others wait.

    CREATE INDEX CONCURRENTLY waits for every transaction older than it in the database. The
    holder's own lock is session-level (no transaction) and waiters poll in short transactions,
    so the build neither deadlocks nor stalls. The gate in the first revision makes sure both
    other executions are already polling for the lock when the index build starts.
    """
    database = make_database("indexing")
    env = {
        **environment(job_env, tmp_path, [database], lock_timeout_s=30),
        "MIGRATE_LOCK_WAIT_S": "30",
    }

    async def scenario() -> tuple[dict[str, JobRun], dict[str, Any] | None, list[str]]:
        started: list[Started] = []
        try:
            async with Gate(database.pg.admin_dsn(database.name), INDEXING_GATE) as gate:
                started.extend(start_job(env=env, name=f"cic-{i}", out_dir=tmp_path) for i in range(3))
                # The gate opens once the two others have said that they wait for the lock.
                await wait_until(lambda: len(waiting(started)) >= 2, 60)
                winner = await gate.reached(60)
                polling = waiting(started)
        finally:
            runs = await finish_all(started)
        return runs, winner, polling

    runs, winner, polling = asyncio.run(scenario())

    assert winner is not None and len(polling) == 2, (winner, polling)
    assert {run.code for run in runs.values()} == {0}, {n: r.stdout[-2000:] for n, r in runs.items()}
    assert_no_race_errors(list(runs.values()))
    counts = applied_counts(list(runs.values()))
    assert counts == Counter({(database.name, rev): 1 for rev in INDEXING_REVISIONS}), counts
    winner_name = winner["application_name"].removeprefix("migrate-job:").removesuffix(":0")
    assert winner_name not in polling
    for name, run in runs.items():
        assert run.events("migration.lock_timeout") == [], name
        if name != winner_name:
            assert run.events("lock.waiting") and run.events("migration.applied") == [], name
    assert database.version() == [INDEXING_REVISIONS[-1]] and "gizmo_notes" in database.tables()
    index = database.pg.fetch(
        "SELECT indisvalid, indisready FROM pg_index WHERE indexrelid = 'ix_gizmos_code'::regclass",
        database=database.name,
    )
    assert index == [{"indisvalid": True, "indisready": True}]
    # Had it waited for a poller's transaction, the build would have lasted until lock_timeout.
    (build,) = [e for e in runs[winner_name].events("migration.applied") if e["revision"] == "dddd00000002"]
    assert build["duration_ms"] < 3000, build
