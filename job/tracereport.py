"""``trace --output DIR``: trace.json (everything, for tools) and trace.md (for a pull request comment)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from job import lockmodes
from job.lockrules import Finding, RevisionTrace

Traced = list[tuple[RevisionTrace, list[Finding]]]


def write(output: Path, traced: Traced) -> list[str]:
    """Write trace.json and trace.md into output (created if need be); return their paths."""
    output.mkdir(parents=True, exist_ok=True)
    paths = [output / "trace.json", output / "trace.md"]
    paths[0].write_text(json.dumps(as_json(traced), indent=1) + "\n", encoding="utf-8")
    paths[1].write_text(markdown(traced), encoding="utf-8")
    return [str(p) for p in paths]


def as_json(traced: Traced) -> dict[str, Any]:
    """Return the whole trace: per revision its locks, rewrites, scans, statements and findings."""
    revisions = []
    for one, findings in traced:
        revisions.append(
            {
                "service": one.service,
                "revision": one.revision,
                "description": one.message,
                "path": one.path,
                "locks": one.lock_list(),
                "rewritten": one.rewritten,
                "scanned": one.scanned,
                "held_ms": one.held_ms,
                "duration_ms": one.duration_ms,
                "statements": [
                    {
                        "statement": s.statement,
                        "outside_transaction": s.outside,
                        "locks": [{"table": t, "mode": m} for t, m in sorted(s.locks.items())],
                        "scanned": s.scanned,
                        "rewritten": s.rewritten,
                        "duration_ms": s.duration_ms,
                    }
                    for s in one.statements
                ],
                "findings": [{**f.fields(), "message": f.message} for f in findings],
            }
        )
    failing = [f for _, fs in traced for f in fs if f.exempted is None]
    return {"findings": len(failing), "revisions": revisions}


def markdown(traced: Traced) -> str:
    """Return the report for a pull request: a summary, then one table per revision."""
    failing = [f for _, fs in traced for f in fs if f.exempted is None]
    lines = ["# What each revision locks (migrate-job trace)", ""]
    if failing:
        revisions = len({(f.service, f.revision) for f in failing})
        lines.append(f"**{len(failing)} finding(s)** in {revisions} revision(s).")
    else:
        lines.append(
            "No finding: no table that existed before is rewritten, or read in full under a lock "
            "that blocks writes."
        )
    lines += [
        "",
        "Measured by applying each revision on a scratch database and reading PostgreSQL's catalog "
        "(`pg_locks`, `relfilenode`, scan counts). Only tables that existed before the revision are shown. "
        "*scan*: read in full; *yes* when a lock that blocks writes was held meanwhile.",
    ]
    service = None
    for one, findings in traced:
        if one.service != service:
            service = one.service
            lines += ["", f"## {service}"]
        lines += ["", f"### `{one.revision}` {one.message}", ""]
        by_table: dict[str, list[Finding]] = {}
        for finding in findings:
            by_table.setdefault(finding.table, []).append(finding)
        tables = sorted(set(one.locks) | set(one.rewritten) | set(one.scanned))
        if not tables:
            lines.append("No table that existed before is locked.")
        else:
            lines += ["| table | lock | blocks | rewrite | scan | finding |", "|---|---|---|---|---|---|"]
            for table in tables:
                mode = one.locks.get(table)
                blocks = ", ".join(lockmodes.blocks(mode)) or "-"
                cells = [_cell(f) for f in by_table.pop(table, [])]
                read = any(table in s.scanned for s in one.statements)
                scan = "yes" if table in one.scanned else "yes, writes go on" if read else "-"
                lines.append(
                    f"| {table} | {mode or '-'} | {blocks} | {'yes' if table in one.rewritten else '-'} | "
                    f"{scan} | {'<br>'.join(cells) or '-'} |"
                )
        for finding in by_table.get("", []):
            lines.append(f"\n{_cell(finding)}")
        for finding in (f for f in findings if f.exempted is None and f.table):
            lines += ["", f"> {finding.message}"]
    return "\n".join(lines) + "\n"


def _cell(finding: Finding) -> str:
    """Return a finding as a table cell: its rule, or that it is exempted and why; and lint's verdict."""
    if finding.exempted is not None:
        return f"{finding.rule} (exempted: {finding.exempted})"
    return f"**{finding.rule}** ({finding.lint_verdict})"
