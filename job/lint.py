"""Lint: each revision's SQL, rendered offline as the job would run it, checked by squawk.

squawk (the ``squawk-cli`` wheel, a dev dependency) is absent from the runtime image: lint is a CI
and workstation command. Each revision is linted on its own, so a statement on a table that an
earlier revision created counts as a change to an existing table (CREATE INDEX without
CONCURRENTLY is flagged there, not on a table created in the same revision).

A revision may exempt itself from a rule with a comment that says why::

    # migrate-job: lint-ignore prefer-text-field -- the columns belong to tables created here
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from job.errors import ConfigError
from job.executor import Execution, render_sql

if TYPE_CHECKING:
    from job.db import Target
    from job.services import Service

Level = Literal["warning", "error"]
LEVELS: dict[str, int] = {"warning": 1, "error": 2}
# Rules the job satisfies itself on every connection, so a revision's SQL need not.
HANDLED_BY_JOB: dict[str, str] = {
    "require-lock-timeout": "the job sets lock_timeout on every connection (manifest lock_timeout_s)",
    "require-statement-timeout": "the job sets statement_timeout on every connection "
    "(manifest statement_timeout_s)",
}
EXPAND_CONTRACT = (
    "expand and contract over two releases: a new column kept in step by a trigger, job.ops.backfill, "
    "then drop the old one (docs/authoring.md: Zero-downtime recipes)"
)
# Rules whose risky statement a job.ops helper does safely: the finding's help names the helper.
HELPERS: dict[str, str] = {
    "require-concurrent-index-creation": "job.ops.create_index_concurrently(index_name, table_name, "
    "columns) builds it CONCURRENTLY outside the revision's transaction and rebuilds an INVALID "
    "index a killed build left",
    "ban-concurrent-index-creation-in-transaction": "job.ops.create_index_concurrently leaves the "
    "revision's transaction for the build",
    "require-concurrent-index-deletion": "job.ops.drop_index_concurrently(index_name)",
    "adding-not-nullable-field": "job.ops.add_not_null(table, column) then job.ops.validate_not_null("
    "table, column): CHECK NOT VALID, VALIDATE, SET NOT NULL without a scan, drop the check",
    "adding-required-field": "add the column nullable, fill it (job.ops.add_column_with_default for a "
    "default, or job.ops.backfill), then job.ops.add_not_null + job.ops.validate_not_null",
    "adding-foreign-key-constraint": "job.ops.add_foreign_key_not_valid(...) then "
    "job.ops.validate_constraint(table, name)",
    "constraint-missing-not-valid": "job.ops.add_foreign_key_not_valid + job.ops.validate_constraint for "
    "a foreign key, job.ops.add_not_null + job.ops.validate_not_null for NOT NULL; for another CHECK, "
    "op.create_check_constraint(..., postgresql_not_valid=True) then job.ops.validate_constraint in a "
    "later revision",
    "adding-field-with-default": "job.ops.add_column_with_default(table, column, default_sql): add it "
    "without default, set the default, backfill in batches, NOT NULL the safe way",
    "disallowed-unique-constraint": "job.ops.create_index_concurrently(..., unique=True), then "
    "ALTER TABLE ... ADD CONSTRAINT ... UNIQUE USING INDEX in a later revision",
    "changing-column-type": EXPAND_CONTRACT,
    "renaming-column": EXPAND_CONTRACT,
    "prefer-robust-stmts": "in a revision this statement runs outside the transaction that moves the "
    "version table (after an autocommit block or a job.ops helper that leaves the transaction): "
    "put the job.ops helpers first in the revision, or in a revision of their own",
}
NO_REASON = "lint-ignore-without-reason"
EXEMPTION = re.compile(r"#\s*migrate-job:\s*lint-ignore\b(?P<rest>.*)$")
RUNNING = re.compile(r"^-- Running upgrade .*-> (?P<revision>\S+)\s*$")


@dataclass(frozen=True)
class Exemption:
    """A revision file's ``# migrate-job: lint-ignore RULE[,RULE] -- reason`` line."""

    rules: tuple[str, ...]
    reason: str
    line: int  # 1-based, in the revision file
    text: str


