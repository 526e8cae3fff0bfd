"""Where the tasks of one Cloud Run execution meet: ``migrate_job_executions`` (only this module writes it).

With ``CLOUD_RUN_TASK_COUNT`` > 1, the tasks share one canary, one ``max_failures`` budget per
entry and one ``execution.summary``. They never talk to each other: they meet in a table of the
coordination database (an entry's ``coordination_database``; a ``discover`` entry's
``discover_database`` by default), keyed by ``CLOUD_RUN_EXECUTION``, so old rows never stop a
new execution. Rows: ``canary`` (its outcome), ``task:<index>`` (each task's attempt and exit
code), ``db:<service>:<server>/<database>`` (each database's result, and its entry's budget).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from job.errors import ConfigError

if TYPE_CHECKING:
    from job.db import Target
    from job.manifest import DatabaseEntry
    from job.report import DatabaseResult
    from job.run import Run

TABLE = "migrate_job_executions"
# Rows older than this are deleted when a task opens the table (deploy/README.md says so).
RETENTION_DAYS = 30
CREATE = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
    execution text NOT NULL,
    item text NOT NULL,
    status text NOT NULL,
    task_index integer,
    attempt integer,
    budget text,
    detail jsonb,
    updated_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (execution, item)
)"""
# A later pass over a database never hides what an earlier attempt of the execution did to it.
UPSERT = f"""
INSERT INTO {TABLE} (execution, item, status, task_index, attempt, budget, detail)
VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb)
ON CONFLICT (execution, item) DO UPDATE SET
    status = EXCLUDED.status, task_index = EXCLUDED.task_index, attempt = EXCLUDED.attempt,
    budget = EXCLUDED.budget, detail = coalesce({TABLE}.detail, '{{}}') || EXCLUDED.detail,
    updated_at = clock_timestamp()
WHERE NOT (
    (EXCLUDED.status = 'skipped' AND {TABLE}.status <> 'skipped')
    OR (EXCLUDED.status = 'current' AND {TABLE}.status = 'applied')
)"""
# Advisory lock keys (with the execution's hash): one writer at a time for these steps.
CREATING, BUDGET, FINISHING = 1, 2, 3


def coordinated(entries: Sequence[DatabaseEntry], canary: int | None) -> bool:
    """Return whether the run's tasks must share something: a canary or a failure budget."""
    return canary is not None or any(e.canary is not None or e.max_failures is not None for e in entries)


def refuse_without(run: Run, canary: int | None) -> None:
    """Raise ConfigError if several tasks would need to share a canary or budget and cannot."""
    if run.cloud_run.task_count <= 1 or not coordinated(run.selected, canary):
        return
    needing = [
        e
        for e in run.selected
        if (canary is not None or e.canary is not None or e.max_failures is not None)
        and e.coordination is None
    ]
    if needing:
        names = ", ".join(dict.fromkeys(e.label for e in needing[:5]))
        raise ConfigError(
            f"CLOUD_RUN_TASK_COUNT = {run.cloud_run.task_count}, and {names} use canary or max_failures: "
            "the tasks of one execution share them through a coordination database, and none is named",
            hint='give those [[databases]] entries coordination_database = "<a database on the same '
            'server where the login may create a table>" (it holds migrate_job_executions), or run one task',
            service=needing[0].service,
        )
    if not run.cloud_run.execution:
        raise ConfigError(
            "several tasks share a canary or max_failures by execution, and CLOUD_RUN_EXECUTION is not set",
            hint="Cloud Run sets it; to simulate tasks locally, give each run a new CLOUD_RUN_EXECUTION",
        )


def meeting_point(run: Run) -> DatabaseEntry | None:
    """Return where this execution's tasks meet: the first selected entry's coordination database."""
    if run.cloud_run.task_count <= 1 or not run.cloud_run.execution:
        return None
    for entry in run.selected:
        if entry.coordination is not None:
            return entry.model_copy(update={"database": entry.coordination, "discover": None})
    return None


def item(entry: DatabaseEntry) -> str:
    """Return a database's row key: service, server and name (one row per database of the execution)."""
    return f"db:{entry.service}:{entry.location}/{entry.name}"


