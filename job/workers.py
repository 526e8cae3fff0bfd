"""``--jobs N``: apply several databases at once, each in a worker process of a bounded pool.

Alembic's ``context`` and ``op`` are module-level proxies, so two migrations never share a
process: each database is applied by ``job.applying.apply`` inside one worker, exactly as the
sequential path does it (lock, re-read, one transaction per revision). Workers come from a fork
server that imported the job once, so starting one costs a fork, not an interpreter. Every log
line, from the parent or a worker, is written whole under one lock, so stdout stays one JSON
object per line. The first failure (in manifest order) ends the run: nothing new starts, the
running databases finish, and the rest are reported as skipped; an entry with ``on_failure =
"continue"`` lets its databases fail alone (job.failures decides).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import multiprocessing
import os
import signal
import sys
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TextIO

from job import logs

if TYPE_CHECKING:
    from multiprocessing.synchronize import Lock
    from pathlib import Path

    from job.db import Target
    from job.executor import Execution
    from job.failures import Failures
    from job.manifest import Manifest
    from job.plan import Direction
    from job.recorder import Identity
    from job.report import DatabaseResult
    from job.run import Run
    from job.services import Service
    from job.settings import CloudRun, Settings

# Imported once by the fork server, so that each worker starts warm and shares these pages with
# the others: everything a worker uses, the log handler and the driver included (imported in each
# worker instead, they cost some 40 MB per worker).
PRELOAD = [
    "job.workers",
    "job.applying",
    "job.run",
    "job.executor",
    "alembic.config",
    "alembic.runtime.environment",
    "alembic.script",
    "job.structured",
    "sqlalchemy.ext.asyncio",
    "sqlalchemy.dialects.postgresql.asyncpg",
    "asyncpg",
    "tenacity",
]
# A worker is replaced by a fresh fork after this many databases: what a migration leaves behind
# (env.py modules, the allocator's fragmentation; some 40 KB a database) stays bounded however
# many databases the run has, for the price of one fork per hundred databases.
TASKS_PER_WORKER = 100
# How long workers get to roll back and release their locks after the run is interrupted.
STOP_GRACE_S = 15.0


@dataclass
class Task:
    """One database to apply, with everything a worker needs to do it alone."""

    index: int
    settings: Settings
    cloud_run: CloudRun
    manifest: Manifest
    target: Target
    result: DatabaseResult
    heads: tuple[str, ...]
    destination: str
    direction: Direction
    version_table: str
    version_schema: str | None
    identity: Identity | None
    history_exists: bool


@dataclass
class Outcome:
    """What a worker did with one database, and the error that stopped it, if any."""

    index: int
    result: DatabaseResult
    error: BaseException | None


class LockedStream:
    """A stdout writer that writes each log line whole, under a lock shared by every process."""

    def __init__(self, lock: Lock, stream: TextIO) -> None:
        self.lock = lock
        self.stream = stream
        self.pending = ""

    def write(self, text: str) -> int:
        """Buffer text; write complete lines at once, under the lock."""
        self.pending += text
        if "\n" in self.pending:
            lines, _, self.pending = self.pending.rpartition("\n")
            if logs.current_setup()[0] == "text" and self.stream.isatty():
                # On a terminal, the parent's progress line may stand where this line goes.
                lines = logs.ERASE + lines
            with self.lock:
                self.stream.write(lines + "\n")
                self.stream.flush()
        return len(text)

    def flush(self) -> None:
        """Lines are flushed as they complete."""

    def isatty(self) -> bool:
        """Return whether the underlying stream is a terminal."""
        return self.stream.isatty()


# ---- in the worker --------------------------------------------------------------------------

_services: dict[str, Service] = {}


def _start_worker(lock: Lock, fmt: str, labels: dict[str, str], context: dict[str, Any]) -> None:
    """Set up a worker's logging like the parent's, writing through the shared lock."""
    # What the fork server imported stays shared only while nothing writes to its pages: frozen,
    # the garbage collector never walks (and so copies) it.
    gc.freeze()
    logs.setup(fmt, labels=labels, stream=LockedStream(lock, sys.stdout))  # type: ignore[arg-type]
    logs.bind(**context)
    # The parent handles Ctrl-C for the whole run; a worker stops when the parent says so.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _warm(services_dir: Path, names: list[str]) -> int:
    """Load the services' scripts in this worker; return its pid.

    Submitted once per worker when the pool starts, so that workers start, and read every
    revision file of the services with work, while the parent's preflight still runs: the
    first database a worker gets is then only its own work.
    """
    services = _worker_services(services_dir)
    for name in names:
        with contextlib.suppress(Exception):  # a broken history is the preflight's to report
            services[name].script.get_heads()
    return os.getpid()


def _worker_services(services_dir: Path) -> dict[str, Service]:
    """Return the services, discovered once per worker (their scripts then load once too)."""
    from job.services import discover

    if not _services:
        _services.update(discover(services_dir))
    return _services


def apply_one(task: Task) -> Outcome:
    """Apply one database in this worker; return its result and error instead of raising.

    The pool's entry point: a module-level function, so it pickles by name.
    """
    for secret in (task.target.address.password,):
        if secret:
            logs.redact(str(secret))
    return asyncio.run(_work(task))


async def _work(task: Task) -> Outcome:
    """Apply the task's database; SIGTERM cancels it (the running revision rolls back)."""
    from job.applying import apply
    from job.report import RunReport
    from job.run import Run

    current = asyncio.current_task()
    assert current is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, current.cancel)
    services = _worker_services(task.settings.services_dir)
    run = Run(task.settings, task.cloud_run, task.manifest, services, [], RunReport("worker"))
    execution = _execution(task, services[task.target.service])
    try:
        await apply(run, task.result, execution)
    except asyncio.CancelledError:
        task.result.status = "interrupted"
        return Outcome(task.index, task.result, asyncio.CancelledError())
    except BaseException as exc:
        return Outcome(task.index, task.result, _portable(exc))
    return Outcome(task.index, task.result, None)


