"""Built-in tests every service gets, in the style of pytest-alembic, for each folder under services/.

The services are found when the tests are collected, so a new service is covered without writing a
test: one head; an upgrade from base to head on a fresh database whose schema then matches
models.py; every revision's downgrade undoing its upgrade; and SQL that lints clean. They run
in-process against the session's PostgreSQL, on scratch databases created and dropped by the job.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from devtools.pgserver import PgServer
from job import commands
from job.commands import Run
from job.report import RunReport
from job.services import Service, discover
from job.settings import CloudRun, Settings
from tests.support import SERVICES_DIR, scratch_url, write_manifest

SERVICES = sorted(discover(SERVICES_DIR))
SCRATCH = "env://MIGRATE_TEST_SCRATCH_URL"


@pytest.fixture(params=SERVICES)
def service(request: pytest.FixtureRequest) -> Service:
    """One shipped service."""
    return discover(SERVICES_DIR)[request.param]


@pytest.fixture
def scratch(pg: PgServer, monkeypatch: pytest.MonkeyPatch) -> str:
    """A secret reference to a URL whose role may create the job's scratch databases."""
    monkeypatch.setenv("MIGRATE_TEST_SCRATCH_URL", scratch_url(pg))
    return SCRATCH


def make_run(command: str, service: Service, tmp_path: Path, services_dir: Path = SERVICES_DIR) -> Run:
    """Return a run of command on a manifest naming only this service (its database is never reached)."""
    entry = {
        "service": service.name,
        "database": service.name.replace("-", "_"),
        "host": "127.0.0.1",
        "user": "u",
        "password": "p",
    }
    manifest = write_manifest(tmp_path / "manifest.toml", [entry])
    settings = Settings(manifest=manifest, services_dir=services_dir, env="local")
    return commands.prepare(RunReport(command), settings, CloudRun(), services=[service.name])


def test_has_a_single_head(service: Service) -> None:
    """The history is valid and has one head (the job refuses several)."""
    assert service.head() is not None, f"{service.name} has no revision yet"
    assert len(service.script.get_heads()) == 1


def test_upgrades_from_base_to_head_and_matches_its_models(
    service: Service, scratch: str, tmp_path: Path
) -> None:
    """A fresh database upgraded to head has exactly the schema models.py describes (check)."""
    run = make_run("check", service, tmp_path)
    asyncio.run(commands.check(run, scratch))  # raises DriftFound, naming each difference
    (result,) = run.report.databases
    assert result.status == "clean" and result.to_revision == service.head()


def test_every_revision_round_trips(service: Service, scratch: str, tmp_path: Path) -> None:
    """Each revision up, down and up again leaves the same schema (verify)."""
    run = make_run("verify", service, tmp_path)
    asyncio.run(commands.verify(run, scratch))  # raises RoundTripFailed, naming the revision
    (result,) = run.report.databases
    assert result.status == "verified"
    assert len(result.applied) == len(list(service.script.walk_revisions()))


def test_lints_clean(service: Service, tmp_path: Path) -> None:
    """Every revision's SQL passes squawk, or carries a reasoned exemption (lint)."""
    run = make_run("lint", service, tmp_path)
    asyncio.run(commands.lint(run))  # raises LintFindings, naming the revisions
