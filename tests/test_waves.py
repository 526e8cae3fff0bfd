"""Canary waves, going on past a tenant's failure (on_failure = "continue"), and run.progress.

A fleet of tenant databases is upgraded in one run: a canary proves a release on a few of them
before the rest are touched, one broken tenant must not hold the other hundreds back, and a long
run says how far it is. Real PostgreSQL, the job as a process.
"""

from __future__ import annotations

import io
import itertools
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from devtools.pgserver import PgServer
from job import logs
from job.errors import ConfigError, ConnectError, MigrationFailed
from job.failures import Failures
from job.manifest import DatabaseEntry, parse_manifest
from tests.conftest import Database
from tests.support import FIXTURES, PASSWORD, PROJECT, run_job, write_manifest

FIXTURE_SERVICES = str(FIXTURES / "services")
ALTERING_HEAD = "cccc00000002"


@pytest.fixture
def fleet(pg: PgServer, socket_root: Path | None) -> Iterator[Callable[[str, int], list[Database]]]:
    """Return a factory of n tenant databases of a service, sharing one login role (as tenants do)."""
    made: list[Database] = []
    count = iter(range(1000))

    def make(service: str, n: int) -> list[Database]:
        base = f"w{os.getpid()}_{next(count)}"
        role = f"{base}_migrator"
        pg.create_role(role, PASSWORD)
        group = [Database(service, f"{base}_t{i:02d}", role, PASSWORD, pg, socket_root) for i in range(n)]
        for database in group:
            pg.create_database(database.name, owner=role)
        made.extend(group)
        return group

    yield make
    for database in made:
        pg.drop_database(database.name)


def block(group: list[Database], **extra: Any) -> dict[str, Any]:
    """Return one manifest entry listing every database of the group."""
    first = group[0].entry()
    del first["database"]
    return {**first, "databases": [d.name for d in group], **extra}


def env_for(
    job_env: dict[str, str], tmp_path: Path, blocks: list[dict[str, Any]], **more: str
) -> dict[str, str]:
    """Return the job's environment: a manifest of these entries, and the fixture services."""
    manifest = write_manifest(tmp_path / "env.toml", blocks, project=PROJECT)
    return {**job_env, "MIGRATE_MANIFEST": str(manifest), "MIGRATE_SERVICES_DIR": FIXTURE_SERVICES, **more}


def statuses(run: Any) -> dict[str, str]:
    """Return each database's status in the run's summary."""
    return {d["database"]: d["status"] for d in run.summary["databases"]}


# ---- canary ---------------------------------------------------------------------------------


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_a_failure_in_the_canary_leaves_every_other_database_untouched(
    fleet: Callable[[str, int], list[Database]], tmp_path: Path, job_env: dict[str, str], jobs: str
) -> None:
    # on_failure = "continue" would migrate the others: the canary's failure overrules it.
    group = fleet("broken", 4)
    env = env_for(job_env, tmp_path, [block(group, canary=1, on_failure="continue")])
    run = run_job("--jobs", jobs, env=env)
    assert run.code == 7, run.stdout[-3000:]
    assert list(statuses(run).values()) == ["failed", "skipped", "skipped", "skipped"]
    assert [d.version() for d in group[1:]] == [[], [], []]
    assert all(d.tables() == set() for d in group[1:])
    (error,) = run.events("run.error")
    assert error["message"].startswith("the canary failed:")
    assert "other 3 database(s) with work were not touched" in error["message"]
    assert "run again" in error["hint"] and error["database"] == group[0].name
    (canary,) = run.events("run.canary")
    assert canary["outcome"] == "failed" and canary["canary"] == [f"broken/{group[0].name}"]
    assert run.by_database()[group[0].name]["error"]


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_a_passing_canary_lets_the_rest_run_after_it(
    fleet: Callable[[str, int], list[Database]], tmp_path: Path, job_env: dict[str, str], jobs: str
) -> None:
    group = fleet("altering", 5)
    run = run_job("upgrade", "--canary", "2", "--jobs", jobs, env=env_for(job_env, tmp_path, [block(group)]))
    assert run.code == 0, run.stdout[-3000:]
    assert set(statuses(run).values()) == {"applied"}
    assert all(d.version() == [ALTERING_HEAD] for d in group)
    (canary,) = run.events("run.canary")
    assert canary["outcome"] == "passed" and canary["rest"] == 3
    assert canary["canary"] == [f"altering/{d.name}" for d in group[:2]]
    # The canary wave completed before any other database was locked.
    lines = run.lines
    gate = lines.index(canary)
    canaries = {d.name for d in group[:2]}
    done_before = {e["database"] for e in lines[:gate] if e.get("event") == "db.done"}
    assert done_before == canaries
    assert not [
        e for e in lines[:gate] if e.get("event") == "lock.acquired" and e["database"] not in canaries
    ]


