"""trace and plan --impact: what each revision locks, rewrites and scans, read from PostgreSQL itself.

The ``locks`` fixture service (tests/fixtures/trace/locks) is the issue's "done when" service: one
revision per case, in the order the issue lists them. The ``ledger`` fixture uses every job.ops
helper, each of which must stay silent.
"""

from __future__ import annotations

import json
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from devtools.pgserver import PgServer
from job import lockmodes
from job.lockrules import LINT_RULES, RevisionTrace, analyse, judge
from job.plan import Step
from job.trace import Observed, Reading
from tests.conftest import Database
from tests.support import (
    FIXTURES,
    PASSWORD,
    JobRun,
    record_output,
    run_job,
    scratch_url,
    start_job,
    write_manifest,
)

LOCKS = FIXTURES / "trace"
LEDGER = FIXTURES / "zero_downtime"
# The issue's "done when": exactly these findings, by revision.
EXPECTED = {
    "locks0003": {"table-rewrite"},  # int to bigint
    "locks0004": {"scan-under-lock"},  # SET NOT NULL inside a DO block
    "locks0005": {"scan-under-lock"},  # a plain CREATE INDEX
    "locks0008": {"table-rewrite"},  # a column with a volatile default
    "locks0010": {"scan-under-lock"},  # a validating foreign key
}


def scratch_env(
    pg: PgServer, job_env: dict[str, str], tmp_path: Path, services: Path, service: str
) -> dict[str, str]:
    """Return the environment of a trace run: a manifest naming the service, a scratch URL."""
    manifest = write_manifest(
        tmp_path / f"{service}.toml",
        [{"service": service, "database": service, "host": "127.0.0.1", "user": "u", "password": "p"}],
    )
    return {
        **job_env,
        "MIGRATE_MANIFEST": str(manifest),
        "MIGRATE_SERVICES_DIR": str(services),
        "SCRATCH_URL": scratch_url(pg),
    }


def scratch_left(pg: PgServer, purpose: str = "trace") -> list[dict[str, Any]]:
    """Return the scratch databases of a purpose still on the server."""
    return pg.fetch(f"SELECT datname FROM pg_database WHERE datname LIKE 'mj_{purpose}_%'")


def findings_by_revision(run: JobRun) -> dict[str, set[str]]:
    """Return the rules found per revision."""
    found: dict[str, set[str]] = {}
    for line in run.events("trace.finding"):
        found.setdefault(line["revision"], set()).add(line["rule"])
    return found


@pytest.fixture(scope="module")
def done_when(pg: PgServer, tmp_path_factory: pytest.TempPathFactory) -> tuple[JobRun, Path]:
    """One trace of the issue's service, with its reports (module-wide: the tests read it)."""
    tmp = tmp_path_factory.mktemp("trace")
    env = scratch_env(pg, {}, tmp, LOCKS, "locks")
    run = run_job("trace", "--scratch", "env://SCRATCH_URL", "--output", str(tmp / "report"), env=env)
    return run, tmp / "report"


def test_the_done_when_service_gets_exactly_the_issue_findings(done_when: tuple[JobRun, Path]) -> None:
    """Rewrites for the type change and the volatile default; scans under lock for the DO block, the
    plain index and the foreign key; nothing else (not the new tables, the nullable column, the
    concurrent index, the varchar widening, NOT VALID then VALIDATE)."""
    run, _ = done_when
    assert run.code == 9, run.stdout
    assert findings_by_revision(run) == EXPECTED
    for line in run.events("trace.finding"):
        assert line["severity"] == "ERROR" and line["trace_level"] == "error"
        assert line["service"] == "locks" and line["table"] == "payments"
        # What the lock blocks, how long, what avoids it.
        assert (
            "blocks" in line["message"]
            and " ms here" in line["message"]
            and "Avoid it with" in line["message"]
        )
    error = run.events("run.error")[0]
    assert error["exit_code"] == 9 and error["error"] == "trace"


