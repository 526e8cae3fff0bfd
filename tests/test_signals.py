"""Signals in the middle of a run: SIGTERM, SIGKILL and SIGINT never leave a half-applied revision.

Cloud Run stops a task with SIGTERM (then SIGKILL after the grace period), and an operator stops a
local run with Ctrl-C. Each test runs the real job as a process (a fresh interpreter: a signal may
land while it starts) on the ``sleepy`` fixture service (four revisions, each creating a table and
then sleeping 0.3 s in its transaction), stops it at random moments, and checks the database and
the server afterwards. The random stops run several at a time, each on a database of its own, so
the suite waits for the kill moments of a round at once rather than one after the other.
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
from tests.support import FIXTURES, PASSWORD, REPO, JobRun, job_environment, record_output, write_manifest

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
# How many jobs are stopped at once (each on its own sleepy database): KILLS / PARALLEL rounds.
PARALLEL = 4
# The job must have exited within this long after SIGTERM or SIGINT.
EXIT_WITHIN_S = 5.0
# The server notices a vanished client within client_connection_check_interval (2 s).
BACKEND_GONE_WITHIN_S = 5.0
# Set it to replay the random kill moments of an earlier run (the seed is in every message).
SEED_VARIABLE = "MIGRATE_TEST_SIGNAL_SEED"
# Under pytest-xdist (make test) these tests go to one worker, one after another: they share the
# sleepy databases, whose kill window is measured once by four cold jobs at once. The random-moment
# soaks (20 stops each) are marked scale: make test-scale runs them alone on the machine.
pytestmark = pytest.mark.xdist_group("signals")


class JobProcess:
    """``python -m job`` as a child process whose stdout lines are collected as they come."""

    def __init__(self, env: dict[str, str], *args: str) -> None:
        self.started = time.monotonic()
        # A fresh interpreter (not tests.support's warm fork): a signal may land while it starts.
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "job", *args],
            env=job_environment(env),
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[tuple[float, str]] = []
        self.exited_after_s: float | None = None
        # When the process ended (s since start), whoever waits for it and whenever.
        self.ended_at: float | None = None
        self.run: JobRun | None = None
        self._stderr: list[str] = []
        self._eof = False
        self._changed = threading.Condition()
        self._readers = [
            threading.Thread(target=self._read_stdout, daemon=True),
            threading.Thread(target=self._read_stderr, daemon=True),
            threading.Thread(target=self._watch_exit, daemon=True),
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

    def _watch_exit(self) -> None:
        """Waiter thread: note when the process ended, while the test tends to other processes."""
        self.proc.wait()
        self.ended_at = self.elapsed()

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
        run = self._collect()
        self.exited_after_s = self.ended_at if self.ended_at is not None else self.elapsed()
        return run

    def _collect(self) -> JobRun:
        """Join the readers and record the output (once) for the session's leak check."""
        if self.run is None:
            for reader in self._readers:
                reader.join(10)
            stdout = "".join(line for _, line in self.lines)
            self.run = JobRun(self.proc.returncode, stdout, "".join(self._stderr))
            record_output(self.run.stdout + self.run.stderr)
        return self.run

    def arrivals(self, event: str) -> list[tuple[float, dict[str, Any]]]:
        """Return (time.monotonic() when it came, the parsed line) of each stdout line with this event."""
        return [(self.started + at, json.loads(line)) for at, line in self.lines if event_of(line) == event]

    def event_times(self) -> dict[str, float]:
        """Return when each event first appeared on stdout (s since start)."""
        times: dict[str, float] = {}
        for at, line in self.lines:
            times.setdefault(event_of(line) or "?", at)
        return times


