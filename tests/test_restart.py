"""The database server goes away: not listening yet when the job starts, restarted mid-run, never back.

Cloud SQL restarts for maintenance, fails over, or is still starting when a release pipeline runs
the job. These tests stop and start a real PostgreSQL under a running job, so they use a server of
their own (the session's ``pg`` is shared by every other test) behind a Cloud SQL-shaped socket dir.
"""

from __future__ import annotations

import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from devtools.pgserver import PgServer, start_local_server
from tests.conftest import INSTANCE
from tests.support import JobRun
from tests.test_signals import (
    HEAD,
    REVISIONS,
    JobProcess,
    Sleepy,
    advisory_locks,
    event_of,
    reset,
    schema_revision,
    sleepy_database,
    wait_no_job_session,
)


@pytest.fixture(scope="module")
def server() -> Iterator[PgServer]:
    """A local server for this module alone, with password auth, that the tests stop and start."""
    srv = start_local_server()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def module_sleepy(server: PgServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sleepy]:
    """The module's sleepy database, reached through its own /cloudsql-shaped socket directory."""
    root = Path(tempfile.mkdtemp(prefix="mjrs"))
    server.cloudsql_dir(root, [INSTANCE])
    yield sleepy_database(server, root, tmp_path_factory.mktemp("restart"), "sleepy")
    shutil.rmtree(root, ignore_errors=True)


def ensure_running(server: PgServer) -> None:
    """Start the server if a test left it stopped (an assertion may fail while it is down)."""
    try:
        server.fetch("SELECT 1")
    except (OSError, asyncpg.PostgresError):
        server.start_server()


@pytest.fixture
def sleepy(module_sleepy: Sleepy, server: PgServer) -> Iterator[Sleepy]:
    """The sleepy database at base on a running server, whatever the previous test did."""
    ensure_running(server)
    reset(module_sleepy.db)
    yield module_sleepy
    ensure_running(server)


def assert_clean_run(run: JobRun) -> None:
    """Only JSON lines on stdout, the summary last and consistent with the exit code, no stderr."""
    shown = run.stdout + run.stderr
    assert run.stderr == "", shown
    assert None not in [event_of(line) for line in run.stdout.splitlines()], shown
    assert run.summary["exit_code"] == run.code, shown


def test_server_not_listening_yet_is_waited_for(sleepy: Sleepy, server: PgServer) -> None:
    """A server that is still starting when the job starts is retried until it answers.

    Cloud Run may start the job while the instance restarts or before the socket is mounted; the
    job must wait (db.connect_retry) within MIGRATE_CONNECT_TIMEOUT_S, not fail at once.
    """
    server.stop_server()
    with JobProcess({**sleepy.env, "MIGRATE_CONNECT_TIMEOUT_S": "30"}) as job:
        first_retry = job.wait_for_event("db.connect_retry", timeout=30)
        job.sleep_until(max(2.0, first_retry + 0.5))
        server.start_server()
        run = job.finish(timeout=60)
    assert run.code == 0, run.stdout + run.stderr
    assert_clean_run(run)
    retries = run.events("db.connect_retry")
    assert retries and all(r["instance"] == INSTANCE and r["reason"] for r in retries), retries
    assert run.summary["status"] == "succeeded"
    assert schema_revision(sleepy.db, "after waiting for the server") == HEAD


def test_restart_during_a_migration_is_resumed_without_reapplying(sleepy: Sleepy, server: PgServer) -> None:
    """A restart (maintenance, failover) in the middle of a run costs only the running revision.

    The server rolls that revision back; the job reconnects (db.reconnect), re-reads the revision
    under the lock and applies the rest, so every revision is applied exactly once.
    """
    db = sleepy.db
    with JobProcess({**sleepy.env, "MIGRATE_CONNECT_TIMEOUT_S": "30"}) as job:
        job.wait_for_event("migration.applied", timeout=30)
        server.restart()
        run = job.finish(timeout=60)
    assert run.code == 0, run.stdout + run.stderr
    assert_clean_run(run)
    events = [line["event"] for line in run.lines]
    assert "db.reconnect" in events, run.stdout
    applied = [line["revision"] for line in run.lines if line["event"] == "migration.applied"]
    assert Counter(applied) == dict.fromkeys(REVISIONS, 1), run.stdout
    # The restart landed inside the run: after the first revision, before the last.
    reconnect = events.index("db.reconnect")
    landed = [i for i, event in enumerate(events) if event == "migration.applied"]
    assert landed[0] < reconnect < landed[-1], events
    result = run.by_database()[db.name]
    # from_revision is where this run found the database (base), not where its last pass resumed.
    assert result["status"] == "applied" and result["from_revision"] is None, result
    assert result["applied"] == list(REVISIONS) and result["to_revision"] == HEAD, result
    assert schema_revision(db, "after the restart") == HEAD
    assert wait_no_job_session(db, 2.0) == []
    assert advisory_locks(db) == []


def test_server_that_never_comes_back_is_exit_4_naming_the_instance(sleepy: Sleepy, server: PgServer) -> None:
    """A server that stays down ends the run after MIGRATE_CONNECT_TIMEOUT_S with exit 4.

    The job must not hang (a Cloud Run task has a deadline) and must tell the operator which
    instance did not answer, with the flag that mounts it.
    """
    server.stop_server()
    with JobProcess({**sleepy.env, "MIGRATE_CONNECT_TIMEOUT_S": "2"}) as job:
        run = job.finish(timeout=30)
    assert run.code == 4, run.stdout + run.stderr
    assert_clean_run(run)
    errors = run.events("run.error")
    assert [e["error"] for e in errors] == ["connect"], errors
    assert INSTANCE in errors[0]["hint"] and "--set-cloudsql-instances" in errors[0]["hint"], errors[0]
    assert run.events("db.connect_retry"), "a server that is down is retried first"
    times = job.event_times()
    waited = times["run.error"] - times["run.start"]
    # Retried for the timeout; tenacity's stop_after_delay looks only after an attempt, so the
    # backoff wait that crosses the deadline (under 2 s this early) and the preflight come on top.
    assert 2.0 <= waited <= 2.0 + 5.0, f"gave up after {waited:.2f}s"
    assert run.summary["status"] == "failed"
    # The database that could not be reached failed; "skipped" is for those after a failure.
    assert {d["status"] for d in run.summary["databases"]} == {"failed"}, run.summary
