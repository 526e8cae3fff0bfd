"""Commands that render SQL without running it: sql (for review) and lint (squawk on each revision)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from job import logs
from job.errors import LintFindings
from job.executor import Execution, offline_target, render_sql
from job.inspection import inspect_all
from job.plan import resolve_revision
from job.report import DatabaseResult
from job.run import Run

if TYPE_CHECKING:
    from job.lint import RevisionSQL


async def sql(run: Run, *, start: str | None = None, to: str = "head", output: Path | None = None) -> None:
    """Render, per database, the SQL that upgrade would run (from its revision, or from start)."""
    if start is None:
        inspected = await inspect_all(run, destination=to, allow_ahead=False, quiet=True)
        pairs = [(r, e, e.plan.current if e.plan else ()) for r, e in inspected]
    else:
        pairs = _from_start(run, start, to)
    for result, execution, begin in pairs:
        rendered = Execution(execution.service, execution.target, to, apply=True, quiet=True, offline=True)
        text = logs.scrub(render_sql(rendered, begin))
        path = None
        if output is not None:
            output.mkdir(parents=True, exist_ok=True)
            path = output / f"{execution.target.service}__{execution.target.database}.sql"
            path.write_text(text, encoding="utf-8")
        result.status = "pending" if rendered.plan and rendered.plan.pending else "current"
        result.from_revision = "+".join(begin) or None
        result.to_revision = rendered.plan.target if rendered.plan else result.from_revision
        result.pending = [s.revision for s in rendered.plan.steps] if rendered.plan else []
        logs.event(
            "db.sql",
            f"SQL for {execution.target.entry.label} from {result.from_revision or 'base'} "
            f"to {result.to_revision or 'base'}" + (f" written to {path}" if path else ""),
            from_revision=result.from_revision,
            to_revision=result.to_revision,
            path=str(path) if path else None,
            sql=None if path else text,
            **execution.target.fields(),
        )


def _from_start(run: Run, start: str, to: str) -> list[tuple[DatabaseResult, Execution, tuple[str, ...]]]:
    """Return each selected database's pass from a given revision (or base), without connecting."""
    targets = run.preflight(to)
    if start != "base":
        for service in run.selected_services:
            resolve_revision(service, start)
    begin: tuple[str, ...] = () if start == "base" else (start,)
    return [
        (
            run.report.add(DatabaseResult(t.service, t.database, t.fields()["instance"])),
            Execution(run.services[t.service], t, to, quiet=True),
            begin,
        )
        for t in targets
    ]


async def lint(run: Run, *, start: str | None = None, to: str = "head", fail_on: str = "warning") -> None:
    """Lint the offline SQL of each selected service's revisions with squawk; raise LintFindings.

    Needs no database: the SQL is rendered from start (default base) to ``to``.
    """
    from job import lint as linting

    squawk = linting.find_squawk()
    failed: list[linting.Finding] = []
    for service in run.selected_services:
        service.head()
        if start not in (None, "base"):
            resolve_revision(service, str(start))
        target = offline_target(service)
        for chunk in linting.lint_service(service, target, start=start, to=to, squawk=squawk):
            _log_findings(chunk)
            bad = linting.failing(chunk.findings, fail_on)
            failed += bad
            logs.event(
                "lint.revision",
                f"{service.name}: revision {chunk.revision} "
                + (f"has {len(bad)} finding(s) at or above {fail_on}" if bad else "lints clean"),
                service=service.name,
                revision=chunk.revision,
                findings=len(bad),
                exempted=sum(1 for f in chunk.findings if f.exempted is not None),
            )
    if failed:
        raise findings_error(
            LintFindings,
            "lint",
            failed,
            fail_on,
            hint="make each statement safe as its lint.finding help says, or, where the rule does not "
            "apply, add to the revision file: # migrate-job: lint-ignore RULE -- reason",
        )


def findings_error(
    kind: type[LintFindings], tool: str, failed: list[Any], fail_on: str, hint: str
) -> LintFindings:
    """Return the exit-9 error of lint or trace: how many findings, in which revisions."""
    revisions = list(dict.fromkeys(f"{f.service} {f.revision}" for f in failed))
    return kind(
        f"{len(failed)} {tool} finding(s) at or above {fail_on} in " + ", ".join(revisions),
        hint=hint,
        service=failed[0].service if len({f.service for f in failed}) == 1 else None,
        revision=failed[0].revision if len(revisions) == 1 else None,
    )


def _log_findings(chunk: RevisionSQL) -> None:
    """Log each finding of one revision, and one line per rule it is exempt from."""
    exempted: dict[str, list[Any]] = {}
    for finding in chunk.findings:
        if finding.exempted is not None:
            exempted.setdefault(finding.rule, []).append(finding)
            continue
        logs.event(
            "lint.finding",
            finding.description,
            level=logging.ERROR if finding.level == "error" else logging.WARNING,
            **finding.fields(),
        )
    for rule, waived in exempted.items():
        # One line per rule: a CREATE TABLE can break a rule once per column.
        logs.event(
            "lint.exempted",
            f"{chunk.service}: revision {chunk.revision} is exempt from {rule} "
            f"({len(waived)} finding(s)): {waived[0].exempted}",
            service=chunk.service,
            revision=chunk.revision,
            rule=rule,
            reason=waived[0].exempted,
            count=len(waived),
            statements=list(dict.fromkeys(f.fields()["statement"] for f in waived)),
            path=chunk.path,
        )
