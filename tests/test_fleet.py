"""1000 databases of one server in one run: bounded memory, and a summary within one log entry.

Tenant-per-database services run one history on a thousand databases of a server. Here they are
copies of one template (CREATE DATABASE ... TEMPLATE, the cheap way), the service is a tiny one
(tests/fixtures/fleet/tenant, one revision), and the job is a real process with ``--jobs 2`` that
discovers them. It starts as a fresh interpreter: forked from the tests' warm server, it would
share pages with a process outside its tree, and its memory would look smaller than it is. The
whole tree (the job, the fork server, its workers) is sampled from /proc while it runs; the
figures go to build/fleet-1000.json.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from devtools.pgserver import PgServer
from tests.conftest import INSTANCE
from tests.support import FIXTURES, PASSWORD, PROJECT, REPO, JobRun, record_output, start_job, write_manifest

COUNT = 1000
HEAD = "f1ee00000001"
# What the whole process tree may hold, counted as PSS: a page shared after fork counts once.
TREE_LIMIT_MB = 250
# Cloud Logging's limit for one entry: the run.summary line as the job prints it.
ENTRY_BYTES = 256 * 1024
# Databases are created, checked and dropped over this many connections at once.
CONNECTIONS = 2
FIGURES = REPO / "build" / "fleet-1000.json"
# Run by `make test-scale` (and CI after `make test`): two and a half minutes, most of it the disk.
pytestmark = pytest.mark.scale


@dataclass
class Fleet:
    """The tenant databases of one login role, copied from one template."""

    role: str
    prefix: str
    names: list[str]


async def in_parallel(worker: Callable[[list[str]], Awaitable[None]], names: list[str]) -> None:
    """Run worker on CONNECTIONS shares of names at once."""
    await asyncio.gather(*(worker(names[i::CONNECTIONS]) for i in range(CONNECTIONS)))


def each(pg: PgServer, names: list[str], statement: Callable[[str], str]) -> None:
    """Run statement(name) for every name as the superuser, over CONNECTIONS connections."""

    async def worker(share: list[str]) -> None:
        connection = await asyncpg.connect(pg.admin_dsn(), timeout=30)
        try:
            for name in share:
                await connection.execute(statement(name))
        finally:
            await connection.close()

    asyncio.run(in_parallel(worker, names))


def at_head(pg: PgServer, names: list[str]) -> list[str]:
    """Return the databases whose alembic_version holds HEAD."""
    found: list[str] = []

    async def worker(share: list[str]) -> None:
        for name in share:
            connection = await asyncpg.connect(pg.admin_dsn(name), timeout=30)
            try:
                if await connection.fetchval("SELECT version_num FROM alembic_version") == HEAD:
                    found.append(name)
            finally:
                await connection.close()

    asyncio.run(in_parallel(worker, names))
    return found


@pytest.fixture
def fleet(pg: PgServer) -> Iterator[Fleet]:
    """Return COUNT empty databases owned by one login role, dropped afterwards."""
    prefix = f"t{os.getpid()}_fleet"
    role, template = f"{prefix}_migrator", f"{prefix}_template"
    names = [f"{prefix}_{i:04d}" for i in range(COUNT)]
    pg.create_role(role, PASSWORD)
    pg.create_database(template, owner=role)
    # 1000 copies of even an empty database are 7.3 GB of files: the disk sets the pace. FILE_COPY
    # (PostgreSQL 15+) writes them once; the default, WAL_LOG, also writes each block to the WAL.
    version = int(pg.fetch("SHOW server_version_num")[0]["server_version_num"])
    strategy = " STRATEGY FILE_COPY" if version >= 150000 else ""
    try:
        each(pg, names, lambda n: f'CREATE DATABASE "{n}" TEMPLATE "{template}" OWNER "{role}"{strategy}')
        yield Fleet(role, prefix, names)
    finally:
        each(pg, [*names, template], lambda n: f'DROP DATABASE IF EXISTS "{n}" WITH (FORCE)')


class TreeSampler(threading.Thread):
    """Sums the PSS of a process and all its descendants every interval, and keeps the peak."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        super().__init__(name="tree-sampler", daemon=True)
        self.pid = pid
        self.interval = interval
        self.peak_kb = 0
        self.processes = 0
        self.done = threading.Event()

    def run(self) -> None:
        """Sample until stopped."""
        while not self.done.wait(self.interval):
            pids = tree(self.pid)
            self.processes = max(self.processes, len(pids))
            self.peak_kb = max(self.peak_kb, sum(pss_kb(p) for p in pids))

    def __enter__(self) -> TreeSampler:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.join()


def tree(pid: int) -> list[int]:
    """Return pid and the pids of all its descendants (from /proc/PID/task/TID/children)."""
    found, pending = [], [pid]
    while pending:
        current = pending.pop()
        found.append(current)
        try:
            for task in os.scandir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task.name}/children") as fh:
                    pending += [int(child) for child in fh.read().split()]
        except OSError:  # gone meanwhile
            continue
    return found


def pss_kb(pid: int) -> int:
    """Return a process's proportional set size in kB (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            return next((int(line.split()[1]) for line in fh if line.startswith("Pss:")), 0)
    except OSError:
        return 0


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="needs Linux /proc")
def test_1000_discovered_databases_migrate_in_one_run_within_250_mb_and_one_log_entry(
    fleet: Fleet, pg: PgServer, socket_root: Path | None, job_env: dict[str, str], tmp_path: Path
) -> None:
    where: dict[str, Any] = {"instance": INSTANCE} if socket_root else {"host": pg.host, "port": pg.port}
    entry = {
        "service": "tenant",
        **where,
        "user": fleet.role,
        "password": PASSWORD,
        "discover": f"SELECT datname FROM pg_database WHERE datname LIKE '{fleet.prefix}\\_0%'",
    }
    manifest = write_manifest(tmp_path / "fleet.toml", [entry], project=PROJECT)
    env = {**job_env, "MIGRATE_MANIFEST": str(manifest), "MIGRATE_SERVICES_DIR": str(FIXTURES / "fleet")}
    started = time.monotonic()
    proc = start_job("--jobs", "2", env=env, cold=True)
    with TreeSampler(proc.pid) as sampler:
        stdout, stderr = proc.communicate(timeout=300)
    elapsed = time.monotonic() - started
    record_output(stdout + stderr)
    job = JobRun(proc.returncode, stdout, stderr)
    summary_bytes = len(stdout.splitlines()[-1].encode()) if stdout else 0
    figures = {
        "databases": COUNT,
        "jobs": 2,
        "seconds": round(elapsed, 1),
        "tree_pss_mb": round(sampler.peak_kb / 1024, 1),
        "processes": sampler.processes,
        "summary_bytes": summary_bytes,
    }
    FIGURES.parent.mkdir(exist_ok=True)
    FIGURES.write_text(json.dumps(figures, indent=1) + "\n", encoding="utf-8")
    assert job.code == 0, stdout[-3000:] + stderr[-3000:]
    assert job.summary["counts"] == {"applied": COUNT}
    (group,) = job.summary["groups"]
    assert group["count"] == COUNT and sorted(group["databases"]) == fleet.names
    assert group["to_revision"] == HEAD
    assert summary_bytes < ENTRY_BYTES, figures
    assert sampler.peak_kb < TREE_LIMIT_MB * 1024, figures
    assert len(at_head(pg, fleet.names)) == COUNT
