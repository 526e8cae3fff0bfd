"""job.ops, the zero-downtime helpers: run by the job as a real process while an application works.

The revisions here are the "Zero-downtime recipes" of docs/authoring.md (tests/fixtures/zero_downtime/ledger),
plus a slow index build to kill (slowbuild) and a misuse to refuse (misuse). The application is
three asyncpg connections in a thread: a reader, a writer and an updater that keeps each row lock
for 20 ms, each statement timed. No statement of theirs may wait longer than the job's
lock_timeout plus a margin; the longest wait per revision is printed and written to
build/ops-app-waits.json.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import signal
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from sqlalchemy.engine import URL

from job import db
from job.lint import render_revisions, split_revisions
from job.manifest import DatabaseEntry
from job.services import discover
from tests.conftest import Database
from tests.support import FIXTURES, PROJECT, REPO, JobRun, run_job, run_script, write_manifest
from tests.test_signals import JobProcess

SERVICES_DIR = FIXTURES / "zero_downtime"
LEDGER = [f"ledger00000{n}" for n in range(1, 9)]
HELPERS = {
    "ledger000002": "create_index_concurrently + drop_index_concurrently",
    "ledger000003": "add_not_null + validate_not_null",
    "ledger000004": "add_foreign_key_not_valid + validate_constraint",
    "ledger000005": "add_column_with_default",
    "ledger000006": "expand: plain op.add_column + sync trigger (no helper)",
    "ledger000007": "backfill",
    "ledger000008": "contract: add_not_null + validate_not_null, then drop trigger and column",
}
# The revisions that use only job.ops helpers, whose offline SQL must run twice without error.
RERUNNABLE = ("ledger000002", "ledger000003", "ledger000004", "ledger000005", "ledger000007")
LOCK_TIMEOUT_S = 1.0
# Room for a loaded 2-core machine: the job, PostgreSQL and this process share it.
WAIT_MARGIN_S = 1.0
WAITS_FILE = REPO / "build" / "ops-app-waits.json"
ACCOUNTS = 50
# What the plain, blocking SQL would do to the tables that ledger000001 creates.
PLAIN_RECIPE = """
CREATE INDEX ix_payments_account_id_created_at ON payments (account_id, created_at);
DROP INDEX ix_payments_account_id;
ALTER TABLE payments ALTER COLUMN reference SET NOT NULL;
ALTER TABLE payments ADD CONSTRAINT fk_payments_account_id_accounts
    FOREIGN KEY (account_id) REFERENCES accounts (id) ON DELETE RESTRICT;
ALTER TABLE payments ADD COLUMN public_id uuid NOT NULL DEFAULT gen_random_uuid();
ALTER TABLE payments ADD COLUMN amount_cents bigint;
UPDATE payments SET amount_cents = round(amount * 100);
ALTER TABLE payments ALTER COLUMN amount_cents SET NOT NULL;
ALTER TABLE payments DROP COLUMN amount;
"""
# A payment's reference carries its amount in cents, so that any row can be checked afterwards.
SEED_PAYMENTS = """
INSERT INTO payments (account_id, amount, reference)
SELECT 1 + n % {accounts}, (n * 37 % 100000) / 100.0, 'seed-' || (n * 37 % 100000)
FROM generate_series(1, {rows}) AS n
"""


def environment(job_env: dict[str, str], tmp_path: Path, database: Database, **entry: Any) -> dict[str, str]:
    """Return the job's environment for one database of the zero-downtime fixtures."""
    manifest = write_manifest(tmp_path / "env.toml", [{**database.entry(), **entry}], project=PROJECT)
    return {
        **job_env,
        "MIGRATE_MANIFEST": str(manifest),
        "MIGRATE_SERVICES_DIR": str(SERVICES_DIR),
        "MIGRATE_LOCK_WAIT_S": "30",
    }