def test_each_revision_says_what_it_locks_rewrites_and_scans(done_when: tuple[JobRun, Path]) -> None:
    run, _ = done_when
    traced = {line["revision"]: line for line in run.events("trace.revision")}
    assert list(traced) == [f"locks{n:04d}" for n in range(1, 13)]
    for line in traced.values():
        assert {"service", "revision", "locks", "rewritten", "scanned", "duration_ms"} <= set(line)
    # Only tables that existed before the revision, and never the job's own.
    assert traced["locks0001"]["locks"] == [] and traced["locks0009"]["locks"] == []
    assert not any(
        lock["table"] in {"alembic_version", "migrate_job_history"}
        for t in traced.values()
        for lock in t["locks"]
    )
    assert traced["locks0002"]["locks"] == [
        {"table": "payments", "mode": "AccessExclusiveLock", "blocks": ["reads", "writes"]}
    ]
    assert traced["locks0002"]["rewritten"] == traced["locks0002"]["scanned"] == []
    assert traced["locks0003"]["rewritten"] == ["payments"]
    assert traced["locks0005"]["locks"] == [{"table": "payments", "mode": "ShareLock", "blocks": ["writes"]}]
    assert traced["locks0007"]["rewritten"] == traced["locks0007"]["scanned"] == []  # varchar widening
    # The referenced table of the foreign key.
    assert {"table": "accounts", "mode": "ShareRowExclusiveLock", "blocks": ["writes"]} in traced[
        "locks0010"
    ]["locks"]
    assert traced["locks0010"]["scanned"] == ["payments"]
    # NOT VALID, then VALIDATE in a revision of its own: the scan blocks no writes.
    assert traced["locks0012"]["scanned"] == []
    assert {"table": "refunds", "mode": "ShareUpdateExclusiveLock", "blocks": []} in traced["locks0012"][
        "locks"
    ]


def test_each_finding_says_whether_lint_saw_it(done_when: tuple[JobRun, Path]) -> None:
    """squawk reads SQL: it sees the plain index and the type change, not what a DO block does."""
    run, _ = done_when
    verdicts = {
        line["revision"]: (line["lint_saw"], line["lint_rules"]) for line in run.events("trace.finding")
    }
    assert verdicts["locks0004"] == (False, [])  # the DO block
    assert verdicts["locks0005"] == (True, ["require-concurrent-index-creation"])
    assert verdicts["locks0003"][0] is True and "changing-column-type" in verdicts["locks0003"][1]


def test_the_report_files(done_when: tuple[JobRun, Path]) -> None:
    _, report = done_when
    data = json.loads((report / "trace.json").read_text())
    assert data["findings"] == 5
    revisions = {r["revision"]: r for r in data["revisions"]}
    assert [f["rule"] for f in revisions["locks0005"]["findings"]] == ["scan-under-lock"]
    assert revisions["locks0005"]["findings"][0]["message"].startswith("locks: revision locks0005")
    markdown = (report / "trace.md").read_text()
    assert markdown.count("### `locks") == 12
    assert "| table | lock | blocks | rewrite | scan | finding |" in markdown
    assert "| payments | ShareLock | writes | - | yes | **scan-under-lock** (lint saw it too" in markdown
    assert (
        "| payments | AccessExclusiveLock | reads, writes | - | yes | **scan-under-lock** (lint missed it) |"
        in (markdown)
    )
    assert "No table that existed before is locked." in markdown


def test_the_scratch_database_is_dropped(done_when: tuple[JobRun, Path], pg: PgServer) -> None:
    run, _ = done_when
    assert run.summary["databases"][0]["status"] == "traced"
    assert scratch_left(pg) == []


def test_every_job_ops_helper_stays_silent(pg: PgServer, tmp_path: Path, job_env: dict[str, str]) -> None:
    """The ledger recipes (concurrent indexes, NOT NULL by a check, NOT VALID foreign key, a volatile
    default and a backfill in batches, expand and contract): no finding, exit 0."""
    run = run_job(
        "trace", "--scratch", "env://SCRATCH_URL", env=scratch_env(pg, job_env, tmp_path, LEDGER, "ledger")
    )
    assert run.code == 0, run.stdout
    assert run.events("trace.finding") == []
    traced = {line["revision"]: line for line in run.events("trace.revision")}
    assert len(traced) == 8 and all(t["rewritten"] == t["scanned"] == [] for t in traced.values())
    # validate_not_null scans under SHARE UPDATE EXCLUSIVE, then SET NOT NULL takes ACCESS EXCLUSIVE
    # without a scan: the later lock does not make the earlier scan one under it.
    assert {"table": "payments", "mode": "AccessExclusiveLock", "blocks": ["reads", "writes"]} in traced[
        "ledger000003"
    ]["locks"]
    assert scratch_left(pg) == []


