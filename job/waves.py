"""Apply the databases with work in waves: a canary first, alone, then the rest only if it passed.

A canary is the first N databases with work (``canary = N`` in an entry: of that entry; ``--canary
N``: of the whole selection), in manifest order. Every entry's canaries make one wave, migrated
before any other database; one failure among them leaves the rest untouched (``skipped``). Both
the sequential path and the ``--jobs`` pool apply each wave the same way.
"""

from __future__ import annotations

import itertools
import logging
from typing import TYPE_CHECKING

from job import logs
from job.applying import apply
from job.errors import MigrateJobError
from job.report import FAILED

if TYPE_CHECKING:
    from job.executor import Execution
    from job.failures import Failures
    from job.report import DatabaseResult
    from job.run import Run
    from job.workers import Pool

Work = list[tuple["DatabaseResult", "Execution"]]


def canaries(work: Work, canary: int | None) -> tuple[Work, Work]:
    """Return the canary wave and the rest; no canary asked (or nothing after it): one wave."""
    taken: dict[object, int] = {}
    wave: Work = []
    for item in work:
        entry = item[1].target.entry
        size, key = (canary, None) if canary is not None else (entry.canary, entry.block)
        if size is not None and taken.get(key, 0) < size:
            taken[key] = taken.get(key, 0) + 1
            wave.append(item)
    chosen = {id(e) for _, e in wave}
    rest = [(r, e) for r, e in work if id(e) not in chosen]
    return (wave, rest) if wave and rest else ([], work)


async def apply_waves(
    run: Run,
    inspected: Work,
    work: Work,
    failures: Failures,
    pool: Pool | None,
    canary: int | None,
    *,
    gated: bool = False,
) -> None:
    """Apply the canary wave, then (if it passed) the rest; raise the run's first failure.

    gated: the execution's canary passed already (several tasks share one): no wave of this task's own.
    """
    wave, rest = ([], work) if gated else canaries(work, canary)
    if wave:
        await canary_wave(run, inspected, wave, rest, failures, pool)
    busy = {id(e) for _, e in work}
    idle = [(r, e) for r, e in inspected if r.status != "ahead" and id(e) not in busy]
    await _wave(run, inspected, rest, failures, pool, idle=idle)
    failures.raise_if_any()


async def canary_wave(
    run: Run, inspected: Work, wave: Work, rest: Work, failures: Failures, pool: Pool | None
) -> None:
    """Apply the canary wave alone; raise its failure, told as the canary's, if any database of it failed."""
    try:
        await _wave(run, inspected, wave, failures, pool, idle=())
    except MigrateJobError as exc:
        if not failures.own(exc):
            raise
        raise _canary_failed(wave, rest, exc) from None
    first = failures.first(among={id(e.target.entry) for _, e in wave})
    if first is not None and any(r.status in FAILED for r, _ in wave):
        raise _canary_failed(wave, rest, first)
    _log_canary(wave, rest, "passed")


async def _wave(
    run: Run, inspected: Work, wave: Work, failures: Failures, pool: Pool | None, idle: Work | tuple[()]
) -> None:
    """Apply one wave (in this process or the pool); report the idle databases as current."""
    if pool is None:
        await _in_order(run, inspected, wave, failures, idle)
        return
    for result, execution in idle:
        result.finish(execution.target, "current")
    await pool.apply(wave, failures)


async def _in_order(
    run: Run, inspected: Work, wave: Work, failures: Failures, idle: Work | tuple[()]
) -> None:
    """Apply the wave's databases in manifest order in this process, and finish the idle ones."""
    chosen = {id(e) for _, e in wave}
    waiting = {id(e) for _, e in idle}
    order = [e for _, e in inspected if id(e) in chosen]
    following = {id(current): after for current, after in itertools.pairwise(order)}
    for result, execution in inspected:
        if id(execution) in chosen:
            if not await failures.may_start(execution.target.entry):
                # Another task spent the entry's budget: this database is skipped.
                failures.raise_if_any()
                continue
            if id(execution) in following:
                # Its login overlaps this database's migration (job.handover).
                run.handover.prepare(run.connect, following[id(execution)])
            try:
                await apply(run, result, execution)
            except MigrateJobError as exc:
                if not failures.own(exc):
                    raise
                if not await failures.settle(execution.target.entry, exc, result):
                    first = failures.error() or exc
                    if first is exc:
                        raise
                    # An earlier database's tolerated failure is the run's (first in manifest order).
                    raise first from exc
        elif id(execution) not in waiting:
            continue
        result.finish(execution.target, "current")


def _canary_failed(wave: Work, rest: Work, error: MigrateJobError) -> MigrateJobError:
    """Return the canary's failure, told as what it means for the run (the others untouched)."""
    _log_canary(wave, rest, "failed")
    error.message = (
        f"the canary failed: {error.message}; the other {len(rest)} database(s) with work were not "
        "touched (skipped)"
    )
    error.hint = (
        "fix what failed on the canary (run.summary has each database's error), then run again: the "
        "canary goes first again, and the rest follow only if it succeeds"
    )
    error.context["canary"] = [e.target.entry.label for _, e in wave]
    return error


def _log_canary(wave: Work, rest: Work, outcome: str) -> None:
    """Log the ``run.canary`` event: which databases were the canary, and how it went."""
    labels = [e.target.entry.label for _, e in wave]
    logs.event(
        "run.canary",
        f"canary {outcome} on {len(wave)} database(s)"
        + (f"; migrating the other {len(rest)}" if outcome == "passed" else f"; {len(rest)} left untouched"),
        level=logging.INFO if outcome == "passed" else logging.ERROR,
        outcome=outcome,
        canary=labels,
        rest=len(rest),
    )
