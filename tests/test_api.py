"""The Python API: what a release pipeline and a service's start-up check call instead of the CLI."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy.engine import URL

from job import api
from job.errors import PendingMigrations
from job.settings import Settings
from tests.conftest import Database
from tests.support import HEADS, SERVICES_DIR, write_manifest


def url_of(database: Database) -> str:
    """Return a DATABASE_URL for the test database, as a service would have it."""
    return URL.create(
        "postgresql",
        username=database.role,
        password=database.password,
        host=database.pg.host,
        port=database.pg.port,
        database=database.name,
    ).render_as_string(hide_password=False)


def test_start_up_check_refuses_a_database_behind_its_head(
    make_database: Callable[..., Database], tmp_path: Path, job_env: dict[str, str]
) -> None:
    """A service can refuse to start on an unmigrated database with one call, and start once it is."""
    database = make_database("settlement")
    service_dir = SERVICES_DIR / "settlement"
    with pytest.raises(PendingMigrations) as caught:
        api.ensure_at_head(url_of(database), service_dir)
    assert database.name in caught.value.message and HEADS["settlement"] in caught.value.message
    assert database.tables() == set(), "the check only reads"

    settings = Settings(
        manifest=write_manifest(tmp_path / "m.toml", [database.entry()]),
        socket_dir=Path(job_env["MIGRATE_SOCKET_DIR"]) if "MIGRATE_SOCKET_DIR" in job_env else None,
    )
    report = api.upgrade(settings=settings)
    assert [d.status for d in report.databases] == ["applied"]

    status = api.ensure_at_head(url_of(database), service_dir)
    assert status.at_head and status.revision == HEADS["settlement"]


def test_async_form_works_inside_a_running_loop(make_database: Callable[..., Database]) -> None:
    """Async apps (FastAPI start-up) call the *_async form; the sync form refuses a running loop."""
    database = make_database("risk-engine")
    service_dir = SERVICES_DIR / "risk-engine"

    async def start_up() -> api.DatabaseStatus:
        with pytest.raises(RuntimeError, match="_async"):
            api.database_status(url_of(database), service_dir)
        return await api.database_status_async(url_of(database), service_dir)

    status = asyncio.run(start_up())
    assert status.revision is None and status.head == HEADS["risk-engine"] and not status.at_head
