"""The run's record: one result per database, turned into the ``run.summary`` line."""

from __future__ import annotations

import time
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


# Up to this many databases, run.summary lists each in full.
FULL_SUMMARY_LIMIT = 200


@dataclass
class RunReport:
    """Results gathered as the run goes, so the summary is complete even when it stops early."""

    command: str
    databases: list[DatabaseResult] = field(default_factory=list)
    # This Cloud Run task's share of the selected databases (index, count, how many of how many).
    shard: dict[str, int] | None = None
    started: float = field(default_factory=time.monotonic)

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
            out["databases"] = [r.as_dict() for r in self.databases]
            return out
        # A Cloud Logging entry holds at most 256 KB: past the limit, databases with nothing to
        # report are listed by name only, and every other one in full.
        out["databases"] = [r.as_dict() for r in self.databases if r.status != "current"]
        out["current"] = [f"{r.service}/{r.database}" for r in self.databases if r.status == "current"]
        return out


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
