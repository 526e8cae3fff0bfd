"""``make bench`` (``python -m devtools.bench``): migrate-job against the alembic loop, dbmate and psql."""

from __future__ import annotations

# The helpers tests/devtools/test_bench.py checks without a database, under the package's name.
from devtools.bench.databases import (
    INSTANCE,
    PASSWORD,
    PASSWORD_ENV,
    SERVICES,
    Endpoint,
    _conninfo_quote,
    alembic_ini,
    alembic_url,
    bench_databases,
    conninfo,
    mask,
    render_manifest,
    revisions,
)
from devtools.bench.measure import children, proc_kb
from devtools.bench.peers import dbmate_url, split_revisions, write_dbmate_dir
from devtools.bench.report import min_median, ratio_text

__all__ = [
    "INSTANCE",
    "PASSWORD",
    "PASSWORD_ENV",
    "SERVICES",
    "Endpoint",
    "_conninfo_quote",
    "alembic_ini",
    "alembic_url",
    "bench_databases",
    "children",
    "conninfo",
    "dbmate_url",
    "mask",
    "min_median",
    "proc_kb",
    "ratio_text",
    "render_manifest",
    "revisions",
    "split_revisions",
    "write_dbmate_dir",
]
