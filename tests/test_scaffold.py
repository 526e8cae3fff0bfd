"""new-service: a folder from the blessed template, ready for revisions and the built-in tests."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from devtools.pgserver import PgServer
from job import commands
from job.scaffold import create_service, template_root
from job.services import discover
from tests.support import SERVICES_DIR, run_job, scratch_url, write_manifest
from tests.test_service_contract import make_run


def entry(service: str) -> dict[str, str]:
    """Return a manifest entry for a service (these commands never connect to it)."""
    return {
        "service": service,
        "database": service.replace("-", "_"),
        "host": "127.0.0.1",
        "user": "u",
        "password": "p",
    }


def test_new_service_is_written_from_the_template_and_takes_revisions(
    tmp_path: Path, job_env: dict[str, str]
) -> None:
    """The folder has the blessed env.py; heads and revision work on it; bad requests are exit 2."""
    services = tmp_path / "services"
    shutil.copytree(SERVICES_DIR / "risk-engine", services / "risk-engine")
    local = {k: v for k, v in job_env.items() if not k.startswith("CLOUD_RUN_")}
    env = {
        **local,
        "MIGRATE_MANIFEST": str(write_manifest(tmp_path / "m.toml", [entry("risk-engine")])),
        "MIGRATE_SERVICES_DIR": str(services),
    }
    made = run_job("new-service", "ledger-core", env=env)
    assert made.code == 0, made.stdout
    folder = services / "ledger-core"
    assert made.events("service.created")[0]["path"] == str(folder)
    env_py = (folder / "migrations" / "env.py").read_bytes()
    assert env_py == (SERVICES_DIR / "settlement" / "migrations" / "env.py").read_bytes()
    assert (folder / "migrations" / "script.py.mako").is_file()
    assert (folder / "migrations" / "versions" / ".gitkeep").is_file()
    assert "ledger-core service" in (folder / "alembic.ini").read_text()
    assert "localhost/ledger_core" in (folder / "alembic.ini").read_text()
    assert "NAMING_CONVENTION" in (folder / "models.py").read_text()
    assert not list(folder.rglob("*.tmpl"))

    assert run_job("new-service", "ledger-core", env=env).code == 2, "an existing folder is refused"
    assert run_job("new-service", "Ledger_Core", env=env).code == 2, "a bad name is refused"
    on_cloud_run = run_job("new-service", "other", env={**env, "CLOUD_RUN_JOB": "migrate-job"})
    assert on_cloud_run.code == 2 and not (services / "other").exists()

    env["MIGRATE_MANIFEST"] = str(
        write_manifest(tmp_path / "m2.toml", [entry("risk-engine"), entry("ledger-core")])
    )
    empty = run_job("heads", "--service", "ledger-core", env=env)
    assert empty.code == 0 and empty.events("service.heads")[0]["heads"] == []
    revision = run_job("revision", "-m", "create ledger", "--service", "ledger-core", env=env)
    assert revision.code == 0, revision.stdout
    (created,) = revision.events("revision.created")
    heads = run_job("heads", "--service", "ledger-core", env=env)
    assert heads.events("service.heads")[0]["heads"] == [created["revision"]]


def test_a_new_service_passes_the_built_in_tests(
    tmp_path: Path, pg: PgServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What test_service_contract runs for each folder under services/ passes on a fresh service."""
    services = tmp_path / "services"
    create_service(services, "ledger")
    service = discover(services)["ledger"]
    run = make_run("revision", service, tmp_path, services)
    asyncio.run(commands.revision(run, "create ledger"))
    service = discover(services)["ledger"]  # a fresh load sees the new revision
    monkeypatch.setenv("MIGRATE_TEST_SCRATCH_URL", scratch_url(pg))
    for command in ("check", "verify"):
        run = make_run(command, service, tmp_path, services)
        asyncio.run(getattr(commands, command)(run, "env://MIGRATE_TEST_SCRATCH_URL"))
        assert [r.status for r in run.report.databases] == ["clean" if command == "check" else "verified"]
    asyncio.run(commands.lint(make_run("lint", service, tmp_path, services)))


def test_the_template_env_py_is_the_shipped_one() -> None:
    """The template and every shipped service carry the same blessed env.py and script.py.mako."""
    for name in ("env.py", "script.py.mako"):
        blessed = (template_root() / "migrations" / name).read_bytes()
        for service in discover(SERVICES_DIR).values():
            assert (service.path / "migrations" / name).read_bytes() == blessed, (service.name, name)
