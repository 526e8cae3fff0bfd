"""The command line: argument parsing, and the one mapping from outcomes to exit codes."""

from __future__ import annotations

import subprocess
import sys

import pytest

from job import cli
from job.errors import (
    ConfigError,
    ConnectError,
    HistoryError,
    Interrupted,
    LockTimeout,
    MigrationFailed,
    PendingMigrations,
    SecretError,
)
from tests.support import REPO


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (ConfigError("x"), 2),
        (SecretError("x"), 3),
        (ConnectError("x"), 4),
        (LockTimeout("x"), 5),
        (HistoryError("x"), 6),
        (MigrationFailed("x"), 7),
        (PendingMigrations("x"), 10),
        (Interrupted(2), 130),
        (Interrupted(15), 143),
        (KeyboardInterrupt(), 130),
        (RuntimeError("a bug"), 1),
    ],
)
def test_exit_codes_follow_the_design_contract(error: BaseException, code: int) -> None:
    """Cloud Run, Cloud Build and release pipelines branch on these numbers: they must not drift."""
    assert cli.exit_code(error) == code


def test_no_command_means_upgrade_and_selectors_go_anywhere() -> None:
    """Cloud Run runs the image with no arguments; selectors work before or after the command."""
    parser = cli.build_parser()
    bare = parser.parse_args([])
    assert bare.command is None and bare.to == "head" and bare.service == []
    before = parser.parse_args(["--service", "settlement", "plan", "--database", "a"])
    assert before.command == "plan" and before.service == ["settlement"] and before.database == ["a"]
    after = parser.parse_args(["plan", "--check", "--service", "a", "--service", "b"])
    assert after.check and after.service == ["a", "b"]


def test_unknown_flag_is_a_usage_error() -> None:
    """argparse's own usage errors are exit 2 too."""
    with pytest.raises(SystemExit) as caught:
        cli.build_parser().parse_args(["plan", "--nope"])
    assert caught.value.code == 2


def test_help_is_fast_and_imports_no_heavy_library() -> None:
    """--help must not pay for SQLAlchemy, asyncpg or the Google clients."""
    code = (
        "import sys, contextlib, io\n"
        "from job import cli\n"
        "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "    cli.main(['--help'])\n"
        "heavy = [m for m in ('sqlalchemy', 'asyncpg', 'google.cloud.secretmanager', "
        "'google.cloud.logging_v2', 'alembic') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == ""
