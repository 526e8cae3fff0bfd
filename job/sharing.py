"""The tasks of one Cloud Run execution as one run: one canary for all, and one ``execution.summary``.

Each task still migrates its own share. Before any task locks a database of its share, the
execution's canary (the first N databases with work of the whole selection) must have passed:
the first task to get there runs it, whichever share its databases are in, while the others wait
for its outcome; a task that finds it failed stops with the canary's error. The task that
finishes last logs the ``execution.summary``. What the tasks share is stored by job.coordination.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import TYPE_CHECKING, Any

from job import coordination, logs
from job.errors import Interrupted, MigrateJobError, error_class
from job.failures import Failures
from job.report import FAILED, FULL_SUMMARY_LIMIT, SUMMARY_BYTES, DatabaseResult, compact, json_size
from job.waves import canaries, canary_wave

if TYPE_CHECKING:
    from job.coordination import CanaryClaim, Ledger
    from job.plan import Direction
    from job.run import Run

    # Where the command takes the databases: destination, direction, allow_ahead.
    Destination = tuple[str, Direction, bool]

# How long a task may take to record its end (the coordination server may be unreachable by now).
FINISH_S = 30.0
RESULT_FIELDS = {f.name for f in dataclasses.fields(DatabaseResult)}


async def begin(run: Run, canary: int | None) -> Ledger | None:
    """Refuse shared settings no task can share; return the execution's ledger (None: one task, or none)."""
    coordination.refuse_without(run, canary)
    try:
        ledger = await coordination.open_ledger(run)
    except MigrateJobError as exc:
        if coordination.coordinated(run.selected, canary):
            raise
        # Only the execution.summary needed it: the tasks go on as they would without one.
        logs.event(
            "execution.uncoordinated",
            f"{exc.message}; the tasks go on without an execution.summary",
            level=logging.WARNING,
            hint=exc.hint,
        )
        return None
    if ledger is not None:
        run.report.closing = lambda code: _finish(run, code)
    return ledger


def needs_canary(run: Run, canary: int | None) -> bool:
    """Return whether the selection has a canary (the command line's, or an entry's)."""
    return canary is not None or any(e.canary is not None for e in run.selected)


async def shared_canary(run: Run, ledger: Ledger, canary: int | None, how: Destination) -> bool:
    """Make sure the execution's canary passed (run here if no task did); return whether one gates."""
    if not needs_canary(run, canary):
        return False
    claim = await coordination.claim_canary(run, ledger, on_wait=_log_waiting)
    if claim.outcome == "passed":
        logs.event(
            "run.canary",
            f"the execution's canary passed in task {claim.task_index}; migrating this task's share",
            outcome="passed",
            canary=claim.detail.get("canary", []),
            canary_task=claim.task_index,
        )
        return True
    if claim.outcome == "failed":
        raise _failed_elsewhere(claim)
    await _run_claimed(run, ledger, claim, canary, how)
    return True


def _log_waiting() -> None:
    """Log that another task runs the execution's canary, and this one waits for its outcome."""
    logs.event(
        "run.canary_waiting",
        "another task of this execution is running the canary; waiting for its outcome before "
        "migrating this task's share",
    )


async def _run_claimed(
    run: Run, ledger: Ledger, claim: CanaryClaim, canary: int | None, how: Destination
) -> None:
    """Run the canary this task claimed, and record how it went for every task."""
    who = (run.cloud_run.task_index, run.cloud_run.task_attempt)
    try:
        labels = await _run_canary(run, ledger, canary, how)
    except MigrateJobError as exc:
        if isinstance(exc, Interrupted) or "canary" not in exc.context:
            await claim.abandon()
            raise
        detail = {
            "kind": exc.kind,
            "message": exc.message,
            "hint": exc.hint,
            "service": exc.service,
            "database": exc.database,
            "canary": exc.context["canary"],
        }
        await claim.settle("failed", detail, *who)
        raise
    except BaseException:
        await claim.abandon()
        raise
    await claim.settle("passed", {"canary": labels}, *who)


