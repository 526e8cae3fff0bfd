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


def test_databases_are_named_and_assigned_round_robin() -> None:
    dbs = bench.bench_databases(4)
    assert [(d.name, d.service) for d in dbs] == [
        ("bench_settlement_001", "settlement"),
        ("bench_risk_engine_002", "risk-engine"),
        ("bench_compliance_003", "compliance"),
        ("bench_settlement_004", "settlement"),
    ]


def test_both_manifest_forms_list_every_database_once() -> None:
    dbs = bench.bench_databases(7)
    for list_form in (True, False):
        raw = tomllib.loads(bench.render_manifest(dbs, SOCKET, list_form=list_form))
        names = [n for e in raw["databases"] for n in e.get("databases", [e.get("database")])]
        assert sorted(names) == sorted(d.name for d in dbs)
        assert {e["instance"] for e in raw["databases"]} == {bench.INSTANCE}
        assert {e["password"] for e in raw["databases"]} == {"env://" + bench.PASSWORD_ENV}
    assert len(tomllib.loads(bench.render_manifest(dbs, TCP, list_form=True))["databases"]) == 3


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
