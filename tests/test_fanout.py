"""Many databases of one history: list and discover in the manifest, Cloud Run task shares, --jobs.

Tenant-per-database services run one history on hundreds of databases; these tests pin down that
the manifest says so without repeating blocks, that the tasks of a Cloud Run execution split the
databases into disjoint, complete shares, and that a pool of worker processes applies them with
the same guarantees as the sequential run (each revision once, the lock, a complete summary).
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from job.errors import ConfigError
from job.manifest import DatabaseEntry, load_manifest, parse_manifest, shard
from tests.conftest import Database
from tests.support import FIXTURES, HEADS, PROJECT, run_job, write_manifest
from tests.test_concurrency import SLOW_GATE, Gate
from tests.test_signals import JobProcess

SERVICES = ("settlement", "risk-engine", "compliance")
FIXTURE_SERVICES = str(FIXTURES / "services")


def entries(n: int) -> list[DatabaseEntry]:
    """Return n manifest entries of one service (the shape tenant databases have)."""
    return [
        DatabaseEntry(service="settlement", database=f"tenant_{i:04d}", host="h", user="u", password="p")
        for i in range(n)
    ]


@pytest.mark.parametrize("count", [1, 2, 3, 7, 10, 64])
def test_shares_of_1000_entries_are_disjoint_and_complete(count: int) -> None:
    manifest = entries(1000)
    shares = [shard(manifest, index, count) for index in range(count)]
    names = [e.name for share in shares for e in share]
    assert len(names) == len(set(names)) == 1000
    assert set(names) == {e.name for e in manifest}
    # Shares are roughly even (a hash, not a rotation), and each keeps manifest order.
    assert min(map(len, shares)) >= 1000 / count / 2
    for share in shares:
        assert [e.name for e in share] == sorted(e.name for e in share)


def test_a_database_keeps_its_task_when_others_come_and_go() -> None:
    """A share depends on each database's identity, not its position (docs/guards.md, sharding)."""
    before = {e.name: i for i in range(3) for e in shard(entries(10), i, 3)}
    fewer = [e for e in entries(12) if e.name != "tenant_0002"]  # one dropped, two created
    after = {e.name: i for i in range(3) for e in shard(fewer, i, 3)}
    assert all(after[name] == task for name, task in before.items() if name in after)
    assert len(after) == 11


@pytest.mark.parametrize(("index", "count"), [(3, 3), (-1, 2), (0, 0)])
def test_an_impossible_task_index_is_a_configuration_error(index: int, count: int) -> None:
    with pytest.raises(ConfigError, match="CLOUD_RUN_TASK_INDEX"):
        shard(entries(3), index, count)


def test_a_databases_list_expands_to_one_entry_each_in_list_order() -> None:
    raw = {
        "databases": [
            {
                "service": "settlement",
                "databases": ["b", "a", "c"],
                "host": "h",
                "user": "u",
                "password": "p",
            },
            {"service": "compliance", "database": "z", "host": "h", "user": "u", "password": "p"},
        ]
    }
    manifest = parse_manifest(raw, {"settlement", "compliance"}, path=Path("m.toml"))
    assert [(e.service, e.database) for e in manifest.databases] == [
        ("settlement", "b"),
        ("settlement", "a"),
        ("settlement", "c"),
        ("compliance", "z"),
    ]


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"databases": []}, "non-empty list"),
        ({"databases": ["a"], "database": "b"}, "excludes database"),
        ({"databases": ["a", "a"]}, "repeats database 'a'"),
        ({"discover": "SELECT 1", "database": "b"}, "exactly one of database, databases or discover"),
        ({}, "exactly one of database, databases or discover"),
    ],
)
def test_list_and_discover_mistakes_are_configuration_errors(entry: dict[str, Any], message: str) -> None:
    raw = {"databases": [{"service": "settlement", "host": "h", "user": "u", "password": "p", **entry}]}
    with pytest.raises(ConfigError, match=message):
        parse_manifest(raw, {"settlement"}, path=Path("m.toml"))


def manifest_env(job_env: dict[str, str], tmp_path: Path, blocks: list[dict[str, Any]]) -> dict[str, str]:
    """Return the job's environment with a manifest of these entries."""
    manifest = write_manifest(tmp_path / "env.toml", blocks, project=PROJECT)
    return {**job_env, "MIGRATE_MANIFEST": str(manifest)}


def shared_block(databases: list[Database], **extra: Any) -> dict[str, Any]:
    """Return one manifest entry for several databases of one service and login."""
    first = databases[0].entry()
    del first["database"]
    return {**first, "databases": [d.name for d in databases], **extra}


