"""One execution, many Cloud Run tasks: one canary, one failure budget, retries that resume, one summary.

Each task is a job process with the Cloud Run variables Cloud Run sets (execution, index, count,
attempt); they meet only in migrate_job_executions of the coordination database. Real PostgreSQL.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import asyncpg
import pytest

from devtools.pgserver import PgServer
from job.manifest import DatabaseEntry, task_of
from tests.conftest import Database
from tests.support import FIXTURES, PASSWORD, PROJECT, JobRun, record_output, start_job, write_manifest

FLEET_SERVICES = str(FIXTURES / "fleet")
FIXTURE_SERVICES = str(FIXTURES / "services")
TENANT_HEAD = "f1ee00000001"
_executions = itertools.count()


@pytest.fixture
def fleet(pg: PgServer, socket_root: Path | None) -> Iterator[Callable[..., list[Database]]]:
    """Return a factory of n tenant databases of a service (one login role), plus one to coordinate in.

    With tasks, tenant i is named so that the job's own rule (manifest.task_of, a hash of the
    database's server and name) gives it to task i % tasks: the shares are then known, as the
    tests below count on, whatever the pid in the names.
    """
    made: list[Database] = []
    count = itertools.count()

    def make(service: str, n: int, tasks: int = 1) -> list[Database]:
        base = f"x{os.getpid()}_{next(count)}"
        role = f"{base}_migrator"
        pg.create_role(role, PASSWORD)
        group = [placed(service, f"{base}_t{i:02d}", role, i % tasks, tasks) for i in range(n)]
        group.append(Database(service, f"{base}_meet", role, PASSWORD, pg, socket_root))
        for database in group:
            pg.create_database(database.name, owner=role)
        made.extend(group)
        return group

    def placed(service: str, stem: str, role: str, task: int, tasks: int) -> Database:
        """Return the first database named stem_<k> that the job gives to task (of tasks)."""
        for k in itertools.count():
            database = Database(service, f"{stem}_{k}", role, PASSWORD, pg, socket_root)
            if tasks == 1 or task_of(DatabaseEntry(**database.entry()), tasks) == task:
                return database
        raise AssertionError("unreachable")

    yield make
    for database in made:
        pg.drop_database(database.name)


def manifest(tmp_path: Path, group: list[Database], **extra: Any) -> Path:
    """Write a manifest of one block listing the group's tenants, coordinated in its last database."""
    *tenants, meeting = group
    first = tenants[0].entry()
    del first["database"]
    block = {**first, "databases": [d.name for d in tenants], "coordination_database": meeting.name, **extra}
    return write_manifest(tmp_path / "env.toml", [block], project=PROJECT)


def task_env(
    job_env: dict[str, str],
    path: Path,
    services: str,
    execution: str,
    index: int,
    count: int,
    attempt: int = 0,
) -> dict[str, str]:
    """Return one task's environment, with the variables Cloud Run gives every task of an execution."""
    return {
        **job_env,
        "MIGRATE_MANIFEST": str(path),
        "MIGRATE_SERVICES_DIR": services,
        "CLOUD_RUN_EXECUTION": execution,
        "CLOUD_RUN_TASK_INDEX": str(index),
        "CLOUD_RUN_TASK_COUNT": str(count),
        "CLOUD_RUN_TASK_ATTEMPT": str(attempt),
    }


def new_execution() -> str:
    """Return an execution name no other test (or xdist worker) uses."""
    return f"migrate-job-{os.getpid()}-{next(_executions)}"


def run_tasks(envs: list[dict[str, str]], *args: str, timeout: float = 120) -> list[JobRun]:
    """Start every task at once, wait for all; return their runs in task order."""
    procs = [start_job(*args, env=env) for env in envs]
    runs = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=timeout)
        record_output(stdout + stderr)
        runs.append(JobRun(proc.returncode, stdout, stderr))
    return runs