def _execution(task: Task, service: Service) -> Execution:
    """Return the pass the parent's preflight planned, rebuilt in this process."""
    from job.executor import Execution
    from job.plan import compute_plan
    from job.recorder import Recorder

    execution = Execution(service, task.target, task.destination, direction=task.direction)
    execution.version_table, execution.version_schema = task.version_table, task.version_schema
    execution.plan = compute_plan(service, task.heads, task.destination, task.direction)
    execution.history_exists = task.history_exists
    if task.identity is not None:
        # The worker writes the same migrate_job_history rows as the sequential path would.
        execution.recorder = Recorder(service, task.identity, task.direction)
    return execution


def _portable(exc: BaseException) -> BaseException:
    """Return an exception that survives pickling, with the traceback text kept for the log."""
    import pickle
    import traceback

    from job.errors import MigrateJobError

    try:
        pickle.loads(pickle.dumps(exc))
        portable = exc
    except Exception:
        portable = RuntimeError(f"{type(exc).__name__}: {exc}")
    if not isinstance(exc, MigrateJobError):
        portable.__notes__ = ["".join(traceback.format_exception(exc))]  # type: ignore[attr-defined]
    return portable


# ---- in the parent --------------------------------------------------------------------------


def _context() -> multiprocessing.context.ForkServerContext:
    """Return the fork-server context, with the job's modules preloaded into the server."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    return context


@contextlib.contextmanager
def _parent_lines(lock: Lock) -> Iterator[None]:
    """Make the parent's own log lines go through the shared lock too."""
    handlers = [h for h in logging.getLogger().handlers if isinstance(h, logging.StreamHandler)]
    saved = [h.stream for h in handlers]
    for handler in handlers:
        handler.setStream(LockedStream(lock, handler.stream))  # type: ignore[arg-type]
    try:
        yield
    finally:
        for handler, stream in zip(handlers, saved, strict=True):
            handler.setStream(stream)