@dataclass(frozen=True)
class Finding:
    """One rule broken by one statement of one revision."""

    service: str
    revision: str
    rule: str
    level: str
    message: str
    help: str | None
    statement: str
    path: str | None = None
    exempted: str | None = None  # the exemption's reason, when the revision exempts this rule

    @property
    def description(self) -> str:
        """Return a sentence naming the service, revision, rule and statement."""
        return (
            f"{self.service}: revision {self.revision} breaks {self.rule} in `{self.short}`: {self.message}"
        )

    @property
    def short(self) -> str:
        """Return the statement on one line, shortened."""
        flat = " ".join(self.statement.split())
        return flat if len(flat) <= 120 else flat[:117] + "..."

    def fields(self) -> dict[str, Any]:
        """Return the finding as log fields."""
        return {
            "service": self.service,
            "revision": self.revision,
            "rule": self.rule,
            # "level" and "message" are the log line's own (severity, sentence): named apart here.
            "lint_level": self.level,
            "problem": self.message,
            "help": self.help,
            "statement": " ".join(self.statement.split()),
            "path": self.path,
            "reason": self.exempted,
        }


@dataclass
class RevisionSQL:
    """The SQL one revision runs, and what linting it found."""

    service: str
    revision: str
    sql: str
    path: str | None
    version_table: str = "alembic_version"
    findings: list[Finding] = field(default_factory=list)


def find_squawk() -> str:
    """Return the squawk executable: the venv's own, else one on PATH; raise ConfigError if none."""
    beside = Path(sys.executable).parent / "squawk"
    if beside.is_file():
        return str(beside)
    found = shutil.which("squawk")
    if found is None:
        raise ConfigError(
            "lint needs squawk, which is not installed here (it is not in the runtime image)",
            hint="run lint from a checkout with the dev dependencies: make install (uv sync), "
            "then migrate-job lint",
        )
    return found


def render_revisions(service: Service, target: Target, start: str | None, to: str) -> list[RevisionSQL]:
    """Return the offline SQL of each revision from start (None: base) to ``to``, in order."""
    execution = Execution(service, target, to, apply=True, quiet=True, offline=True)
    text = render_sql(execution, () if start in (None, "base") else (str(start),))
    out = []
    for revision, sql in split_revisions(text):
        script = service.script.get_revision(revision)
        path = script.path if script else None
        out.append(RevisionSQL(service.name, revision, sql, path, execution.version_table))
    return out


def split_revisions(text: str) -> list[tuple[str, str]]:
    """Return (revision, SQL) per revision from Alembic's offline script.

    Alembic writes ``BEGIN;`` then ``-- Running upgrade A -> B`` for each revision; what comes
    before the first (the version table's creation) belongs to the first revision's transaction.
    """
    lines = text.splitlines()
    starts: list[tuple[int, str]] = []
    for number, line in enumerate(lines):
        match = RUNNING.match(line)
        if match is None:
            continue
        begin = number
        previous = [i for i in range(number) if lines[i].strip()]
        if starts and previous and lines[previous[-1]].strip() == "BEGIN;":
            begin = previous[-1]
        starts.append((0 if not starts else begin, match["revision"]))
    out = []
    for index, (begin, revision) in enumerate(starts):
        end = starts[index + 1][0] if index + 1 < len(starts) else len(lines)
        out.append((revision, "\n".join(lines[begin:end]) + "\n"))
    return out


def statements(sql: str) -> list[tuple[int, int, str]]:
    """Return (first line, last line, text) of each statement, lines counted from 0."""
    out = []
    start: int | None = None
    in_body = False  # inside a $$-quoted function body, whose lines end with ; too
    lines = sql.splitlines()
    for number, line in enumerate(lines):
        stripped = line.strip()
        if start is None:
            if not stripped or stripped.startswith("--"):
                continue
            start = number
        in_body ^= line.count("$$") % 2 == 1
        if stripped.endswith(";") and not in_body:
            out.append((start, number, "\n".join(lines[start : number + 1]).strip()))
            start = None
    return out


def exemptions(path: str | None, keyword: str = "lint-ignore") -> list[Exemption]:
    """Return the exemption comments of a revision file: lint-ignore (lint's), trace-ignore (trace's)."""
    if path is None:
        return []
    pattern = re.compile(EXEMPTION.pattern.replace("lint-ignore", re.escape(keyword)))
    found = []
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        match = pattern.search(line)
        if match is None:
            continue
        rules_part, _, reason = match["rest"].partition("--")
        rules = tuple(r for r in re.split(r"[\s,]+", rules_part.strip()) if r)
        # A long reason goes on in the comment lines right below it.
        for more in lines[number:]:
            text = more.strip()
            if not text.startswith("#") or pattern.search(text) or not text.lstrip("# "):
                break
            reason += " " + text.lstrip("# ")
        found.append(Exemption(rules, " ".join(reason.split()), number, line.strip()))
    return found