def histories(databases: list[Database]) -> dict[str, list[dict[str, Any]]]:
    """Return each database's migrate_job_history rows (none if never migrated), read side by side."""

    async def one(database: Database) -> list[dict[str, Any]]:
        connection = await asyncpg.connect(database.pg.admin_dsn(database.name))
        try:
            rows = await connection.fetch(
                "SELECT revision, recorded_at, execution, task_index FROM migrate_job_history "
                "WHERE direction = 'up'"
            )
        except asyncpg.UndefinedTableError:
            return []
        finally:
            await connection.close()
        return [dict(r) for r in rows]

    async def every() -> list[list[dict[str, Any]]]:
        return await asyncio.gather(*(one(d) for d in databases))

    return {d.name: rows for d, rows in zip(databases, asyncio.run(every()), strict=True)}


def history(database: Database) -> list[dict[str, Any]]:
    """Return one database's migrate_job_history rows."""
    return histories([database])[database.name]


def summaries(runs: list[JobRun]) -> list[dict[str, Any]]:
    """Return every execution.summary line of the runs (each just before its run.summary)."""
    found = []
    for run in runs:
        lines = run.lines
        for i, line in enumerate(lines):
            if line.get("event") == "execution.summary":
                assert lines[i + 1]["event"] == "run.summary" and i + 2 == len(lines)
                found.append(line)
    return found


# ---- one canary per execution ---------------------------------------------------------------


def test_four_tasks_at_once_run_the_canary_once_before_any_other_tenant(
    fleet: Callable[..., list[Database]], tmp_path: Path, job_env: dict[str, str]
) -> None:
    group = fleet("tenant", 24, tasks=4)
    tenants = group[:-1]
    path = manifest(tmp_path, group, canary=3)
    execution = new_execution()
    runs = run_tasks([task_env(job_env, path, FLEET_SERVICES, execution, i, 4) for i in range(4)])
    assert [r.code for r in runs] == [0, 0, 0, 0], [r.stdout[-2000:] for r in runs]
    rows = histories(tenants)
    assert all(len(r) == 1 and r[0]["revision"] == TENANT_HEAD for r in rows.values()), rows
    # The server's own clock: the canaries' commits come before any other tenant's migration began.
    canary_done = max(rows[d.name][0]["recorded_at"] for d in tenants[:3])
    assert all(rows[d.name][0]["recorded_at"] > canary_done for d in tenants[3:])
    ran = [e for r in runs for e in r.events("run.canary") if "canary_task" not in e]
    assert len(ran) == 1 and ran[0]["canary"] == [f"tenant/{d.name}" for d in tenants[:3]]
    # The others waited for it (or found it done), and none ran one of its own.
    assert len([e for r in runs for e in r.events("run.canary") if "canary_task" in e]) == 3
    (summary,) = summaries(runs)
    assert summary["total"] == 24 and summary["counts"] == {"applied": 24}, summary
    assert summary["status"] == "succeeded" and summary["databases"] == []
    assert summary["tasks"]["reported"] == 4 and summary["tasks"]["of"] == 4
    assert {t["attempt"] for t in summary["tasks"]["attempts"]} == {0}


def test_one_task_at_a_time_last_first_still_runs_the_canary_first(
    fleet: Callable[..., list[Database]], tmp_path: Path, job_env: dict[str, str]
) -> None:
    group = fleet("tenant", 8, tasks=4)
    tenants = group[:-1]
    path = manifest(tmp_path, group, canary=3)
    execution = new_execution()
    runs = {}
    for index in (3, 2, 1, 0):
        (runs[index],) = run_tasks([task_env(job_env, path, FLEET_SERVICES, execution, index, 4)])
        assert runs[index].code == 0, runs[index].stdout[-3000:]
    # Task 3 came first: it ran the canary (tenants 0, 1 and 2, of the shares of tasks 0, 1 and 2).
    (ran,) = [e for e in runs[3].events("run.canary") if "canary_task" not in e]
    assert ran["canary"] == [f"tenant/{d.name}" for d in tenants[:3]]
    assert all(e["canary_task"] == 3 for i in (2, 1, 0) for e in runs[i].events("run.canary"))
    rows = histories(tenants)
    assert all(len(r) == 1 for r in rows.values()), rows
    canary_done = max(rows[d.name][0]["recorded_at"] for d in tenants[:3])
    assert all(rows[d.name][0]["recorded_at"] > canary_done for d in tenants[3:])
    assert summaries([runs[i] for i in (3, 2, 1)]) == []
    (summary,) = summaries([runs[0]])
    assert summary["total"] == 8 and summary["counts"] == {"applied": 8}, summary