class Pool:
    """The bounded pool of worker processes for one run, started once the preflight found work."""

    def __init__(self, run: Run, size: int) -> None:
        context = _context()
        self.lock = context.Lock()
        self.size = size
        fmt, labels = logs.current_setup()
        self.executor = ProcessPoolExecutor(
            max_workers=size,
            mp_context=context,
            max_tasks_per_child=TASKS_PER_WORKER,
            initializer=_start_worker,
            initargs=(self.lock, fmt, labels, dict(logs.context())),
        )
        self.run = run
        # A task carries the manifest's settings, not its databases: pickled into every task, a
        # thousand entries would travel to a worker (and be built again there) once per database.
        self.manifest = run.manifest.model_copy(update={"databases": ()})
        self.used = False
        # Start every worker now, in parallel, rather than one at a time as tasks arrive.
        names = [s.name for s in run.selected_services]
        for _ in range(size):
            self.executor.submit(_warm, run.settings.services_dir, names)

    def close(self) -> None:
        """Stop the workers (each finished or stopped already).

        A pool that got no database (nothing pending) is not waited for: its workers may still be
        starting, and a no-op run must not pay for them.
        """
        if not self.used:
            self._signal(signal.SIGKILL)
        self.executor.shutdown(wait=self.used, cancel_futures=True)

    async def apply(self, work: list[tuple[DatabaseResult, Execution]], failures: Failures) -> None:
        """Apply every database of work, at most size at once; raise what stops the run.

        A failure the manifest tolerates (on_failure = "continue") is only recorded in failures;
        any other stops new work, and the first such failure in manifest order is raised.
        """
        tasks = [self._task(i, result, execution) for i, (result, execution) in enumerate(work)]
        self.used = self.used or bool(tasks)
        queue = list(reversed(tasks))
        running: dict[asyncio.Future[Outcome], Task] = {}
        fatal: list[Outcome] = []
        with _parent_lines(self.lock):
            try:
                while queue or running:
                    while queue and len(running) < self.size and not failures.stopped:
                        task = queue.pop()
                        if not await failures.may_start(work[task.index][1].target.entry):
                            break
                        running[asyncio.wrap_future(self.executor.submit(apply_one, task))] = task
                    if not running:
                        break
                    done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                    for future in done:
                        del running[future]
                        fatal += await self._collect(work, future.result(), failures)
            except asyncio.CancelledError:
                await self._stop(work, running)
                raise
        if fatal:
            raise min(fatal, key=lambda o: o.index).error  # type: ignore[misc]
        if failures.stopped:
            raise failures.error() or RuntimeError("the run stopped without an error")

    def _task(self, index: int, result: DatabaseResult, execution: Execution) -> Task:
        """Return the worker's task for one planned database."""
        assert execution.plan is not None
        run = self.run
        return Task(
            index=index,
            settings=run.settings,
            cloud_run=run.cloud_run,
            manifest=self.manifest,
            target=execution.target,
            result=result,
            heads=execution.plan.current,
            destination=execution.destination,
            direction=execution.direction,
            version_table=execution.version_table,
            version_schema=execution.version_schema,
            identity=execution.recorder.identity if execution.recorder else None,
            history_exists=execution.history_exists,
        )

    async def _collect(
        self, work: list[tuple[DatabaseResult, Execution]], outcome: Outcome, failures: Failures | None
    ) -> list[Outcome]:
        """Copy a worker's result into the run's report; return it if it failed not as a database's own."""
        result, execution = work[outcome.index]
        vars(result).update(vars(outcome.result))
        result.finish(execution.target, "current")
        if outcome.error is None or failures is None:
            return []
        await failures.settle(execution.target.entry, outcome.error, result)
        return [] if failures.own(outcome.error) else [outcome]

    async def _stop(
        self, work: list[tuple[DatabaseResult, Execution]], running: dict[asyncio.Future[Outcome], Task]
    ) -> None:
        """Tell running workers to stop (their revision rolls back), and wait for them."""
        self._signal(signal.SIGTERM)
        if not running:
            return
        done, _ = await asyncio.wait(running, timeout=STOP_GRACE_S)
        for future in done:
            with contextlib.suppress(Exception):
                await self._collect(work, future.result(), None)

    def _signal(self, signum: int) -> None:
        """Send a signal to every worker process the pool has started."""
        for pid in list(getattr(self.executor, "_processes", {}) or {}):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)


def pool_for(run: Run, databases: int) -> Pool | None:
    """Return a pool when the run asks for --jobs above 1 and has several databases."""
    size = min(run.jobs, databases)
    return Pool(run, size) if size > 1 else None
