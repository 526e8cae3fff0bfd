"""Command line: parse arguments, run a command, and map its outcome to an exit code (here only)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

from job import logs, version
from job.errors import (
    ConfigError,
    ConnectError,
    DriftFound,
    HistoryError,
    Interrupted,
    LintFindings,
    LockTimeout,
    MigrateJobError,
    MigrationFailed,
    PendingMigrations,
    SecretError,
)
from job.parser import build_parser
from job.report import RunReport

if TYPE_CHECKING:
    from pydantic import ValidationError

    from job.run import Run

EXIT_CODES: dict[type[MigrateJobError], int] = {
    ConfigError: 2,
    SecretError: 3,
    ConnectError: 4,
    LockTimeout: 5,
    HistoryError: 6,
    MigrationFailed: 7,
    DriftFound: 8,
    LintFindings: 9,
    PendingMigrations: 10,
}
# Failures whose stack trace helps: a bug in the job, or a migration that raised.
TRACED = {1, 7}
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}
OFFLINE_COMMANDS = {"heads", "history", "show", "revision", "merge", "lint", "new-service", "verify", "trace"}


def exit_code(exc: BaseException) -> int:
    """Return the exit code for an exception that ended the run."""
    if isinstance(exc, Interrupted):
        return 128 + exc.signum
    if isinstance(exc, KeyboardInterrupt):
        return 130
    for cls in type(exc).__mro__:
        if cls in EXIT_CODES:
            return EXIT_CODES[cls]  # type: ignore[index]
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return the process exit code."""
    args = build_parser().parse_args(argv)
    args.command = args.command or "upgrade"
    # Hold SIGTERM and SIGINT until the event loop turns them into a clean cancel (_dispatch):
    # raised from a plain handler at an arbitrary point (an import, logging set-up), they can be
    # swallowed or mistaken for a bug. PID 1 in a container has no default SIGTERM action anyway.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    report = RunReport(args.command)
    code = 0
    try:
        run = _prepare(args, report)
        command = _command(args)  # imports the commands while signals still wait
        # A signal that arrived during start-up stops the run here, before anything is touched.
        for signum in sorted(STOP_SIGNALS & signal.sigpending())[:1]:
            raise _signalled(signum)
        asyncio.run(_dispatch(args, run, command))
    except BaseException as exc:  # every ending, even a bug, gets its error line and summary
        code = exit_code(exc)
        _log_error(exc, code)
    finally:
        # The outcome is decided: a signal now must not turn it into a death by signal.
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        report.log_summary(code)
        logging.shutdown()
    return code


def entry() -> None:
    """Run the command line as a process (``migrate-job``, ``python -m job``) and end it at once.

    By the time main returns, the summary is written and every connection, worker and thread the
    run started is closed. What is left is the interpreter's own teardown of some thousand modules,
    0.1 to 0.3 s that Cloud Run would bill to every execution and task: os._exit skips it.
    """
    code = main()
    for stream in (sys.stdout, sys.stderr):
        # A closed or broken pipe: nothing more can be said there.
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)


def _setting_error(exc: ValidationError) -> ConfigError:
    """Return the error for an environment variable that does not parse, naming the variable."""
    err = exc.errors()[0]
    prefix = "CLOUD_RUN_" if exc.title == "CloudRun" else "MIGRATE_"
    name = prefix + str(err["loc"][0]).upper() if err["loc"] else prefix + "*"
    return ConfigError(
        f"invalid {name}: {err['msg']}",
        hint=f"fix or unset {name} (see the settings table in the README)",
    )


def _prepare(args: argparse.Namespace, report: RunReport) -> Run:
    """Read settings, set up logging and load the manifest; return the run."""
    from pydantic import ValidationError

    from job.run import prepare
    from job.settings import CloudRun, Settings

    try:
        settings = Settings()
        cloud_run = CloudRun()
    except ValidationError as exc:
        logs.setup("auto")
        raise _setting_error(exc) from None
    labels = {k: str(v) for k, v in cloud_run.fields().items()}
    logs.setup(settings.log_format, labels=labels)
    logs.bind(command=args.command, **cloud_run.fields())
    run = prepare(report, settings, cloud_run, services=args.service, databases=args.database, jobs=args.jobs)
    logs.event(
        "run.start",
        f"migrate-job {args.command} on {len(run.entries)} database(s) of {run.manifest.path.name}",
        env=settings.env,
        manifest=str(run.manifest.path),
        database_count=len(run.entries),
        to_discover=len(run.undiscovered) or None,
        version=version(),
        image=settings.image,
        image_revision=settings.image_revision,
    )
    return run


