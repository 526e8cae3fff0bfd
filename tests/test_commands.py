"""Read-only operator commands (current, heads, history) as processes, with their JSON shapes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tests.conftest import Database
from tests.support import HEADS, run_job, write_manifest


def test_current_reports_revision_and_head_without_writing(
    make_database: Callable[..., Database], tmp_path: Path, job_env: dict[str, str]
) -> None:
    """`current` answers "is my database at head?" for every database, and changes nothing."""
    fresh, done = make_database("settlement"), make_database("risk-engine")
    env = {
        **job_env,
        "MIGRATE_MANIFEST": str(write_manifest(tmp_path / "m.toml", [fresh.entry(), done.entry()])),
    }
    assert run_job("--database", done.name, env=env).code == 0
    run = run_job("current", env=env)
    assert run.code == 0, run.stdout
    lines = {line["database"]: line for line in run.events("db.current")}
    assert "revision" not in lines[fresh.name] and lines[fresh.name]["at_head"] is False
    assert lines[fresh.name]["head"] == HEADS["settlement"]
    assert lines[done.name] | {"revision": HEADS["risk-engine"], "at_head": True} == lines[done.name]
    assert run.events("db.plan") == [], "current says one line per database"
    assert {d["database"]: d["status"] for d in run.summary["databases"]} == {
        fresh.name: "pending",
        done.name: "current",
    }
    assert fresh.tables() == set()


def test_heads_and_history_need_no_database(tmp_path: Path, job_env: dict[str, str]) -> None:
    """heads and history read only the scripts: they work even when no database is reachable."""
    manifest = write_manifest(
        tmp_path / "m.toml",
        [
            {
                "service": s,
                "database": s.replace("-", "_"),
                "host": "127.0.0.1",
                "port": 1,
                "user": "u",
                "password": "p",
            }
            for s in HEADS
        ],
    )
    env = {**job_env, "MIGRATE_MANIFEST": str(manifest)}
    heads = run_job("heads", env=env)
    assert heads.code == 0
    assert {line["service"]: line["heads"] for line in heads.events("service.heads")} == {
        s: [h] for s, h in HEADS.items()
    }
    history = run_job("history", "--verbose", "--service", "settlement", env=env)
    assert history.code == 0
    revisions = history.events("service.revision")
    assert [r["revision"] for r in revisions] == [HEADS["settlement"], "c81a6c877761"], "newest first"
    assert revisions[0]["is_head"] and revisions[0]["down_revision"] == ["c81a6c877761"]
    assert revisions[1]["down_revision"] == [] and revisions[1]["description"] == "initial migration"
    assert revisions[0]["path"].startswith("migrations/versions/")
