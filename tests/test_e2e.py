"""The job as Cloud Run runs it: a process with no arguments, CLOUD_RUN_* set, real PostgreSQL."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from devtools.secretmanager_emulator import SecretManagerEmulator
from tests.conftest import Database
from tests.support import (
    ALL_PASSWORDS,
    FIXTURES,
    HEADS,
    PROJECT,
    TABLES,
    JobRun,
    run_job,
    write_manifest,
)


def assert_clean_output(run: JobRun) -> None:
    """Every stdout line is a Cloud Logging JSON object with an event; nothing else anywhere."""
    assert run.stderr == "", run.stderr
    for line in run.lines:
        assert line["event"], line
        assert line["severity"] in {"INFO", "WARNING", "ERROR"}, line
        assert line["message"], line
    for password in ALL_PASSWORDS:
        assert password not in run.stdout
    assert run.lines[-1]["event"] == "run.summary"


def assert_one_error(run: JobRun, code: int, kind: str) -> dict:
    """The run failed with this code and wrote exactly one clear error line, no traceback."""
    assert run.code == code, run.stdout + run.stderr
    assert_clean_output(run)
    errors = run.events("run.error")
    assert len(errors) == 1, errors
    assert errors[0]["error"] == kind, errors[0]
    assert errors[0]["exit_code"] == code
    for line in run.lines:
        shown = {k: v for k, v in line.items() if k != "stack_trace"}
        assert "Traceback" not in json.dumps(shown), line
    assert run.summary["exit_code"] == code
    return errors[0]


@pytest.fixture
def three(
    make_database: Callable[..., Database],
    secret_manager: SecretManagerEmulator,
    tmp_path: Path,
    job_env: dict[str, str],
) -> tuple[list[Database], dict[str, str]]:
    """Three fresh databases, each reached through a different kind of secret reference."""
    settlement, risk, compliance = (make_database(s) for s in ("settlement", "risk-engine", "compliance"))
    secret_manager.add_secret(PROJECT, f"{settlement.name}-password", settlement.password)
    secret_manager.add_secret(PROJECT, f"{risk.name}-password", risk.password + "\n")
    password_file = tmp_path / "compliance-password"
    password_file.write_text(compliance.password)
    entries = [
        settlement.entry(
            f"secretmanager://projects/{PROJECT}/secrets/{settlement.name}-password/versions/latest"
        ),
        risk.entry(f"secretmanager://{risk.name}-password"),
        compliance.entry(f"file://{password_file}"),
    ]
    manifest = write_manifest(tmp_path / "env.toml", entries, project=PROJECT)
    return [settlement, risk, compliance], {**job_env, "MIGRATE_MANIFEST": str(manifest)}


def test_cloud_run_execution_upgrades_three_databases_then_is_a_noop(three) -> None:
    """The walking skeleton: one execution migrates every database; the next one changes nothing.

    The first run starts a fresh interpreter, as Cloud Run does; the rest of the suite forks warm ones.
    """
    databases, env = three
    first = run_job(env=env, cold=True)
    assert first.code == 0, first.stdout + first.stderr
    assert_clean_output(first)
    for db in databases:
        assert TABLES[db.service] <= db.tables()
        assert db.version() == [HEADS[db.service]]
    summary = first.summary
    assert summary["status"] == "succeeded" and summary["exit_code"] == 0
    results = first.by_database()
    assert [d["database"] for d in summary["databases"]] == [db.name for db in databases]
    assert results[databases[0].name]["applied"] == ["c81a6c877761", HEADS["settlement"]]
    for db in databases:
        entry = results[db.name]
        assert entry["status"] == "applied"
        assert entry["from_revision"] is None and entry["to_revision"] == HEADS[db.service]
        assert entry["service"] == db.service and entry["duration_ms"] >= 0
    applied = first.events("migration.applied")
    assert [e["revision"] for e in applied] == [
        "c81a6c877761",
        HEADS["settlement"],
        HEADS["risk-engine"],
        "ac845c92cc2a",
        HEADS["compliance"],
    ]
    assert all(isinstance(e["duration_ms"], int) for e in applied)
    assert all(line["execution"] == "migrate-job-abc12" for line in first.lines)

    second = run_job(env=env)
    assert second.code == 0
    assert_clean_output(second)
    assert second.events("migration.applied") == []
    assert {d["status"] for d in second.summary["databases"]} == {"current"}


def test_plan_check_gates_a_release(three) -> None:
    """plan --check exits 10 while anything is pending and 0 after the upgrade; it never writes."""
    databases, env = three
    pending = run_job("plan", "--check", env=env)
    assert_one_error(pending, 10, "pending")
    assert {d["status"] for d in pending.summary["databases"]} == {"pending"}
    assert pending.by_database()[databases[0].name]["pending"] == ["c81a6c877761", HEADS["settlement"]]
    assert all(db.tables() == set() for db in databases), "plan must not create alembic_version"
    assert run_job(env=env).code == 0
    done = run_job("plan", "--check", env=env)
    assert done.code == 0
    assert {d["status"] for d in done.summary["databases"]} == {"current"}


def test_unknown_service_is_a_configuration_error(tmp_path: Path, job_env: dict[str, str]) -> None:
    """A manifest naming a service the image does not ship stops before any database (exit 2)."""
    manifest = write_manifest(
        tmp_path / "m.toml",
        [{"service": "ledger", "database": "ledger", "host": "127.0.0.1", "user": "u", "password": "p"}],
    )
    error = assert_one_error(run_job(env={**job_env, "MIGRATE_MANIFEST": str(manifest)}), 2, "config")
    assert "ledger" in error["message"] and "settlement" in error["hint"]


@pytest.mark.parametrize(
    "text",
    ["[[databases]\nservice = 'settlement'\n", "[[databases]]\nservice = 'settlement'\npasswrd = 'x'\n"],
    ids=["not-toml", "unknown-key"],
)
def test_malformed_manifest_is_a_configuration_error(
    text: str, tmp_path: Path, job_env: dict[str, str]
) -> None:
    """A manifest that is not TOML, or has an unknown key, is exit 2 with the file named."""
    manifest = tmp_path / "bad.toml"
    manifest.write_text(text)
    error = assert_one_error(run_job(env={**job_env, "MIGRATE_MANIFEST": str(manifest)}), 2, "config")
    assert "bad.toml" in error["message"]


def test_missing_secret_stops_before_any_database(three, secret_manager: SecretManagerEmulator) -> None:
    """A secret that is not in Secret Manager is exit 3, and no database was touched."""
    databases, env = three
    manifest = Path(env["MIGRATE_MANIFEST"])
    manifest.write_text(manifest.read_text().replace(f"{databases[1].name}-password", "nope"))
    error = assert_one_error(run_job(env=env), 3, "secret")
    assert "nope" in error["message"] and error["database"] == databases[1].name
    assert all(db.version() == [] for db in databases), "secrets are read before any upgrade"


def test_wrong_password_is_refused_at_once(
    make_database: Callable[..., Database], tmp_path: Path, job_env: dict[str, str]
) -> None:
    """A wrong password is exit 4 without waiting out the connect timeout, and is never shown."""
    db = make_database("risk-engine")
    os.environ["MJ_TEST_WRONG"] = "wr0ng:/#?%<>&()' pass"
    manifest = write_manifest(tmp_path / "m.toml", [db.entry("env://MJ_TEST_WRONG")])
    env = {
        **job_env,
        "MIGRATE_MANIFEST": str(manifest),
        "MJ_TEST_WRONG": "wr0ng:/#?%<>&()' pass",
        "MIGRATE_CONNECT_TIMEOUT_S": "60",
    }
    run = run_job(env=env, timeout=30)
    error = assert_one_error(run, 4, "connect")
    assert "password" in error["message"] and error["database"] == db.name
    assert run.summary["duration_ms"] < 20_000


def test_unreachable_socket_is_exit_4_naming_the_instance(
    make_database: Callable[..., Database], tmp_path: Path, job_env: dict[str, str]
) -> None:
    """An instance with no socket is retried until the connect timeout, then exit 4 says what to do."""
    db = make_database("risk-engine")
    entry = {**db.entry(), "instance": f"{PROJECT}:us-central1:not-mounted"}
    entry.pop("host", None)
    entry.pop("port", None)
    manifest = write_manifest(tmp_path / "m.toml", [entry])
    empty = tempfile.mkdtemp(prefix="mjnone")  # short: socket paths are limited to 107 bytes
    env = {**job_env, "MIGRATE_MANIFEST": str(manifest), "MIGRATE_SOCKET_DIR": empty}
    run = run_job(env=env)
    error = assert_one_error(run, 4, "connect")
    assert "not-mounted" in error["hint"] and "--set-cloudsql-instances" in error["hint"]
    assert run.events("db.connect_retry"), "a missing socket is retried (it may not be ready yet)"


def test_failing_migration_rolls_back_and_stops_the_run(
    make_database: Callable[..., Database], tmp_path: Path, job_env: dict[str, str]
) -> None:
    """A migration that fails is exit 7 naming it; the database stays at the last good revision."""
    broken = make_database("broken")
    after = make_database("broken")
    manifest = write_manifest(tmp_path / "m.toml", [broken.entry(), after.entry()])
    env = {
        **job_env,
        "MIGRATE_MANIFEST": str(manifest),
        "MIGRATE_SERVICES_DIR": str(FIXTURES / "services"),
    }
    run = run_job(env=env)
    error = assert_one_error(run, 7, "migration_failed")
    assert error["revision"] == "aaaa00000002" and error["database"] == broken.name
    assert "no_such_column" in error["message"]
    assert "stack_trace" in error
    assert broken.version() == ["aaaa00000001"]
    assert "gadgets" not in broken.tables() and "widgets" in broken.tables()
    results = run.by_database()
    assert results[broken.name]["status"] == "failed"
    assert results[broken.name]["applied"] == ["aaaa00000001"]
    assert results[broken.name]["to_revision"] == "aaaa00000001"
    assert results[after.name]["status"] == "skipped"
    assert after.version() == []