def run_squawk(squawk: str, chunks: list[RevisionSQL]) -> list[list[dict[str, Any]]]:
    """Return squawk's JSON violations for each chunk, in order (one squawk process for all)."""
    if not chunks:
        return []
    with tempfile.TemporaryDirectory(prefix="mj-lint-") as tmp:
        names = []
        for index, chunk in enumerate(chunks):
            name = f"{index:04d}.sql"
            (Path(tmp) / name).write_text(chunk.sql, encoding="utf-8")
            names.append(name)
        # The rules the job satisfies are excluded; the rest are squawk's defaults.
        command = [squawk, "--reporter=json", "--exclude=" + ",".join(HANDLED_BY_JOB), *names]
        proc = subprocess.run(command, cwd=tmp, capture_output=True, text=True, check=False)
    try:
        violations = json.loads(proc.stdout or "[]")
    except json.JSONDecodeError:
        first = (proc.stderr or proc.stdout).strip().splitlines()[:1]
        raise ConfigError(
            f"squawk gave no JSON report (exit {proc.returncode}): {first[0] if first else 'no output'}",
            hint="check that squawk-cli is 2.70 or newer (uv sync installs the locked version)",
        ) from None
    by_file: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for violation in violations:
        by_file.setdefault(Path(str(violation.get("file", ""))).name, []).append(violation)
    return [by_file[name] for name in names]


def judge(chunk: RevisionSQL, violations: list[dict[str, Any]]) -> list[Finding]:
    """Return the chunk's findings: squawk's, less the version table's, exempted where the file says so."""
    spans = statements(chunk.sql)
    version_table = re.compile(rf"\b{re.escape(chunk.version_table)}\b")
    ignores = exemptions(chunk.path)
    reasons = {rule: e.reason for e in ignores if e.reason for rule in e.rules}
    findings = [
        Finding(
            chunk.service,
            chunk.revision,
            NO_REASON,
            "error",
            f"the exemption on line {e.line} of the revision file gives no reason: {e.text}",
            "say why the rule does not apply: # migrate-job: lint-ignore RULE -- reason",
            e.text,
            chunk.path,
        )
        for e in ignores
        if not e.reason or not e.rules
    ]
    lines = chunk.sql.splitlines()
    for violation in violations:
        line = int(violation.get("line", 0))
        statement = next(
            (text for first, last, text in spans if first <= line <= last),
            lines[line] if 0 <= line < len(lines) else "",
        )
        # Alembic's own bookkeeping (the version table) is not the revision author's to change.
        if version_table.search(statement):
            continue
        rule = str(violation.get("rule_name") or "unknown")
        findings.append(
            Finding(
                chunk.service,
                chunk.revision,
                rule,
                str(violation.get("level") or "warning").lower(),
                str(violation.get("message") or ""),
                finding_help(rule, violation.get("help")),
                statement,
                chunk.path,
                reasons.get(rule),
            )
        )
    chunk.findings = findings
    return findings


def finding_help(rule: str, squawk_help: str | None) -> str | None:
    """Return squawk's help, followed by the job.ops helper that does the change safely, if one does."""
    helper = HELPERS.get(rule)
    if helper is None:
        return squawk_help
    return f"{squawk_help} With migrate-job: {helper}." if squawk_help else f"With migrate-job: {helper}."


def lint_service(
    service: Service, target: Target, *, start: str | None = None, to: str = "head", squawk: str | None = None
) -> list[RevisionSQL]:
    """Return each revision of the service from start to ``to``, with its findings."""
    chunks = render_revisions(service, target, start, to)
    for chunk, violations in zip(chunks, run_squawk(squawk or find_squawk(), chunks), strict=True):
        judge(chunk, violations)
    return chunks


def failing(findings: list[Finding], fail_on: str) -> list[Finding]:
    """Return the findings that are not exempted and at or above the fail_on level."""
    threshold = LEVELS[fail_on]
    return [f for f in findings if f.exempted is None and LEVELS.get(f.level, 2) >= threshold]
