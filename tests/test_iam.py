"""Cloud SQL IAM database login (job/iam.py) and the owner role, end to end through real processes.

The job's Google identity comes from the fake metadata server (devtools/metadata_server.py) through
the real google-auth client; the IAM database user is a PostgreSQL login role whose password is the
token the fake hands out, as Cloud SQL checks a token for an IAM user. Secret Manager is never asked.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from devtools.metadata_server import MetadataServer
from devtools.secretmanager_emulator import SecretManagerEmulator
from job.iam import SCOPE
from tests.conftest import Database, grant_membership
from tests.support import (
    FIXTURES,
    IAM_USER,
    PROJECT,
    SERVICE_ACCOUNT,
    SERVICES_DIR,
    TOKENS,
    JobRun,
    run_job,
    write_manifest,
)
from tests.test_concurrency import SLOW_GATE, Gate, start_job

SETTLEMENT_HEAD = "b277be36eb38"


def environment(
    env: dict[str, str], tmp_path: Path, entries: list[dict[str, Any]], **top: Any
) -> dict[str, str]:
    """Return the job's environment with a manifest of these entries."""
    manifest = write_manifest(tmp_path / "m.toml", entries, project=PROJECT, **top)
    return {**env, "MIGRATE_MANIFEST": str(manifest)}


def discover_entry(database: Database) -> dict[str, Any]:
    """Return an IAM entry that lists this one database from the server (the discover path)."""
    entry = database.iam_entry(discover=f"SELECT datname FROM pg_database WHERE datname = '{database.name}'")
    del entry["database"]
    return entry


def test_iam_entries_migrate_as_the_owner_with_a_token_and_no_secret(
    make_database: Callable[..., Database],
    tmp_path: Path,
    iam_env: dict[str, str],
    metadata: MetadataServer,
    secret_manager: SecretManagerEmulator,
) -> None:
    """A listed and a discovered IAM entry log in as the service account and create as the owner role.

    Applied by --jobs workers, which get their tokens themselves. The identity is logged once, every
    token is asked for with the Cloud SQL login scope, and Secret Manager gets no request at all.
    """
    listed, discovered = make_database("settlement"), make_database("settlement")
    for database in (listed, discovered):
        grant_membership(database.pg, database.role)
    env = environment(iam_env, tmp_path, [listed.iam_entry(), discover_entry(discovered)])
    asked_before = len(secret_manager.access_log)

    result = run_job("upgrade", "--jobs", "2", env=env)

    assert result.code == 0, result.stdout + result.stderr
    for database in (listed, discovered):
        assert database.version() == [SETTLEMENT_HEAD]
        assert set(database.owners().values()) == {database.role}, database.owners()
        # The audit trail names who logged in, not the role the tables were created as.
        recorded = database.pg.fetch(
            "SELECT DISTINCT recorded_by FROM migrate_job_history", database=database.name
        )
        assert [r["recorded_by"] for r in recorded] == [IAM_USER], recorded
    [identity] = result.events("auth.iam")
    assert (identity["identity"], identity["user"]) == (SERVICE_ACCOUNT, IAM_USER)
    tokens = metadata.token_requests()
    assert len(tokens) >= 4 and all(t.scopes == [SCOPE] for t in tokens)
    assert all(seen.flavored for seen in metadata.requests)
    assert len(secret_manager.access_log) == asked_before, "an IAM entry reads no secret"


