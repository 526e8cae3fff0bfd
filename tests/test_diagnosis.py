"""A failed revision's error names its statement, the revision file's line, and what PostgreSQL said.

One fixture service (tests/fixtures/failing/failures) holds a setup revision and one failing
revision per case; database k is stamped just below case k, so that one run of the job (going
on past failures) fails every case, each on its own database. The same databases then go
through ``--jobs 2``, ``history --applied``, the text format and offline ``sql``: six job
processes in all, in one test so that they share the databases.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from job import diagnosis
from tests.conftest import Database
from tests.support import FIXTURES, PASSWORD, PROJECT, JobRun, run_job, spellings, write_manifest

SERVICES = FIXTURES / "failing"
VERSIONS = SERVICES / "failures" / "migrations" / "versions"
SETUP = "ffff00000000"
# Per failing revision: what its error must say (statement: its start; the rest: exact values).
CASES: dict[str, dict[str, Any]] = {
    "ffff00000001": {
        "statement": "CREATE UNIQUE INDEX accounts_code_key ON accounts (code)",
        "sqlstate": "23505",
        "detail": "Key (code)=(x) is duplicated.",
        "constraint": "accounts_code_key",
    },
    "ffff00000002": {
        "statement": "ALTER TABLE people ALTER COLUMN email SET NOT NULL",
        "sqlstate": "23502",
        "table": "people",
        "column": "email",
    },
    "ffff00000003": {
        "statement": "ALTER TABLE orders ADD CONSTRAINT orders_amount_positive CHECK (amount > 0)",
        "sqlstate": "23514",
        "constraint": "orders_amount_positive",
    },
    "ffff00000004": {
        "statement": "ALTER TABLE lines ADD CONSTRAINT lines_order_id_fkey FOREIGN KEY(order_id)",
        "sqlstate": "23503",
        "detail": 'Key (order_id)=(99) is not present in table "orders".',
        "constraint": "lines_order_id_fkey",
    },
    "ffff00000005": {
        "statement": "ALTER TABLE accounts ADD COLUMN flag boolean DEFALT false",
        "sqlstate": "42601",
        "position": len("ALTER TABLE accounts ADD COLUMN flag boolean ") + 1,
    },
    "ffff00000006": {"statement": "ALTER TABLE invoices ADD COLUMN paid BOOLEAN", "sqlstate": "42P01"},
    "ffff00000007": {
        "statement": "INSERT INTO accounts (id, code) VALUES (2, 'built')",
        "sqlstate": "23505",
        "detail": "Key (id)=(2) already exists.",
        "constraint": "accounts_pkey",
    },
    "ffff00000008": {
        "statement": "CREATE UNIQUE INDEX CONCURRENTLY accounts_code_cc ON accounts (code)",
        "sqlstate": "23505",
        "detail": "Key (code)=(x) is duplicated.",
    },
    "ffff00000009": {
        "statement": "ALTER TABLE people VALIDATE CONSTRAINT ck_people_email_not_null",
        "sqlstate": "23514",
        "table": "people",
    },
}


def where(revision: str) -> tuple[str, int]:
    """Return the revision's file (relative to the service) and the line marked ``# fails``."""
    (path,) = VERSIONS.glob(f"*_{revision}_*.py")
    lines = path.read_text(encoding="utf-8").splitlines()
    line = next(n for n, text in enumerate(lines, 1) if text.rstrip().endswith("# fails"))
    return str(path.relative_to(SERVICES / "failures")), line


def environment(
    job_env: dict[str, str], tmp_path: Path, databases: list[Database], **entry: Any
) -> dict[str, str]:
    """Return the job's environment: every database in the manifest, going on past failures."""
    entries = [{**d.entry(), "on_failure": "continue", **entry} for d in databases]
    manifest = write_manifest(tmp_path / f"env{len(entry)}.toml", entries, project=PROJECT)
    return {**job_env, "MIGRATE_MANIFEST": str(manifest), "MIGRATE_SERVICES_DIR": str(SERVICES)}


def check_failures(run: JobRun, databases: list[Database]) -> dict[str, dict[str, Any]]:
    """Assert each database's failure line names its case's statement, line and server fields."""
    assert run.code == 7, run.stdout[-3000:]
    assert not any(form in run.stdout + run.stderr for form in spellings(PASSWORD))
    failed = {line["database"]: line for line in run.events("db.failed")}
    for revision, database in zip(CASES, databases, strict=True):
        line, expected = failed[database.name], CASES[revision]
        assert line["revision"] == revision, line
        assert line["statement"].startswith(expected["statement"]), (revision, line["statement"])
        assert (line["revision_file"], line["line"]) == where(revision), (revision, line)
        for key in ("sqlstate", "detail", "constraint", "table", "column", "position"):
            if key in expected:
                assert line.get(key) == expected[key], (revision, key, line)
        assert "detail" not in expected or expected["detail"].rstrip(".") in line["message"]
        assert expected["statement"].split("(")[0] in line["message"], (revision, line["message"])
        # The revision's own frames: its file and line, nothing of the job, no 200-line trace.
        trace = line["stack_trace"]
        assert f"line {line['line']}, in " in trace and "# fails" in trace, trace
        assert not re.search(r'File "[^"]*/job/', trace) and trace.count("\n") < 12, trace
    (error,) = run.events("run.error")
    first = failed[databases[0].name]
    assert {k: error[k] for k in ("statement", "revision_file", "line", "detail", "constraint")} == {
        k: first[k] for k in ("statement", "revision_file", "line", "detail", "constraint")
    }
    assert error["stack_trace"] == first["stack_trace"]
    return failed


