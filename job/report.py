"""The run's record: one result per database, turned into the ``run.summary`` line."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from job import logs

if TYPE_CHECKING:
    from job.db import Target
    from job.plan import Plan, Step

# Statuses of a database that did not get where the run was taking it.
FAILED = frozenset({"failed", "interrupted"})


@dataclass
class DatabaseResult:
    """What happened to one database."""

    service: str
    database: str
    instance: str | None = None
    status: str = "skipped"
    from_revision: str | None = None
    to_revision: str | None = None
    applied: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)
    duration_ms: int = 0
    error: str | None = None

    def record(self, plan: Plan | None, applied: list[Step]) -> None:
        """Fill in the revisions from what the database's passes saw and what committed."""
        self.applied = [s.revision for s in applied] or self.applied
        if applied:
            self.to_revision = applied[-1].lands_at
        elif plan is not None and self.to_revision is None:
            self.to_revision = plan.from_revision
        if plan is not None:
            done = set(self.applied)
            self.pending = [s.revision for s in plan.steps if s.revision not in done]

    def finish(self, target: Target, status: str) -> None:
        """Set the final status (unless applying set it) and log that the database is done."""
        if self.status == "skipped":
            self.status = status
        logs.event(
            "db.done",
            f"{target.entry.label}: {self.status} at {self.to_revision or 'base'}",
            status=self.status,
            from_revision=self.from_revision,
            to_revision=self.to_revision,
            applied=self.applied,
            duration_ms=self.duration_ms,
            **target.fields(),
        )

    def as_dict(self) -> dict[str, Any]:
        """Return the summary entry for this database."""
        out: dict[str, Any] = {
            "service": self.service,
            "database": self.database,
            "instance": self.instance,
            "status": self.status,
            "from_revision": self.from_revision,
            "to_revision": self.to_revision,
            "applied": self.applied,
            "duration_ms": self.duration_ms,
        }
        if self.pending:
            out["pending"] = self.pending
        if self.error:
            out["error"] = self.error
        return out


# Up to this many databases, run.summary lists each in full (when that fits in SUMMARY_BYTES).
FULL_SUMMARY_LIMIT = 200
# Cloud Logging takes at most 256 KB per entry. The summary's fields stay under this, which leaves
# room for the line's other fields and for what Cloud Logging adds to the entry.
SUMMARY_BYTES = 200 * 1024
# What makes databases one group in the compact summary: they went the same way.
GROUP_KEY = ("service", "instance", "status", "from_revision", "to_revision", "applied", "pending")


@dataclass
class RunReport:
    """Results gathered as the run goes, so the summary is complete even when it stops early."""

    command: str
    databases: list[DatabaseResult] = field(default_factory=list)
    # This Cloud Run task's share of the selected databases (index, count, how many of how many).
    shard: dict[str, int] | None = None
    started: float = field(default_factory=time.monotonic)
    # Called with the exit code just before run.summary (a task of several records its end).
    closing: Callable[[int], None] | None = None

    def add(self, result: DatabaseResult) -> DatabaseResult:
        """Record a database (initially skipped) and return its result to fill in."""
        self.databases.append(result)
        return result

    def summary(self, exit_code: int) -> dict[str, Any]:
        """Return the fields of the ``run.summary`` line."""
        counts: dict[str, int] = {}
        for result in self.databases:
            counts[result.status] = counts.get(result.status, 0) + 1
        out: dict[str, Any] = {
            "command": self.command,
            "status": run_status(exit_code),
            "exit_code": exit_code,
            "counts": counts,
            "duration_ms": elapsed_ms(self.started),
        }
        if self.shard is not None and self.shard["task_count"] > 1:
            out["shard"] = self.shard
        if len(self.databases) <= FULL_SUMMARY_LIMIT:
            full = {**out, "databases": [r.as_dict() for r in self.databases]}
            if json_size(full) <= SUMMARY_BYTES:
                return full
        return {**out, **compact(self.databases, SUMMARY_BYTES - json_size(out))}

    def log_summary(self, exit_code: int) -> None:
        """Write the ``run.summary`` line, always the last."""
        if self.closing is not None:
            self.closing(exit_code)
        summary = self.summary(exit_code)
        counts = ", ".join(f"{n} {status}" for status, n in summary["counts"].items()) or "no database"
        message = f"{self.command} {summary['status']} (exit {exit_code}): {counts}"
        if summary.get("omitted"):
            message += (
                f"; {summary['omitted']} database(s) left out of this line to keep it within one Cloud "
                "Logging entry: each one's db.done line has its result"
            )
        logs.event(
            "run.summary",
            message,
            level=logging.INFO if exit_code == 0 else logging.ERROR,
            **summary,
        )


def compact(results: list[DatabaseResult], budget: int) -> dict[str, Any]:
    """Return the summary's databases in at most budget bytes: problems in full, the rest grouped.

    Each group's entry comes first, then the problem databases in manifest order, then each
    group's names; a list stops at its first item that does not fit, counted in ``omitted``.
    """
    problems = [r.as_dict() for r in results if in_full(r)]
    groups = _groups([r for r in results if not in_full(r)])
    spend = _Budget(budget - json_size({"databases": [], "groups": [], "omitted": len(results)}))
    shown = spend.take([header for header, _ in groups], extra=json_size({"databases": []}))
    listed = spend.take(problems)
    for header, names in groups[: len(shown)]:
        header["databases"] = spend.take(names)
    omitted = len(results) - len(listed) - sum(len(h["databases"]) for h in shown)
    return {"databases": listed, "groups": shown, **({"omitted": omitted} if omitted else {})}


def in_full(result: DatabaseResult) -> bool:
    """Return whether the compact summary lists a database on its own: it failed or has an error."""
    return result.status in FAILED or bool(result.error)


def _groups(results: list[DatabaseResult]) -> list[tuple[dict[str, Any], list[str]]]:
    """Return the databases that went the same way as one entry each, with their names, in order."""
    groups: dict[str, tuple[dict[str, Any], list[str]]] = {}
    for result in results:
        entry = result.as_dict()
        header = {k: entry[k] for k in GROUP_KEY if k in entry}
        header, names = groups.setdefault(
            json.dumps(header), ({**header, "count": 0, "total_duration_ms": 0, "max_duration_ms": 0}, [])
        )
        header["count"] += 1
        header["total_duration_ms"] += result.duration_ms
        header["max_duration_ms"] = max(header["max_duration_ms"], result.duration_ms)
        names.append(result.database)
    return list(groups.values())


class _Budget:
    """Bytes left for the summary's lists, spent item by item."""

    def __init__(self, left: int) -> None:
        self.left = left

    def take(self, items: list[Any], extra: int = 0) -> list[Any]:
        """Return the leading items that fit (each with its separator and extra bytes), and spend them."""
        taken = []
        for item in items:
            size = json_size(item) + extra + 2
            if size > self.left:
                break
            self.left -= size
            taken.append(item)
        return taken


def json_size(value: Any) -> int:
    """Return the bytes value takes in a log line (encoded as the Cloud Logging handler does)."""
    return len(json.dumps(value, ensure_ascii=False).encode())


def run_status(exit_code: int) -> str:
    """Return the run's status word for an exit code."""
    if exit_code == 0:
        return "succeeded"
    if exit_code == 10:
        return "pending"
    if exit_code in (130, 143):
        return "interrupted"
    return "failed"


def elapsed_ms(since: float) -> int:
    """Return whole milliseconds since a time.monotonic() reading."""
    return int((time.monotonic() - since) * 1000)