def stop_all_at(
    sleepies: list[Sleepy], signum: int, delays: list[float]
) -> list[tuple[JobProcess, JobRun, float]]:
    """Run one job per database at once, send each the signal delays[i] seconds after its start.

    Return each job, its run, and when the signal was sent (s since that job's start).
    """
    jobs = [JobProcess(s.env) for s in sleepies]
    try:
        if signum != signal.SIGKILL:  # which nothing can catch
            for job in jobs:
                job.wait_handled(signum)
        sent: dict[int, float] = {}
        for i in sorted(range(len(jobs)), key=lambda i: delays[i]):
            jobs[i].sleep_until(delays[i])
            sent[i] = jobs[i].send(signum)
        return [(job, job.finish(timeout=EXIT_WITHIN_S), sent[i]) for i, job in enumerate(jobs)]
    finally:
        for job in jobs:
            job.__exit__()


def run_all_to_end(sleepies: list[Sleepy]) -> list[JobRun]:
    """Run one job per database at once, undisturbed; return their runs."""
    jobs = [JobProcess(s.env) for s in sleepies]
    try:
        return [job.finish(timeout=60) for job in jobs]
    finally:
        for job in jobs:
            job.__exit__()


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
def sleepies(
    pg: PgServer, socket_root: Path | None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[Sleepy]]:
    """PARALLEL sleepy databases, with the kill window measured on undisturbed runs of all at once."""
    targets = [
        sleepy_database(pg, socket_root, tmp_path_factory.mktemp("signals"), f"t{os.getpid()}_sleepy{n}")
        for n in range(PARALLEL)
    ]
    jobs = [JobProcess(t.env) for t in targets]
    runs = [job.finish(timeout=60) for job in jobs]
    for target, run in zip(targets, runs, strict=True):
        assert run.code == 0, run.stdout + run.stderr
        assert target.db.version() == [HEAD]
    # The window ends just past the last migration of the slowest: load from the others included.
    last_applied = max(at for job in jobs for at, line in job.lines if event_of(line) == "migration.applied")
    times = jobs[0].event_times()
    for target in targets:
        target.window = (0.4, last_applied + 0.1)
        reset(target.db)
    print(
        f"\n{PARALLEL} undisturbed sleepy runs at once: run.start {times['run.start']:.2f}s, db.connected "
        f"{times['db.connected']:.2f}s, last migration.applied {last_applied:.2f}s, "
        f"exit {max(j.exited_after_s or 0 for j in jobs):.2f}s; kill window 0.40-{last_applied + 0.1:.2f}s"
    )
    yield targets
    for target in targets:
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


