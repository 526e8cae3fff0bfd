"""The command line's grammar: every command, its flags and their help (job/cli.py runs them)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

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