def _reads_manifest_databases(args: argparse.Namespace) -> bool:
    """Return whether the command works on the manifest's databases (so discover entries are listed)."""
    if getattr(args, "applied", False):
        return True
    if getattr(args, "impact", False):
        return True  # plan --impact reads every selected database, besides its scratch database
    return args.command not in OFFLINE_COMMANDS and not getattr(args, "scratch", None)


def _signalled(signum: int) -> Interrupted:
    """Log that a stop signal arrived; return the error that ends the run."""
    logs.event("run.signal", f"received signal {signum}; stopping", level=logging.WARNING, signal=signum)
    return Interrupted(signum)


async def _dispatch(
    args: argparse.Namespace, run: Run, command: Callable[[Run], Awaitable[None] | None]
) -> None:
    """Run the chosen command; SIGTERM or SIGINT cancels it and ends the run as Interrupted."""
    from job.run import discover_databases

    received: list[int] = []
    task = asyncio.current_task()
    assert task is not None

    def stop(signum: int) -> None:
        # Cancelling the task interrupts the running statement: asyncpg asks the server to
        # cancel it, so the migration's transaction rolls back, then the connection closes.
        if not received:
            received.append(signum)
            _signalled(signum)
            task.cancel()

    loop = asyncio.get_running_loop()
    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, stop, signum)
    # A signal that arrived while blocked is delivered now, to the handler above.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    try:
        # Commands that read only the scripts or a scratch database never list the manifest's.
        if _reads_manifest_databases(args):
            await discover_databases(run)
        outcome = command(run)
        if outcome is not None:
            await outcome
    except asyncio.CancelledError:
        if received:
            raise Interrupted(received[0]) from None
        raise
    finally:
        # Before asyncio.run closes the loop, which puts back the default (deadly) handlers.
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)


def _command(args: argparse.Namespace) -> Callable[[Run], Awaitable[None] | None]:
    """Return the command function that args choose, bound to its arguments."""
    from job import commands

    table: dict[str, Callable[[Run], Awaitable[None] | None]] = {
        "upgrade": lambda run: commands.upgrade(
            run, to=args.to, allow_ahead=args.allow_ahead, canary=args.canary
        ),
        "plan": lambda run: commands.plan(
            run,
            check=args.check,
            to=args.to,
            allow_ahead=args.allow_ahead,
            impact=args.impact,
            scratch=args.scratch,
        ),
        "current": lambda run: commands.current(run, allow_ahead=args.allow_ahead),
        "downgrade": lambda run: commands.downgrade(run, args.to, yes=args.yes),
        "stamp": lambda run: commands.stamp(run, args.revision, yes=args.yes),
        "acknowledge": lambda run: commands.acknowledge(run, args.revisions, yes=args.yes),
        "heads": commands.heads,
        "history": lambda run: (
            commands.applied_history(run) if args.applied else commands.history(run, verbose=args.verbose)
        ),
        "sql": lambda run: commands.sql(run, start=args.start, to=args.to, output=args.output),
        "lint": lambda run: commands.lint(run, start=args.start, to=args.to, fail_on=args.fail_on),
        "verify": lambda run: commands.verify(run, args.scratch),
        "check": lambda run: commands.check(run, args.scratch),
        "trace": lambda run: commands.trace(
            run, args.scratch, start=args.start, to=args.to, fail_on=args.fail_on, output=args.output
        ),
        "revision": lambda run: commands.revision(
            run, args.message, autogenerate=args.autogenerate, scratch=args.scratch
        ),
        "new-service": lambda run: commands.new_service(run, args.name),
        "show": lambda run: commands.show(run, args.revision),
        "merge": lambda run: commands.merge(run, args.message),
        "reset": lambda run: commands.reset(run, yes=args.yes),
    }
    return table[args.command]


def _log_error(exc: BaseException, code: int) -> None:
    """Write the one error line for the exception that ended the run."""
    if isinstance(exc, MigrateJobError):
        message, fields = exc.message, exc.fields()
    elif isinstance(exc, KeyboardInterrupt):
        message, fields = "interrupted", {"error": "interrupted"}
    else:
        message = f"unexpected error (a bug in migrate-job): {type(exc).__name__}: {exc}"
        fields = {"error": "bug", "hint": "report it with this line's stack_trace"}
    level = logging.WARNING if code == 10 else logging.ERROR
    # A failed revision shows its own frames (or none), not the job's: it is not a bug in the job.
    own = getattr(exc, "stack_trace", None)
    logs.event(
        "run.error",
        logs.scrub(message),
        level=level,
        exc=exc if code in TRACED and own is None else None,
        exit_code=code,
        **fields,
        stack_trace=own or None,
    )


if __name__ == "__main__":
    sys.exit(main())
