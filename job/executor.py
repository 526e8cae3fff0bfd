"""Run a service's env.py on one database: read its heads, plan, and apply the plan step by step.

The job hands env.py the live connection through ``config.attributes["connection"]`` and
drives Alembic with a ``fn`` hook, as Alembic's own commands do, so whatever env.py configures
(version table, schema, transaction mode) is honoured.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Protocol

from job import db, logs
from job.errors import ConfigError, MigrateJobError, MigrationFailed
from job.plan import DONE, Direction, Plan, Step, compute_plan
from job.report import elapsed_ms
from job.services import outside_transaction

if TYPE_CHECKING:
    from alembic.runtime.migration import MigrationContext, MigrationStep
    from sqlalchemy.engine import Connection
    from sqlalchemy.ext.asyncio import AsyncConnection

    from job.batching import Batch
    from job.db import Target
    from job.recorder import Recorder
    from job.services import Service


class StepObserver(Protocol):
    """Watches each step as Alembic runs it (job.trace): attached to the context, wraps each step."""

    def attach(self, context: MigrationContext) -> None:
        """Register with the migration context (after the recorder, so its hook runs last)."""

    def wrap(self, shown: Step, step: MigrationStep) -> MigrationStep:
        """Return the step to hand Alembic in place of this one."""


@dataclass
class Execution:
    """One pass of env.py over one database: its plan and, when applying, what got committed."""

    service: Service
    target: Target
    destination: str = "head"
    apply: bool = False
    expected: Plan | None = None
    plan: Plan | None = None
    applied: list[Step] = field(default_factory=list)
    running: Step | None = None
    version_table: str = "alembic_version"
    version_schema: str | None = None
    quiet: bool = False
    direction: Direction = "up"
    offline: bool = False  # rendering SQL: nothing is applied, so nothing is logged as applied
    recorder: Recorder | None = None  # writes migrate_job_history rows when applying
    check_edits: bool = True  # the preflight refuses applied revisions edited since they ran
    history_exists: bool = False  # the preflight saw migrate_job_history (no need to create it)
    batch: Batch | None = None  # the running revision's statements not sent yet (job.batching)
    # The version table's rows as the job read them under the lock (one query), so that Alembic
    # does not read them again; None: Alembic reads them (preflights, offline, other tables).
    known_heads: tuple[str, ...] | None = None
    observer: StepObserver | None = None  # watches each step (trace), which then is not logged as applied

    def __call__(self, heads: tuple[str, ...], context: MigrationContext) -> Iterator[MigrationStep]:
        """Alembic's ``fn``: compute the plan from the heads read under env.py's settings."""
        self.version_table = context.version_table
        self.version_schema = context.version_table_schema
        plan = self.plan_from(tuple(heads))
        if not self.apply:
            return iter(())
        if self.recorder is not None and not self.offline and not context.as_sql:
            from job import batching

            self.recorder.attach(context, create_table=not self.history_exists)
            assert context.connection is not None
            self.batch = batching.start(context.impl, context.connection, context.version_table)
        if self.observer is not None and not context.as_sql:
            self.observer.attach(context)
        return self._steps(plan)

    def plan_from(self, heads: tuple[str, ...]) -> Plan:
        """Compute (and log) the plan from the revisions the database is at."""
        self.plan = compute_plan(self.service, heads, self.destination, self.direction)
        if not self.quiet and (self.expected is None or self.expected.steps != self.plan.steps):
            # Read-only passes always say what they found; an apply pass only when the database
            # moved since (another execution did the work while we waited for the lock).
            self._log_plan(self.plan, replanned=self.expected is not None)
        return self.plan

    def again(self) -> Execution:
        """Return a fresh apply pass that expects this pass's plan (the database may have moved)."""
        return replace(
            self,
            apply=True,
            expected=self.plan,
            plan=None,
            applied=[],
            running=None,
            batch=None,
            known_heads=None,
        )

    def _steps(self, plan: Plan) -> Iterator[MigrationStep]:
        """Yield the plan's steps; Alembic resumes us only after a step's transaction committed."""
        for shown, step in zip(plan.steps, plan.alembic_steps, strict=True):
            self.running = shown
            started = time.monotonic()
            # Lines a migration logs itself (job.ops's backfill.progress) say which revision;
            # the scope _run_env opened ends with env.py.
            logs.also(revision=shown.revision)
            if self.batch is not None:
                # A revision that commits on its own (autocommit_block, job.ops) sends each statement.
                self.batch.open = outside_transaction(self.service, shown.revision) is None
                self.batch.file = revision_code_file(self.service, shown.revision)
            yield step if self.observer is None else self.observer.wrap(shown, step)
            if self.batch is not None:
                self.batch.open = False
            self.running = None
            self.applied.append(shown)
            if self.offline or self.observer is not None:
                continue
            verb = DONE[self.direction]
            logs.event(
                "migration.applied",
                f"{verb} {shown.revision} ({shown.message}) on {self.target.entry.label}",
                revision=shown.revision,
                description=shown.message,
                direction=None if self.direction == "up" else self.direction,
                at_revision=shown.lands_at,
                duration_ms=elapsed_ms(started),
                **self.target.fields(),
            )

    def _log_plan(self, plan: Plan, *, replanned: bool) -> None:
        """Log what this database is at and what would run."""
        pending = [s.fields() for s in plan.steps]
        logs.event(
            "db.plan",
            f"{self.target.entry.label} is at {plan.from_revision or 'base'}; "
            + (f"{len(pending)} step(s) to {plan.target or 'base'}" if pending else "nothing to do"),
            from_revision=plan.from_revision,
            to_revision=plan.target,
            pending=pending,
            replanned=replanned or None,
            **self.target.fields(),
        )

    @property
    def revision_now(self) -> str | None:
        """Return the revision the database is at after this pass."""
        if self.applied:
            return self.applied[-1].lands_at
        return self.plan.from_revision if self.plan else None