def tenants(make_database: Callable[..., Database], service: str, n: int) -> list[Database]:
    """Return n fresh databases of a service that share one login role (as tenants do)."""
    made = [make_database(service)]
    for _ in range(n - 1):
        other = make_database(service)
        made[0].pg.execute(f'ALTER DATABASE "{other.name}" OWNER TO "{made[0].role}"')
        made.append(other)
    for database in made:
        database.role = made[0].role
    return made


def test_one_block_migrates_every_database_it_lists_in_order(
    make_database: Callable[..., Database], tmp_path: Path, job_env: dict[str, str]
) -> None:
    group = tenants(make_database, "settlement", 3)
    run = run_job(env=manifest_env(job_env, tmp_path, [shared_block(group)]))
    assert run.code == 0, run.stdout[-3000:]
    assert [d["database"] for d in run.summary["databases"]] == [d.name for d in group]
    assert all(d.version() == [HEADS["settlement"]] for d in group)


def test_cloud_run_tasks_each_migrate_their_share(
    make_database: Callable[..., Database], tmp_path: Path, job_env: dict[str, str]
) -> None:
    group = tenants(make_database, "compliance", 5)
    env = manifest_env(job_env, tmp_path, [shared_block(group)])
    manifest = load_manifest(Path(env["MIGRATE_MANIFEST"]), SERVICES)
    mine = [e.name for e in shard(list(manifest.databases), 1, 2)]
    run = run_job(env={**env, "CLOUD_RUN_TASK_COUNT": "2", "CLOUD_RUN_TASK_INDEX": "1"})
    assert run.code == 0, run.stdout[-3000:]
    assert [d["database"] for d in run.summary["databases"]] == mine
    assert run.summary["shard"] == {
        "task_index": 1,
        "task_count": 2,
        "databases": len(mine),
        "of": 5,
        "attempt": 0,
    }
    assert [d.version() for d in group] == [[HEADS["compliance"]] if d.name in mine else [] for d in group]
    rest = run_job(env={**env, "CLOUD_RUN_TASK_COUNT": "2", "CLOUD_RUN_TASK_INDEX": "0"})
    assert rest.code == 0
    assert all(d.version() == [HEADS["compliance"]] for d in group)


def discover_block(group: list[Database], query: str) -> dict[str, Any]:
    """Return a discover entry that reaches the server of group with its login."""
    first = group[0].entry()
    del first["database"]
    return {**first, "discover": query}


def test_discover_lists_the_databases_at_run_time_in_name_order(
    make_database: Callable[..., Database], tmp_path: Path, job_env: dict[str, str]
) -> None:
    group = tenants(make_database, "risk-engine", 3)
    names = ", ".join(f"'{d.name}'" for d in reversed(group))
    query = f"SELECT datname FROM pg_database WHERE datname IN ({names})"
    run = run_job(env=manifest_env(job_env, tmp_path, [discover_block(group, query)]))
    assert run.code == 0, run.stdout[-3000:]
    assert [d["database"] for d in run.summary["databases"]] == sorted(d.name for d in group)
    (found,) = run.events("manifest.discovered")
    assert found["count"] == 3 and found["service"] == "risk-engine"
    assert all(d.version() == [HEADS["risk-engine"]] for d in group)
    # --database selects among what was discovered.
    again = run_job(
        "plan",
        "--database",
        group[1].name,
        env=manifest_env(job_env, tmp_path, [discover_block(group, query)]),
    )
    assert [d["database"] for d in again.summary["databases"]] == [group[1].name]


@pytest.mark.parametrize(
    "query",
    ["SELECT datname FROM no_such_table", "CREATE TABLE written_by_discover (id int)"],
    ids=["broken", "writes"],
)
def test_a_discover_query_that_fails_or_writes_is_a_configuration_error(
    make_database: Callable[..., Database], tmp_path: Path, job_env: dict[str, str], query: str
) -> None:
    group = [make_database("settlement")]
    run = run_job(env=manifest_env(job_env, tmp_path, [discover_block(group, query)]))
    assert run.code == 2, run.stdout[-3000:]
    (error,) = run.events("run.error")
    assert "discover query of service settlement" in error["message"]
    assert "written_by_discover" not in group[0].tables()


