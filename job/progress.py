"""``run.progress``: how far a run over many databases is, at a steady interval.

A run with work for at least ``THRESHOLD`` databases logs, every ``MIGRATE_PROGRESS_S`` seconds,
how many are done, failed and left, the rate and the estimated time left. One database has its
own ``db.done`` line, which says all there is. On a terminal (text format) the same numbers are
one line that updates in place.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

from job import logs
from job.report import FAILED

if TYPE_CHECKING:
    from job.report import DatabaseResult

# Fewer databases with work than this: no progress events (each one's db.done says enough).
THRESHOLD = 2


def snapshot(results: Sequence[DatabaseResult], started: float) -> dict[str, Any]:
    """Return the progress fields: done, failed, left, rate (databases/s) and eta_s."""
    failed = sum(1 for r in results if r.status in FAILED)
    # A database's status leaves "skipped" only once it is finished (applied, current or failed).
    left = sum(1 for r in results if r.status == "skipped")
    done = len(results) - failed - left
    elapsed = max(time.monotonic() - started, 1e-6)
    rate = (done + failed) / elapsed
    return {
        "done": done,
        "failed": failed,
        "left": left,
        "total": len(results),
        "rate": round(rate, 3),
        "eta_s": round(left / rate, 1) if rate > 0 else None,
        "elapsed_s": round(elapsed, 1),
    }


def describe(fields: dict[str, Any]) -> str:
    """Return the progress as a sentence for people."""
    eta = f"{fields['eta_s']:.0f}s" if fields["eta_s"] is not None else "unknown"
    return (
        f"{fields['done'] + fields['failed']}/{fields['total']} databases: {fields['done']} done, "
        f"{fields['failed']} failed, {fields['left']} left; {fields['rate']:.2f}/s, about {eta} left"
    )


async def _tick(results: Sequence[DatabaseResult], interval: float, started: float) -> None:
    """Log run.progress every interval until cancelled."""
    while True:
        await asyncio.sleep(interval)
        fields = snapshot(results, started)
        logs.progress("run.progress", describe(fields), **fields)


@contextlib.asynccontextmanager
async def reporting(results: Sequence[DatabaseResult], interval: float) -> AsyncIterator[None]:
    """Log progress over results while the block runs (interval 0: never)."""
    if len(results) < THRESHOLD or interval <= 0:
        yield
        return
    ticker = asyncio.ensure_future(_tick(results, interval, time.monotonic()))
    try:
        yield
    finally:
        ticker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ticker
        logs.end_progress()
