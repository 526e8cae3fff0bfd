"""Every env.py shape teams ship runs unmodified under the job (DESIGN.md, Services)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Database
from tests.support import FIXTURES, run_job, write_manifest

SHAPES = FIXTURES / "shapes"


@pytest.mark.parametrize(
    "shape",
    [
        # Alembic's generic template: builds a sync engine from sqlalchemy.url, calls fileConfig.
        "synctemplate",
        # Alembic's async template: calls asyncio.run itself, which cannot nest in the job's loop.
        "asynctemplate",
        # The teams' shape: DATABASE_URL overrides sqlalchemy.url.
        "dburl",
    ],
)
def test_shape_upgrades_plans_and_keeps_the_logs_structured(
    shape: str, make_database: Callable[..., Database], tmp_path: Path, job_env: dict[str, str]
) -> None:
    """The shape applies its revision, plans read-only, and its fileConfig never hijacks the logs."""
    database = make_database(shape)
    manifest = write_manifest(tmp_path / "m.toml", [database.entry()])
    env = {**job_env, "MIGRATE_MANIFEST": str(manifest), "MIGRATE_SERVICES_DIR": str(SHAPES)}

    planned = run_job("plan", "--check", env=env)
    assert planned.code == 10, planned.stdout + planned.stderr
    assert database.tables() == set(), "plan stays read-only whoever opens the connection"

    first = run_job(env=env)
    assert first.code == 0, first.stdout + first.stderr
    assert first.stderr == "" and all(line["event"] for line in first.lines)
    assert [e["revision"] for e in first.events("migration.applied")] == ["5a0e00000001"]
    assert database.version() == ["5a0e00000001"] and f"shape_{shape}" in database.tables()

    again = run_job(env=env)
    assert again.code == 0 and again.events("migration.applied") == []
