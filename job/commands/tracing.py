"""Commands that run revisions on a scratch database and read what PostgreSQL did: trace, plan --impact.

``trace`` applies each selected service's revisions on a scratch database it creates and drops (a
SIGTERM or Ctrl-C drops it too), watching each one (job.trace), and judges what it saw with the two
rules of job.lockrules. ``plan --impact`` (job.impact) weighs the same traces against the tables
of each real database, read-only.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from job import lockmodes, lockrules, logs
from job.commands.render import findings_error
from job.errors import TraceFindings
from job.executor import Execution, execute, offline_target
from job.plan import resolve_revision
from job.recorder import Recorder
from job.report import DatabaseResult, elapsed_ms
from job.run import Run, close, close_raw
from job.scratch import admin_url, scratch_target

if TYPE_CHECKING:
    from job import db
    from job.lint import RevisionSQL
    from job.services import Service


async def trace(
    run: Run,
    scratch: str,
    *,
    start: str = "base",
    to: str = "head",
    fail_on: str = "warning",
    output: Path | None = None,
) -> None:
    """Trace each selected service's revisions from start to ``to``; raise TraceFindings (exit 9)."""
    admin = admin_url(run, scratch)
    traced: list[tuple[lockrules.RevisionTrace, list[lockrules.Finding]]] = []
    failed: list[lockrules.Finding] = []
    for service in run.selected_services:
        _check_range(service, start, to)
        async with scratch_target(admin, scratch, service, "trace", run.report) as (target, result):
            traces = await trace_service(run, service, target, result, start=start, to=to)
        lint, lint_ran = _lint(service, start, to)
        for one in traces:
            findings = lockrules.judge(one, lint.get(one.revision), lint_ran)
            _log_revision(one, findings, fail_on)
            failed += lockrules.failing(findings, fail_on)
            traced.append((one, findings))
    if output is not None:
        from job import tracereport

        written = tracereport.write(output, traced)
        logs.event("trace.report", f"trace report written to {', '.join(map(str, written))}", paths=written)
    if failed:
        raise findings_error(
            TraceFindings,
            "trace",
            failed,
            fail_on,
            hint="change each revision as its trace.finding says, or, where a table stays small everywhere, "
            "add to the revision file: # migrate-job: trace-ignore RULE -- reason",
        )


def _check_range(service: Service, start: str, to: str) -> None:
    """Raise ConfigError for a --from or --to the service does not have (before any database is made)."""
    service.head()
    for revision in (start, to):
        if revision not in ("base", "head"):
            resolve_revision(service, revision)


async def trace_service(
    run: Run, service: Service, target: db.Target, result: DatabaseResult, *, start: str, to: str
) -> list[lockrules.RevisionTrace]:
    """Apply the service's revisions on the scratch target, tracing those after start; return the traces."""
    from job.lockwatch import Sampler
    from job.trace import Tracer

    started = time.monotonic()
    _, connection = await run.connect(target)
    sampling = await run.connect_raw(target)
    try:
        if start != "base":
            await execute(connection, Execution(service, target, start, True, quiet=True, offline=True))
        tracer = Tracer(service)
        async with Sampler(sampling) as sampler:
            tracer.sampler = sampler
            recorder = Recorder(service, run.identity(), "up")
            execution = Execution(service, target, to, True, quiet=True, recorder=recorder, observer=tracer)
            await execute(connection, execution)
        traces = [lockrules.analyse(service.name, o, sampler.samples) for o in tracer.observed]
        result.status = "traced"
        result.from_revision = None if start == "base" else start
        result.to_revision = execution.revision_now
        result.applied = [t.revision for t in traces]
        return traces
    except BaseException:
        result.status = "failed"
        raise
    finally:
        await close(connection)
        await close_raw(sampling)
        result.duration_ms = elapsed_ms(started)


def _lint(service: Service, start: str, to: str) -> tuple[dict[str, RevisionSQL], bool]:
    """Return lint's findings per revision, and whether lint could run (squawk installed, SQL rendered)."""
    from job import lint as linting
    from job.errors import MigrateJobError

    try:
        squawk = linting.find_squawk()
        chunks = linting.lint_service(service, offline_target(service), start=start, to=to, squawk=squawk)
    except MigrateJobError as exc:
        logs.event(
            "trace.lint_skipped",
            f"{service.name}: lint could not run beside trace, so no finding says whether lint saw it: "
            f"{exc.message}",
            level=logging.WARNING,
            service=service.name,
        )
        return {}, False
    return {c.revision: c for c in chunks}, True


