"""Smoke tests for devtools.bench's helpers that need no database (the bench itself is not a test)."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from urllib.parse import unquote, urlsplit

from devtools import bench
from devtools.bench import Endpoint
from job.manifest import parse_manifest

TCP = Endpoint("127.0.0.1", 54321)
SOCKET = Endpoint("127.0.0.1", 54321, Path("/tmp/mjbenchX/cloudsql"))


def test_databases_are_named_and_carry_the_bench_history() -> None:
    dbs = bench.bench_databases(1000)
    assert [(d.name, d.service) for d in dbs[:2]] == [
        ("bench_tenants_0001", "tenants"),
        ("bench_tenants_0002", "tenants"),
    ]
    assert bench.SERVICES == ("tenants",)


def test_the_bench_history_has_the_shape_of_a_tenant_fleet() -> None:
    # The shape: 30 revisions with tables and indexes, added columns, partial indexes,
    # backfills then NOT NULL, check constraints, so the bench times what fleets really run.
    revisions = bench.revisions("tenants")
    assert len(revisions) == 30
    sql = "".join(text for _, text in bench.split_revisions(_offline_sql()))
    for shape in ("CREATE TABLE", "CREATE INDEX", "ADD COLUMN", " WHERE ", "SET NOT NULL", "CHECK ("):
        assert shape in sql, shape
    assert "UPDATE invoices SET currency" in sql


def _offline_sql() -> str:
    """Return the bench history rendered offline by Alembic, as the bench renders it."""
    import subprocess
    import sys

    alembic = Path(sys.executable).parent / "alembic"
    env = {**os.environ, "DATABASE_URL": "postgresql://bench@localhost/bench"}
    done = subprocess.run(
        [alembic, "-c", bench.alembic_ini("tenants"), "upgrade", "head", "--sql"],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    return done.stdout


def test_offline_sql_splits_into_one_dbmate_migration_per_revision(tmp_path: Path) -> None:
    pieces = bench.split_revisions(_offline_sql())
    assert [revision for revision, _ in pieces] == bench.revisions("tenants")
    # dbmate keeps its own version table and wraps each file in a transaction of its own.
    assert all("alembic_version" not in text and "BEGIN" not in text for _, text in pieces)
    versions = bench.write_dbmate_dir(pieces, tmp_path)
    assert versions[:2] == ["001", "002"] and len(versions) == 30
    first = sorted(tmp_path.iterdir())[0].read_text()
    assert first.startswith("-- migrate:up\nCREATE TABLE tenants") and "-- migrate:down" in first


def test_dbmate_url_round_trips_the_password_and_socket() -> None:
    db = bench.bench_databases(1)[0]
    parts = urlsplit(bench.dbmate_url(db, SOCKET))
    assert unquote(parts.password or "") == bench.PASSWORD
    assert unquote(parts.query) == f"socket={SOCKET.socket_root}/{bench.INSTANCE}"
    assert urlsplit(bench.dbmate_url(db, TCP)).port == 54321


def test_both_manifest_forms_list_every_database_once() -> None:
    dbs = bench.bench_databases(7)
    for list_form in (True, False):
        raw = tomllib.loads(bench.render_manifest(dbs, SOCKET, list_form=list_form))
        names = [n for e in raw["databases"] for n in e.get("databases", [e.get("database")])]
        assert sorted(names) == sorted(d.name for d in dbs)
        assert {e["instance"] for e in raw["databases"]} == {bench.INSTANCE}
        assert {e["password"] for e in raw["databases"]} == {"env://" + bench.PASSWORD_ENV}
    assert len(tomllib.loads(bench.render_manifest(dbs, TCP, list_form=True))["databases"]) == 1


def test_per_database_manifest_is_accepted_by_the_job() -> None:
    text = bench.render_manifest(bench.bench_databases(3), TCP, list_form=False)
    manifest = parse_manifest(tomllib.loads(text), bench.SERVICES, path=Path("bench.toml"))
    assert [e.host for e in manifest.databases] == ["127.0.0.1"] * 3


def test_alembic_url_round_trips_the_password_and_socket() -> None:
    db = bench.bench_databases(1)[0]
    parts = urlsplit(bench.alembic_url(db, SOCKET))
    assert unquote(parts.password or "") == bench.PASSWORD
    assert unquote(parts.query) == f"host={SOCKET.socket_root}/{bench.INSTANCE}"
    assert urlsplit(bench.alembic_url(db, TCP)).port == 54321


def test_conninfo_quotes_values_and_leaves_out_the_password() -> None:
    info = bench.conninfo(bench.bench_databases(1)[0], SOCKET)
    assert f"host='{SOCKET.socket_root}/{bench.INSTANCE}'" in info and "port='5432'" in info
    assert bench._conninfo_quote("a'b\\c") == "'a\\'b\\\\c'"
    assert "password" not in info


def test_ratios_and_masking() -> None:
    assert bench.ratio_text("noop", 0.5, 50.0) == "100x faster"
    assert bench.ratio_text("noop", 1.0, 4.2) == "4.2x faster"
    assert bench.ratio_text("empty", 3.0, 2.0) == "1.50 of floor"
    assert bench.min_median([3.0, 1.0, 2.0]) == (1.0, 2.0)
    assert bench.PASSWORD not in bench.mask(f"url {bench.alembic_url(bench.bench_databases(1)[0], TCP)}")


def test_proc_figures_of_a_live_process() -> None:
    assert (bench.proc_kb(os.getpid(), "status", "VmHWM:") or 0) > 0
    assert bench.proc_kb(2**22 + 7, "status", "VmHWM:") is None  # above pid_max: never a process
    assert bench.children(2**22 + 7) == []