def budget_key(entry: DatabaseEntry) -> str:
    """Return the key of the entry's failure budget (its [[databases]] block, the same in every task)."""
    return f"{entry.service}#{entry.block}" if entry.block is not None else entry.label


@dataclass
class Ledger:
    """This task's view of the execution's rows, over one open connection to the meeting point."""

    connection: Any
    execution: str
    task_index: int
    attempt: int
    task_count: int
    # One statement at a time on the connection (the preflight's databases fail side by side).
    guard: asyncio.Lock = field(default_factory=asyncio.Lock)
    tasks: list[dict[str, Any]] | None = None

    async def start(self) -> None:
        """Create the table if needed, forget old executions, and say this task runs."""
        async with self.connection.transaction():
            await self._lock(CREATING, global_=True)
            await self.connection.execute(CREATE)
            await self.connection.execute(
                f"DELETE FROM {TABLE} WHERE updated_at < now() - make_interval(days => $1)", RETENTION_DAYS
            )
        await self._put(f"task:{self.task_index}", "running", None, {})

    async def _lock(self, step: int, *, global_: bool = False) -> None:
        """Take a transaction-level advisory lock for one step (of this execution, or of all)."""
        await self.connection.execute(
            "SELECT pg_advisory_xact_lock($1, hashtext($2))", step, "" if global_ else self.execution
        )

    async def _put(self, key: str, status: str, budget: str | None, detail: dict[str, Any]) -> None:
        """Write one row of this execution (a later pass never hides an earlier outcome)."""
        await self.connection.execute(
            UPSERT,
            self.execution,
            key,
            status,
            self.task_index,
            self.attempt,
            budget,
            json.dumps(detail),
        )

    async def record(self, results: Sequence[tuple[DatabaseResult, DatabaseEntry]]) -> None:
        """Write each database's result (its row, with its entry's budget key)."""
        async with self.guard, self.connection.transaction():
            for result, entry in results:
                await self._put(item(entry), result.status, budget_key(entry), result.as_dict())

    async def failed(self, entry: DatabaseEntry, detail: dict[str, Any]) -> int:
        """Record a database's failure; return how many of its entry's databases failed in the execution.

        Under a lock per execution, so that every failure gets its own count.
        """
        async with self.guard, self.connection.transaction():
            await self._lock(BUDGET)
            await self._put(item(entry), "failed", budget_key(entry), detail)
            return int(await self.connection.fetchval(*self._spent_query(entry)))

    def _spent_query(self, entry: DatabaseEntry) -> tuple[str, str, str]:
        """Return the query (and its arguments) counting the failed databases of an entry's budget."""
        return (
            f"SELECT count(*) FROM {TABLE} WHERE execution = $1 AND budget = $2 AND status = 'failed'",
            self.execution,
            budget_key(entry),
        )

    async def spent(self, entry: DatabaseEntry) -> int:
        """Return how many databases of the entry's budget failed in this execution so far."""
        async with self.guard:
            return int(await self.connection.fetchval(*self._spent_query(entry)))

    async def failure(self, entry: DatabaseEntry, nth: int) -> dict[str, Any]:
        """Return the row of the entry's nth failure (1-based, in the order they were counted)."""
        async with self.guard:
            row = await self.connection.fetchrow(
                f"SELECT task_index, detail FROM {TABLE} WHERE execution = $1 AND budget = $2 "
                "AND status = 'failed' ORDER BY updated_at OFFSET $3 LIMIT 1",
                self.execution,
                budget_key(entry),
                nth - 1,
            )
        return {} if row is None else {**json.loads(row["detail"] or "{}"), "task_index": row["task_index"]}

    async def finish(self, exit_code: int) -> list[dict[str, Any]] | None:
        """Say this task finished; return every database row if it is the last task to finish."""
        async with self.connection.transaction():
            await self._lock(FINISHING)
            await self._put(f"task:{self.task_index}", "finished", None, {"exit_code": exit_code})
            tasks = await self.connection.fetch(
                f"SELECT task_index, attempt, status, detail FROM {TABLE} "
                "WHERE execution = $1 AND item LIKE 'task:%' ORDER BY task_index",
                self.execution,
            )
            if sum(r["status"] == "finished" for r in tasks) < self.task_count:
                return None
            rows = await self.connection.fetch(
                f"SELECT detail FROM {TABLE} WHERE execution = $1 AND item LIKE 'db:%' ORDER BY item",
                self.execution,
            )
        self.tasks = [
            {"task_index": r["task_index"], "attempt": r["attempt"], **json.loads(r["detail"] or "{}")}
            for r in tasks
        ]
        return [json.loads(r["detail"]) for r in rows]

    async def close(self) -> None:
        """Close the ledger's connection."""
        from job.run import close_raw

        await close_raw(self.connection)


