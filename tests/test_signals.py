"""Signals in the middle of a run: SIGTERM, SIGKILL and SIGINT never leave a half-applied revision.

Cloud Run stops a task with SIGTERM (then SIGKILL after the grace period), and an operator stops a
local run with Ctrl-C. Each test runs the real job as a process on the ``sleepy`` fixture service
(four revisions, each creating a table and then sleeping 0.3 s in its transaction), stops it at
random moments, and checks the database and the server afterwards.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from devtools.pgserver import PgServer
from tests.conftest import Database
from tests.support import FIXTURES, PASSWORD, REPO, JobRun, record_output, write_manifest

REVISIONS = ("5eee00000001", "5eee00000002", "5eee00000003", "5eee00000004")
HEAD = REVISIONS[-1]
SERVICES_DIR = FIXTURES / "services"
# The Cloud Run context of every execution here: it makes application_name "migrate-job:...".
CLOUD_RUN = {
    "CLOUD_RUN_JOB": "migrate-job",
    "CLOUD_RUN_EXECUTION": "migrate-job-signals",
    "CLOUD_RUN_TASK_INDEX": "0",
    "CLOUD_RUN_TASK_COUNT": "1",
    "CLOUD_RUN_TASK_ATTEMPT": "0",
}
KILLS = 20
# The job must have exited within this long after SIGTERM or SIGINT.
EXIT_WITHIN_S = 5.0
# The server notices a vanished client within client_connection_check_interval (2 s).
BACKEND_GONE_WITHIN_S = 5.0
# Set it to replay the random kill moments of an earlier run (the seed is in every message).
SEED_VARIABLE = "MIGRATE_TEST_SIGNAL_SEED"


class JobProcess:
    """``python -m job`` as a child process whose stdout lines are collected as they come."""

    def __init__(self, env: dict[str, str], *args: str) -> None:
        # The environment of tests.support.run_job: the parent's, minus any MIGRATE_/CLOUD_RUN_.
        base = {k: v for k, v in os.environ.items() if not k.startswith(("MIGRATE_", "CLOUD_RUN_"))}
        base.update({"MIGRATE_LOG_FORMAT": "json", "MIGRATE_CONNECT_TIMEOUT_S": "3"})
        base.update(env)
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "job", *args],
            env=base,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[tuple[float, str]] = []
        self.exited_after_s: float | None = None
        self.run: JobRun | None = None
        self._stderr: list[str] = []
        self._eof = False
        self._changed = threading.Condition()
        self._readers = [
            threading.Thread(target=self._read_stdout, daemon=True),
            threading.Thread(target=self._read_stderr, daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def __enter__(self) -> JobProcess:
        """Return the running job; leaving the block makes sure it is gone and recorded."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Kill the job if a failed assertion left it running; record its output either way."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._collect()

    def _read_stdout(self) -> None:
        """Reader thread: keep each stdout line with the time it arrived."""
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append((time.monotonic() - self.started, line))
                self._changed.notify_all()
        with self._changed:
            self._eof = True
            self._changed.notify_all()

    def _read_stderr(self) -> None:
        """Reader thread: keep stderr whole (it must stay empty)."""
        assert self.proc.stderr is not None
        self._stderr.append(self.proc.stderr.read())

    def elapsed(self) -> float:
        """Return the seconds since the process was started."""
        return time.monotonic() - self.started

    def sleep_until(self, seconds: float) -> None:
        """Sleep until this many seconds after the start."""
        time.sleep(max(0.0, seconds - self.elapsed()))

    def wait_handled(self, signum: int, timeout: float = 10.0) -> None:
        """Wait until the job has taken charge of a signal: caught, blocked or ignored (/proc).

        Until then the kernel's default action ends the interpreter while it starts up, which no
        program can prevent; a signal tests the job only from that moment on.
        """
        bit = 1 << (signum - 1)
        status = Path(f"/proc/{self.proc.pid}/status")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                masks = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
            except OSError:  # already gone (the caller will see how), or no /proc here
                return
            if any(int(masks.get(k, "0"), 16) & bit for k in ("SigCgt", "SigBlk", "SigIgn")):
                return
            time.sleep(0.005)
        raise AssertionError(f"the job did not take charge of signal {signum} within {timeout:.0f}s")

    def send(self, signum: int) -> float:
        """Send a signal now; return when, in seconds since the start."""
        self.proc.send_signal(signum)
        return self.elapsed()

    def wait_for_event(self, event: str, timeout: float) -> float:
        """Wait until stdout shows a line with this event; return when it came (s since start)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for at, line in self.lines:
                    if event_of(line) == event:
                        return at
                remaining = deadline - time.monotonic()
                if self._eof or remaining <= 0:
                    shown = "".join(line for _, line in self.lines)
                    raise AssertionError(f"no {event} line after {self.elapsed():.1f}s:\n{shown}")
                self._changed.wait(remaining)

    def finish(self, timeout: float) -> JobRun:
        """Wait for the exit (failing, after a SIGKILL, past timeout); record and return its output."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            run = self._collect()
            raise AssertionError(
                f"the job was still running {timeout:.1f}s later:\n{run.stdout}{run.stderr}"
            ) from None
        self.exited_after_s = self.elapsed()
        return self._collect()

    def _collect(self) -> JobRun:
        """Join the readers and record the output (once) for the session's leak check."""
        if self.run is None:
            for reader in self._readers:
                reader.join(10)
            stdout = "".join(line for _, line in self.lines)
            self.run = JobRun(self.proc.returncode, stdout, "".join(self._stderr))
            record_output(self.run.stdout + self.run.stderr)
        return self.run

    def event_times(self) -> dict[str, float]:
        """Return when each event first appeared on stdout (s since start)."""
        times: dict[str, float] = {}
        for at, line in self.lines:
            times.setdefault(event_of(line) or "?", at)
        return times


