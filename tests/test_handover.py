"""Tests for job/handover.py: one connection per database, within a budget, without weakening the preflight.

A release that adds one revision to many databases paid two logins per database (read, then
apply). These tests pin down that a sequential run now logs in once per database, that what it
keeps open is bounded, and that a kept connection that died is replaced rather than used.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import asyncpg

from job.handover import Handover
from tests.conftest import Database
from tests.support import HEADS, run_job
from tests.test_fanout import FIXTURE_SERVICES, manifest_env


def _sessions(database: Database) -> int:
    """Return how many sessions the server has counted on the database (read from another one)."""
    rows = database.pg.fetch("SELECT sessions FROM pg_stat_database WHERE datname = $1", database.name)
    return int(rows[0]["sessions"])


def _settled_sessions(database: Database, at_least: int) -> int:
    """Return the database's session count once the ended sessions have all been counted."""
    deadline = time.monotonic() + 10
    count = _sessions(database)
    while count < at_least and time.monotonic() < deadline:
        time.sleep(0.1)
        count = _sessions(database)
    time.sleep(0.3)  # a second session, had there been one, would be counted by now
    return _sessions(database)


def test_a_sequential_run_logs_in_once_per_database(
    make_database: Callable[..., Database], tmp_path: Path, job_env: dict[str, str]
) -> None:
    """The preflight's connection applies: each database sees one session, yet every one was read first."""
    made = [make_database(service) for service in ("settlement", "risk-engine", "compliance")]
    before = [_sessions(d) for d in made]
    run = run_job(env=manifest_env(job_env, tmp_path, [d.entry() for d in made]))
    assert run.code == 0, run.stdout[-3000:]
    assert [_settled_sessions(d, b + 1) - b for d, b in zip(made, before, strict=True)] == [1, 1, 1]
    assert all(d.version() == [HEADS[d.service]] for d in made)
    # Still read first: every plan line comes before the first change.
    events = [e["event"] for e in run.lines if e.get("event") in ("db.plan", "lock.acquired")]
    assert events == ["db.plan"] * 3 + ["lock.acquired"] * 3


def _connect(database: Database) -> asyncpg.Connection:
    """Return a plain connection to the database, as the preflight opens one."""
    return asyncpg.connect(database.pg.scratch_url(database.name))  # type: ignore[no-any-return]


def test_the_budget_bounds_what_is_kept(make_database: Callable[..., Database]) -> None:
    """Past the server's budget a connection is not kept (the apply opens its own); disabled keeps none."""
    database = make_database("settlement")

    async def scenario() -> None:
        first, second = await _connect(database), await _connect(database)
        handover = Handover(enabled=True, budgets={"s": 1})
        assert await handover.keep(1, "s", first)
        assert not await handover.keep(2, "s", second)
        assert handover.take(1) is first and handover.take(1) is None
        assert not await Handover(enabled=False).keep(3, "s", second)
        await first.close()
        await second.close()

    asyncio.run(scenario())


def test_the_budget_is_a_share_of_max_connections(make_database: Callable[..., Database]) -> None:
    """The services keep most of the server: the run holds at most a quarter of max_connections."""
    database = make_database("settlement")

    async def scenario() -> int:
        connection = await _connect(database)
        handover = Handover(enabled=True)
        await handover.keep(1, "s", connection)
        await handover.close()
        assert connection.is_closed()  # close() ends what was never handed over
        return handover.budgets["s"]

    limit = int(database.pg.fetch("SHOW max_connections")[0]["max_connections"])
    assert asyncio.run(scenario()) == min(100, limit // 4)


def test_the_tasks_of_an_execution_share_the_budget(make_database: Callable[..., Database]) -> None:
    """Ten tasks on one server each hold a tenth of the budget: together they stay within it."""
    database = make_database("settlement")

    async def scenario() -> int:
        connection = await _connect(database)
        handover = Handover(enabled=True, tasks=10)
        await handover.keep(1, "s", connection)
        await handover.close()
        return handover.budgets["s"]

    limit = int(database.pg.fetch("SHOW max_connections")[0]["max_connections"])
    assert asyncio.run(scenario()) == min(100, limit // 4) // 10


def test_a_kept_connection_that_died_is_not_handed_over(make_database: Callable[..., Database]) -> None:
    """A server restart between preflight and apply: the apply logs in afresh instead."""
    database = make_database("settlement")

    async def scenario() -> None:
        connection = await _connect(database)
        handover = Handover(enabled=True, budgets={"s": 5})
        assert await handover.keep(1, "s", connection)
        connection.terminate()
        assert handover.take(1) is None

    asyncio.run(scenario())


def test_a_failure_leaves_the_next_database_untouched_and_closes_what_was_opened_ahead(
    make_database: Callable[..., Database], tmp_path: Path, job_env: dict[str, str]
) -> None:
    """The next database's connection is opened while one migrates; a failure there must not move it."""
    made = [make_database("broken"), make_database("altering"), make_database("altering")]
    env = {
        **manifest_env(job_env, tmp_path, [d.entry() for d in made]),
        "MIGRATE_SERVICES_DIR": FIXTURE_SERVICES,
    }
    run = run_job(env=env)
    assert run.code == 7, run.stdout[-3000:]
    assert [d["status"] for d in run.summary["databases"]] == ["failed", "skipped", "skipped"]
    assert made[1].version() == [] and made[2].version() == []
    assert run.stderr == ""  # no task or connection left behind to complain at exit
    assert [e["database"] for e in run.events("lock.acquired")] == [made[0].name]


def test_a_connection_is_adopted_once(make_database: Callable[..., Database]) -> None:
    """The next login of the same task (a retry after a lost connection) must not reuse the kept one."""
    from sqlalchemy.engine import make_url

    from job import engines

    database = make_database("settlement")
    url = make_url(database.pg.admin_dsn(database.name)).set(drivername="postgresql+asyncpg")

    async def scenario() -> tuple[bool, bool]:
        engine = engines.engine_for(url.set(database=None), {})
        kept = await _connect(database)
        engines.connecting_to(database.name, kept)
        first = await engine.connect()
        second = await engine.connect()
        try:
            pids = [
                (await c.get_raw_connection()).driver_connection.get_server_pid() for c in (first, second)
            ]  # type: ignore[union-attr]
            return pids[0] == kept.get_server_pid(), pids[1] != pids[0]
        finally:
            await first.close()
            await second.close()

    assert asyncio.run(scenario()) == (True, True)