def copy_locks(tmp_path: Path, *, upto: int = 12) -> Path:
    """Return a copy of the locks service with only its first revisions."""
    services = tmp_path / "services"
    shutil.copytree(LOCKS / "locks", services / "locks", ignore=shutil.ignore_patterns("__pycache__"))
    for path in (services / "locks" / "migrations" / "versions").glob("*.py"):
        if int(path.name.split("_locks")[1][:4]) > upto:
            path.unlink()
    return services


def add_revision(services: Path, revision: str, parent: str, body: str, header: str = "") -> Path:
    """Write a revision after parent into the copied locks service."""
    path = services / "locks" / "migrations" / "versions" / f"20251201_1100_{revision}_extra.py"
    path.write_text(
        f'"""extra revision\n\nRevision ID: {revision}\nRevises: {parent}\n"""\n\n'
        "import sqlalchemy as sa\nfrom alembic import op\n\n"
        f"{header}"
        f"revision = {revision!r}\ndown_revision = {parent!r}\nbranch_labels = None\ndepends_on = None\n\n\n"
        f"def upgrade() -> None:\n{body}\n\n\ndef downgrade() -> None:\n    pass\n",
        encoding="utf-8",
    )
    return path


SQL_BUILT_IN_PYTHON = """    # The tables are found at run time: rendered offline (lint), nothing runs.
    if op.get_context().as_sql:
        return
    rows = op.get_bind().execute(sa.text("SELECT tablename FROM pg_tables WHERE tablename = 'payments'"))
    for (table,) in rows.all():
        op.execute(f"ALTER TABLE {table} ALTER COLUMN account_id TYPE bigint")"""


def test_sql_built_in_python_is_caught_where_lint_sees_nothing(
    pg: PgServer, tmp_path: Path, job_env: dict[str, str]
) -> None:
    services = copy_locks(tmp_path, upto=2)
    add_revision(services, "extra0001", "locks0002", SQL_BUILT_IN_PYTHON)
    env = scratch_env(pg, job_env, tmp_path, services, "locks")
    run = run_job("trace", "--scratch", "env://SCRATCH_URL", "--from", "locks0002", env=env)
    assert run.code == 9, run.stdout
    assert [line["revision"] for line in run.events("trace.revision")] == ["extra0001"]
    (finding,) = run.events("trace.finding")
    assert (finding["rule"], finding["table"], finding["lint_saw"]) == ("table-rewrite", "payments", False)
    assert "changing account_id from integer to bigint" in finding["message"]
    assert run_job("lint", "--from", "locks0002", env=env).code == 0  # what lint alone says


AUTOCOMMIT_INDEXES = """    with op.get_context().autocommit_block():
        op.execute("CREATE INDEX CONCURRENTLY ix_payments_note ON payments (note)")
        op.execute("CREATE INDEX ix_payments_amount ON payments (amount)")"""


def test_statements_outside_the_transaction_are_watched_while_they_run(
    pg: PgServer, tmp_path: Path, job_env: dict[str, str]
) -> None:
    """In an autocommit block: the plain index blocks writes while it reads (a finding, its lock held
    until the statement ends), the concurrent one does not; both locks are seen."""
    services = copy_locks(tmp_path, upto=2)
    add_revision(services, "extra0005", "locks0002", AUTOCOMMIT_INDEXES)
    env = scratch_env(pg, job_env, tmp_path, services, "locks")
    run = run_job("trace", "--scratch", "env://SCRATCH_URL", "--from", "locks0002", env=env)
    assert run.code == 9, run.stdout
    statements = {line["statement"]: line for line in run.events("trace.statement")}
    concurrent = statements["CREATE INDEX CONCURRENTLY ix_payments_note ON payments (note)"]
    plain = statements["CREATE INDEX ix_payments_amount ON payments (amount)"]
    assert concurrent["outside_transaction"] is True and plain["outside_transaction"] is True
    assert concurrent["locks"] == [{"table": "payments", "mode": "ShareUpdateExclusiveLock"}]
    assert plain["locks"] == [{"table": "payments", "mode": "ShareLock"}]
    assert concurrent["scanned"] == plain["scanned"] == ["payments"]
    (finding,) = run.events("trace.finding")
    assert finding["rule"] == "scan-under-lock" and finding["mode"] == "ShareLock"
    assert "building index ix_payments_amount without CONCURRENTLY" in finding["message"]
    assert "until the statement ends" in finding["message"]


