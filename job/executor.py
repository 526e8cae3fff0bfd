"""Run a service's env.py on one database: read its heads, plan, and apply the plan step by step.

The job hands env.py the live connection through ``config.attributes["connection"]`` and
drives Alembic with a ``fn`` hook, as Alembic's own commands do, so whatever env.py configures
(version table, schema, transaction mode) is honoured.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from job import logs
from job.errors import MigrateJobError, MigrationFailed
from job.plan import Plan, Step, compute_plan
from job.report import elapsed_ms

if TYPE_CHECKING:
    from alembic.runtime.migration import MigrationContext, RevisionStep
    from sqlalchemy.engine import Connection
    from sqlalchemy.ext.asyncio import AsyncConnection

    from job.db import Target
    from job.services import Service


@dataclass
class Execution:
    """One pass of env.py over one database: its plan and, when applying, what got committed."""

    service: Service
    target: Target
    destination: str = "head"
    apply: bool = False
    plan: Plan | None = None
    applied: list[Step] = field(default_factory=list)
    running: Step | None = None

    def __call__(self, heads: tuple[str, ...], context: MigrationContext) -> Iterator[RevisionStep]:
        """Alembic's ``fn``: compute the plan from the heads read under env.py's settings."""
        self.plan = compute_plan(self.service, tuple(heads), self.destination)
        self._log_plan(self.plan)
        if not self.apply:
            return iter(())
        return self._steps(self.plan)

    def _steps(self, plan: Plan) -> Iterator[RevisionStep]:
        """Yield the plan's steps; Alembic resumes us only after a step's transaction committed."""
        for shown, step in zip(plan.steps, plan.alembic_steps, strict=True):
            self.running = shown
            started = time.monotonic()
            yield step
            self.running = None
            self.applied.append(shown)
            logs.event(
                "migration.applied",
                f"applied {shown.revision} ({shown.message}) to {self.target.entry.label}",
                revision=shown.revision,
                description=shown.message,
                duration_ms=elapsed_ms(started),
                **self.target.fields(),
            )

    def _log_plan(self, plan: Plan) -> None:
        """Log what this database is at and what would run."""
        pending = [s.fields() for s in plan.steps]
        logs.event(
            "db.plan",
            f"{self.target.entry.label} is at {plan.from_revision or 'base'}; "
            + (f"{len(pending)} revision(s) to {plan.target}" if pending else "nothing to do"),
            from_revision=plan.from_revision,
            to_revision=plan.target,
            pending=pending,
            **self.target.fields(),
        )

    @property
    def revision_now(self) -> str | None:
        """Return the revision the database is at after this pass."""
        if self.applied:
            return self.applied[-1].revision
        return self.plan.from_revision if self.plan else None


async def execute(connection: AsyncConnection, execution: Execution) -> Execution:
    """Run env.py on the connection for this execution; raise MigrationFailed if a step fails."""
    try:
        await connection.run_sync(_run_env, execution)
    except MigrateJobError:
        await connection.rollback()
        raise
    except Exception as exc:
        await connection.rollback()
        raise _failure(execution, exc) from exc
    if execution.apply:
        await connection.commit()
    else:
        await connection.rollback()
    return execution


def _run_env(connection: Connection, execution: Execution) -> None:
    """Run the service's env.py with the live connection and the execution as its ``fn``."""
    from alembic.runtime.environment import EnvironmentContext

    service = execution.service
    config = service.config()
    config.attributes["connection"] = connection
    with EnvironmentContext(config, service.script, fn=execution, dont_mutate=not execution.apply):
        service.script.run_env()


def _failure(execution: Execution, exc: BaseException) -> MigrationFailed:
    """Return the operator-facing error for an exception raised while env.py ran."""
    target = execution.target
    reason = logs.scrub(_reason(exc))
    stays = execution.revision_now or "base"
    if execution.running is None:
        return MigrationFailed(
            f"env.py of service {target.service} failed on database {target.database}: {reason}",
            hint=f"fix services/{target.service}/migrations/env.py; the database is unchanged",
            service=target.service,
            database=target.database,
        )
    step = execution.running
    return MigrationFailed(
        f"migration {step.revision} ({step.message}) failed on database {target.database} of "
        f"service {target.service}: {reason}; its transaction rolled back",
        hint=f"the database stays at {stays}; fix the migration in a new image and run again",
        service=target.service,
        database=target.database,
        revision=step.revision,
        at_revision=stays,
    )


def _reason(exc: BaseException) -> str:
    """Return the first line of the driver's message, without SQLAlchemy's SQL echo."""
    orig: Any = getattr(exc, "orig", None)
    source = orig if orig is not None else exc
    text = str(source).strip().splitlines()
    first = text[0] if text else type(source).__name__
    # asyncpg errors arrive as "<class 'asyncpg.exceptions.X'>: message" through SQLAlchemy.
    if first.startswith("<class '") and ">: " in first:
        first = first.split(">: ", 1)[1]
    return f"{type(exc).__name__}: {first}"
