"""Commands that change databases: upgrade, downgrade, stamp, and acknowledge an edited revision."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING

from job import logs, progress, recorder
from job.errors import ConfigError
from job.failures import Failures
from job.inspection import Inspected, inspect_all, with_history
from job.plan import Direction, stamps_forward
from job.run import Run, confirm
from job.waves import apply_waves

if TYPE_CHECKING:
    from job.coordination import Ledger
    from job.manifest import DatabaseEntry
    from job.workers import Pool


async def upgrade(
    run: Run, to: str = "head", *, allow_ahead: bool = False, canary: int | None = None
) -> None:
    """Check every selected database, then upgrade each in manifest order, stopping at a failure.

    canary: migrate the selection's first N databases with work alone, the rest only if they all
    succeeded (instead of each manifest entry's own ``canary``).
    """
    await _change(run, to, "up", allow_ahead=allow_ahead, canary=canary)


async def downgrade(run: Run, to: str, *, yes: bool = False) -> None:
    """Undo revisions down to ``to`` (a revision, -N or base), where the manifest allows it."""
    _refuse_where_not_allowed(
        run, "downgrades are", "roll forward instead: ship a new revision that undoes the change"
    )
    confirm(yes, f"downgrade to {to} undoes revisions and may drop data")
    await _change(run, to, "down")


def _refuse_where_not_allowed(run: Run, what: str, hint: str) -> None:
    """Raise ConfigError if a selected database is protected (allow_downgrade = false on any entry of it)."""
    refused = run.manifest.protected(run.entries)
    if refused:
        raise ConfigError(
            f"manifest {run.manifest.path} sets allow_downgrade = false for {_names(refused)} (or for "
            f"another service's entry on the same database): {what} refused here",
            hint=hint,
        )


def _refuse_reset(run: Run) -> None:
    """Raise ConfigError unless every selected database may be reset (allow_reset, nothing protected)."""
    refused = run.manifest.resets_refused(run.entries)
    if refused:
        raise ConfigError(
            f"manifest {run.manifest.path} does not set allow_reset = true for {_names(refused)}: "
            "reset, which drops the databases, is refused",
            hint="reset is for development databases: set allow_reset = true in a development "
            "manifest (top level or on the entry); never in staging or production",
            database=refused[0].database,
        )
    protected = run.manifest.protected_sharing(run.entries)
    if protected:
        raise ConfigError(
            f"reset would drop database {protected[0].database}, which {_names(protected)} shares "
            f"with allow_downgrade = false in manifest {run.manifest.path}: reset refused",
            hint="a database with any protected entry is never dropped; to rebuild one service's "
            "tables there, ship a revision that does it",
            database=protected[0].database,
        )


def _names(entries: Sequence[DatabaseEntry]) -> str:
    """Return the first entries' labels for a message."""
    return ", ".join(e.label for e in entries[:5]) + (" ..." if len(entries) > 5 else "")


async def stamp(run: Run, revision: str, *, yes: bool = False) -> None:
    """Set the recorded revision without running migrations (after a manual fix or a restore).

    Where downgrades are refused, only forward stamps are allowed (see _refuse_backward_stamps).
    """
    confirm(yes, f"stamp {revision} records a revision without running its migrations")
    await _change(run, revision, "stamp")


def _refuse_backward_stamps(run: Run, inspected: Inspected) -> None:
    """Raise ConfigError if a protected database would be stamped anywhere but forward.

    Stamping backwards or sideways makes the next upgrade run revisions again on tables that
    already have them; stamping forward only records what was applied by hand (or a restore).
    """
    protected = {id(e) for e in run.manifest.protected(run.entries)}
    for result, execution in inspected:
        plan = execution.plan
        if id(execution.target.entry) not in protected or plan is None or not plan.pending:
            continue
        if not stamps_forward(execution.service, plan):
            raise ConfigError(
                f"stamp {execution.destination} would move {execution.target.entry.label} from "
                f"{plan.from_revision or 'base'} to {plan.target or 'base'}, which is not ahead of it; "
                f"manifest {run.manifest.path} sets allow_downgrade = false there: stamp refused",
                hint="only stamping forward (to a descendant of the current revision) is allowed "
                "where downgrades are refused; roll forward with a new revision instead",
                service=execution.service.name,
                database=result.database,
                revision=plan.from_revision,
            )


async def reset(run: Run, *, yes: bool = False) -> None:
    """Drop and recreate each selected database, then upgrade it to head (development only)."""
    from job import iam, tls
    from job.scratch import recreate

    if run.cloud_run.job:
        raise ConfigError(
            "reset drops databases and is refused on Cloud Run",
            hint="reset is for a development database on a workstation; roll forward everywhere else",
        )
    _refuse_reset(run)
    confirm(yes, "reset drops and recreates every selected database: all their data is lost")
    done: set[tuple[str, str]] = set()
    for target in run.preflight():
        # Two services may share a database: it is dropped once, then both histories upgrade it.
        if (target.entry.location, target.database) in done:
            continue
        done.add((target.entry.location, target.database))
        await recreate(
            target.url.set(database=target.entry.discover_database),
            target.database,
            create=True,
            what="the",
            login={**iam.login_args(target.entry), **tls.connect_args(target)},
            hint=f"reset connects to {target.entry.discover_database} on the same server as "
            f"{target.entry.user or 'the login'}, which must own the database and have CREATEDB",
        )
        logs.event("db.reset", f"dropped and recreated {target.entry.label}", **target.fields())
    await _change(run, "head", "up")


async def _change(
    run: Run, destination: str, direction: Direction, *, allow_ahead: bool = False, canary: int | None = None
) -> None:
    """Check every selected database, then move each in manifest order (canary first), as failures allow.

    With several Cloud Run tasks, the execution's canary and budgets are shared (job.sharing).
    """
    from job import sharing

    ledger = await sharing.begin(run, canary)
    # In one process, each database's preflight connection is kept for its apply (job.handover).
    run.handover.enabled, run.handover.tasks = run.jobs <= 1, run.cloud_run.task_count
    try:
        await _change_shared(run, destination, direction, allow_ahead, canary, ledger)
    finally:
        await run.handover.close()
        if ledger is not None:
            await ledger.close()


async def _change_shared(
    run: Run,
    destination: str,
    direction: Direction,
    allow_ahead: bool,
    canary: int | None,
    ledger: Ledger | None,
) -> None:
    """Inspect this task's share, pass the (shared) canary, then move its databases."""
    from job import sharing
    from job.workers import pool_for

    starting: asyncio.Future[Pool | None] | None = None
    failures = Failures(run.entries)
    failures.ledger = ledger

    def work_found() -> None:
        # Start the workers now, while the rest of the preflight runs. In a thread: starting a
        # fork-server process blocks until the server has imported the job.
        nonlocal starting
        if starting is None:
            starting = asyncio.ensure_future(asyncio.to_thread(pool_for, run, len(run.entries)))

    try:
        inspected = await inspect_all(
            run,
            destination=destination,
            allow_ahead=allow_ahead,
            direction=direction,
            on_work=work_found,
            failures=failures,
        )
        # No database of this share is locked before the execution's canary passed.
        gated = ledger is not None and await sharing.shared_canary(
            run, ledger, canary, (destination, direction, allow_ahead)
        )
    except BaseException:
        if starting is not None and (started := await starting) is not None:
            started.close()
        raise
    pool = await starting if starting is not None else None
    if direction == "stamp":
        try:
            _refuse_backward_stamps(run, inspected)
        except BaseException:
            if pool is not None:
                pool.close()
            raise
    work = [(r, e) for r, e in inspected if r.status != "ahead" and e.plan is not None and e.plan.pending]
    if pool is not None and len(work) < 2:
        pool.close()
        pool = None
    # Only when there is work for several: a no-op run must not pay for starting workers.
    pool = pool or pool_for(run, len(work))
    try:
        async with progress.reporting([r for r, _ in work], run.settings.progress_s):
            await apply_waves(run, inspected, work, failures, pool, canary, gated=gated)
    finally:
        if pool is not None:
            pool.close()


async def acknowledge(run: Run, revisions: Sequence[str], *, yes: bool = False) -> None:
    """Record edited revisions' files as they are now, so runs accept the edit (an audited row)."""
    confirm(yes, "acknowledge accepts edited revision files as if they had been applied as they are now")
    services = run.selected_services
    for revision in revisions:
        if not any(s.knows(revision) for s in services):
            raise ConfigError(
                f"revision {revision} is not in the history of {', '.join(s.name for s in services)}",
                hint="name a revision as migrate-job history shows it, with --service",
                revision=revision,
            )
    inspected = await inspect_all(run, destination="head", allow_ahead=False, quiet=True, check_edits=False)
    who = run.identity()
    for result, execution in inspected:
        ours = [r for r in revisions if execution.service.knows(r)]
        done = await with_history(
            run,
            execution,
            lambda fetch, schema, e=execution, o=ours: recorder.acknowledge(fetch, e.service, schema, o, who),
        )
        result.status = "acknowledged" if done else "current"
        result.applied = list(done or [])
        logs.event(
            "history.acknowledged",
            f"{execution.target.entry.label}: "
            + (f"acknowledged edited {', '.join(done)}" if done else "nothing edited to acknowledge"),
            revisions=list(done or []),
            **execution.target.fields(),
        )