def test_a_token_rotated_mid_run_serves_the_next_connection(
    make_database: Callable[..., Database], tmp_path: Path, iam_env: dict[str, str], metadata: MetadataServer
) -> None:
    """The token changes while the first database migrates: its connection goes on, the next one logs in anew.

    The first database's revision waits at a gate the test holds. Meanwhile the IAM user's password
    becomes the second token (the first no longer logs in) and the metadata server hands it out; the
    second database can only be reached with it.
    """
    slow, altering = make_database("slow"), make_database("altering")
    for database in (slow, altering):
        grant_membership(database.pg, database.role)
    env = environment(iam_env, tmp_path, [slow.iam_entry(), altering.iam_entry()])
    env["MIGRATE_SERVICES_DIR"] = str(FIXTURES / "services")

    async def scenario() -> tuple[JobRun, bool, int]:
        async with Gate(slow.pg.admin_dsn(slow.name), SLOW_GATE) as gate:
            job = start_job(env=env, name="iam-rotation", out_dir=tmp_path)
            deadline = time.monotonic() + 30
            while await gate.waiter() is None and job.proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            at_gate = await gate.waiter() is not None
            slow.pg.create_role(IAM_USER, TOKENS[1])
            metadata.rotate(TOKENS[1])
            served_before = len(metadata.token_requests())
        return await asyncio.to_thread(job.finish), at_gate, served_before

    result, at_gate, served_before = asyncio.run(scenario())

    assert at_gate and result.code == 0, result.stdout + result.stderr
    assert slow.version() == ["bbbb00000003"], "the connection opened with the old token kept working"
    assert altering.version() == ["cccc00000002"], "the next connection logged in with the new token"
    assert len(metadata.token_requests()) > served_before
    assert result.events("db.connect_retry") == []


def test_a_refused_iam_login_names_what_to_check(
    make_database: Callable[..., Database], tmp_path: Path, iam_env: dict[str, str], metadata: MetadataServer
) -> None:
    """Cloud SQL refusing the token is exit 4, with the flag, roles, user and grants to check."""
    database = make_database("settlement")
    metadata.rotate(TOKENS[1])  # a token the database does not take
    result = run_job(env=environment(iam_env, tmp_path, [database.iam_entry()]))

    assert result.code == 4, result.stdout + result.stderr
    error = result.events("run.error")[0]
    assert error["error"] == "connect" and "password was refused" in error["message"]
    for piece in ("cloudsql.iam_authentication=on", "roles/cloudsql.instanceUser", SERVICE_ACCOUNT, "GRANT"):
        assert piece in error["hint"], error["hint"]
    assert database.tables() == set()


def test_no_token_is_a_secret_error_before_any_database(
    make_database: Callable[..., Database], tmp_path: Path, iam_env: dict[str, str], metadata: MetadataServer
) -> None:
    """A metadata server that refuses a token, or no Google credentials at all: exit 3, nothing touched."""
    database = make_database("settlement")
    env = environment(iam_env, tmp_path, [database.iam_entry()])

    metadata.deny_tokens()
    denied = run_job(env=env)
    missing = run_job(env={**env, "GOOGLE_APPLICATION_CREDENTIALS": str(tmp_path / "nowhere.json")})

    for result, says in (
        (denied, "could not get a Cloud SQL login token"),
        (missing, "no Google credentials"),
    ):
        assert result.code == 3, result.stdout + result.stderr
        error = result.events("run.error")[0]
        assert error["error"] == "secret" and says in error["message"] and error["hint"]
        assert result.events("db.connected") == []
    assert database.tables() == set()


def test_an_owner_role_the_login_may_not_take_stops_the_preflight(
    make_database: Callable[..., Database], tmp_path: Path, job_env: dict[str, str]
) -> None:
    """owner applies to password logins too; one the login is no member of is exit 4 naming the GRANT."""
    database, other = make_database("settlement"), make_database("risk-engine")
    entry = {**database.entry(), "owner": other.role}
    env = {**environment(job_env, tmp_path, [entry]), "MIGRATE_SERVICES_DIR": str(SERVICES_DIR)}

    result = run_job(env=env)

    assert result.code == 4, result.stdout + result.stderr
    error = result.events("run.error")[0]
    assert f'permission denied to set role "{other.role}"' in error["message"]
    assert f'GRANT "{other.role}" TO "{database.role}"' in error["hint"]
    assert database.tables() == set()
