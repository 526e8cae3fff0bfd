"""Tests for job/report.py: the run.summary line, whole up to 200 databases, compact past that.

Cloud Logging drops an entry over 256 KB, and the summary is the line operators read first. These
build reports the way a run fills them in and write the line through the job's own JSON handler,
so what is measured is the whole line as the job prints it.
"""

from __future__ import annotations

import io
import json
from typing import Any

from job import logs
from job.report import FULL_SUMMARY_LIMIT, DatabaseResult, RunReport
from tests.test_logs import restore_logging  # noqa: F401 (autouse: logging is put back after each test)

# Cloud Logging's limit for one entry.
ENTRY_BYTES = 256 * 1024
INSTANCE = "fusion-prime-prod:us-central1:fp-tenants-db"
# A 30-revision history, with ids as Alembic makes them (12 hex digits).
HISTORY = [f"{0xA1B2C3D4E5F6 + 7919 * i:012x}" for i in range(30)]
CLOUD_RUN = {
    "job": "migrate-job-prod",
    "execution": "migrate-job-prod-x7k2p",
    "task_index": "0",
    "task_attempt": "0",
}


def tenant(i: int, **fields: Any) -> DatabaseResult:
    """Return the result of tenant database i of the settlement service."""
    return DatabaseResult("settlement", f"tenant_{i:04d}", INSTANCE, **fields)


def applied_from_empty(i: int) -> DatabaseResult:
    """Return a tenant upgraded through the whole history."""
    return tenant(i, status="applied", to_revision=HISTORY[-1], applied=list(HISTORY), duration_ms=1800 + i)


def failed_midway(i: int) -> DatabaseResult:
    """Return a tenant whose 15th revision failed: 14 applied, 16 pending, a real-sized error."""
    error = (
        f"migration {HISTORY[14]} (backfill settlement_commands.amount_cents) failed on database "
        f"tenant_{i:04d} of service settlement: NotNullViolationError: null value in column "
        '"amount_cents" of relation "settlement_commands" violates not-null constraint; its '
        "transaction rolled back"
    )
    return tenant(
        i,
        status="failed",
        to_revision=HISTORY[13],
        applied=HISTORY[:14],
        pending=HISTORY[14:],
        duration_ms=950,
        error=error,
    )


def summary_line(report: RunReport, exit_code: int) -> tuple[int, dict[str, Any]]:
    """Write the report's run.summary as the job does; return the line's size in bytes and the line."""
    stream = io.StringIO()
    logs.setup("json", stream=stream, labels=CLOUD_RUN)
    logs.bind(command=report.command, **CLOUD_RUN)
    report.log_summary(exit_code)
    (line,) = stream.getvalue().splitlines()
    return len(line.encode()), json.loads(line)


def report_of(results: list[DatabaseResult]) -> RunReport:
    """Return an upgrade's report holding these results."""
    report = RunReport("upgrade")
    for result in results:
        report.add(result)
    return report


def test_up_to_200_databases_each_is_listed_in_full() -> None:
    results = [applied_from_empty(i) for i in range(FULL_SUMMARY_LIMIT)]
    size, line = summary_line(report_of(results), 0)
    assert line["databases"] == [r.as_dict() for r in results]
    assert "groups" not in line and "omitted" not in line
    assert size < ENTRY_BYTES


def test_1000_databases_upgraded_through_30_revisions_are_one_group_within_an_entry() -> None:
    results = [applied_from_empty(i) for i in range(1000)]
    size, line = summary_line(report_of(results), 0)
    assert size < ENTRY_BYTES
    assert line["counts"] == {"applied": 1000} and line["databases"] == []
    (group,) = line["groups"]
    assert group == {
        "service": "settlement",
        "instance": INSTANCE,
        "status": "applied",
        "from_revision": None,
        "to_revision": HISTORY[-1],
        "applied": HISTORY,
        "count": 1000,
        "total_duration_ms": sum(r.duration_ms for r in results),
        "max_duration_ms": 2799,
        "databases": [r.database for r in results],
    }
    assert "omitted" not in line


def at(i: int, status: str, revision: str) -> DatabaseResult:
    """Return a tenant that stayed at revision."""
    return tenant(i, status=status, from_revision=revision, to_revision=revision)


def test_databases_that_went_differently_are_grouped_apart_and_problems_listed_whole() -> None:
    two_behind = {"from_revision": HISTORY[-3], "to_revision": HISTORY[-1], "applied": HISTORY[-2:]}
    ahead = "at ffffffffffff, which this image does not know"
    results = [
        *(at(i, "current", HISTORY[-1]) for i in range(300)),
        *(applied_from_empty(i) for i in range(300, 500)),
        # The same head, reached from another revision: another group.
        *(tenant(i, status="applied", **two_behind) for i in range(500, 700)),
        tenant(700, status="ahead", from_revision="ffffffffffff", error=ahead),
        failed_midway(701),
        at(702, "interrupted", HISTORY[3]),
        *(at(i, "skipped", HISTORY[3]) for i in range(703, 1000)),
    ]
    size, line = summary_line(report_of(results), 7)
    assert size < ENTRY_BYTES
    assert [d["database"] for d in line["databases"]] == ["tenant_0700", "tenant_0701", "tenant_0702"]
    assert line["databases"][1] == results[701].as_dict()
    groups = [(g["status"], g["from_revision"], g["count"]) for g in line["groups"]]
    assert groups == [
        ("current", HISTORY[-1], 300),
        ("applied", None, 200),
        ("applied", HISTORY[-3], 200),
        ("skipped", HISTORY[3], 297),
    ]
    listed = [n for g in line["groups"] for n in g["databases"]] + [d["database"] for d in line["databases"]]
    assert sorted(listed) == sorted(r.database for r in results)
    assert line["counts"] == {
        "current": 300,
        "applied": 400,
        "ahead": 1,
        "failed": 1,
        "interrupted": 1,
        "skipped": 297,
    }


def test_many_failures_fill_the_entry_in_manifest_order_and_the_rest_are_counted() -> None:
    # on_failure = "continue" and a revision that fails on most tenants: 800 errors do not fit.
    results = [failed_midway(i) if i % 5 else applied_from_empty(i) for i in range(1000)]
    size, line = summary_line(report_of(results), 7)
    assert size < ENTRY_BYTES
    failed = [r for r in results if r.status == "failed"]
    listed = line["databases"]
    assert 100 < len(listed) < len(failed)
    assert listed == [r.as_dict() for r in failed[: len(listed)]], "the first failures, each with its error"
    (group,) = line["groups"]
    assert group["status"] == "applied" and group["count"] == 200
    assert line["omitted"] == 1000 - len(listed) - len(group["databases"])
    assert f"{line['omitted']} database(s) left out" in line["message"]
    assert "db.done" in line["message"]


def test_200_databases_too_big_for_an_entry_are_made_compact() -> None:
    results = [failed_midway(i) for i in range(FULL_SUMMARY_LIMIT)]
    for result in results:
        result.error = (result.error or "") + " " + "x" * 1000
    size, line = summary_line(report_of(results), 7)
    assert size < ENTRY_BYTES
    assert line["omitted"] > 0 and line["groups"] == []


def test_the_text_format_shows_each_group_on_a_row() -> None:
    stream = io.StringIO()
    logs.setup("text", stream=stream)
    report_of([applied_from_empty(i) for i in range(500)]).log_summary(0)
    rows = stream.getvalue().splitlines()
    assert len(rows) == 2 and "[500 databases]" in rows[1] and "applied" in rows[1]