def run(coroutine: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine to its end in a loop of its own."""
    return asyncio.run(coroutine)


def seed(database: Database, rows: int, *, skip_triggers: bool = False) -> None:
    """Fill accounts and payments (with triggers off when asked: rows as an older release wrote them)."""
    sql = f"INSERT INTO accounts (name) SELECT 'account-' || n FROM generate_series(1, {ACCOUNTS}) AS n;\n"
    sql += SEED_PAYMENTS.format(accounts=ACCOUNTS, rows=rows).strip() + ";\n"
    if skip_triggers:
        sql = "SET session_replication_role = replica;\n" + sql
    run_script(database.pg.admin_dsn(database.name), sql)


class AppLoad:
    """The application's traffic on payments: a reader, a writer and an updater, each statement timed.

    ``release`` switches the writer from release N (writes amount) to N+1 (writes amount_cents),
    as a deploy between the expand and the contract migrations would.
    """

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.release = 1
        self.samples: list[tuple[float, float, str]] = []  # (started, seconds, what)
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: run(self._main()), daemon=True)

    def __enter__(self) -> AppLoad:
        self._thread.start()
        while not self.samples and not self.errors and self._thread.is_alive():
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def waits_between(self, start: float, end: float) -> list[float]:
        """Return the duration of every statement that was running at some point in [start, end]."""
        return [seconds for began, seconds, _ in self.samples if began <= end and began + seconds >= start]

    async def _main(self) -> None:
        connections = [
            await asyncpg.connect(self.dsn, server_settings={"application_name": f"app-{role}"})
            for role in ("reader", "writer", "updater")
        ]
        try:
            await asyncio.gather(
                self._loop(self._read, connections[0]),
                self._loop(self._write, connections[1]),
                self._loop(self._update, connections[2]),
            )
        finally:
            for connection in connections:
                await connection.close()

    async def _loop(self, step: Callable[[asyncpg.Connection, random.Random], Any], conn: Any) -> None:
        """Run one kind of work until stopped; record any error (the application must see none)."""
        rng = random.Random(len(self.samples))
        while not self._stop.is_set():
            try:
                await step(conn, rng)
            except Exception as exc:
                self.errors.append(f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.005)

    async def _timed(self, what: str, awaitable: Any) -> Any:
        """Await one statement and record how long it took."""
        began = time.monotonic()
        result = await awaitable
        self.samples.append((began, time.monotonic() - began, what))
        return result

    async def _read(self, conn: Any, rng: random.Random) -> None:
        """A page of an account's latest payments."""
        query = "SELECT id, reference FROM payments WHERE account_id = $1 ORDER BY created_at DESC LIMIT 20"
        await self._timed("read", conn.fetch(query, rng.randint(1, ACCOUNTS)))

    async def _write(self, conn: Any, rng: random.Random) -> None:
        """A new payment, written by release N (amount) or N+1 (amount_cents)."""
        cents = rng.randint(1, 99999)
        column, value = ("amount", cents / 100) if self.release == 1 else ("amount_cents", cents)
        insert = f"INSERT INTO payments (account_id, {column}, reference) VALUES ($1, $2, $3)"
        await self._timed("write", conn.execute(insert, rng.randint(1, ACCOUNTS), value, f"app-{cents}"))

    async def _update(self, conn: Any, rng: random.Random) -> None:
        """A short transaction that keeps one row locked for 20 ms, as an application's would."""
        async with conn.transaction():
            update = (
                "UPDATE payments SET reference = reference WHERE id = (SELECT max(id) FROM payments) - $1"
            )
            await self._timed("update", conn.execute(update, rng.randint(0, 500)))
            await conn.execute("SELECT pg_sleep(0.02)")


def snapshot(database: Database) -> dict[str, Any]:
    """Return what the recipes change in the catalog: columns, indexes, constraints and triggers."""
    fetch = database.pg.fetch
    tables = "('payments'::regclass, 'accounts'::regclass)"
    return {
        "columns": fetch(
            "SELECT a.attrelid::regclass::text AS tbl, a.attname, "
            "format_type(a.atttypid, a.atttypmod) AS type, a.attnotnull, "
            "pg_get_expr(d.adbin, d.adrelid) AS default, a.attidentity FROM pg_attribute a "
            "LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum "
            f"WHERE a.attrelid IN {tables} AND a.attnum > 0 AND NOT a.attisdropped ORDER BY 1, 2",
            database=database.name,
        ),
        "indexes": fetch(
            "SELECT indexrelid::regclass::text AS name, pg_get_indexdef(indexrelid) AS def, indisvalid "
            f"FROM pg_index WHERE indrelid IN {tables} ORDER BY 1",
            database=database.name,
        ),
        "constraints": fetch(
            "SELECT conname, contype, pg_get_constraintdef(oid) AS def, convalidated "
            f"FROM pg_constraint WHERE conrelid IN {tables} ORDER BY 1",
            database=database.name,
        ),
        "triggers": fetch(
            f"SELECT tgname FROM pg_trigger WHERE tgrelid IN {tables} AND NOT tgisinternal ORDER BY 1",
            database=database.name,
        ),
    }


def offline_sql(start: str | None, to: str) -> str:
    """Return the ledger's offline SQL from start to ``to``, rendered in this process as `sql` does."""
    service = discover(SERVICES_DIR)["ledger"]
    never_connected = db.Target(
        DatabaseEntry(service="ledger", database="offline", url="offline"),
        URL.create(db.DRIVER, database="offline"),
    )
    return "".join(chunk.sql for chunk in render_revisions(service, never_connected, start, to))


def plain_recipe(make_database: Callable[..., Database]) -> dict[str, Any]:
    """Return the catalog that the plain, blocking SQL of the recipes leaves (the reference result)."""
    database = make_database("ledger")
    dsn = database.pg.admin_dsn(database.name)
    run_script(dsn, offline_sql(None, LEDGER[0]))
    seed(database, 10)
    run_script(dsn, PLAIN_RECIPE)
    return snapshot(database)


def assert_data_complete(database: Database) -> None:
    """Every payment has its own public_id and the amount in cents its reference says."""
    (row,) = database.pg.fetch(
        "SELECT count(*) AS rows, count(DISTINCT public_id) AS ids, "
        "count(*) FILTER (WHERE amount_cents <> split_part(reference, '-', 2)::bigint) AS wrong "
        "FROM payments",
        database=database.name,
    )
    assert row["rows"] > 0 and row["ids"] == row["rows"] and row["wrong"] == 0, row


def record_waits(key: str, waits: dict[str, Any]) -> None:
    """Print the longest application waits and keep them in build/ops-app-waits.json."""
    WAITS_FILE.parent.mkdir(exist_ok=True)
    recorded = json.loads(WAITS_FILE.read_text(encoding="utf-8")) if WAITS_FILE.exists() else {}
    recorded[key] = waits
    WAITS_FILE.write_text(json.dumps(recorded, indent=1) + "\n", encoding="utf-8")
    print(f"\nlongest application wait per revision ({key}):")
    for revision, entry in waits.items():
        wait, statements_seen = entry["max_wait_ms"], entry["statements"]
        print(f"  {revision}  {wait:>6} ms  over {statements_seen:>5} statements  {entry['helpers']}")


def waits_per_revision(job: JobProcess, load: AppLoad, end: float) -> dict[str, Any]:
    """Return the longest application wait while each revision ran (between two migration.applied)."""
    (lock_taken, _), *_ = job.arrivals("lock.acquired")
    out: dict[str, Any] = {}
    start = lock_taken
    for arrived, line in job.arrivals("migration.applied"):
        waits = load.waits_between(start, arrived)
        out[line["revision"]] = {
            "helpers": HELPERS[line["revision"]],
            "max_wait_ms": round(max(waits, default=0.0) * 1000, 1),
            "statements": len(waits),
        }
        start = arrived
    assert start <= end
    return out


@pytest.mark.long
def test_each_recipe_keeps_application_queries_within_lock_timeout(
    make_database: Callable[..., Database], tmp_path: Path, job_env: dict[str, str]
) -> None:
    """The recipes run while an application reads and writes payments: nobody waits past lock_timeout.

    Each helper's statements that the application must wait for (brief exclusive locks, row locks
    of a batch) are bounded by the job's lock_timeout; everything long runs under locks that the
    application's statements do not conflict with. The result is the catalog the plain, blocking
    SQL gives, and the data is complete.
    """
    database = make_database("ledger")
    env = environment(job_env, tmp_path, database, lock_timeout_s=LOCK_TIMEOUT_S)
    first = run_job("upgrade", "--to", LEDGER[0], env=env)
    assert first.code == 0, first.stdout
    seed(database, 20000)

    waits: dict[str, Any] = {}
    with AppLoad(database.pg.admin_dsn(database.name)) as load:
        release_n = JobProcess(env, "upgrade", "--to", LEDGER[6])
        done_n = release_n.finish(timeout=60)
        waits.update(waits_per_revision(release_n, load, time.monotonic()))
        load.release = 2  # release N+1 is deployed: it writes amount_cents only
        time.sleep(0.2)
        release_n1 = JobProcess(env, "upgrade")
        done_n1 = release_n1.finish(timeout=60)
        waits.update(waits_per_revision(release_n1, load, time.monotonic()))
        jobs_ran = [(job.started, job.started + job.lines[-1][0]) for job in (release_n, release_n1)]
        during = [w for start, end in jobs_ran for w in load.waits_between(start, end)]
    record_waits("ledger under load", waits)

    assert done_n.code == 0 and done_n1.code == 0, done_n.stdout + done_n1.stdout
    assert done_n.stderr == done_n1.stderr == ""
    assert "revision" not in done_n.summary, "a migration's context ends with its env.py"
    assert load.errors == [], load.errors[:5]
    assert set(waits) == set(LEDGER[1:]), waits
    assert len(during) > 100, "the application kept working while the job ran"
    assert max(during) < LOCK_TIMEOUT_S + WAIT_MARGIN_S, waits
    assert database.version() == [LEDGER[-1]]
    history = database.pg.fetch(
        "SELECT revision FROM migrate_job_history ORDER BY id", database=database.name
    )
    assert [r["revision"] for r in history] == LEDGER, "each recorded in its revision's transaction"
    assert snapshot(database) == plain_recipe(make_database)
    assert_data_complete(database)


def test_a_killed_index_build_is_dropped_and_built_again(
    make_database: Callable[..., Database], tmp_path: Path, job_env: dict[str, str]
) -> None:
    """A CREATE INDEX CONCURRENTLY terminated mid-build leaves an INVALID index; the next run rebuilds it.

    PostgreSQL keeps the INVALID index (it slows writes and is never used), and a rerun of plain
    ``CREATE INDEX CONCURRENTLY IF NOT EXISTS`` would keep it too. Here the job loses its backend
    mid-build, reconnects and runs the revision again in the same execution (as after a failover),
    where the helper finds the INVALID index, drops it and builds it again. The build sleeps 10 ms
    a row (slow_code): longer than the manifest's statement_timeout, which the helper lifts for it.
    """
    database = make_database("slowbuild")
    env = environment(job_env, tmp_path, database, statement_timeout_s=0.5)
    assert run_job("upgrade", "--to", "slow00000001", env=env).code == 0

    job = JobProcess(env, "upgrade")
    pid = run(building_pid(database, timeout=30))
    terminated = database.pg.fetch("SELECT pg_terminate_backend($1) AS ok", pid, database=database.name)
    rebuilt = job.finish(timeout=60)

    assert terminated == [{"ok": True}]
    assert rebuilt.code == 0, rebuilt.stdout
    (reconnect,) = rebuilt.events("db.reconnect")
    assert "terminating connection" in reconnect["message"]
    (dropped,) = rebuilt.events("ops.invalid_index_dropped")
    assert dropped["index"] == "ix_gizmos_slow_code" and dropped["severity"] == "WARNING"
    assert dropped["database"] == database.name and dropped["revision"] == "slow00000002"
    assert [e["revision"] for e in rebuilt.events("migration.applied")] == ["slow00000002"]
    assert database.version() == ["slow00000002"]
    assert index_state(database) == [{"indisvalid": True}]


async def building_pid(database: Database, timeout: float) -> int:
    """Return the backend building gizmos' index once it is scanning the table."""
    connection = await asyncpg.connect(database.pg.admin_dsn(database.name))
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid = await connection.fetchval(
                "SELECT pid FROM pg_stat_progress_create_index "
                "WHERE datname = current_database() AND phase LIKE 'building index%'"
            )
            if pid is not None:
                return int(pid)
            await asyncio.sleep(0.02)
    finally:
        await connection.close()
    raise AssertionError("the index build never started")


def index_state(database: Database) -> list[dict[str, Any]]:
    """Return ix_gizmos_slow_code's validity (no row: no index)."""
    return database.pg.fetch(
        "SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass('ix_gizmos_slow_code')",
        database=database.name,
    )


def test_an_index_build_that_waits_past_lock_timeout_is_retried_and_built(
    make_database: Callable[..., Database], tmp_path: Path, job_env: dict[str, str]
) -> None:
    """A transaction older than the build makes CREATE INDEX CONCURRENTLY wait; lock_timeout ends that.

    The helper keeps lock_timeout for the build: waiting blocks no application query, but a
    build that waits forever would hang the job. The job retries the revision, as for any lock
    timeout, and the retry drops the INVALID index the timed-out build left and builds it again.
    """
    database = make_database("ledger")
    env = environment(job_env, tmp_path, database, lock_timeout_s=LOCK_TIMEOUT_S)
    run_script(
        database.pg.admin_dsn(database.name), f'SET ROLE "{database.role}";\n' + offline_sql(None, LEDGER[0])
    )

    async def scenario() -> tuple[JobRun, int]:
        blocker = await asyncpg.connect(database.pg.admin_dsn(database.name))
        try:
            # A report's snapshot: the build must wait for it before its index may be used.
            transaction = blocker.transaction(isolation="repeatable_read")
            await transaction.start()
            await blocker.fetchval("SELECT count(*) FROM payments")
            job = JobProcess(env, "upgrade", "--to", LEDGER[1])
            await asyncio.to_thread(job.wait_for_event, "migration.lock_timeout", 30)
            await transaction.commit()
            return await asyncio.to_thread(job.finish, 60), blocker.get_server_pid()
        finally:
            await blocker.close()

    retried, blocker_pid = run(scenario())

    assert retried.code == 0, retried.stdout
    (timeout,) = retried.events("migration.lock_timeout")
    assert timeout["revision"] == LEDGER[1] and blocker_pid in [b["pid"] for b in timeout["blockers"]]
    (dropped,) = retried.events("ops.invalid_index_dropped")
    assert dropped["index"] == "ix_payments_account_id_created_at"
    assert database.version() == [LEDGER[1]]
    indexes = database.pg.fetch(
        "SELECT indexrelid::regclass::text AS name, indisvalid FROM pg_index "
        "WHERE indrelid = 'payments'::regclass AND NOT indisprimary",
        database=database.name,
    )
    assert indexes == [{"name": "ix_payments_account_id_created_at", "indisvalid": True}]


COUNT_JOB_UPDATES = """
ALTER TABLE payments ADD COLUMN job_updates integer NOT NULL DEFAULT 0;
CREATE FUNCTION count_job_updates() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('application_name') LIKE 'migrate-job%' THEN
        NEW.job_updates := OLD.job_updates + 1;
        PERFORM pg_sleep(0.001);
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER count_job_updates BEFORE UPDATE ON payments FOR EACH ROW EXECUTE FUNCTION count_job_updates();
"""


def test_a_killed_backfill_resumes_and_updates_every_row_once(
    make_database: Callable[..., Database], tmp_path: Path, job_env: dict[str, str]
) -> None:
    """SIGKILL mid-backfill: committed batches stay, the next run does the rest, no row twice.

    A trigger counts the job's updates of each row (and sleeps 1 ms for each, so that the first
    1000-row batch takes over a second: it is halved, and the job is killed after it).
    """
    database = make_database("ledger")
    env = environment(job_env, tmp_path, database)
    assert run_job("upgrade", "--to", LEDGER[5], env=env).code == 0
    # The first batch (1000 rows) and the one in flight when the job is killed (500) leave some.
    rows = 1800
    seed(database, rows, skip_triggers=True)  # written before the expand: amount_cents is NULL
    run_script(database.pg.admin_dsn(database.name), COUNT_JOB_UPDATES)

    job = JobProcess(env, "upgrade", "--to", LEDGER[6])
    job.wait_for_event("backfill.progress", timeout=30)
    (_, first_progress), *_ = job.arrivals("backfill.progress")
    job.proc.send_signal(signal.SIGKILL)
    killed = job.finish(timeout=60)
    left_after_kill = count(database, "amount_cents IS NULL")

    assert killed.code == -signal.SIGKILL
    assert first_progress["rows_done"] == 1000 and first_progress["rows_left"] == rows - 1000
    assert first_progress["batch_size"] == 500, "the slow 1000-row batch was halved"
    assert first_progress["database"] == database.name and first_progress["revision"] == LEDGER[6]
    assert database.version() == [LEDGER[5]]
    assert 0 < left_after_kill <= rows - 1000

    again = run_job("upgrade", "--to", LEDGER[6], env=env)
    assert again.code == 0, again.stdout
    (start,) = again.events("backfill.start")
    (done,) = again.events("backfill.done")
    assert start["rows_left"] <= left_after_kill and done["rows_done"] == start["rows_left"]
    assert database.version() == [LEDGER[6]]
    assert count(database, "job_updates = 1") == rows, "every row updated exactly once"
    assert count(database, "amount_cents = split_part(reference, '-', 2)::bigint") == rows


def count(database: Database, where: str) -> int:
    """Return how many payments match."""
    (row,) = database.pg.fetch(f"SELECT count(*) AS n FROM payments WHERE {where}", database=database.name)
    return int(row["n"])


def test_offline_sql_is_plain_reruns_cleanly_and_lints_clean(
    make_database: Callable[..., Database], tmp_path: Path, job_env: dict[str, str]
) -> None:
    """`sql` renders what the helpers do as SQL a DBA can run, twice if need be; `lint` finds nothing.

    Run statement by statement (as psql -f), the script builds the plain recipe's catalog; each
    helper revision's part runs again without error, as it must after a crash.
    """
    database = make_database("ledger")
    env = environment(job_env, tmp_path, database)
    rendered = run_job("sql", "--from", "base", env=env)
    linted = run_job("lint", env=env)

    assert rendered.code == 0, rendered.stdout
    (line,) = rendered.events("db.sql")
    sql = line["sql"]
    for plain in (
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS ix_payments_account_id_created_at",
        "DROP INDEX CONCURRENTLY IF EXISTS ix_payments_account_id;",
        "CHECK (reference IS NOT NULL) NOT VALID",
        "ALTER TABLE payments VALIDATE CONSTRAINT ck_payments_reference_not_null;",
        "ALTER TABLE payments ALTER COLUMN reference SET NOT NULL;",
        "REFERENCES accounts (id) ON DELETE RESTRICT NOT VALID",
        "ALTER TABLE payments ADD COLUMN IF NOT EXISTS public_id UUID;",
        "SET DEFAULT gen_random_uuid()",
        "UPDATE payments SET amount_cents = round(amount * 100)",
    ):
        assert plain in sql, plain
    assert "job.ops" not in sql and "<" not in sql, "plain SQL, nothing of Python in it"
    assert "revision" not in rendered.summary, "rendering leaves no migration context behind"
    assert database.tables() == set(), "sql --from base touches no database"

    assert linted.code == 0, linted.stdout
    assert linted.events("lint.finding") == []
    exempted = {(e["revision"], e["rule"]) for e in linted.events("lint.exempted")}
    assert exempted == {(LEDGER[7], "ban-drop-column"), (LEDGER[7], "ban-drop-function")}, (
        "the contract's own"
    )

    dsn = database.pg.admin_dsn(database.name)
    chunks = dict(split_revisions(sql))
    run_script(dsn, chunks[LEDGER[0]])
    seed(database, 2500)
    for revision in LEDGER[1:]:
        run_script(dsn, chunks[revision])
        if revision in RERUNNABLE:
            run_script(dsn, chunks[revision])  # as after a crash before its end was recorded
    assert database.version() == [LEDGER[-1]]
    assert snapshot(database) == plain_recipe(make_database)
    assert_data_complete(database)


def test_a_helper_after_other_ddl_is_refused_and_nothing_is_applied(
    make_database: Callable[..., Database], tmp_path: Path, job_env: dict[str, str]
) -> None:
    """create_index_concurrently after add_column in one revision refuses: committing early is unsafe.

    Leaving the transaction would commit the new column before the revision is done; the job
    then reports the helper's message, and the revision's transaction rolls back whole.
    """
    database = make_database("misuse")
    env = environment(job_env, tmp_path, database)

    refused = run_job("upgrade", env=env)

    assert refused.code == 7, refused.stdout
    (error,) = refused.events("run.error")
    assert error["revision"] == "misuse000002"
    message = error["message"]
    assert "HelperRefused: job.ops.create_index_concurrently on widgets" in message, message
    assert "already changed the definition of widgets" in message, message
    assert "in a revision of its own, or before the revision's other operations" in message, message
    assert "job.ops helpers pick up where they stopped" in error["hint"], error["hint"]
    assert database.version() == ["misuse000001"]
    columns = database.pg.fetch(
        "SELECT attname FROM pg_attribute WHERE attrelid = 'widgets'::regclass AND attname = 'note'",
        database=database.name,
    )
    assert columns == [] and "ix_widgets_note" not in relations(database)


def test_a_helper_in_the_first_revision_of_a_database_may_commit_the_new_version_table(
    make_database: Callable[..., Database], tmp_path: Path, job_env: dict[str, str]
) -> None:
    """Adopting a database that has tables: the first revision indexes one, concurrently.

    Alembic creates alembic_version in the first revision's transaction; committing that early is
    harmless (it is created only if missing), so the helper tells it apart from the revision's own
    changes and goes on.
    """
    database = make_database("adopt")
    database.pg.execute(
        "CREATE TABLE legacy (id bigint PRIMARY KEY, code text);"
        f'ALTER TABLE legacy OWNER TO "{database.role}"',
        database=database.name,
    )
    env = environment(job_env, tmp_path, database)

    adopted = run_job("upgrade", env=env)

    assert adopted.code == 0, adopted.stdout
    assert database.version() == ["adopt0000001"]
    valid = database.pg.fetch(
        "SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass('ix_legacy_code')",
        database=database.name,
    )
    assert valid == [{"indisvalid": True}]


def relations(database: Database) -> set[str]:
    """Return every relation of the public schema by name."""
    rows = database.pg.fetch(
        "SELECT relname FROM pg_class WHERE relnamespace = 'public'::regnamespace", database=database.name
    )
    return {r["relname"] for r in rows}


RECIPE_BLOCK = re.compile(
    r"```python\n# (?P<path>tests/fixtures/zero_downtime/\S+\.py)\n(?P<code>.*?)```", re.S
)


def test_the_documented_recipes_are_the_revisions_these_tests_run() -> None:
    """Each recipe in docs/authoring.md is copied from the fixture revision that the tests above apply."""
    readme = (REPO / "docs" / "authoring.md").read_text(encoding="utf-8")
    blocks = list(RECIPE_BLOCK.finditer(readme))
    shown = {Path(b["path"]).name.split("_")[2] for b in blocks}
    assert shown >= set(LEDGER[1:]), sorted(shown)
    for block in blocks:
        source = (REPO / block["path"]).read_text(encoding="utf-8")
        for part in block["code"].strip().split("\n\n\n"):  # imports, constants, functions
            assert part in source, (block["path"], part)
