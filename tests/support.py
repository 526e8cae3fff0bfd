"""Helpers shared by the tests: test passwords, manifests, and running the job as a process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from devtools.warmjob import WarmServer

REPO = Path(__file__).resolve().parent.parent
SERVICES_DIR = REPO / "services"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
# Set it to start every job process as a fresh interpreter (devtools.warmjob explains the default).
COLD_START = "MIGRATE_TEST_COLD_START"
PROJECT = "fusion-prime-test"
# Every character that broke the shell script: a password must survive all of them.
PASSWORD = "p@ss:/#?%<>&()' w0rd"
# The access tokens the fake metadata server hands out (devtools.metadata_server), as the job's IAM
# login's password: first one, then the other after a rotation.
TOKENS = (
    "ya29.c.c0ASRK0Gtest-iam-token-one_a1B2c3D4e5F6g7H8i9J0",
    "ya29.c.c0ASRK0Gtest-iam-token-two_z9Y8x7W6v5U4t3S2r1Q0",
)
# The job's service account in the tests, and its IAM database user (the email less its domain).
SERVICE_ACCOUNT = f"migrate-job@{PROJECT}.iam.gserviceaccount.com"
IAM_USER = f"migrate-job@{PROJECT}.iam"
# Every test password and token, so that a test can prove none of them reaches any output.
ALL_PASSWORDS = (PASSWORD, "wr0ng:/#?%<>&()' pass", *TOKENS)
# A DATABASE_URL left in the job's environment by whatever ran before: the job must never use it.
STALE_DATABASE_URL = "postgresql://wrong:wrong@127.0.0.1:1/wrong"
HEADS = {"settlement": "b277be36eb38", "risk-engine": "9da4646821fb", "compliance": "3ae732a7860c"}
TABLES = {
    "settlement": {"settlement_commands", "webhook_subscriptions", "escrows"},
    "risk-engine": {"escrows"},
    "compliance": {
        "kyc_cases",
        "aml_alerts",
        "sanctions_checks",
        "compliance_cases",
        "compliance_checks",
        "watchlist_entries",
    },
}


def spellings(secret: str) -> set[str]:
    """Return how a secret could show in output: as is, or URL-quoted (fully, as SQLAlchemy renders it)."""
    quoted = {urllib.parse.quote(secret, safe=""), urllib.parse.quote(secret, safe=" +")}
    return {secret, *quoted, *(q.replace("%", "%%") for q in quoted)}


def scratch_url(pg: Any, database: str = "postgres") -> str:
    """Return a scratch URL for the test server, saying that it has no TLS (PgServer.scratch_url)."""
    return str(pg.scratch_url(database))


def toml_value(value: Any) -> str:
    """Return value as TOML (JSON string escapes are valid TOML basic-string escapes)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


def write_manifest(path: Path, databases: list[dict[str, Any]], **top: Any) -> Path:
    """Write a manifest file with the given top-level keys and [[databases]] entries."""
    lines = [f"{k} = {toml_value(v)}" for k, v in top.items()]
    for entry in databases:
        lines.append("\n[[databases]]")
        lines.extend(f"{k} = {toml_value(v)}" for k, v in entry.items())
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@dataclass
class JobRun:
    """A finished run of the job as a process."""

    code: int
    stdout: str
    stderr: str

    @property
    def lines(self) -> list[dict[str, Any]]:
        """Return stdout parsed as one JSON object per line (fails on any other line)."""
        return [json.loads(line) for line in self.stdout.splitlines() if line.strip()]

    def events(self, name: str) -> list[dict[str, Any]]:
        """Return the log lines with this event name."""
        return [line for line in self.lines if line.get("event") == name]

    @property
    def summary(self) -> dict[str, Any]:
        """Return the run.summary line, which must be the last."""
        last = self.lines[-1]
        assert last["event"] == "run.summary", last
        return last

    def by_database(self) -> dict[str, dict[str, Any]]:
        """Return the summary's per-database entries by database name."""
        return {d["database"]: d for d in self.summary["databases"]}


def job_environment(env: dict[str, str]) -> dict[str, str]:
    """Return the environment of a job process: the parent's less MIGRATE_/CLOUD_RUN_, plus env."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MIGRATE_", "CLOUD_RUN_"))}
    base.update({"MIGRATE_LOG_FORMAT": "json", "MIGRATE_CONNECT_TIMEOUT_S": "3"})
    base.update(env)
    return base


_warm: WarmServer | None = None


def start_job(
    *args: str,
    env: dict[str, str],
    stdout: IO[Any] | None = None,
    stderr: IO[Any] | None = None,
    cold: bool = False,
) -> Any:
    """Start ``python -m job ARGS`` as a process (forked warm, see devtools.warmjob); return it.

    The result has subprocess.Popen's pid, stdout, stderr, poll, wait, send_signal, kill and
    communicate. cold, or MIGRATE_TEST_COLD_START=1 for every job, starts a fresh interpreter.
    """
    global _warm
    full = job_environment(env)
    if cold or os.environ.get(COLD_START):
        return subprocess.Popen(
            [sys.executable, "-m", "job", *args],
            env=full,
            cwd=REPO,
            stdout=stdout or subprocess.PIPE,
            stderr=stderr or subprocess.PIPE,
            text=stdout is None,
        )
    if _warm is None:
        _warm = WarmServer()
    return _warm.start(list(args), env=full, cwd=REPO, stdout=stdout, stderr=stderr)


def stop_warm_server() -> None:
    """Stop the session's warm job server, if one was started."""
    if _warm is not None:
        _warm.stop()


def run_job(*args: str, env: dict[str, str], timeout: float = 120, cold: bool = False) -> JobRun:
    """Run ``python -m job ARGS`` as Cloud Run would, with only the given environment added."""
    proc = start_job(*args, env=env, cold=cold)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    record_output(stdout + stderr)
    return JobRun(proc.returncode, stdout, stderr)


def run_script(dsn: str, sql: str) -> None:
    """Run a rendered SQL script statement by statement on one session, as ``psql -f`` does.

    Sent as one query, a script runs in one implicit transaction, where CREATE INDEX CONCURRENTLY
    and a DO block that commits cannot run.
    """
    import asyncio

    import asyncpg

    from job.lint import statements

    async def run() -> None:
        connection = await asyncpg.connect(dsn)
        try:
            for _, _, statement in statements(sql):
                await connection.execute(statement)
        finally:
            await connection.close()

    asyncio.run(run())


# Set by conftest for the session: every child process's output is appended here.
OUTPUT_LOG: Path | None = None


def record_output(text: str) -> None:
    """Append a process's output to the session's log, which the leak check scans at the end."""
    if OUTPUT_LOG is not None:
        with OUTPUT_LOG.open("a", encoding="utf-8") as fh:
            fh.write(text)