async def execute(connection: AsyncConnection, execution: Execution) -> Execution:
    """Run env.py on the connection for this execution; raise MigrationFailed if a step fails."""
    try:
        await _run_env_where_it_can(connection, execution)
    except MigrateJobError:
        await connection.rollback()
        raise
    except Exception as exc:
        await connection.rollback()
        error = _failure(execution, exc)
        if execution.recorder is not None and execution.running is not None:
            await execution.recorder.record_failure(connection, execution.running.revision, error)
        raise error from exc
    if execution.apply:
        await connection.commit()
    else:
        await connection.rollback()
    return execution


async def _run_env_where_it_can(connection: AsyncConnection, execution: Execution) -> None:
    """Run env.py on the job's connection; if it calls asyncio.run, in a thread with no loop."""
    own_loop = False
    with warnings.catch_warnings():
        # The async template's coroutine, never awaited when asyncio.run refuses to nest.
        warnings.simplefilter("ignore", RuntimeWarning)
        try:
            await connection.run_sync(_run_env, execution)
        except RuntimeError as exc:
            if execution.plan is not None or "running event loop" not in str(exc):
                raise
            own_loop = True
    if own_loop:
        # Alembic's async template ignores config.attributes and runs asyncio.run itself.
        await asyncio.to_thread(_run_env, None, execution)


def _run_env(connection: Connection | None, execution: Execution) -> None:
    """Run the service's env.py with the execution as its ``fn``, whatever shape env.py has.

    The cookbook shape takes the live connection from ``config.attributes``; the templates build
    their own engine from ``sqlalchemy.url`` or ``DATABASE_URL``, and that engine's connections
    log in as the job's own do (envpy.EnvConnections).
    """
    from job import (
        batching,  # noqa: F401 (registers its Alembic impl before env.py configures one)
        envpy,
    )

    service = execution.service
    config = service.config()
    if connection is not None:
        config.attributes["connection"] = connection
    with (
        envpy.handing_url(config, execution.target.url.render_as_string(hide_password=False)),
        envpy.EnvConnections(execution.target),
        envpy.job_owns_logging(),
        logs.scoped(**execution.target.fields()),
        _batching_ends(connection),
        envpy.environment_context(
            config,
            service.script,
            execution.known_heads,
            (execution.version_table, execution.version_schema),
            fn=execution,
            dont_mutate=not execution.apply,
        ),
    ):
        service.script.run_env()


@contextlib.contextmanager
def _batching_ends(connection: Connection | None) -> Iterator[None]:
    """Stop batching on the connection when env.py is done (the next pass starts its own)."""
    from job import batching

    try:
        yield
    finally:
        if connection is not None:
            batching.stop(connection)


def offline_target(service: Service) -> Target:
    """Return a target that reaches no server, for SQL that is only rendered (show, lint)."""
    from sqlalchemy.engine import URL

    from job.manifest import DatabaseEntry

    entry = DatabaseEntry(service=service.name, database="offline", url="offline")
    return db.Target(entry, URL.create(db.DRIVER, database="offline"))