def stop_at(env: dict[str, str], signum: int, delay: float) -> tuple[JobProcess, JobRun, float]:
    """Run the job, send it a signal delay seconds after its start; return it, its run, and when."""
    with JobProcess(env) as job:
        if signum != signal.SIGKILL:  # which nothing can catch
            job.wait_handled(signum)
        job.sleep_until(delay)
        sent = job.send(signum)
        return job, job.finish(timeout=EXIT_WITHIN_S), sent


def run_to_end(env: dict[str, str]) -> JobRun:
    """Run the job undisturbed and return its run."""
    with JobProcess(env) as job:
        return job.finish(timeout=60)


def event_of(line: str) -> str | None:
    """Return a stdout line's event name, or None if the line is not a JSON log object."""
    try:
        parsed = json.loads(line)
    except ValueError:
        return None
    return parsed.get("event") if isinstance(parsed, dict) else None


@dataclass
class Sleepy:
    """The one sleepy database of a module, its job environment and the moments worth a signal."""

    db: Database
    env: dict[str, str]
    # Kill moments are drawn from here: from the start to just past the last migration.
    window: tuple[float, float] = (0.4, 2.2)


def sleepy_database(pg: PgServer, socket_root: Path | None, workdir: Path, name: str) -> Sleepy:
    """Create a database for the sleepy service and the environment of a job that migrates it."""
    role = f"{name}_migrator"
    pg.create_role(role, PASSWORD)
    pg.create_database(name, owner=role)
    db = Database("sleepy", name, role, PASSWORD, pg, socket_root)
    manifest = write_manifest(workdir / "sleepy.toml", [db.entry()])
    env = {**CLOUD_RUN, "MIGRATE_MANIFEST": str(manifest), "MIGRATE_SERVICES_DIR": str(SERVICES_DIR)}
    if socket_root is not None:
        env["MIGRATE_SOCKET_DIR"] = str(socket_root)
    return Sleepy(db, env)


@pytest.fixture(scope="module")
def sleepy(
    pg: PgServer, socket_root: Path | None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Sleepy]:
    """One sleepy database for the module, with the kill window measured on an undisturbed run."""
    target = sleepy_database(pg, socket_root, tmp_path_factory.mktemp("signals"), f"t{os.getpid()}_sleepy")
    with JobProcess(target.env) as job:
        run = job.finish(timeout=60)
    assert run.code == 0, run.stdout + run.stderr
    assert target.db.version() == [HEAD]
    times = job.event_times()
    last_applied = max(at for at, line in job.lines if event_of(line) == "migration.applied")
    target.window = (0.4, last_applied + 0.1)
    print(
        f"\nundisturbed sleepy run: run.start {times['run.start']:.2f}s, db.connected "
        f"{times['db.connected']:.2f}s, last migration.applied {last_applied:.2f}s, "
        f"exit {job.exited_after_s:.2f}s; kill window {target.window[0]:.2f}-{target.window[1]:.2f}s"
    )
    reset(target.db)
    yield target
    pg.drop_database(target.db.name)


