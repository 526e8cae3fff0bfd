"""The two rules of ``trace``, judged on what PostgreSQL did while each revision ran (job.trace).

* ``table-rewrite`` (error): a table that existed before the revision was rewritten (a new
  ``relfilenode``): every row copied, every index rebuilt, under ACCESS EXCLUSIVE.
* ``scan-under-lock`` (error): such a table was read in full while the revision held a lock on it
  that blocks writes (SET NOT NULL's check, a validating ADD CONSTRAINT, a plain CREATE INDEX).
  A rewrite reads the table too; that scan is part of the ``table-rewrite`` finding.

A revision may exempt itself from a rule, as for ``lint``, with a comment that says why::

    # migrate-job: trace-ignore table-rewrite -- audit_log holds a few rows in every environment

Each finding says whether ``lint`` (squawk, reading the SQL text) saw the same problem.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import pairwise
from typing import TYPE_CHECKING, Any

from job import lockmodes

if TYPE_CHECKING:
    from job.lint import RevisionSQL
    from job.trace import Observed


@dataclass
class StatementTrace:
    """What one statement (or the work between two readings) did to tables that existed before."""

    statement: str | None
    outside: bool  # ran outside the revision's transaction (autocommit)
    locks: dict[str, str]  # table -> strongest mode held at its end (or sampled while it ran)
    scanned: list[str]  # read in full (under any lock)
    rewritten: list[str]
    duration_ms: int


@dataclass
class RevisionTrace:
    """What one revision did to the tables that existed before it."""

    service: str
    revision: str
    message: str
    path: str | None
    locks: dict[str, str]  # table -> strongest mode
    rewritten: list[str]
    scanned: list[str]  # read in full while a lock that blocks writes was held on it
    held_ms: dict[str, int]  # table -> how long its write-blocking lock was held, here
    statements: list[StatementTrace]
    duration_ms: int
    before: dict[str, Any]  # table -> detail (columns, constraints, indexes), at the baseline
    after: dict[str, Any]

    def lock_list(self) -> list[dict[str, Any]]:
        """Return the locks as log fields: table, mode, what it blocks."""
        return [{"table": t, "mode": m, "blocks": lockmodes.blocks(m)} for t, m in sorted(self.locks.items())]


# --- Analysis: from readings to what each statement and the revision did ----------------------


def analyse(service: str, observed: Observed, samples: set[tuple[int, int, str]]) -> RevisionTrace:
    """Return what the revision did, from its readings and the sampler's samples."""
    names = observed.tables
    readings = [r for r in observed.readings if r.data is not None]
    ends: dict[int, float] = {}
    for reading in readings:
        if reading.in_tx:
            ends[reading.xid] = max(ends.get(reading.xid, 0.0), reading.at)
    locks: dict[str, str] = {}
    rewritten: list[str] = []
    scanned: list[str] = []
    held: dict[str, int] = {}
    statements = []
    for prev, cur in pairwise(readings):
        modes: dict[int, set[str]] = {}
        if cur.in_tx:
            for oid, mode in cur.data["locks"] if cur.data else []:
                modes.setdefault(int(oid), set()).add(str(mode))
        for xid, oid, mode in samples:
            if oid in names and (prev.xid < xid < cur.xid or (cur.in_tx and xid == cur.xid)):
                modes.setdefault(oid, set()).add(mode)
        strongest = {names[o]: m for o, ms in modes.items() if o in names and (m := lockmodes.strongest(ms))}
        scans, rewrites = [], []
        for oid, name in names.items():
            before, after = prev.table(oid), cur.table(oid)
            if before is None or after is None:
                continue
            if after[0] != before[0]:
                rewrites.append(name)
            if after[1] > before[1]:
                scans.append(name)
        for table, mode in strongest.items():
            locks[table] = lockmodes.strongest([mode, locks.get(table, mode)]) or mode
            if lockmodes.blocks_writes(mode):
                until = ends.get(cur.xid, cur.at) if cur.in_tx else cur.at
                held[table] = max(held.get(table, 0), round((until - prev.at) * 1000))
        rewritten += [t for t in rewrites if t not in rewritten]
        scanned += [t for t in scans if lockmodes.blocks_writes(strongest.get(t)) and t not in scanned]
        if strongest or scans or rewrites:
            duration = round((cur.at - prev.at) * 1000)
            statements.append(
                StatementTrace(cur.statement, not cur.in_tx, strongest, scans, rewrites, duration)
            )
    by_name = {str(o): n for o, n in names.items()}
    return RevisionTrace(
        service,
        observed.step.revision,
        observed.step.message,
        observed.path,
        locks,
        rewritten,
        scanned,
        held,
        statements,
        observed.duration_ms,
        {by_name[k]: v for k, v in observed.before.items() if k in by_name},
        {by_name[k]: v for k, v in observed.after.items() if k in by_name},
    )


# --- The rules ------------------------------------------------------------------------------------