def test_an_exemption_with_a_reason_passes_and_one_without_is_a_finding(
    pg: PgServer, tmp_path: Path, job_env: dict[str, str]
) -> None:
    services = copy_locks(tmp_path, upto=2)
    body = '    op.alter_column("payments", "amount", type_=sa.BigInteger(), existing_type=sa.Integer())'
    reasoned = (
        "# migrate-job: trace-ignore table-rewrite -- payments holds a few rows in every\n# environment\n\n"
    )
    path = add_revision(services, "extra0002", "locks0002", body, header=reasoned)
    env = scratch_env(pg, job_env, tmp_path, services, "locks")
    run = run_job("trace", "--scratch", "env://SCRATCH_URL", env=env)
    assert run.code == 0, run.stdout
    (exempted,) = run.events("trace.exempted")
    assert exempted["rule"] == "table-rewrite" and exempted["tables"] == ["payments"]
    assert exempted["reason"] == "payments holds a few rows in every environment"
    path.write_text(
        path.read_text().replace(reasoned, "# migrate-job: trace-ignore table-rewrite\n\n"), encoding="utf-8"
    )
    run = run_job("trace", "--scratch", "env://SCRATCH_URL", "--fail-on", "error", env=env)
    assert run.code == 9
    assert {line["rule"] for line in run.events("trace.finding")} == {
        "table-rewrite",
        "trace-ignore-without-reason",
    }


def test_a_failing_revision_exits_7_and_drops_the_scratch_database(
    pg: PgServer, tmp_path: Path, job_env: dict[str, str]
) -> None:
    services = copy_locks(tmp_path, upto=2)
    add_revision(services, "extra0003", "locks0002", '    op.execute("ALTER TABLE nowhere ADD COLUMN x int")')
    run = run_job(
        "trace", "--scratch", "env://SCRATCH_URL", env=scratch_env(pg, job_env, tmp_path, services, "locks")
    )
    assert run.code == 7, run.stdout
    assert run.summary["databases"][0]["status"] == "failed"
    assert scratch_left(pg) == []


def test_sigterm_stops_the_trace_and_drops_the_scratch_database(
    pg: PgServer, tmp_path: Path, job_env: dict[str, str]
) -> None:
    services = copy_locks(tmp_path, upto=2)
    add_revision(services, "extra0004", "locks0002", '    op.execute("SELECT pg_sleep(60)")')
    env = scratch_env(pg, job_env, tmp_path, services, "locks")
    proc = start_job("trace", "--scratch", "env://SCRATCH_URL", env=env)
    try:
        deadline = time.monotonic() + 30
        while not pg.fetch(
            "SELECT pid FROM pg_stat_activity WHERE query LIKE '%pg_sleep(60)%' AND pid <> pg_backend_pid()"
        ):
            assert time.monotonic() < deadline, "the trace never reached the sleeping revision"
            time.sleep(0.1)
        assert scratch_left(pg) != []
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    record_output(stdout + stderr)
    assert proc.returncode == 143, stdout
    assert scratch_left(pg) == []


def test_plan_impact_weighs_the_pending_locks_on_a_database_with_rows(
    pg: PgServer, make_database: Callable[..., Database], tmp_path: Path, job_env: dict[str, str]
) -> None:
    """50,000 payments on the real database: reported within the accuracy of its statistics, read-only."""
    database = make_database("locks")
    manifest = write_manifest(tmp_path / "m.toml", [database.entry()])
    env = {
        **job_env,
        "MIGRATE_MANIFEST": str(manifest),
        "MIGRATE_SERVICES_DIR": str(LOCKS),
        "SCRATCH_URL": scratch_url(pg),
    }
    assert run_job("upgrade", "--to", "locks0002", env=env).code == 0
    pg.execute(
        "INSERT INTO accounts SELECT g, 'a' || g FROM generate_series(1, 100) g; "
        "INSERT INTO payments (id, account_id, amount) "
        "SELECT g, 1 + g % 100, g FROM generate_series(1, 50000) g; "
        "ANALYZE accounts; ANALYZE payments",
        database=database.name,
    )
    run = run_job("plan", "--impact", "--scratch", "env://SCRATCH_URL", env=env)
    assert run.code == 0, run.stdout
    assert database.version() == ["locks0002"]  # read-only: nothing applied
    impacts = run.events("db.impact")
    by = {(line["revision"], line["table"]): line for line in impacts}
    rewrite = by[("locks0003", "payments")]
    assert rewrite["database"] == database.name and rewrite["mode"] == "AccessExclusiveLock"
    assert rewrite["rewrite"] is True and rewrite["blocks"] == ["reads", "writes"]
    assert abs(rewrite["rows"] - 50_000) <= 2_500 and rewrite["bytes"] > 1_000_000
    assert (
        rewrite["estimate_ms"] >= 0
        and "rewrite rate" in rewrite["estimate"]
        and "seeded rows" in rewrite["estimate"]
    )
    assert by[("locks0005", "payments")]["scan"] is True
    assert by[("locks0010", "accounts")]["mode"] == "ShareRowExclusiveLock"
    # Only locks that block writes; the concurrent index and VALIDATE block none.
    assert all(lockmodes.blocks_writes(line["mode"]) for line in impacts)
    assert not {r for r, _ in by} & {"locks0006", "locks0012"}
    assert PASSWORD not in run.stdout + run.stderr
    assert scratch_left(pg, "impact") == []