def _log_revision(one: lockrules.RevisionTrace, findings: list[lockrules.Finding], fail_on: str) -> None:
    """Log the revision's trace.statement lines, its trace.revision line, then its findings."""
    for statement in one.statements:
        logs.event(
            "trace.statement",
            f"{one.service}: {one.revision}: " + _statement_summary(statement),
            level=logging.INFO,
            service=one.service,
            revision=one.revision,
            statement=" ".join((statement.statement or "").split()) or None,
            outside_transaction=statement.outside or None,
            locks=[{"table": t, "mode": m} for t, m in sorted(statement.locks.items())],
            scanned=statement.scanned,
            rewritten=statement.rewritten,
            duration_ms=statement.duration_ms,
        )
    bad = lockrules.failing(findings, fail_on)
    locked = ", ".join(f"{t} {m}" for t, m in sorted(one.locks.items())) or "no table that existed before"
    logs.event(
        "trace.revision",
        f"{one.service}: revision {one.revision} ({one.message}) locks {locked}"
        + (f"; rewrites {', '.join(one.rewritten)}" if one.rewritten else "")
        + (f"; reads all of {', '.join(one.scanned)} under a lock that blocks writes" if one.scanned else "")
        + (f": {len(bad)} finding(s)" if bad else ""),
        level=logging.WARNING if bad else logging.INFO,
        service=one.service,
        revision=one.revision,
        description=one.message,
        locks=one.lock_list(),
        rewritten=one.rewritten,
        scanned=one.scanned,
        duration_ms=one.duration_ms,
        findings=len(bad),
    )
    exempted: dict[str, list[lockrules.Finding]] = {}
    for finding in findings:
        if finding.exempted is not None:
            exempted.setdefault(finding.rule, []).append(finding)
            continue
        level = logging.ERROR if finding.level == "error" else logging.WARNING
        logs.event("trace.finding", finding.message, level=level, **finding.fields())
    for rule, waived in exempted.items():
        logs.event(
            "trace.exempted",
            f"{one.service}: revision {one.revision} is exempt from {rule} on "
            f"{', '.join(f.table for f in waived)}: {waived[0].exempted}",
            service=one.service,
            revision=one.revision,
            rule=rule,
            tables=[f.table for f in waived],
            reason=waived[0].exempted,
            path=one.path,
        )


def _statement_summary(statement: Any) -> str:
    """Return a sentence on what one statement did to tables that existed before."""
    parts = [f"{t} {m} (blocks {lockmodes.describe_blocks(m)})" for t, m in sorted(statement.locks.items())]
    text = "locks " + ", ".join(parts) if parts else "takes no lock on a table that existed before"
    if statement.rewritten:
        text += f"; rewrites {', '.join(statement.rewritten)}"
    if statement.scanned:
        text += f"; reads all of {', '.join(statement.scanned)}"
    flat = " ".join((statement.statement or "").split())
    shown = flat if len(flat) <= 100 else flat[:97] + "..."
    return text + (f": `{shown}`" if shown else "")


async def impact(run: Run, scratch: str, executions: list[Execution], *, to: str = "head") -> None:
    """Trace the pending revisions on a scratch database, then weigh their locks on each database.

    One ``db.impact`` line per database, pending revision and table it locks against writes: rows
    and bytes as they stand there (read-only), and an estimate of how long writes would wait.
    """
    from job import impact as weighing

    services = {e.service.name: e.service for e in executions if e.plan is not None and e.plan.pending}
    if not services:
        return
    admin = admin_url(run, scratch)
    traces: dict[tuple[str, str], lockrules.RevisionTrace] = {}
    rates: weighing.Rates | None = None
    for service in services.values():
        async with scratch_target(admin, scratch, service, "impact") as (target, result):
            for one in await trace_service(run, service, target, result, start="base", to=to):
                traces[(service.name, one.revision)] = one
            if rates is None:
                rates = await _calibrate(run, target)
    assert rates is not None
    for execution in executions:
        assert execution.plan is not None
        found = [traces.get((execution.service.name, s.revision)) for s in execution.plan.steps]
        await _weigh_one(run, execution, [t for t in found if t is not None], rates)


async def _calibrate(run: Run, target: db.Target) -> Any:
    """Measure the scratch server's scan, index and rewrite rates (job.impact.calibrate)."""
    from job import impact as weighing

    connection = await run.connect_raw(target)
    try:
        return await weighing.calibrate(connection)
    finally:
        await close_raw(connection)


async def _weigh_one(
    run: Run, execution: Execution, pending: list[lockrules.RevisionTrace], rates: Any
) -> None:
    """Read one database's tables (read-only) and log a db.impact line per write-blocking lock."""
    from job import impact as weighing

    target = execution.target
    entry = target.entry
    tables = weighing.tables_of(pending)
    sizes: dict[str, dict[str, Any]] = {}
    if tables:
        connection = await run.connect_raw(target)
        try:
            sizes = await weighing.read_sizes(connection, tables)
        finally:
            await close_raw(connection)
    attempts = entry.lock_retries + 1
    wait = f"at most lock_timeout {entry.lock_timeout_s:g} s per attempt, {attempts} attempt(s)"
    for found in weighing.weigh(pending, sizes, rates, wait):
        blocks = lockmodes.describe_blocks(found.mode)
        rows = "not there yet" if not found.present else f"{found.rows} rows, {weighing.size(found.bytes)}"
        logs.event(
            "db.impact",
            f"{entry.label}: revision {found.revision} takes {found.mode} on {found.table} ({rows}), "
            f"which blocks {blocks} for {weighing.duration(found.estimate_ms)}"
            + (" while it rewrites the table" if found.rewrite else "")
            + (" while it reads the table in full" if found.scan and not found.rewrite else ""),
            level=logging.WARNING if found.estimate_ms >= 1000 else logging.INFO,
            **found.fields(),
            **target.fields(),
        )