def test_a_broken_canary_stops_every_task_and_touches_no_other_tenant(
    fleet: Callable[..., list[Database]], tmp_path: Path, job_env: dict[str, str]
) -> None:
    group = fleet("tenant", 8, tasks=4)
    tenants = group[:-1]
    # What a hand-made fix left behind: the revision's CREATE TABLE fails on the second canary.
    tenants[1].pg.execute("CREATE TABLE tenant_settings (id int)", database=tenants[1].name)
    path = manifest(tmp_path, group, canary=3, on_failure="continue")
    execution = new_execution()
    runs = run_tasks([task_env(job_env, path, FLEET_SERVICES, execution, i, 4) for i in range(4)])
    assert [r.code for r in runs] == [7, 7, 7, 7], [r.stdout[-2000:] for r in runs]
    for run in runs:
        (error,) = run.events("run.error")
        assert error["message"].startswith("the canary failed:"), error
        assert error["database"] == tenants[1].name
    # Only the canary ran (its other two tenants: on_failure = "continue"); nothing else was touched.
    assert [bool(rows) for rows in histories(tenants).values()] == [True, False, True] + [False] * 5
    (summary,) = summaries(runs)
    assert summary["status"] == "failed" and summary["counts"]["failed"] == 1
    assert [d["database"] for d in summary["databases"]] == [tenants[1].name]


def test_several_tasks_need_a_coordination_database_for_a_canary(
    fleet: Callable[..., list[Database]], tmp_path: Path, job_env: dict[str, str]
) -> None:
    group = fleet("tenant", 2, tasks=2)
    path = manifest(tmp_path, group, canary=1)
    text = path.read_text().replace(f'coordination_database = "{group[-1].name}"\n', "")
    path.write_text(text)
    (run,) = run_tasks([task_env(job_env, path, FLEET_SERVICES, new_execution(), 0, 2)])
    assert run.code == 2, run.stdout[-3000:]
    (error,) = run.events("run.error")
    assert "coordination_database" in error["hint"] and "CLOUD_RUN_TASK_COUNT = 2" in error["message"]
    assert all(rows == [] for rows in histories(group).values())


def test_a_discover_entry_coordinates_in_its_discover_database(
    fleet: Callable[..., list[Database]], tmp_path: Path, job_env: dict[str, str]
) -> None:
    group = fleet("tenant", 2, tasks=2)
    *tenants, listing = group
    # The discover query's database, where this login may read but not create a table.
    listing.pg.execute(f'ALTER DATABASE "{listing.name}" OWNER TO CURRENT_USER')
    listing.pg.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC", database=listing.name)
    names = ", ".join(f"'{d.name}'" for d in tenants)
    entry = {**tenants[0].entry(), "discover_database": listing.name}
    del entry["database"]
    entry["discover"] = f"SELECT datname FROM pg_database WHERE datname IN ({names})"
    path = write_manifest(tmp_path / "env.toml", [{**entry, "canary": 1}], project=PROJECT)
    (refused,) = run_tasks([task_env(job_env, path, FLEET_SERVICES, new_execution(), 0, 2)])
    assert refused.code == 2, refused.stdout[-3000:]
    (error,) = refused.events("run.error")
    assert f"coordination_database {listing.name}" in error["message"], error
    # Without a canary or a budget, only the execution.summary needed it: the tasks go on.
    write_manifest(path, [entry], project=PROJECT)
    runs = run_tasks([task_env(job_env, path, FLEET_SERVICES, new_execution(), i, 2) for i in range(2)])
    assert [r.code for r in runs] == [0, 0], [r.stdout[-2000:] for r in runs]
    assert all(r.events("execution.uncoordinated") for r in runs) and summaries(runs) == []
    assert all(len(rows) == 1 for rows in histories(tenants).values())