def test_jobs_apply_every_database_once_with_whole_log_lines(
    make_database: Callable[..., Database], tmp_path: Path, job_env: dict[str, str]
) -> None:
    made = [make_database(SERVICES[i % 3]) for i in range(6)]
    env = manifest_env(job_env, tmp_path, [d.entry() for d in made])
    run = run_job("--jobs", "3", env=env)
    assert run.code == 0, run.stdout[-3000:]
    assert run.stderr == ""
    # Every line parsed as JSON (run.lines), and the summary keeps manifest order.
    assert [d["database"] for d in run.summary["databases"]] == [d.name for d in made]
    assert all(d["status"] == "applied" for d in run.summary["databases"])
    applied = [(e["database"], e["revision"]) for e in run.events("migration.applied")]
    assert len(applied) == len(set(applied))
    assert len(run.events("lock.acquired")) == 6
    assert all(e.get("execution") == "migrate-job-abc12" for e in run.events("migration.applied"))
    assert all(d.version() == [HEADS[d.service]] for d in made)
    # Workers record what they apply in migrate_job_history, as the sequential path does.
    for database in made:
        rows = database.pg.fetch(
            "SELECT revision, direction, execution FROM migrate_job_history ORDER BY id",
            database=database.name,
        )
        assert [r["revision"] for r in rows][-1:] == [HEADS[database.service]]
        assert {(r["direction"], r["execution"]) for r in rows} == {("up", "migrate-job-abc12")}


def test_two_executions_with_jobs_apply_each_revision_once(
    make_database: Callable[..., Database], tmp_path: Path, job_env: dict[str, str]
) -> None:
    made = [make_database(SERVICES[i % 3]) for i in range(4)]
    env = manifest_env(job_env, tmp_path, [d.entry() for d in made])

    async def both() -> list[Any]:
        return await asyncio.gather(*(asyncio.to_thread(run_job, "--jobs", "2", env=env) for _ in range(2)))

    runs = asyncio.run(both())
    assert [r.code for r in runs] == [0, 0], [r.stdout[-2000:] for r in runs]
    applied = [(e["database"], e["revision"]) for r in runs for e in r.events("migration.applied")]
    assert len(applied) == len(set(applied))
    assert all(d.version() == [HEADS[d.service]] for d in made)


def test_a_failure_in_the_pool_stops_new_work_and_the_summary_is_complete(
    make_database: Callable[..., Database], tmp_path: Path, job_env: dict[str, str]
) -> None:
    """The other worker is held at a gate until the failure is known: the rest is then never started."""
    made = [make_database("broken")] + [make_database("slow") for _ in range(3)]
    env = {
        **manifest_env(job_env, tmp_path, [{**d.entry(), "lock_timeout_s": 30} for d in made]),
        "MIGRATE_SERVICES_DIR": FIXTURE_SERVICES,
    }

    async def scenario() -> Any:
        gates = [Gate(d.pg.admin_dsn(d.name), SLOW_GATE) for d in made[1:]]
        for gate in gates:
            await gate.__aenter__()
        try:
            with JobProcess(env, "--jobs", "2") as job:
                await asyncio.to_thread(job.wait_for_event, "db.done", 60)  # the failed one: the others wait
                for gate in gates:
                    await gate.open()
                return await asyncio.to_thread(job.finish, 60)
        finally:
            for gate in gates:
                await gate.open()

    run = asyncio.run(scenario())
    assert run.code == 7, run.stdout[-3000:]
    statuses = {d["database"]: d["status"] for d in run.summary["databases"]}
    assert list(statuses) == [d.name for d in made]
    assert statuses[made[0].name] == "failed"
    # The database the other worker had started finishes; the two after it are never started.
    assert [statuses[d.name] for d in made[1:]] == ["applied", "skipped", "skipped"]
    (error,) = run.events("run.error")
    assert error["database"] == made[0].name and error["revision"] == "aaaa00000002"
    assert made[0].version() == ["aaaa00000001"]


def test_sigterm_stops_every_worker_and_rolls_back(
    make_database: Callable[..., Database], tmp_path: Path, job_env: dict[str, str]
) -> None:
    made = [make_database("slow") for _ in range(2)]
    env = {
        **manifest_env(job_env, tmp_path, [{**d.entry(), "lock_timeout_s": 30} for d in made]),
        "MIGRATE_SERVICES_DIR": FIXTURE_SERVICES,
    }

    async def scenario() -> Any:
        gates = [Gate(d.pg.admin_dsn(d.name), SLOW_GATE) for d in made]
        for gate in gates:
            await gate.__aenter__()
        try:
            with JobProcess(env, "--jobs", "2") as job:
                deadline = time.monotonic() + 60
                while not all([await g.waiter() for g in gates]) and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                assert all([await g.waiter() for g in gates]), "both workers should wait at the gate"
                job.send(signal.SIGTERM)
                return await asyncio.to_thread(job.finish, 20)
        finally:
            for gate in gates:
                await gate.open()

    run = asyncio.run(scenario())
    assert run.code == 143, run.stdout[-3000:]
    assert run.summary["status"] == "interrupted"
    assert {d["status"] for d in run.summary["databases"]} == {"interrupted"}
    for database in made:
        assert database.version() == []
        assert "slow_one" not in database.tables()
        left = database.pg.fetch(
            "SELECT pid FROM pg_stat_activity WHERE application_name LIKE 'migrate-job%' AND datname = $1",
            database.name,
        )
        assert left == []