def test_plan_impact_needs_scratch(tmp_path: Path, job_env: dict[str, str]) -> None:
    manifest = write_manifest(
        tmp_path / "m.toml",
        [{"service": "locks", "database": "x", "host": "127.0.0.1", "user": "u", "password": "p"}],
    )
    env = {**job_env, "MIGRATE_MANIFEST": str(manifest), "MIGRATE_SERVICES_DIR": str(LOCKS)}
    run = run_job("plan", "--impact", env=env)
    assert run.code == 2 and "--scratch" in run.events("run.error")[0]["message"]


def test_lint_help_points_to_trace(job_env: dict[str, str]) -> None:
    from job.cli import build_parser

    parser = build_parser()
    lint = parser._subparsers._group_actions[0].choices["lint"]  # type: ignore[union-attr]
    assert "trace" in lint.format_help() and "judge" in lint.format_help()


# --- The analysis, on readings written by hand ---------------------------------------------------


def reading(
    kind: str,
    xid: int,
    at: float,
    tables: dict[int, tuple[int, int]],
    locks: list[Any],
    in_tx: bool = True,
    statement: str | None = None,
) -> Reading:
    data = {
        "pid": 1,
        "at": at,
        "vxid": f"3/{xid}",
        "tables": {str(o): list(v) for o, v in tables.items()},
        "locks": locks,
    }
    return Reading(kind, statement, in_tx, data)


def observed(readings: list[Reading]) -> Observed:
    step = Step("r1", "test", (), "r1")
    return Observed(step, None, {10: "payments", 11: "accounts"}, 0.0, readings)


def test_a_scan_counts_under_the_lock_held_at_its_end_not_a_later_one() -> None:
    """VALIDATE (a scan, SHARE UPDATE EXCLUSIVE) then SET NOT NULL (no scan, ACCESS EXCLUSIVE)."""
    readings = [
        reading("baseline", 5, 0.0, {10: (1, 0), 11: (2, 0)}, []),
        reading(
            "probe",
            5,
            0.010,
            {10: (1, 1), 11: (2, 0)},
            [[10, "ShareUpdateExclusiveLock"]],
            statement="VALIDATE",
        ),
        reading(
            "probe",
            5,
            0.020,
            {10: (1, 1), 11: (2, 0)},
            [[10, "ShareUpdateExclusiveLock"], [10, "AccessExclusiveLock"]],
            statement="SET NOT NULL",
        ),
        reading("end", 5, 0.030, {10: (1, 1), 11: (2, 0)}, [[10, "AccessExclusiveLock"]]),
    ]
    trace = analyse("s", observed(readings), set())
    assert trace.locks == {"payments": "AccessExclusiveLock"}
    assert trace.scanned == [] and trace.rewritten == []
    assert trace.held_ms == {"payments": 20}  # from SET NOT NULL's start to the commit


def test_outside_the_transaction_the_sampled_locks_of_the_statement_count() -> None:
    """An autocommit statement: its scan, and the locks sampled between its two readings (by xid)."""
    readings = [
        reading("baseline", 5, 0.0, {10: (1, 0), 11: (2, 0)}, []),
        reading("before", 7, 0.010, {10: (1, 0), 11: (2, 0)}, [], in_tx=False),
        reading("after", 9, 0.020, {10: (1, 1), 11: (2, 0)}, [], in_tx=False, statement="CREATE INDEX"),
        reading("end", 10, 0.030, {10: (1, 1), 11: (2, 0)}, []),
    ]
    assert analyse("s", observed(readings), {(8, 10, "ShareLock")}).scanned == ["payments"]
    concurrent = analyse("s", observed(readings), {(8, 10, "ShareUpdateExclusiveLock")})
    assert concurrent.scanned == [] and concurrent.locks == {"payments": "ShareUpdateExclusiveLock"}
    # A sample of another transaction (the baseline's) is not the statement's.
    assert analyse("s", observed(readings), {(6, 10, "ShareLock")}).scanned == []