# ---- one budget per execution ---------------------------------------------------------------


def test_max_failures_is_one_budget_for_every_task(
    fleet: Callable[..., list[Database]], tmp_path: Path, job_env: dict[str, str]
) -> None:
    group = fleet("tenant", 8, tasks=4)
    tenants = group[:-1]
    broken = tenants[:5]  # the first of every task's share, and the second of task 0
    for database in broken:
        database.pg.execute("CREATE TABLE tenant_settings (id int)", database=database.name)
    path = manifest(tmp_path, group, on_failure="continue", max_failures=2)
    execution = new_execution()
    runs = run_tasks([task_env(job_env, path, FLEET_SERVICES, execution, i, 4) for i in range(4)])
    statuses = {d["database"]: d["status"] for r in runs for d in r.summary["databases"]}
    failed = [n for n, s in statuses.items() if s == "failed"]
    # Two tolerated, the third stops the execution; at most one more per other task was in flight.
    assert 3 <= len(failed) <= 3 + 3, statuses
    assert "skipped" in statuses.values()
    assert {r.code for r in runs} <= {0, 7} and 7 in {r.code for r in runs}
    (summary,) = summaries(runs)
    assert summary["total"] == 8 and summary["counts"]["failed"] == len(failed)


def test_a_task_finding_the_budget_spent_skips_its_share_and_names_the_failure(
    fleet: Callable[..., list[Database]], tmp_path: Path, job_env: dict[str, str]
) -> None:
    group = fleet("tenant", 6, tasks=2)
    tenants = group[:-1]
    for database in tenants[0:6:2]:  # task 0's whole share
        database.pg.execute("CREATE TABLE tenant_settings (id int)", database=database.name)
    path = manifest(tmp_path, group, on_failure="continue", max_failures=2)
    execution = new_execution()
    (first,) = run_tasks([task_env(job_env, path, FLEET_SERVICES, execution, 0, 2)])
    assert first.code == 7 and first.summary["counts"] == {"failed": 3}, first.stdout[-3000:]
    (second,) = run_tasks([task_env(job_env, path, FLEET_SERVICES, execution, 1, 2)])
    assert second.code == 7, second.stdout[-3000:]
    assert second.summary["counts"] == {"skipped": 3}
    (error,) = second.events("run.error")
    assert f"{tenants[4].name} failed in task 0" in error["message"], error
    assert error["database"] == tenants[4].name and "max_failures = 2" in error["hint"]
    assert all(rows == [] for rows in histories(tenants[1:6:2]).values())


# ---- retries resume -------------------------------------------------------------------------


def test_a_killed_task_retried_resumes_and_applies_nothing_twice(
    fleet: Callable[..., list[Database]], tmp_path: Path, job_env: dict[str, str]
) -> None:
    group = fleet("sleepy", 4, tasks=2)
    tenants = group[:-1]
    path = manifest(tmp_path, group, canary=1)
    execution = new_execution()
    # Task 1 starts first: it claims the canary (tenant 0, of task 0's share) and is killed inside it.
    env = task_env(job_env, path, FIXTURE_SERVICES, execution, 1, 2)
    job = start_job("upgrade", "--to", "5eee00000002", env=env)
    for line in job.stdout:
        if '"event": "migration.applied"' in line:
            job.kill()
            break
    record_output("".join(job.communicate()))
    assert job.returncode == -signal.SIGKILL
    assert [r["revision"] for r in history(tenants[0])] == ["5eee00000001"]
    retried = {**env, "CLOUD_RUN_TASK_ATTEMPT": "1"}
    runs = run_tasks(
        [retried, task_env(job_env, path, FIXTURE_SERVICES, execution, 0, 2)],
        "upgrade",
        "--to",
        "5eee00000002",
    )
    assert [r.code for r in runs] == [0, 0], [r.stdout[-2000:] for r in runs]
    assert runs[0].summary["shard"]["attempt"] == 1
    for database, rows in zip(tenants, histories(tenants).values(), strict=True):
        revisions = [r["revision"] for r in rows]
        assert sorted(revisions) == ["5eee00000001", "5eee00000002"], (database.name, revisions)
    (summary,) = summaries(runs)
    assert summary["total"] == 4 and summary["counts"] == {"applied": 4}, summary
    assert sorted((t["task_index"], t["attempt"]) for t in summary["tasks"]["attempts"]) == [(0, 0), (1, 1)]