@pytest.fixture
def rng() -> tuple[random.Random, int]:
    """A seeded random source; the seed goes into every assertion message so a failure replays."""
    seed = int(os.environ.get(SEED_VARIABLE) or random.SystemRandom().randrange(2**32))
    return random.Random(seed), seed


def reset(db: Database) -> None:
    """Put the database back at base: no sleepy table, alembic_version empty (if it exists)."""
    tables = ", ".join(f"sleepy_{n}" for n in range(1, len(REVISIONS) + 1))
    db.pg.execute(
        f"DROP TABLE IF EXISTS {tables};"
        " DO $$ BEGIN IF to_regclass('alembic_version') IS NOT NULL THEN"
        " DELETE FROM alembic_version; END IF; END $$",
        database=db.name,
    )


def schema_revision(db: Database, context: str) -> str | None:
    """Assert that the schema matches alembic_version; return the revision (None: base).

    The sleepy_* tables must be exactly those of the revisions up to the one in alembic_version:
    none if alembic_version is empty or missing.
    """
    tables = db.tables()
    version = db.version() if "alembic_version" in tables else []
    assert len(version) <= 1, f"{context}: several rows in alembic_version: {version}"
    at = version[0] if version else None
    assert at is None or at in REVISIONS, f"{context}: unknown revision {at}"
    upto = REVISIONS.index(at) + 1 if at else 0
    expected = {f"sleepy_{n}" for n in range(1, upto + 1)}
    found = {t for t in tables if t.startswith("sleepy_")}
    assert found == expected, f"{context}: alembic_version says {at or 'base'} but tables are {sorted(found)}"
    return at


def job_sessions(db: Database) -> list[dict[str, Any]]:
    """Return the job's sessions (application_name migrate-job...) on the database."""
    return db.pg.fetch(
        "SELECT pid, application_name, state, backend_type, left(query, 80) AS query"
        " FROM pg_stat_activity WHERE datname = $1 AND application_name LIKE 'migrate-job%'",
        db.name,
    )