def test_a_rewrite_is_one_finding_and_names_its_cause() -> None:
    readings = [
        reading("baseline", 5, 0.0, {10: (1, 0), 11: (2, 0)}, []),
        reading("probe", 5, 0.01, {10: (3, 2), 11: (2, 0)}, [[10, "AccessExclusiveLock"]], statement="ALTER"),
        reading("end", 5, 0.02, {10: (3, 2), 11: (2, 0)}, [[10, "AccessExclusiveLock"]]),
    ]
    trace = analyse("s", observed(readings), set())
    trace.before = {
        "payments": {"columns": [["amount", "integer", True, False]], "constraints": [], "indexes": []}
    }
    trace.after = {
        "payments": {"columns": [["amount", "bigint", True, False]], "constraints": [], "indexes": []}
    }
    assert trace.rewritten == trace.scanned == ["payments"]
    (finding,) = judge(trace)
    assert finding.rule == "table-rewrite" and "changing amount from integer to bigint" in finding.message
    assert finding.lint is None and "reads and writes" in finding.message


def test_lock_modes_and_what_they_block() -> None:
    assert lockmodes.blocks("AccessShareLock") == []
    assert lockmodes.blocks("ShareUpdateExclusiveLock") == []
    assert lockmodes.blocks("ShareLock") == ["writes"]
    assert lockmodes.blocks("AccessExclusiveLock") == ["reads", "writes"]
    assert lockmodes.strongest(["ShareLock", "RowExclusiveLock"]) == "ShareLock"
    # Every mode from SHARE up blocks writes, only ACCESS EXCLUSIVE blocks reads.
    assert [lockmodes.blocks_writes(m) for m in lockmodes.MODES] == [False] * 4 + [True] * 4
    assert set(LINT_RULES) == {"table-rewrite", "scan-under-lock"}
    assert isinstance(RevisionTrace, type)


# --- The docs page (docs/locks.md) says what the code does ------------------------------------

DOCS = Path(__file__).resolve().parent.parent / "docs" / "locks.md"
SHIPPED = Path(__file__).resolve().parent.parent / "services"


def test_the_docs_lock_mode_table_is_the_one_the_code_uses() -> None:
    rows = [
        line.split("|")
        for line in DOCS.read_text().splitlines()
        if line.startswith("| `") and "Lock`" in line
    ]
    table = {r[1].strip(" `"): (r[3].strip(), r[4].strip()) for r in rows}
    assert list(table) == list(lockmodes.MODES)
    for mode, (reads, writes) in table.items():
        assert reads.startswith("yes") == ("reads" in lockmodes.blocks(mode)), mode
        assert writes.startswith("yes") == ("writes" in lockmodes.blocks(mode)), mode


def test_the_docs_show_the_trace_of_the_shipped_services(
    pg: PgServer, tmp_path: Path, job_env: dict[str, str]
) -> None:
    """The section is what the command produces (its headings one level down)."""
    manifest = write_manifest(
        tmp_path / "m.toml",
        [
            {
                "service": name,
                "database": name.replace("-", "_"),
                "host": "127.0.0.1",
                "user": "u",
                "password": "p",
            }
            for name in ("settlement", "risk-engine", "compliance")
        ],
    )
    env = {
        **job_env,
        "MIGRATE_MANIFEST": str(manifest),
        "MIGRATE_SERVICES_DIR": str(SHIPPED),
        "SCRATCH_URL": scratch_url(pg),
    }
    run = run_job("trace", "--scratch", "env://SCRATCH_URL", "--output", str(tmp_path / "out"), env=env)
    assert run.code == 0, run.stdout
    produced = (tmp_path / "out" / "trace.md").read_text()
    produced = produced[produced.index("\n## ") + 1 :]
    shifted = "\n".join("#" + line if line.startswith("##") else line for line in produced.splitlines())
    docs = DOCS.read_text()
    begin = docs.index("<!-- trace of the shipped services: begin -->\n") + len(
        "<!-- trace of the shipped services: begin -->\n"
    )
    end = docs.index("<!-- trace of the shipped services: end -->")
    assert docs[begin:end].strip() == shifted.strip()