@dataclass
class CanaryClaim:
    """The execution's canary as this task found it: decided, or this task's to run (row locked)."""

    connection: Any
    execution: str
    outcome: str | None
    detail: dict[str, Any]
    task_index: int | None
    transaction: Any = None

    async def settle(self, outcome: str, detail: dict[str, Any], task_index: int, attempt: int) -> None:
        """Record the canary's outcome and let the waiting tasks read it."""
        from job.run import close_raw

        try:
            await self.connection.execute(
                f"UPDATE {TABLE} SET status = $3, detail = $4::jsonb, task_index = $5, attempt = $6, "
                "updated_at = clock_timestamp() WHERE execution = $1 AND item = $2",
                self.execution,
                "canary",
                outcome,
                json.dumps(detail),
                task_index,
                attempt,
            )
            await self.transaction.commit()
        finally:
            await close_raw(self.connection)

    async def abandon(self) -> None:
        """Give the canary back undecided (this task stopped): another task, or the retry, runs it."""
        from job.run import close_raw

        await close_raw(self.connection)


async def claim_canary(run: Run, ledger: Ledger, on_wait: Callable[[], None]) -> CanaryClaim:
    """Return the execution's canary: decided by another task, or locked for this task to run.

    A task waits only while another holds the canary's row, that is while it runs the canary; a
    task that died let go of it (its connection closed), and the next one runs the canary itself.
    """
    connection = await _connect(run)
    try:
        await connection.execute(
            f"INSERT INTO {TABLE} (execution, item, status) VALUES ($1, 'canary', 'pending') "
            "ON CONFLICT DO NOTHING",
            ledger.execution,
        )
        transaction = connection.transaction()
        await transaction.start()
        query = (
            f"SELECT status, detail, task_index FROM {TABLE} WHERE execution = $1 AND item = 'canary' "
            "FOR UPDATE"
        )
        row = await connection.fetchrow(query + " SKIP LOCKED", ledger.execution)
        if row is None:  # another task holds it: it is running the canary
            on_wait()
            row = await connection.fetchrow(query, ledger.execution)
    except BaseException:
        from job.run import close_raw

        await close_raw(connection)
        raise
    detail = json.loads(row["detail"] or "{}")
    claim = CanaryClaim(connection, ledger.execution, None, detail, row["task_index"], transaction)
    if row["status"] != "pending":
        claim.outcome = row["status"]
        await claim.abandon()
    return claim


async def _connect(run: Run) -> Any:
    """Open a connection to the execution's meeting point."""
    from job import db

    where = meeting_point(run)
    assert where is not None
    target: Target = db.resolve_target(where, run.manifest, run.resolver, run.socket_root)
    return await run.connect_raw(target)


async def open_ledger(run: Run, *, start: bool = True) -> Ledger | None:
    """Return this task's ledger at the execution's meeting point (started: table made); None without one."""
    if meeting_point(run) is None:
        return None
    connection = await _connect(run)
    cloud_run = run.cloud_run
    assert cloud_run.execution is not None
    ledger = Ledger(
        connection, cloud_run.execution, cloud_run.task_index, cloud_run.task_attempt, cloud_run.task_count
    )
    if start:
        try:
            await ledger.start()
        except Exception as exc:
            await ledger.close()
            where = meeting_point(run)
            assert where is not None
            raise ConfigError(
                f"cannot keep {TABLE} in coordination_database {where.name} on {where.location}: "
                f"{type(exc).__name__}: {exc}",
                hint=f"let {where.user or 'the login'} create a table there (GRANT CREATE ON SCHEMA "
                "public), or name another coordination_database in the manifest",
                service=where.service,
            ) from None
    return ledger