def render_sql(execution: Execution, start: tuple[str, ...]) -> str:
    """Return the SQL the execution's plan would run from start, rendered offline (no database)."""
    import io

    from alembic.runtime.environment import EnvironmentContext

    from job import envpy

    service = execution.service
    config = service.config()
    url = execution.target.url.set(password=None).render_as_string(hide_password=False)
    buffer = io.StringIO()
    config.output_buffer = buffer
    starting = start[0] if len(start) == 1 else None
    if len(start) > 1:
        raise ConfigError(
            f"service {service.name}: offline SQL from several heads ({'+'.join(start)}) is not supported",
            hint="render from one revision with --from",
            service=service.name,
        )
    try:
        with (
            envpy.handing_url(config, url),
            envpy.job_owns_logging(),
            EnvironmentContext(
                config,
                service.script,
                fn=execution,
                as_sql=True,
                starting_rev=starting,
                destination_rev=execution.destination,
            ),
        ):
            service.script.run_env()
    except MigrateJobError:
        raise
    except Exception as exc:
        raise _failure(execution, exc) from exc
    return buffer.getvalue()


def revision_code_file(service: Service, revision: str) -> str | None:
    """Return the file name the revision's code objects carry (what a frame walk compares), if loaded."""
    try:
        script = service.script.get_revision(revision)
        return str(script.module.upgrade.__code__.co_filename) if script is not None else None
    except Exception:
        return None  # not a plain revision module: lines are then not named


def _failure(execution: Execution, exc: BaseException) -> MigrationFailed:
    """Return the operator-facing error for an exception raised while env.py ran."""
    from job import diagnosis

    target = execution.target
    step = execution.running
    found = diagnosis.report(
        exc,
        revision_code_file(execution.service, step.revision) if step is not None else None,
        execution.service.path,
        log_detail=target.entry.log_detail,
    )
    reason = logs.scrub(found.reason)
    stays = execution.revision_now or "base"
    if step is None:
        failed = MigrationFailed(
            f"env.py of service {target.service} failed on database {target.database}: {reason}",
            hint=f"fix services/{target.service}/migrations/env.py; the database is unchanged",
            service=target.service,
            database=target.database,
        )
        failed.stack_trace = _trace(found.stack_trace)
        return failed
    # What stays after the failure, and what to do, by how the revision treats its transaction.
    outcomes = {
        # The helpers commit their steps as they go and check the catalog before each: running the
        # revision again picks up where it stopped, so a lock timeout stays retryable.
        "job.ops": (
            "its transaction rolled back, and any step its job.ops helpers committed on their own stays",
            "fix the cause and run again: the job.ops helpers pick up where they stopped (an INVALID "
            "index left by a killed build is dropped and built again)",
            True,
        ),
        # Work done in autocommit_block() is not undone: a failed CREATE INDEX CONCURRENTLY leaves an
        # INVALID index, and running the revision again would fail on it.
        "autocommit_block": (
            "it runs outside a transaction (autocommit_block), so part of it may have been done",
            "look for INVALID indexes (SELECT indexrelid::regclass FROM pg_index WHERE NOT indisvalid), "
            "drop them with DROP INDEX CONCURRENTLY, then run again",
            False,
        ),
        None: ("its transaction rolled back", "fix the migration in a new image and run again", True),
    }
    stayed, todo, retryable = outcomes[outside_transaction(execution.service, step.revision)]
    sentence = f". {logs.scrub(found.sentence[0].upper() + found.sentence[1:])}" if found.sentence else ""
    error = MigrationFailed(
        f"migration {step.revision} ({step.message}) failed on database {target.database} of "
        f"service {target.service}: {reason}; {stayed}{sentence}",
        hint=f"the database stays at {stays}; {todo}",
        service=target.service,
        database=target.database,
        revision=step.revision,
        at_revision=stays,
        sqlstate=db.sqlstate(exc),
        **{k: logs.scrub(v) if isinstance(v, str) else v for k, v in found.fields.items()},
        **({} if retryable else {"retryable": False}),
    )
    error.stack_trace = _trace(found.stack_trace)
    error.statement_line = logs.scrub(found.statement_line) if found.statement_line else None
    return error


def _trace(stack_trace: str | None) -> str | None:
    """Return the revision's stack trace for the error line, scrubbed (None: the job's whole trace)."""
    return logs.scrub(stack_trace) if stack_trace is not None else None
