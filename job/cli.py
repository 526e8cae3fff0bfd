"""Command line: parse arguments, run a command, and map its outcome to an exit code (here only)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

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

DESCRIPTION = """\
Upgrade every database of an environment manifest with its service's Alembic migrations.
With no command, runs `upgrade`: this is what the Cloud Run job executes.

exit codes: 0 done, 1 bug, 2 usage/configuration, 3 secret unreadable, 4 database unreachable or
login refused, 5 lock held too long, 6 invalid history, 7 migration failed (rolled back),
8 drift between models and migrations (check), 9 findings (lint, trace),
10 pending migrations (plan --check), 130/143 interrupted.
"""


ALLOW_AHEAD_HELP = "skip, with a warning, a database at a revision this image does not know (else exit 6)"
SCRATCH_HELP = "secret reference to a URL whose role may CREATE DATABASE, e.g. env://SCRATCH_URL"


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser for every command."""
    parser = argparse.ArgumentParser(
        prog="migrate-job",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(command="upgrade", to="head", check=False, allow_ahead=False, canary=None)
    _add_selectors(parser, default=[])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    # On a subcommand, SUPPRESS keeps selectors given before the command name.
    selectors = argparse.ArgumentParser(add_help=False)
    _add_selectors(selectors, default=argparse.SUPPRESS)
    up = sub.add_parser("upgrade", parents=[selectors], help="apply pending migrations (default)")
    up.add_argument("--to", default="head", metavar="REV", help="target revision (default: head)")
    up.add_argument("--allow-ahead", action="store_true", help=ALLOW_AHEAD_HELP)
    up.add_argument(
        "--canary",
        type=_positive,
        metavar="N",
        help="migrate the first N databases with work alone, the rest only if all N succeeded "
        "(instead of the manifest entries' canary)",
    )
    plan = sub.add_parser("plan", parents=[selectors], help="show what upgrade would apply, read-only")
    plan.add_argument("--to", default="head", metavar="REV", help="target revision (default: head)")
    plan.add_argument("--allow-ahead", action="store_true", help=ALLOW_AHEAD_HELP)
    plan.add_argument("--check", action="store_true", help="exit 10 if any database has migrations to apply")
    plan.add_argument(
        "--impact",
        action="store_true",
        help="trace the pending revisions on a scratch database (--scratch) and weigh their locks against "
        "each database's tables (db.impact lines), read-only",
    )
    plan.add_argument("--scratch", metavar="REF", help="with --impact: " + SCRATCH_HELP)
    down = sub.add_parser(
        "downgrade", parents=[selectors], help="undo revisions down to --to (refused where not allowed)"
    )
    down.add_argument("--to", required=True, metavar="REV", help="a revision, -N or base")
    down.add_argument("--yes", action="store_true", help="confirm: downgrades may drop data")
    st = sub.add_parser("stamp", parents=[selectors], help="record a revision without running migrations")
    st.add_argument("revision", metavar="REV", help="a revision, head or base")
    st.add_argument("--yes", action="store_true", help="confirm")
    sq = sub.add_parser("sql", parents=[selectors], help="print the SQL upgrade would run, for review")
    sq.add_argument(
        "--from", dest="start", metavar="REV", help="render from REV (or base) without connecting"
    )
    sq.add_argument("--to", default="head", metavar="REV", help="target revision (default: head)")
    sq.add_argument("--output", type=Path, metavar="DIR", help="write <service>__<database>.sql files here")
    ver = sub.add_parser(
        "verify",
        parents=[selectors],
        help="check every revision round-trips (up, down, up) on a scratch database",
    )
    ver.add_argument(
        "--scratch",
        required=True,
        metavar="REF",
        help="secret reference to a URL whose role may CREATE DATABASE, e.g. env://VERIFY_URL",
    )
    rev = sub.add_parser(
        "revision", parents=[selectors], help="write a new revision file for one --service (local authoring)"
    )
    rev.add_argument("-m", "--message", required=True, help="what the revision does")
    rev.add_argument(
        "--autogenerate", action="store_true", help="compare models.py with a scratch database at head"
    )
    rev.add_argument(
        "--scratch", metavar="REF", help="with --autogenerate: URL reference whose role may CREATE DATABASE"
    )
    cur = sub.add_parser("current", parents=[selectors], help="show each database's revision, read-only")
    cur.add_argument("--allow-ahead", action="store_true", help=ALLOW_AHEAD_HELP)
    sub.add_parser("heads", parents=[selectors], help="show each service's head revision (no database)")
    hist = sub.add_parser("history", parents=[selectors], help="list each service's revisions (no database)")
    hist.add_argument("--verbose", action="store_true", help="also the file and branch labels")
    hist.add_argument(
        "--applied",
        action="store_true",
        help="each database's migrate_job_history: what was applied, when, by which execution and image",
    )
    ack = sub.add_parser(
        "acknowledge",
        parents=[selectors],
        help="accept edited applied revisions as they are now (recorded in migrate_job_history)",
    )
    ack.add_argument("revisions", nargs="+", metavar="REV", help="the edited revision(s)")
    ack.add_argument("--yes", action="store_true", help="confirm")
    _add_guardrails(sub, selectors)
    return parser


def _add_guardrails(sub: argparse._SubParsersAction[Any], selectors: argparse.ArgumentParser) -> None:
    """Add the commands for migration authors: check, lint, show, merge, reset, new-service."""
    chk = sub.add_parser(
        "check", parents=[selectors], help="compare models.py with a database at head (exit 8 on drift)"
    )
    chk.add_argument(
        "--scratch",
        metavar="REF",
        help="upgrade a scratch database per service and compare it (a URL reference whose role may "
        "CREATE DATABASE); without it, the manifest's databases are compared read-only",
    )
    lnt = sub.add_parser(
        "lint",
        parents=[selectors],
        help="lint each revision's SQL with squawk (exit 9 on findings); trace is the judge that reads "
        "PostgreSQL, not the SQL text",
        description="Lint each revision's SQL, rendered offline, with squawk. It reads the SQL text: it "
        "cannot see SQL built in Python or inside a DO block, nor tell a type change that rewrites the "
        "table from one that does not. `migrate-job trace --scratch REF` runs the revisions on a scratch "
        "database and reads what PostgreSQL did (locks, rewrites, full scans): the judge.",
    )
    lnt.add_argument(
        "--from", dest="start", default="base", metavar="REV", help="first revision's parent (default: base)"
    )
    lnt.add_argument("--to", default="head", metavar="REV", help="last revision (default: head)")
    _add_fail_on(lnt)
    _add_trace(sub, selectors)
    show = sub.add_parser(
        "show", parents=[selectors], help="show one revision: parents, file, docstring, its SQL (no database)"
    )
    show.add_argument("revision", metavar="REV", help="a revision id (or unique prefix), head or base")
    mrg = sub.add_parser(
        "merge", parents=[selectors], help="write a revision merging one --service's heads (local authoring)"
    )
    mrg.add_argument("-m", "--message", default="merge heads", help="what the merge revision says")
    rst = sub.add_parser(
        "reset",
        parents=[selectors],
        help="drop, recreate and upgrade each selected database (development only; needs --yes)",
    )
    rst.add_argument("--yes", action="store_true", help="confirm: every selected database loses its data")
    new = sub.add_parser(
        "new-service", help="write services/NAME/ from the blessed template (local authoring)"
    )
    new.add_argument("name", metavar="NAME", help="the service's folder name, e.g. ledger or risk-engine")


def _add_trace(sub: argparse._SubParsersAction[Any], selectors: argparse.ArgumentParser) -> None:
    """Add trace: each revision run on a scratch database, what PostgreSQL locked, rewrote and scanned."""
    trc = sub.add_parser(
        "trace",
        parents=[selectors],
        help="run each revision on a scratch database and report what it locks, rewrites and scans "
        "(exit 9 on findings)",
        description="Apply each revision on a scratch database (created and dropped here) and read from "
        "PostgreSQL what it locked, rewrote and read in full. Findings: table-rewrite, scan-under-lock "
        "(docs/locks.md).",
    )
    trc.add_argument("--scratch", required=True, metavar="REF", help=SCRATCH_HELP)
    trc.add_argument("--from", dest="start", default="base", metavar="REV", help="after REV (default: base)")
    trc.add_argument("--to", default="head", metavar="REV", help="last revision (default: head)")
    _add_fail_on(trc)
    trc.add_argument("--output", type=Path, metavar="DIR", help="write trace.json and trace.md here")


def _add_fail_on(parser: argparse.ArgumentParser) -> None:
    """Add --fail-on (lint, trace)."""
    levels = ("warning", "error")
    help_text = "fail on findings at or above this level (default: warning, i.e. every finding)"
    parser.add_argument("--fail-on", choices=levels, default="warning", help=help_text)


def _add_selectors(parser: argparse.ArgumentParser, default: object) -> None:
    """Add the --service and --database selectors that every command takes."""
    parser.add_argument(
        "--service", action="append", default=default, metavar="NAME", help="only this service (repeat)"
    )
    parser.add_argument(
        "--database", action="append", default=default, metavar="NAME", help="only this database (repeat)"
    )
    parser.add_argument(
        "--jobs",
        type=_positive,
        default=1 if default == [] else default,
        metavar="N",
        help="apply up to N databases at once, each in its own worker process (default 1)",
    )


def _positive(text: str) -> int:
    """Return text as an integer of at least 1 (argparse type)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value


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
        asyncio.run(_dispatch(args, run))
    except BaseException as exc:  # every ending, even a bug, gets its error line and summary
        code = exit_code(exc)
        _log_error(exc, code)
    finally:
        # The outcome is decided: a signal now must not turn it into a death by signal.
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        report.log_summary(code)
        logging.shutdown()
    return code


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


async def _dispatch(args: argparse.Namespace, run: Run) -> None:
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
            logs.event(
                "run.signal", f"received signal {signum}; stopping", level=logging.WARNING, signal=signum
            )
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
        outcome = _command(args)(run)
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