# ---- connections ----------------------------------------------------------------------------


def test_too_many_connections_slows_the_tasks_down_and_fails_no_tenant(
    fleet: Callable[..., list[Database]], tmp_path: Path, job_env: dict[str, str]
) -> None:
    group = fleet("tenant", 6, tasks=2)
    tenants = group[:-1]
    # The server refuses the login's connections past 3 (SQLSTATE 53300, as max_connections
    # does): 2 tasks hold one each to coordinate, and ask for 2 more each with --jobs 2.
    group[0].pg.execute(f'ALTER ROLE "{group[0].role}" CONNECTION LIMIT 3')
    path = manifest(tmp_path, group, on_failure="continue", max_failures=1)
    execution = new_execution()
    envs = [task_env(job_env, path, FLEET_SERVICES, execution, i, 2) for i in range(2)]
    runs = run_tasks(envs, "--jobs", "2")
    assert [r.code for r in runs] == [0, 0], [r.stdout[-2000:] for r in runs]
    assert all(len(rows) == 1 for rows in histories(tenants).values())
    retries = [e for r in runs for e in r.events("db.connect_retry")]
    assert any("too many" in e["reason"] for e in retries), retries[:3]
    (summary,) = summaries(runs)
    assert summary["counts"] == {"applied": 6}, summary


# ---- the summary of many databases ----------------------------------------------------------


def test_execution_summary_of_thousands_stays_within_one_log_entry() -> None:
    from job.report import SUMMARY_BYTES, json_size
    from job.settings import CloudRun
    from job.sharing import execution_summary

    cloud_run = CloudRun(execution="migrate-job-x", task_index=0, task_count=8)
    run: Any = SimpleNamespace(selected=[None] * 5000, cloud_run=cloud_run)
    rows = [
        {
            "service": "tenant",
            "database": f"tenant_{i:05d}",
            "instance": "p:r:i",
            "status": "failed" if i % 3 == 0 else "applied",
            "from_revision": None,
            "to_revision": None if i % 3 == 0 else TENANT_HEAD,
            "applied": [] if i % 3 == 0 else [TENANT_HEAD],
            "duration_ms": 12,
            "error": "x" * 400 if i % 3 == 0 else None,
        }
        for i in range(4990)
    ]
    tasks = [{"task_index": i, "attempt": 0, "exit_code": 7} for i in range(8)]
    summary = execution_summary(run, rows, tasks)
    assert summary["total"] == 5000 and summary["counts"] == {
        "failed": 1664,
        "applied": 3326,
        "unreported": 10,
    }
    assert summary["status"] == "failed" and summary["tasks"]["reported"] == 8
    assert json_size(summary) <= SUMMARY_BYTES
    listed = summary["databases"]
    assert listed and all(d["status"] == "failed" for d in listed)
    assert summary["omitted"] == 1664 - len(listed)


def test_too_many_connections_never_spends_the_budget() -> None:
    from job.errors import ConnectError
    from job.failures import Failures
    from job.manifest import DatabaseEntry

    tenant = DatabaseEntry(
        service="s", database="a", host="h", user="u", password="p", on_failure="continue", max_failures=5
    )
    failures = Failures([tenant])
    # Still refused after job.db's long wait: the run stops, and no failure is counted.
    assert not failures.record(tenant, ConnectError("too many connections", sqlstate="53300"))
    assert failures.stopped and failures.counts == {} and failures.failed == []