def wait_no_job_session(db: Database, within_s: float) -> list[dict[str, Any]]:
    """Poll until the job has no session on the database; return what is left after within_s."""
    deadline = time.monotonic() + within_s
    while (left := job_sessions(db)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def advisory_locks(db: Database) -> list[dict[str, Any]]:
    """Return the advisory locks granted in the database (the job's migration lock is one)."""
    return db.pg.fetch(
        "SELECT l.pid, l.classid, l.objid FROM pg_locks l JOIN pg_database d ON d.oid = l.database"
        " WHERE l.locktype = 'advisory' AND l.granted AND d.datname = $1",
        db.name,
    )


def landed(job: JobProcess, run: JobRun, at_s: float) -> str:
    """Say where in the run a signal sent at at_s landed, for the tally in the output."""
    before = {event_of(line) for when, line in job.lines if when <= at_s}
    if run.code == 0 or before & {"db.done", "run.summary"}:
        return "after the work"
    if "lock.acquired" in before:
        return "while migrating"
    if "db.connected" in before:
        return "while inspecting"
    return "while starting or connecting"


def assert_interrupted_cleanly(run: JobRun, code: int, context: str) -> None:
    """Stopped by a signal: JSON lines only, an interrupted summary last, nothing on stderr."""
    shown = f"{context}: exit {run.code}\n{run.stdout}{run.stderr}"
    assert run.code in (code, 0), shown
    assert run.stderr == "", shown
    lines = [event_of(line) for line in run.stdout.splitlines()]
    assert lines and None not in lines, f"non-JSON stdout: {shown}"
    summary = run.summary
    assert summary["exit_code"] == run.code, shown
    assert summary["status"] == ("interrupted" if run.code == code else "succeeded"), shown
    if run.code == code:
        assert [e["error"] for e in run.events("run.error")] == ["interrupted"], shown


def assert_server_clean(db: Database, context: str) -> None:
    """No session of the job is left on the database, and no advisory lock is granted there."""
    left = wait_no_job_session(db, 2.0)
    assert left == [], f"{context}: job sessions left: {left}"
    locks = advisory_locks(db)
    assert locks == [], f"{context}: advisory locks left: {locks}"


def test_sigterm_at_random_moments_rolls_back_and_exits_143(
    sleepy: Sleepy, rng: tuple[random.Random, int]
) -> None:
    """Cloud Run stops tasks with SIGTERM at any moment: every stop must be clean and quick.

    Wherever it lands (starting, connecting, waiting for the lock, inside a migration, after the
    last one), the job exits within 5 s with 143 and an interrupted summary (or 0 if it had
    finished), the running revision rolls back whole, and it leaves no session nor lock behind.
    """
    random_source, seed = rng
    db = sleepy.db
    reset(db)
    tally: Counter[str] = Counter()
    for n in range(KILLS):
        delay = random_source.uniform(*sleepy.window)
        context = f"seed={seed} SIGTERM #{n} at {delay:.2f}s"
        job, run, sent = stop_at(sleepy.env, signal.SIGTERM, delay)
        assert job.exited_after_s is not None
        assert job.exited_after_s - sent < EXIT_WITHIN_S, context
        assert_interrupted_cleanly(run, 143, context)
        assert_server_clean(db, context)
        tally[landed(job, run, sent)] += 1
        if schema_revision(db, context) == HEAD:
            reset(db)
    print(f"\nSIGTERM seed={seed}: {dict(tally)}")
    assert tally["while migrating"] >= 1, f"seed={seed}: no SIGTERM landed in a migration: {dict(tally)}"
    final = run_to_end(sleepy.env)
    assert final.code == 0, f"seed={seed}\n{final.stdout}{final.stderr}"
    assert schema_revision(db, f"seed={seed} final run") == HEAD


def test_sigkill_at_random_moments_leaves_the_schema_at_a_revision(
    sleepy: Sleepy, rng: tuple[random.Random, int]
) -> None:
    """SIGKILL (Cloud Run's end of the grace period, an OOM kill) gives the job no chance at all.

    Only PostgreSQL protects the database then: the killed backend must go away within seconds
    (client_connection_check_interval), its transaction and lock with it, leaving the schema at
    exactly the revision alembic_version names; and the next execution must finish the work.
    """
    random_source, seed = rng
    db = sleepy.db
    reset(db)
    tally: Counter[str] = Counter()
    for n in range(KILLS):
        delay = random_source.uniform(*sleepy.window)
        context = f"seed={seed} SIGKILL #{n} at {delay:.2f}s"
        job, run, sent = stop_at(sleepy.env, signal.SIGKILL, delay)
        assert run.code in (-signal.SIGKILL, 0), f"{context}\n{run.stdout}{run.stderr}"
        left = wait_no_job_session(db, BACKEND_GONE_WITHIN_S)
        assert left == [], f"{context}: the killed job's backend is still there: {left}"
        locks = advisory_locks(db)
        assert locks == [], f"{context}: advisory locks left: {locks}"
        at = schema_revision(db, context)
        tally[landed(job, run, sent)] += 1
        if n % 7 == 6 or n == KILLS - 1:
            # The next execution finishes the work (done every few kills to keep the test short).
            after = run_to_end(sleepy.env)
            assert after.code == 0, f"{context}: next run failed\n{after.stdout}{after.stderr}"
            at = schema_revision(db, f"{context}, next run")
            assert at == HEAD, context
        if at == HEAD:
            reset(db)
    print(f"\nSIGKILL seed={seed}: {dict(tally)}")
    assert tally["while migrating"] >= 1, f"seed={seed}: no SIGKILL landed in a migration: {dict(tally)}"


def test_sigint_during_a_migration_exits_130(sleepy: Sleepy) -> None:
    """Ctrl-C on a local run stops it like SIGTERM does, with the shell's code for SIGINT (130)."""
    db = sleepy.db
    reset(db)
    with JobProcess(sleepy.env) as job:
        job.wait_for_event("migration.applied", timeout=30)
        job.send(signal.SIGINT)
        run = job.finish(timeout=EXIT_WITHIN_S)
    assert run.code == 130, run.stdout + run.stderr
    assert_interrupted_cleanly(run, 130, "SIGINT")
    assert_server_clean(db, "SIGINT")
    at = schema_revision(db, "SIGINT")
    assert at in REVISIONS[:2], f"stopped inside the second revision, yet at {at}"
    assert run.by_database()[db.name]["status"] == "interrupted"