RULES = {"table-rewrite": "error", "scan-under-lock": "error"}
LEVELS = {"warning": 1, "error": 2}
NO_REASON = "trace-ignore-without-reason"
KEYWORD = "trace-ignore"
EXPAND_CONTRACT = (
    "expand and contract over two releases: a new column kept in step by a trigger, job.ops.backfill, "
    "then drop the old one (docs/authoring.md: Zero-downtime recipes, renaming a column or changing its type)"
)
# squawk's rules that name the same problem, for "lint saw it too".
LINT_RULES = {
    "table-rewrite": {
        "changing-column-type",
        "adding-field-with-default",
        "adding-serial-primary-key-field",
        "adding-required-field",
    },
    "scan-under-lock": {
        "require-concurrent-index-creation",
        "adding-not-nullable-field",
        "adding-foreign-key-constraint",
        "constraint-missing-not-valid",
        "disallowed-unique-constraint",
        "adding-serial-primary-key-field",
        "adding-required-field",
        "changing-column-type",
    },
}


@dataclass(frozen=True)
class Finding:
    """One rule broken on one table by one revision."""

    service: str
    revision: str
    rule: str
    table: str
    message: str  # the log line's sentence: what, under which lock, how long, what avoids it
    help: str
    mode: str | None
    held_ms: int | None
    path: str | None = None
    exempted: str | None = None  # the exemption's reason
    lint: list[str] | None = None  # squawk's rules that flagged the same table; None: lint did not run
    level: str = "error"

    def fields(self) -> dict[str, Any]:
        """Return the finding as log fields (severity and message are the line's own)."""
        return {
            "service": self.service,
            "revision": self.revision,
            "rule": self.rule,
            "table": self.table,
            "trace_level": self.level,
            "mode": self.mode,
            "blocks": lockmodes.blocks(self.mode),
            "held_ms": self.held_ms,
            "help": self.help,
            "lint_saw": None if self.lint is None else bool(self.lint),
            "lint_rules": self.lint,
            "path": self.path,
            "reason": self.exempted,
        }

    @property
    def lint_verdict(self) -> str:
        """Return whether lint saw it, in words."""
        if self.lint is None:
            return "lint not run"
        return f"lint saw it too: {', '.join(self.lint)}" if self.lint else "lint missed it"


def judge(trace: RevisionTrace, lint: RevisionSQL | None = None, lint_ran: bool = False) -> list[Finding]:
    """Return the revision's findings, exempted where its file says why, each with lint's verdict."""
    from job.lint import exemptions

    ignores = exemptions(trace.path, keyword=KEYWORD)
    reasons = {rule: e.reason for e in ignores if e.reason for rule in e.rules}
    found = [
        Finding(
            trace.service,
            trace.revision,
            NO_REASON,
            "",
            f"{trace.service}: revision {trace.revision}: the exemption on line {e.line} of the revision "
            f"file gives no reason: {e.text}",
            "say why the rule does not apply: # migrate-job: trace-ignore RULE -- reason",
            None,
            None,
            trace.path,
        )
        for e in ignores
        if not e.reason or not e.rules
    ]
    for table in trace.rewritten:
        what, hint = _rewrite_cause(trace, table)
        found.append(_finding(trace, "table-rewrite", table, f"rewrites {table} ({what})", hint))
    for table in trace.scanned:
        if table in trace.rewritten:
            continue  # the rewrite's own read: one finding, table-rewrite
        what, hint = _scan_cause(trace, table)
        found.append(_finding(trace, "scan-under-lock", table, f"reads all of {table} ({what})", hint))
    return [
        _with(f, reasons.get(f.rule), _lint_rules(f, lint) if lint_ran else None) if f.rule in RULES else f
        for f in found
    ]


def failing(findings: list[Finding], fail_on: str) -> list[Finding]:
    """Return the findings that are not exempted and at or above the fail_on level."""
    return [f for f in findings if f.exempted is None and LEVELS.get(f.level, 2) >= LEVELS[fail_on]]


def _finding(trace: RevisionTrace, rule: str, table: str, what: str, hint: str) -> Finding:
    """Return a finding whose sentence says what the lock blocks, how long, and what avoids it."""
    culprit = _culprit(trace, table, rule)
    mode = (culprit.locks.get(table) if culprit else None) or trace.locks.get(table)
    held = trace.held_ms.get(table)
    blocks = lockmodes.describe_blocks(mode)
    work = "copying the table and rebuilding its indexes" if rule == "table-rewrite" else "reading it all"
    until = "the statement ends" if culprit is not None and culprit.outside else "the revision commits"
    message = (
        f"{trace.service}: revision {trace.revision} {what} under {mode}, which blocks {blocks} on "
        f"{table} until {until} ({held if held is not None else '?'} ms here, on a scratch "
        f"database; on a real one as long as {work} takes). Avoid it with {hint}"
    )
    return Finding(trace.service, trace.revision, rule, table, message, hint, mode, held, trace.path)


