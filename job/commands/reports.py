"""Commands that read and report, never write: plan, current, heads, history, history --applied."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from job import logs, recorder
from job.errors import ConfigError, PendingMigrations
from job.inspection import inspect_all, with_history
from job.plan import as_tuple
from job.run import Run

# History rows whose checksum is not what the file should still have: a revert, a failed attempt.
NOT_COMPARED = ("down", "failed")


async def plan(
    run: Run,
    *,
    check: bool = False,
    to: str = "head",
    allow_ahead: bool = False,
    impact: bool = False,
    scratch: str | None = None,
) -> None:
    """Show what upgrade would run on each database; with check, raise if anything is pending.

    With impact, the pending revisions are traced on a scratch database (``scratch``, a URL
    reference whose role may create databases) and each lock that blocks writes is weighed
    against the table on each database (``db.impact``), read-only.
    """
    if impact != (scratch is not None):
        raise ConfigError(
            "plan --impact needs --scratch REF, and --scratch is only for --impact",
            hint="migrate-job plan --impact --scratch env://SCRATCH_URL",
        )
    inspected = await inspect_all(run, destination=to, allow_ahead=allow_ahead)
    for result, execution in inspected:
        if result.status != "ahead":
            assert execution.plan is not None
            result.finish(execution.target, "pending" if execution.plan.pending else "current")
    if scratch is not None:
        from job.commands.tracing import impact as weigh

        await weigh(run, scratch, [e for r, e in inspected if r.status == "pending"], to=to)
    pending = [r for r in run.report.databases if r.status == "pending"]
    if check and pending:
        raise PendingMigrations(
            f"{len(pending)} database(s) have migrations to apply: "
            + ", ".join(f"{r.service}/{r.database}" for r in pending),
            hint="run migrate-job upgrade (or execute the Cloud Run job)",
        )


async def current(run: Run, *, allow_ahead: bool = False) -> None:
    """Report each selected database's revision and whether it is at its service's head."""
    inspected = await inspect_all(run, destination="head", allow_ahead=allow_ahead, quiet=True)
    for result, execution in inspected:
        if result.status == "ahead":
            continue
        assert execution.plan is not None
        head = execution.plan.target
        at_head = not execution.plan.pending
        result.status = "current" if at_head else "pending"
        logs.event(
            "db.current",
            f"{execution.target.entry.label} is at {execution.plan.from_revision or 'base'}"
            + (" (head)" if at_head else f"; head is {head}"),
            revision=execution.plan.from_revision,
            head=head,
            at_head=at_head,
            **execution.target.fields(),
        )


def heads(run: Run) -> None:
    """Report each selected service's head revision(s); touches no database."""
    for service in run.selected_services:
        found = service.script.get_heads()
        logs.event(
            "service.heads",
            f"{service.name}: head {', '.join(found) or '(empty history)'}",
            service=service.name,
            heads=list(found),
        )


def history(run: Run, *, verbose: bool = False) -> None:
    """Report each selected service's revisions, newest first; touches no database."""
    for service in run.selected_services:
        script = service.script
        head_set = set(script.get_heads())
        for rev in script.walk_revisions():
            fields: dict[str, Any] = {
                "service": service.name,
                "revision": rev.revision,
                "down_revision": list(as_tuple(rev.down_revision)),
                "description": (rev.doc or "").strip(),
                "is_head": rev.revision in head_set,
                "is_merge": rev.is_merge_point,
                "is_branch_point": rev.is_branch_point,
            }
            if verbose:
                path = Path(rev.path)
                # A script_location given as a package resource lives outside the service folder.
                shown = path.relative_to(service.path) if path.is_relative_to(service.path) else path
                fields.update(path=str(shown), branch_labels=sorted(rev.branch_labels))
            logs.event(
                "service.revision",
                f"{service.name}: {', '.join(as_tuple(rev.down_revision)) or '<base>'} -> {rev.revision}"
                + (" (head)" if rev.revision in head_set else "")
                + f", {(rev.doc or '').strip()}",
                **fields,
            )


async def applied_history(run: Run) -> None:
    """Report each database's migrate_job_history rows, oldest first: the audit trail (read-only)."""
    inspected = await inspect_all(run, destination="head", allow_ahead=True, quiet=True, check_edits=False)
    for result, execution in inspected:
        service = execution.service
        found = await with_history(
            run, execution, lambda fetch, schema, s=service: recorder.rows(fetch, s.name, schema)
        )
        for row in found or []:
            now = recorder.file_checksum(service, row["revision"])
            at = row["recorded_at"]
            counts = row["direction"] in recorder.COUNTS
            same = now == row["checksum"] or row["direction"] in NOT_COMPARED
            logs.event(
                "db.history",
                f"{execution.target.entry.label}: {row['direction']} {row['revision']} at "
                f"{at.isoformat(timespec='seconds')} by {row['execution'] or row['recorded_by']}"
                + ("" if same else " (file edited since)")
                + _how_it_failed(row),
                **{**row, "recorded_at": at.isoformat()},
                edited=now != row["checksum"] if counts else None,
                **execution.target.fields(),
            )
        result.status = "current" if result.status != "ahead" else "ahead"


def _how_it_failed(row: dict[str, Any]) -> str:
    """Return how a failed attempt failed, for its history line (nothing for other rows)."""
    if row["direction"] != "failed":
        return ""
    state = f"SQLSTATE {row['sqlstate']}" if row.get("sqlstate") else "no SQLSTATE"
    return f" ({state}" + (f", at: {row['statement']})" if row.get("statement") else ")")