async def _run_canary(run: Run, ledger: Ledger, canary: int | None, how: Destination) -> list[str]:
    """Apply the first N databases with work of the whole selection; return their labels."""
    from job.inspection import inspect_all
    from job.report import RunReport
    from job.run import Run as RunType

    whole = RunType(
        run.settings, run.cloud_run, run.manifest, run.services, list(run.selected), RunReport("canary")
    )
    failures = Failures(whole.entries)
    destination, direction, allow_ahead = how
    inspected = await inspect_all(
        whole,
        destination=destination,
        direction=direction,
        allow_ahead=allow_ahead,
        quiet=True,
        failures=failures,
    )
    work = [(r, e) for r, e in inspected if r.status != "ahead" and e.plan is not None and e.plan.pending]
    wave, rest = canaries(work, canary)
    if not wave:
        return []
    try:
        await canary_wave(whole, inspected, wave, rest, failures, None)
    finally:
        await ledger.record([(r, e.target.entry) for r, e in wave])
    return [e.target.entry.label for _, e in wave]


def _failed_elsewhere(claim: CanaryClaim) -> MigrateJobError:
    """Return the canary's failure in another task, as this task's error (same kind, same exit code)."""
    detail = claim.detail
    told = str(detail.get("message", "")).removeprefix("the canary failed: ")
    where = f"{detail.get('service')}/{detail.get('database')}"
    return error_class(str(detail.get("kind")))(
        f"the canary failed: {where} failed in task {claim.task_index}: {told}",
        hint=detail.get("hint")
        or "fix what failed on the canary, then run the execution again: the canary goes first again",
        service=detail.get("service"),
        database=detail.get("database"),
        canary=detail.get("canary"),
        canary_task=claim.task_index,
    )


def _finish(run: Run, exit_code: int) -> None:
    """Record this task's results and end; log the execution.summary if it is the last task to end."""
    try:
        asyncio.run(asyncio.wait_for(_record_and_finish(run, exit_code), FINISH_S))
    except Exception as exc:  # the task's own summary must still come
        logs.event(
            "execution.unrecorded",
            f"could not record this task's end in {coordination.TABLE} ({type(exc).__name__}: "
            f"{logs.scrub(str(exc))}); the execution.summary may be missing",
            level=logging.WARNING,
        )


async def _record_and_finish(run: Run, exit_code: int) -> None:
    """Write this task's results, say it finished, and log the summary if every task has."""
    ledger = await coordination.open_ledger(run, start=False)
    assert ledger is not None
    try:
        results = run.report.databases
        if len(results) == len(run.entries):
            await ledger.record(list(zip(results, run.entries, strict=True)))
        rows = await ledger.finish(exit_code)
    finally:
        await ledger.close()
    if rows is not None:
        log_summary(run, rows, ledger.tasks or [])


def execution_summary(run: Run, rows: list[dict[str, Any]], tasks: list[dict[str, Any]]) -> dict[str, Any]:
    """Return the fields of the execution.summary line, from every task's rows."""
    results = [DatabaseResult(**{k: v for k, v in r.items() if k in RESULT_FIELDS}) for r in rows]
    counts: dict[str, int] = {}
    for result in results:
        counts[result.status] = counts.get(result.status, 0) + 1
    total = len(run.selected)
    if total > len(results):
        counts["unreported"] = total - len(results)
    failed = any(t.get("exit_code") for t in tasks) or any(r.status in FAILED for r in results)
    out: dict[str, Any] = {
        "execution": run.cloud_run.execution,
        "status": "failed" if failed else "succeeded",
        "total": total,
        "counts": counts,
        "tasks": {
            "reported": len(tasks),
            "of": run.cloud_run.task_count,
            "attempts": [
                {"task_index": t["task_index"], "attempt": t["attempt"], "exit_code": t.get("exit_code")}
                for t in tasks
            ],
        },
    }
    problems = [r for r in results if r.status in FAILED]
    listed = [r.as_dict() for r in problems]
    if len(problems) <= FULL_SUMMARY_LIMIT and json_size({**out, "databases": listed}) <= SUMMARY_BYTES:
        return {**out, "databases": listed}
    return {**out, **compact(problems, SUMMARY_BYTES - json_size(out))}


def log_summary(run: Run, rows: list[dict[str, Any]], tasks: list[dict[str, Any]]) -> None:
    """Write the execution.summary line (this task finished last)."""
    summary = execution_summary(run, rows, tasks)
    counts = ", ".join(f"{n} {status}" for status, n in summary["counts"].items()) or "no database"
    logs.event(
        "execution.summary",
        f"execution {summary['execution']} {summary['status']}: {summary['total']} database(s) in "
        f"{run.cloud_run.task_count} task(s): {counts}",
        level=logging.INFO if summary["status"] == "succeeded" else logging.ERROR,
        **summary,
    )