def _culprit(trace: RevisionTrace, table: str, rule: str) -> StatementTrace | None:
    """Return the statement that rewrote the table, or read it under a lock that blocks writes."""
    for statement in trace.statements:
        if rule == "table-rewrite" and table in statement.rewritten:
            return statement
        if table in statement.scanned and lockmodes.blocks_writes(statement.locks.get(table)):
            return statement
    return None


def _with(finding: Finding, reason: str | None, lint: list[str] | None) -> Finding:
    from dataclasses import replace

    return replace(finding, exempted=reason, lint=lint)


def _lint_rules(finding: Finding, chunk: RevisionSQL | None) -> list[str]:
    """Return squawk's rules that flagged the same problem on the same table in the revision."""
    if chunk is None:
        return []
    name = finding.table.rsplit(".", 1)[-1].strip('"')
    mentions = re.compile(rf"(?<![\w$]){re.escape(name)}(?![\w$])", re.IGNORECASE)
    rules = [
        f.rule for f in chunk.findings if f.rule in LINT_RULES[finding.rule] and mentions.search(f.statement)
    ]
    return sorted(set(rules))


def _details(trace: RevisionTrace, table: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Return the table's columns, constraints and indexes before and after, by name."""
    before, after = trace.before.get(table, {}), trace.after.get(table, {})

    def by_name(detail: dict[str, Any], key: str) -> dict[str, Any]:
        return {row[0]: row for row in detail.get(key, [])}

    old: dict[str, Any] = {k: by_name(before, k) for k in ("columns", "constraints")}
    new: dict[str, Any] = {k: by_name(after, k) for k in ("columns", "constraints")}
    old["indexes"], new["indexes"] = set(before.get("indexes", [])), set(after.get("indexes", []))
    return old, new


def _rewrite_cause(trace: RevisionTrace, table: str) -> tuple[str, str]:
    """Return what rewrote the table, as far as its catalog says, and what avoids it."""
    old, new = _details(trace, table)
    for name, column in new["columns"].items():
        was = old["columns"].get(name)
        if was is not None and was[1] != column[1]:
            return f"changing {name} from {was[1]} to {column[1]}", EXPAND_CONTRACT
    added = [n for n, c in new["columns"].items() if n not in old["columns"] and c[3]]
    if added:
        return (
            f"adding column {added[0]} with a default that is not a constant",
            f"job.ops.add_column_with_default({table!r}, column, default_sql): add it without the default, "
            "set the default, backfill in batches",
        )
    return (
        "its storage was replaced: VACUUM FULL, CLUSTER, SET TABLESPACE, SET LOGGED, a change PostgreSQL "
        "cannot make in place",
        "a change that keeps the table's storage, or " + EXPAND_CONTRACT,
    )


def _scan_cause(trace: RevisionTrace, table: str) -> tuple[str, str]:
    """Return what read the table under the lock, as far as its catalog says, and what avoids it."""
    old, new = _details(trace, table)
    culprit = _culprit(trace, table, "scan-under-lock")
    text = (culprit.statement or "") if culprit is not None else ""
    indexes = sorted(new["indexes"] - old["indexes"], key=lambda name: name.rsplit(".", 1)[-1] not in text)
    if indexes and (culprit.locks.get(table) if culprit else trace.locks.get(table)) == "ShareLock":
        return (
            f"building index {indexes[0]} without CONCURRENTLY",
            "job.ops.create_index_concurrently(index_name, table_name, columns): built while writes go on",
        )
    nulls = [
        n for n, c in new["columns"].items() if c[2] and n in old["columns"] and not old["columns"][n][2]
    ]
    if nulls:
        return (
            f"SET NOT NULL on {nulls[0]} checks every row",
            f"job.ops.add_not_null({table!r}, {nulls[0]!r}) then job.ops.validate_not_null: a NOT VALID "
            "check, validated without blocking writes, makes SET NOT NULL need no scan",
        )
    for name, con in new["constraints"].items():
        was = old["constraints"].get(name)
        if not con[2] or (was is not None and was[2]):
            continue
        if was is not None:  # NOT VALID before, validated now, under a lock taken earlier in the revision
            return (
                f"VALIDATE CONSTRAINT {name} under a lock the revision took before it",
                "validate in a revision of its own, after the one that adds the constraint "
                "(job.ops.validate_constraint): VALIDATE alone blocks no writes",
            )
        if con[1] == "f":
            return (
                f"adding foreign key {name} checks every row",
                "job.ops.add_foreign_key_not_valid(...) then job.ops.validate_constraint(table, name)",
            )
        if con[1] in ("u", "p", "x"):
            return (
                f"adding constraint {name} builds its index",
                "job.ops.create_index_concurrently(..., unique=True), then ADD CONSTRAINT ... USING INDEX "
                "in a later revision",
            )
        return (
            f"adding constraint {name} checks every row",
            "op.create_check_constraint(..., postgresql_not_valid=True), then job.ops.validate_constraint "
            "in a later revision",
        )
    return (
        "a statement of the revision read every row while it held the lock; the trace.statement lines "
        "say which",
        "the job.ops helper or recipe for that statement (docs/authoring.md: Zero-downtime recipes)",
    )