def test_canary_splits_per_entry_or_for_the_whole_selection() -> None:
    from job.waves import canaries

    raw = {
        "databases": [
            {
                "service": "s",
                "databases": ["a", "b", "c"],
                "host": "h",
                "user": "u",
                "password": "p",
                "canary": 1,
            },
            {"service": "s", "databases": ["d", "e"], "host": "h", "user": "u", "password": "p"},
        ]
    }
    manifest = parse_manifest(raw, {"s"}, path=Path("m.toml"))

    class Item:
        def __init__(self, entry: DatabaseEntry) -> None:
            self.target = type("T", (), {"entry": entry})()

    work: Any = [(None, Item(e)) for e in manifest.databases]
    wave, rest = canaries(work, None)
    assert [e.target.entry.database for _, e in wave] == ["a"]
    assert [e.target.entry.database for _, e in rest] == ["b", "c", "d", "e"]
    wave, rest = canaries(work, 4)
    assert [e.target.entry.database for _, e in wave] == ["a", "b", "c", "d"]
    # A canary of everything gates nothing: one wave.
    assert canaries(work, 9) == ([], work)


# ---- keep going -----------------------------------------------------------------------------


@pytest.mark.long
def test_twenty_tenants_three_broken_the_others_are_migrated_and_a_rerun_takes_only_the_three(
    fleet: Callable[[str, int], list[Database]], tmp_path: Path, job_env: dict[str, str]
) -> None:
    group = fleet("altering", 20)
    broken = [group[3], group[9], group[15]]
    for database in broken:
        # What a hand-made fix left behind: the first revision's CREATE TABLE fails.
        database.pg.execute("CREATE TABLE widgets (id int)", database=database.name)
    env = env_for(job_env, tmp_path, [block(group, on_failure="continue")])
    run = run_job("--jobs", "2", env=env)
    assert run.code == 7, run.stdout[-3000:]
    by_name = run.by_database()
    failed = {n for n, d in by_name.items() if d["status"] == "failed"}
    assert failed == {d.name for d in broken}
    assert all("widgets" in by_name[n]["error"] and "already exists" in by_name[n]["error"] for n in failed)
    assert sum(d["status"] == "applied" for d in by_name.values()) == 17
    assert all(d.version() == [ALTERING_HEAD] for d in group if d not in broken)
    assert all(d.version() == [] for d in broken)
    (error,) = run.events("run.error")
    assert error["message"].startswith("3 database(s) failed")
    assert error["database"] == group[3].name and error["failed"] == 3
    assert len(run.events("db.failed")) == 3
    for database in broken:
        database.pg.execute("DROP TABLE widgets", database=database.name)
    rerun = run_job(env=env)
    assert rerun.code == 0, rerun.stdout[-3000:]
    again = statuses(rerun)
    assert {n for n, s in again.items() if s == "applied"} == {d.name for d in broken}
    assert {s for n, s in again.items() if n not in failed} == {"current"}
    assert all(d.version() == [ALTERING_HEAD] for d in group)


def test_max_failures_stops_the_run_and_skips_the_rest(
    fleet: Callable[[str, int], list[Database]], tmp_path: Path, job_env: dict[str, str]
) -> None:
    # max_failures = 2: two failures are tolerated, the third stops the run.
    group = fleet("altering", 7)
    for database in (group[0], group[2], group[4]):
        database.pg.execute("CREATE TABLE widgets (id int)", database=database.name)
    env = env_for(job_env, tmp_path, [block(group, on_failure="continue", max_failures=2)])
    run = run_job(env=env)
    assert run.code == 7, run.stdout[-3000:]
    assert list(statuses(run).values()) == [
        "failed",
        "applied",
        "failed",
        "applied",
        "failed",
        "skipped",
        "skipped",
    ]
    assert [d.version() for d in group[5:]] == [[], []]
    (error,) = run.events("run.error")
    assert "max_failures = 2" in error["hint"] and error["database"] == group[0].name
    assert error["failed"] == 3 and len(run.events("db.failed")) == 2


def test_max_failures_one_tolerates_one_failure() -> None:
    tenants = [entry(name, on_failure="continue", max_failures=1) for name in ("a", "b", "c")]
    for tenant in tenants:
        tenant._block = 0  # one [[databases]] block: one budget
    failures = Failures(tenants)
    assert failures.record(tenants[0], MigrationFailed("a broke"))
    assert not failures.stopped
    assert not failures.record(tenants[1], MigrationFailed("b broke"))
    assert failures.stopped and "more than its max_failures = 1" in (failures.limit or "")