def test_each_failing_revision_names_its_statement_line_and_server_fields(
    make_database: Callable[..., Database], job_env: dict[str, str], tmp_path: Path
) -> None:
    """Every case, sequential then --jobs 2; history --applied lists each failed attempt; text format."""
    databases = [make_database("failures") for _ in CASES]
    env = environment(job_env, tmp_path, databases)
    setup = run_job("upgrade", "--to", SETUP, env=env)
    assert setup.code == 0, setup.stdout[-2000:]
    for k, database in enumerate(databases[1:], 1):
        database.pg.execute(f"UPDATE alembic_version SET version_num = 'ffff{k:08d}'", database=database.name)

    sequential = check_failures(run_job(env=env), databases)
    parallel = check_failures(run_job("upgrade", "--jobs", "2", env=env), databases)
    for name, line in sequential.items():
        assert {k: v for k, v in parallel[name].items() if k in diagnosis.SERVER_FIELDS} == {
            k: v for k, v in line.items() if k in diagnosis.SERVER_FIELDS
        }

    history = run_job("history", "--applied", env=env)
    assert history.code == 0, history.stdout[-2000:]
    for revision, database in zip(CASES, databases, strict=True):
        rows = [r for r in history.events("db.history") if r["database"] == database.name]
        failed = [r for r in rows if r["direction"] == "failed"]
        assert [r["revision"] for r in failed] == [revision, revision], rows
        assert {r["sqlstate"] for r in failed} == {CASES[revision]["sqlstate"]}
        assert failed[0]["statement"].startswith(CASES[revision]["statement"][:40])
        assert (
            f"failed {revision}" in failed[0]["message"]
            and CASES[revision]["sqlstate"] in failed[0]["message"]
        )
        assert "edited" not in failed[0]

    check_text_format_without_detail(job_env, tmp_path, databases[0])
    # Offline, a revision that reads fails where it reads: its file and line are named too.
    offline = run_job("sql", "--from", "ffff00000006", "--to", "ffff00000007", env=env)
    (error,) = offline.events("run.error")
    file, _ = where("ffff00000007")
    source = (SERVICES / "failures" / file).read_text(encoding="utf-8").splitlines()
    assert error["revision_file"] == file and "op.get_bind()" in source[error["line"] - 1], error


def check_text_format_without_detail(job_env: dict[str, str], tmp_path: Path, database: Database) -> None:
    """On a terminal: statement, line and server fields in a few lines, no traceback, no row value."""
    env = environment(job_env, tmp_path, [database], log_detail=False)
    run = run_job(env={**env, "MIGRATE_LOG_FORMAT": "text"})
    assert run.code == 7
    block = run.stdout[run.stdout.index("run.error") :]
    file, line = where("ffff00000001")
    assert "statement  CREATE UNIQUE INDEX accounts_code_key ON accounts (code)" in block
    assert f"at         {file} line {line}" in block
    assert "SQLSTATE 23505, constraint accounts_code_key" in block
    assert "Traceback" not in run.stdout and "Key (code)" not in run.stdout, run.stdout
    assert len(block.splitlines()) < 10, block


def test_a_position_names_the_statement_it_falls_in() -> None:
    """The server counts from the start of the whole batch; a position in a separator is the end."""
    parts = ["SAVEPOINT x", "CREATE TABLE a (id int)", "ALTER TABLE a ADD b DEFALT"]

    class Server:
        def __init__(self, position: int) -> None:
            self.position = str(position)

    query = diagnosis.JOINER.join(parts)
    at = query.index("DEFALT") + 1
    assert diagnosis._by_position(Server(at), parts) == (2, parts[2].index("DEFALT") + 1)
    assert diagnosis._by_position(Server(query.index("a (id") + 1), parts) == (1, len("CREATE TABLE ") + 1)
    after = len(parts[0]) + 2  # on the separator's semicolon: the end of the statement before it
    assert diagnosis._by_position(Server(after), parts) == (0, len(parts[0]) + 1)


def test_log_detail_false_keeps_a_data_errors_quoted_value_out() -> None:
    """A data error's message quotes the value; without detail, only the error's name is shown."""
    import asyncpg

    fields = {"S": "ERROR", "C": "22P02", "M": 'invalid input syntax for type integer: "abc"', "D": "row abc"}
    error = asyncpg.PostgresError.new(fields)
    hidden = diagnosis.report(error, None, SERVICES, log_detail=False)
    assert "abc" not in f"{hidden.reason} {hidden.sentence} {hidden.fields}"
    assert hidden.reason.endswith("InvalidTextRepresentationError")
    shown = diagnosis.report(error, None, SERVICES, log_detail=True)
    assert '"abc"' in shown.reason and shown.fields == {"detail": "row abc"}


def test_a_bug_of_the_job_keeps_its_whole_stack_trace() -> None:
    """An exception the job's own code raised is not the revision's: no trimmed trace replaces it."""
    from job import parser

    try:
        parser._positive("x")
    except Exception as exc:
        assert diagnosis.report(exc, None, SERVICES / "failures", log_detail=True).stack_trace is None
    else:
        raise AssertionError("_positive accepted x")
