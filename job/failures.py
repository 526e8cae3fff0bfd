"""Which database failures stop the run, and which it goes on after (``on_failure = "continue"``).

By default the first failure stops the run. An entry with ``on_failure = "continue"`` (tenants)
lets its failing databases fail alone: ``max_failures = N`` tolerates N of them, and the N+1th
stops the run (what "max" means). Only a database's own failure
can be tolerated: a connection refused, an unknown revision, a lock held too long, a migration
that failed. A configuration error, an unreadable secret, a signal or a bug stops the run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from job import logs
from job.errors import ConfigError, Interrupted, MigrateJobError, SecretError

if TYPE_CHECKING:
    from job.coordination import Ledger
    from job.manifest import DatabaseEntry
    from job.report import DatabaseResult

# Failures that are not one database's own: they stop the run whatever the manifest says.
FATAL = (ConfigError, SecretError, Interrupted)
# "Too many connections": never a database's own failure (job.db waits it out).
BUSY = "53300"
# How many failed databases the run.error line names (run.summary lists them all).
NAMED = 5


@dataclass
class Failure:
    """One database that failed: where it is in manifest order, and its error."""

    position: int
    entry: DatabaseEntry
    error: MigrateJobError
    tolerated: bool


class Failures:
    """The run's failed databases, and whether the run still goes on."""

    def __init__(self, entries: list[DatabaseEntry]) -> None:
        self.positions = {id(e): i for i, e in enumerate(entries)}
        self.failed: list[Failure] = []
        self.stopped = False
        self.counts: dict[object, int] = {}
        # Why a max_failures stopped the run, once one did.
        self.limit: str | None = None
        self.told = False
        # Several tasks of one execution share each entry's budget through the ledger.
        self.ledger: Ledger | None = None
        # The failure (in another task) that spent a shared budget and so stopped this task.
        self.foreign: MigrateJobError | None = None

    @staticmethod
    def own(error: BaseException) -> bool:
        """Return whether error is a database's own failure (which continue may tolerate)."""
        # A server still refusing connections as too many (53300) after the long wait for it
        # is the server's state, not the database's: it stops the run and spends no budget.
        busy = isinstance(error, MigrateJobError) and error.context.get("sqlstate") == BUSY
        return isinstance(error, MigrateJobError) and not isinstance(error, FATAL) and not busy

    def _shared(self, entry: DatabaseEntry) -> bool:
        """Return whether the entry's budget is the execution's (shared with the other tasks)."""
        return self.ledger is not None and entry.on_failure == "continue" and entry.max_failures is not None

    async def settle(self, entry: DatabaseEntry, error: BaseException, result: DatabaseResult) -> bool:
        """Record a failure (in the execution's budget if shared); return True if the run goes on."""
        if self.ledger is None or not self.own(error) or not self._shared(entry):
            return self.record(entry, error)
        assert isinstance(error, MigrateJobError)
        detail = {**result.as_dict(), "status": "failed", "kind": error.kind, "message": error.message}
        count = await self.ledger.failed(entry, detail)
        return self.record(entry, error, count=count)

    async def may_start(self, entry: DatabaseEntry) -> bool:
        """Return whether a database of the entry may start: False once the execution spent its budget."""
        if self.stopped:
            return False
        if self.ledger is None or not self._shared(entry):
            return True
        assert entry.max_failures is not None
        spent = await self.ledger.spent(entry)
        if spent <= entry.max_failures:
            return True
        self.stopped = True
        self.limit = self.limit or (
            f"{spent} database(s) of service {entry.service} failed in this execution's tasks, more than "
            f"its max_failures = {entry.max_failures}: this task stopped, its databases not yet "
            "migrated are skipped"
        )
        if self.foreign is None:
            self.foreign = _stopped_by(await self.ledger.failure(entry, entry.max_failures + 1))
            self.foreign.hint = (
                f"{self.limit}; each failed database's error is in its task's run.summary and in the "
                "execution.summary: fix them and run again"
            )
        return False

    def record(self, entry: DatabaseEntry, error: BaseException, *, count: int | None = None) -> bool:
        """Record a database's failure; return True if the run goes on with the others.

        count: how many of the entry's databases failed in the whole execution, this one included
        (several tasks); else this run's own count.
        """
        if not isinstance(error, MigrateJobError) or not self.own(error):
            self.stopped = True
            return False
        key = entry.block if entry.block is not None else id(entry)
        self.counts[key] = self.counts.get(key, 0) + 1
        count = self.counts[key] if count is None else count
        goes_on = entry.on_failure == "continue" and (
            entry.max_failures is None or count <= entry.max_failures
        )
        position = self.positions.get(id(entry), len(self.positions))
        self.failed.append(Failure(position, entry, error, goes_on))
        if goes_on:
            logs.event(
                "db.failed",
                f'{entry.label} failed ({error.message}); on_failure = "continue": the others go on',
                level=logging.ERROR,
                **{**error.fields(), "service": entry.service, "database": entry.database},
                stack_trace=getattr(error, "stack_trace", None) or None,
            )
            return True
        if entry.on_failure == "continue":
            self._note_limit(entry, error, count)
        self.stopped = True
        return False

    def _note_limit(self, entry: DatabaseEntry, error: MigrateJobError, count: int) -> None:
        """Say on the error that the entry's max_failures stopped the run."""
        error.context["max_failures"] = entry.max_failures
        self.limit = (
            f"{count} database(s) of service {entry.service} failed, more than its max_failures = "
            f"{entry.max_failures}: the run stopped, the databases not yet migrated are skipped"
        )

    def first(self, among: set[int] | None = None) -> MigrateJobError | None:
        """Return the first failure in manifest order (of the entries whose ids are among), if any."""
        failed = [f for f in self.failed if among is None or id(f.entry) in among]
        return min(failed, key=lambda f: f.position).error if failed else None

    def error(self) -> MigrateJobError | None:
        """Return the error that ends the run: the first failure in manifest order, told whole.

        When the run went on past failures, its message counts and names them, so that the one
        run.error line tells the operator what happened to the run, not only to one database.
        """
        first = self.first()
        if first is None:
            return self.foreign
        if self.told or not any(f.tolerated for f in self.failed):
            return first
        ordered = sorted(self.failed, key=lambda f: f.position)
        names = ", ".join(f.entry.label for f in ordered[:NAMED]) + (", ..." if len(ordered) > NAMED else "")
        first.message = f"{len(ordered)} database(s) failed ({names}); the first: {first.message}"
        first.hint = (
            (self.limit + "; " if self.limit else "the other databases were migrated; ")
            + "each failed database's error is in run.summary: fix them and run again "
            "(a rerun migrates only what is still pending)"
        )
        first.context["failed"] = len(ordered)
        self.told = True
        return first

    def raise_if_any(self) -> None:
        """Raise the run's error if any database failed."""
        error = self.error()
        if error is not None:
            raise error


def _stopped_by(row: dict[str, object]) -> MigrateJobError:
    """Return the error of another task's failure that spent the budget: same kind, so same exit code."""
    from job.errors import error_class

    kind, task = str(row.get("kind", "migration_failed")), row.get("task_index")
    error = error_class(kind)(
        f"{row.get('service')}/{row.get('database')} failed in task {task}, which spent the execution's "
        f"max_failures: {row.get('message')}",
        service=str(row.get("service")),
        database=str(row.get("database")),
        failed_task=task,
    )
    return error