def test_a_tenant_failing_the_preflight_is_its_own_failure_with_continue(
    fleet: Callable[[str, int], list[Database]], tmp_path: Path, job_env: dict[str, str]
) -> None:
    group = fleet("altering", 4)
    # At a revision this image does not know, and a database that is not there (unreachable).
    group[0].pg.execute(
        "CREATE TABLE alembic_version (version_num varchar(32) PRIMARY KEY); "
        "INSERT INTO alembic_version VALUES ('ffffffffffff'); "
        f'ALTER TABLE alembic_version OWNER TO "{group[0].role}"',
        database=group[0].name,
    )
    group[1].pg.drop_database(group[1].name)
    stop = run_job(env=env_for(job_env, tmp_path, [block(group)]))
    # The default is unchanged: the preflight's first failure stops the run before any change.
    assert stop.code == 6, stop.stdout[-3000:]
    assert [d.version() for d in group[2:]] == [[], []]
    run = run_job(env=env_for(job_env, tmp_path, [block(group, on_failure="continue")]))
    assert run.code == 6, run.stdout[-3000:]
    assert list(statuses(run).values()) == ["failed", "failed", "applied", "applied"]
    by_name = run.by_database()
    assert "ffffffffffff" in by_name[group[0].name]["error"]
    assert by_name[group[1].name]["error"]
    assert [d.version() for d in group[2:]] == [[ALTERING_HEAD], [ALTERING_HEAD]]


def entry(name: str, **extra: Any) -> DatabaseEntry:
    """Return a manifest entry built in code."""
    return DatabaseEntry(service="s", database=name, host="h", user="u", password="p", **extra)


def test_only_a_database_s_own_failure_is_tolerated() -> None:
    tenants = [entry("a", on_failure="continue"), entry("b", on_failure="continue")]
    failures = Failures(tenants)
    assert failures.record(tenants[1], MigrationFailed("b broke"))
    assert failures.record(tenants[0], ConnectError("a unreachable"))
    # Manifest order decides the run's error (and so its exit code), not the order of failing.
    assert failures.error() is failures.first() and isinstance(failures.first(), ConnectError)
    assert not failures.record(tenants[0], ConfigError("bad manifest"))
    assert not Failures([entry("c")]).record(entry("c"), MigrationFailed("c broke"))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"max_failures": 2}, 'needs on_failure = "continue"'),
        ({"canary": 0}, "canary"),
        ({"on_failure": "skip"}, "on_failure"),
    ],
)
def test_wave_keys_are_checked(extra: dict[str, Any], message: str) -> None:
    raw = {
        "databases": [{"service": "s", "database": "a", "host": "h", "user": "u", "password": "p", **extra}]
    }
    with pytest.raises(ConfigError, match=message):
        parse_manifest(raw, {"s"}, path=Path("m.toml"))


# ---- progress -------------------------------------------------------------------------------


def test_progress_is_logged_at_the_interval_with_counts(
    fleet: Callable[[str, int], list[Database]], tmp_path: Path, job_env: dict[str, str]
) -> None:
    group = fleet("sleepy", 3)
    env = env_for(job_env, tmp_path, [block(group)], MIGRATE_PROGRESS_S="0.2")
    # Two revisions of 0.3 s each: about 0.6 s a database.
    run = run_job("upgrade", "--to", "5eee00000002", env=env)
    assert run.code == 0, run.stdout[-3000:]
    progress = run.events("run.progress")
    assert len(progress) >= 5, progress
    finished = 0
    for line in run.lines:
        if line.get("event") == "db.done":
            finished += 1
        elif line.get("event") == "run.progress":
            assert (line["done"], line["failed"], line["left"], line["total"]) == (
                finished,
                0,
                3 - finished,
                3,
            )
    steps = [b["elapsed_s"] - a["elapsed_s"] for a, b in itertools.pairwise(progress)]
    assert all(0.1 <= s <= 0.6 for s in steps), steps
    assert any(p["done"] and p["eta_s"] is not None and p["rate"] > 0 for p in progress)


def test_one_database_logs_no_progress(
    fleet: Callable[[str, int], list[Database]], tmp_path: Path, job_env: dict[str, str]
) -> None:
    group = fleet("sleepy", 1)
    env = env_for(job_env, tmp_path, [block(group)], MIGRATE_PROGRESS_S="0.1")
    run = run_job("upgrade", "--to", "5eee00000001", env=env)
    assert run.code == 0 and run.events("run.progress") == []


class Terminal(io.StringIO):
    """A text stream that says it is a terminal."""

    def isatty(self) -> bool:
        """Return True, as a TTY would."""
        return True


def test_on_a_terminal_progress_is_one_line_updated_in_place() -> None:
    terminal = Terminal()
    try:
        logs.setup("text", stream=terminal)
        logs.progress("run.progress", "1/3 databases")
        logs.progress("run.progress", "2/3 databases")
        logs.event("db.done", "settlement/t: applied")
    finally:
        logs.setup("json")
    out = terminal.getvalue()
    assert out.count("\n") == 1 and out.endswith("\n")
    assert out.count(logs.ERASE) == 3 and "2/3 databases" in out


def test_json_progress_is_one_object_per_line() -> None:
    stream = io.StringIO()
    try:
        logs.setup("json", stream=stream)
        logs.progress("run.progress", "1/3 databases", done=1)
    finally:
        logs.setup("json")

    (line,) = stream.getvalue().splitlines()
    assert json.loads(line)["event"] == "run.progress" and json.loads(line)["done"] == 1
