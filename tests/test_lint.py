"""lint: each revision's offline SQL through squawk, with reasoned exemptions in the revision file."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
from sqlalchemy.engine import URL

from job import db
from job.errors import ConfigError
from job.lint import (
    HELPERS,
    Finding,
    exemptions,
    failing,
    find_squawk,
    finding_help,
    lint_service,
    split_revisions,
    statements,
)
from job.manifest import DatabaseEntry
from job.services import discover
from tests.support import FIXTURES, HEADS, SERVICES_DIR, run_job, write_manifest

INDEX_REVISION = '''"""index escrows by chain

Revision ID: 1dx000000001
Revises: 9da4646821fb
Create Date: 2025-11-01 00:00:00
"""

from __future__ import annotations

from alembic import op

revision = "1dx000000001"
down_revision = "9da4646821fb"
branch_labels = None
depends_on = None
{exemption}

def upgrade() -> None:
    """Index escrows.chain_id (escrows exists already: this blocks its writes while it builds)."""
    op.create_index("ix_escrows_chain_id", "escrows", ["chain_id"])


def downgrade() -> None:
    """Drop the index."""
    op.drop_index("ix_escrows_chain_id", table_name="escrows")
'''


def offline_target(service: str) -> db.Target:
    """Return a target that is never connected to: lint renders SQL offline."""
    return db.Target(
        DatabaseEntry(service=service, database="lint", url="offline"), URL.create(db.DRIVER, database="lint")
    )


def test_create_index_without_concurrently_on_an_existing_table_is_flagged(
    tmp_path: Path, job_env: dict[str, str]
) -> None:
    """A plain CREATE INDEX on escrows (made by an earlier revision) fails lint with exit 9."""
    services = tmp_path / "services"
    shutil.copytree(SERVICES_DIR / "risk-engine", services / "risk-engine")
    revision = services / "risk-engine" / "migrations" / "versions" / "20251101_0000_1dx000000001_index.py"
    revision.write_text(INDEX_REVISION.format(exemption=""), encoding="utf-8")
    manifest = write_manifest(
        tmp_path / "m.toml",
        [{"service": "risk-engine", "database": "risk", "host": "127.0.0.1", "user": "u", "password": "p"}],
    )
    env = {**job_env, "MIGRATE_MANIFEST": str(manifest), "MIGRATE_SERVICES_DIR": str(services)}

    run = run_job("lint", env=env)
    assert run.code == 9, run.stdout
    findings = run.events("lint.finding")
    assert [(f["revision"], f["rule"]) for f in findings] == [
        ("1dx000000001", "require-concurrent-index-creation")
    ]
    finding = findings[0]
    assert finding["statement"] == "CREATE INDEX ix_escrows_chain_id ON escrows (chain_id);"
    assert finding["lint_level"] == "warning" and "concurrently" in finding["help"].lower()
    assert "job.ops.create_index_concurrently" in finding["help"], "the helper that does it safely"
    error = run.events("run.error")[0]
    assert error["error"] == "lint" and error["revision"] == "1dx000000001" and "lint-ignore" in error["hint"]
    # The earlier revision created its tables and indexes together: nothing to flag there.
    assert {e["revision"]: e["findings"] for e in run.events("lint.revision")} == {
        HEADS["risk-engine"]: 0,
        "1dx000000001": 1,
    }
    assert run_job("lint", "--fail-on", "error", env=env).code == 0, "squawk rates it a warning"
    assert run_job("lint", "--from", HEADS["risk-engine"], env=env).code == 9

    unexplained = "# migrate-job: lint-ignore require-concurrent-index-creation\n"
    revision.write_text(INDEX_REVISION.format(exemption=unexplained), encoding="utf-8")
    bare = run_job("lint", env=env)
    assert bare.code == 9, bare.stdout
    # An exemption without a reason is a finding itself, and exempts nothing.
    assert sorted(f["rule"] for f in bare.events("lint.finding")) == [
        "lint-ignore-without-reason",
        "require-concurrent-index-creation",
    ]

    explained = (
        "# migrate-job: lint-ignore require-concurrent-index-creation -- escrows holds a few hundred\n"
        "# rows in every environment; the index builds in milliseconds.\n"
    )
    revision.write_text(INDEX_REVISION.format(exemption=explained), encoding="utf-8")
    exempt = run_job("lint", env=env)
    assert exempt.code == 0, exempt.stdout
    (waived,) = [e for e in exempt.events("lint.exempted") if e["revision"] == "1dx000000001"]
    assert waived["rule"] == "require-concurrent-index-creation" and waived["count"] == 1
    assert waived["reason"] == (
        "escrows holds a few hundred rows in every environment; the index builds in milliseconds."
    )


def test_each_revision_is_linted_alone_and_alembic_bookkeeping_is_not_linted() -> None:
    """The offline script splits per revision (autocommit blocks included); version-table SQL is skipped."""
    service = discover(FIXTURES / "services")["indexing"]
    chunks = lint_service(service, offline_target("indexing"))
    assert [c.revision for c in chunks] == ["dddd00000001", "dddd00000002", "dddd00000003"]
    assert "CREATE TABLE alembic_version" in chunks[0].sql
    assert chunks[1].sql.startswith("BEGIN;") and "CREATE INDEX CONCURRENTLY" in chunks[1].sql
    flagged = {f.rule for c in chunks for f in c.findings}
    assert "require-concurrent-index-creation" not in flagged, "CONCURRENTLY in an autocommit block"
    assert not [f for c in chunks for f in c.findings if "alembic_version" in f.statement]
    assert not flagged & {"require-lock-timeout", "require-statement-timeout"}, "the job sets both"


def test_split_keeps_each_revision_in_its_own_transaction() -> None:
    """A revision's chunk starts with the BEGIN that opens its transaction."""
    text = "BEGIN;\n\nCREATE TABLE v (x int);\n\n-- Running upgrade  -> a1\n\nSELECT 1;\n\nCOMMIT;\n\n"
    text += "BEGIN;\n\n-- Running upgrade a1 -> b2\n\nSELECT 2;\n\nCOMMIT;\n"
    (first, a), (second, b) = split_revisions(text)
    assert (first, second) == ("a1", "b2")
    assert a.startswith("BEGIN;\n\nCREATE TABLE v") and a.rstrip().endswith("COMMIT;")
    assert b.startswith("BEGIN;\n\n-- Running upgrade a1 -> b2") and "SELECT 1" not in b