@pytest.mark.scale  # a soak of 20 stops: make test-scale, alone on the machine, times it
def test_sigterm_at_random_moments_rolls_back_and_exits_143(
    sleepies: list[Sleepy], rng: tuple[random.Random, int]
) -> None:
    """Cloud Run stops tasks with SIGTERM at any moment: every stop must be clean and quick.

    Wherever it lands (starting, connecting, waiting for the lock, inside a migration, after the
    last one), the job exits within 5 s with 143 and an interrupted summary (or 0 if it had
    finished), the running revision rolls back whole, and it leaves no session nor lock behind.
    """
    random_source, seed = rng
    for target in sleepies:
        reset(target.db)
    tally: Counter[str] = Counter()
    for round_ in range(KILLS // PARALLEL):
        delays = [random_source.uniform(*target.window) for target in sleepies]
        stopped = stop_all_at(sleepies, signal.SIGTERM, delays)
        for n, (target, (job, run, sent)) in enumerate(zip(sleepies, stopped, strict=True)):
            context = f"seed={seed} SIGTERM #{round_ * PARALLEL + n} at {delays[n]:.2f}s"
            assert job.exited_after_s is not None
            assert job.exited_after_s - sent < EXIT_WITHIN_S, context
            assert_interrupted_cleanly(run, 143, context)
            assert_server_clean(target.db, context)
            tally[landed(job, run, sent)] += 1
            if schema_revision(target.db, context) == HEAD:
                reset(target.db)
    print(f"\nSIGTERM seed={seed}: {dict(tally)}")
    assert tally["while migrating"] >= 1, f"seed={seed}: no SIGTERM landed in a migration: {dict(tally)}"
    for target, final in zip(sleepies, run_all_to_end(sleepies), strict=True):
        assert final.code == 0, f"seed={seed}\n{final.stdout}{final.stderr}"
        assert schema_revision(target.db, f"seed={seed} final run") == HEAD


@pytest.mark.scale  # a soak of 20 kills: make test-scale
def test_sigkill_at_random_moments_leaves_the_schema_at_a_revision(
    sleepies: list[Sleepy], rng: tuple[random.Random, int]
) -> None:
    """SIGKILL (Cloud Run's end of the grace period, an OOM kill) gives the job no chance at all.

    Only PostgreSQL protects the database then: the killed backend must go away within seconds
    (client_connection_check_interval), its transaction and lock with it, leaving the schema at
    exactly the revision alembic_version names; and the next execution must finish the work.
    """
    random_source, seed = rng
    for target in sleepies:
        reset(target.db)
    tally: Counter[str] = Counter()
    rounds = KILLS // PARALLEL
    for round_ in range(rounds):
        delays = [random_source.uniform(*target.window) for target in sleepies]
        stopped = stop_all_at(sleepies, signal.SIGKILL, delays)
        at: dict[str, str | None] = {}
        for n, (target, (job, run, sent)) in enumerate(zip(sleepies, stopped, strict=True)):
            context = f"seed={seed} SIGKILL #{round_ * PARALLEL + n} at {delays[n]:.2f}s"
            assert run.code in (-signal.SIGKILL, 0), f"{context}\n{run.stdout}{run.stderr}"
            left = wait_no_job_session(target.db, BACKEND_GONE_WITHIN_S)
            assert left == [], f"{context}: the killed job's backend is still there: {left}"
            locks = advisory_locks(target.db)
            assert locks == [], f"{context}: advisory locks left: {locks}"
            at[target.db.name] = schema_revision(target.db, context)
            tally[landed(job, run, sent)] += 1
        if round_ % 3 == 1 or round_ == rounds - 1:
            # The next execution finishes the work (every few rounds, to keep the test short).
            for target, after in zip(sleepies, run_all_to_end(sleepies), strict=True):
                context = f"seed={seed} SIGKILL round {round_}, next run on {target.db.name}"
                assert after.code == 0, f"{context}\n{after.stdout}{after.stderr}"
                at[target.db.name] = schema_revision(target.db, context)
                assert at[target.db.name] == HEAD, context
        for target in sleepies:
            if at[target.db.name] == HEAD:
                reset(target.db)
    print(f"\nSIGKILL seed={seed}: {dict(tally)}")
    assert tally["while migrating"] >= 1, f"seed={seed}: no SIGKILL landed in a migration: {dict(tally)}"


def test_sigterm_during_start_up_stops_before_any_database(sleepies: list[Sleepy]) -> None:
    """A SIGTERM while the interpreter starts (Cloud Run cancels an execution just begun) is held
    until the job can stop cleanly, and then ends it at once: 143, nothing connected or changed."""
    sleepy = sleepies[0]
    reset(sleepy.db)
    with JobProcess(sleepy.env) as job:
        job.wait_handled(signal.SIGTERM)
        sent = job.send(signal.SIGTERM)
        run = job.finish(timeout=EXIT_WITHIN_S)
    assert job.exited_after_s is not None and job.exited_after_s - sent < EXIT_WITHIN_S
    assert_interrupted_cleanly(run, 143, "SIGTERM at start-up")
    assert run.code == 143 and run.events("db.connected") == [], run.stdout
    assert [e["signal"] for e in run.events("run.signal")] == [signal.SIGTERM]
    assert schema_revision(sleepy.db, "SIGTERM at start-up") is None


def test_sigint_during_a_migration_exits_130(sleepies: list[Sleepy]) -> None:
    """Ctrl-C on a local run stops it like SIGTERM does, with the shell's code for SIGINT (130)."""
    sleepy = sleepies[0]
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