def test_statements_are_found_by_line_even_with_function_bodies() -> None:
    """A finding's line leads to its whole statement; a $$ body's semicolons do not end it."""
    sql = "BEGIN;\n\nCREATE FUNCTION f() RETURNS int AS $$\nBEGIN\n  RETURN 1;\nEND;\n$$ LANGUAGE plpgsql;\n"
    assert [(first, last) for first, last, _ in statements(sql)] == [(0, 0), (2, 6)]


def test_exemptions_need_a_rule_and_a_reason(tmp_path: Path) -> None:
    """Rules may be listed with commas; the reason may go on in the comment lines below."""
    path = tmp_path / "rev.py"
    path.write_text(
        "x = 1\n"
        "# migrate-job: lint-ignore prefer-text-field, prefer-bigint-over-int -- new table;\n"
        "#   sizes are bounded by the protocol\n"
        "\n"
        "# migrate-job: lint-ignore ban-drop-column\n",
        encoding="utf-8",
    )
    good, bare = exemptions(str(path))
    assert good.rules == ("prefer-text-field", "prefer-bigint-over-int") and good.line == 2
    assert good.reason == "new table; sizes are bounded by the protocol"
    assert bare.rules == ("ban-drop-column",) and bare.reason == ""


def test_a_finding_that_a_helper_fixes_names_the_helper() -> None:
    """squawk says what is unsafe; the help adds which job.ops helper makes the same change safely."""
    assert finding_help("adding-not-nullable-field", "Make the field nullable.") == (
        "Make the field nullable. With migrate-job: job.ops.add_not_null(table, column) then "
        "job.ops.validate_not_null(table, column): CHECK NOT VALID, VALIDATE, SET NOT NULL without a scan, "
        "drop the check."
    )
    assert finding_help("renaming-column", None) is not None
    assert finding_help("prefer-text-field", "Use text.") == "Use text.", "no helper: squawk's help alone"
    assert all("job.ops" in hint for hint in HELPERS.values())
    for rule in (
        "adding-foreign-key-constraint",
        "adding-field-with-default",
        "constraint-missing-not-valid",
    ):
        assert rule in HELPERS, rule


def test_fail_on_level_and_exemptions_decide_what_fails() -> None:
    """Exempted findings never fail; --fail-on error lets warnings through."""

    def finding(level: str, exempted: str | None = None) -> Finding:
        return Finding("s", "r", "rule", level, "m", None, "SELECT 1;", exempted=exempted)

    found = [finding("warning"), finding("error"), finding("error", exempted="why")]
    assert failing(found, "warning") == found[:2]
    assert failing(found, "error") == [found[1]]


def test_without_squawk_lint_says_how_to_get_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """squawk is a dev dependency, absent from the runtime image: a clear configuration error."""
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ConfigError) as caught:
        find_squawk()
    assert "runtime image" in caught.value.message and "make install" in str(caught.value.hint)


def test_the_shipped_services_exempt_only_with_reasons() -> None:
    """Every lint-ignore in the shipped revisions names rules and says why."""
    for service in discover(SERVICES_DIR).values():
        for script in service.script.walk_revisions():
            for exemption in exemptions(script.path):
                assert exemption.rules and len(exemption.reason) > 20, (service.name, exemption)
