"""``plan --impact``: what the pending revisions' locks would cost on each real database.

A trace (job.trace) says which tables a revision locks, in which mode, and whether it rewrites or
reads them in full; the lock modes and that behaviour do not depend on the data. What does is how
long the lock lasts: a rewrite of a 40-row table and of a 40 GB one are the same finding and
different decisions. So each real database is read, read-only (its statistics and
``pg_total_relation_size``), and the time its application would be blocked is estimated from
rates measured on the scratch server: a table seeded with rows there is read in full (SET NOT
NULL's check), indexed (CREATE INDEX) and rewritten (a type change), each timed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from job import lockmodes
from job.lockrules import RevisionTrace

CALIBRATION_TABLE = "mj_impact_calibration"
CALIBRATION_ROWS = 200_000
SIZES_SQL = """
SELECT t.name, c.oid IS NOT NULL AS present, c.reltuples::bigint AS reltuples, s.n_live_tup,
       coalesce(pg_total_relation_size(c.oid), 0) AS total_bytes,
       coalesce(pg_relation_size(c.oid), 0) AS heap_bytes
FROM unnest($1::text[]) AS t(name)
LEFT JOIN pg_class c ON c.oid = to_regclass(t.name)
LEFT JOIN pg_stat_user_tables s ON s.relid = c.oid
"""


@dataclass(frozen=True)
class Rates:
    """Bytes per second measured on the scratch server, and on what."""

    scan: float  # heap bytes read in full (SET NOT NULL's check)
    index: float  # heap bytes indexed (CREATE INDEX)
    rewrite: float  # total bytes (heap and indexes) rewritten (ALTER COLUMN TYPE)
    rows: int
    heap_bytes: int

    def describe(self) -> str:
        """Return how the rates were measured."""
        return (
            f"measured on the scratch server with {self.rows} seeded rows ({size(self.heap_bytes)}): "
            f"full scan {size(self.scan)}/s, index build {size(self.index)}/s, rewrite {size(self.rewrite)}/s"
        )


async def calibrate(connection: Any) -> Rates:
    """Seed a table on the scratch database, time a full-scan check, an index build and a rewrite; drop it."""
    table = CALIBRATION_TABLE
    await connection.execute(f"DROP TABLE IF EXISTS {table}")
    await connection.execute(f"CREATE TABLE {table} (id bigint PRIMARY KEY, n integer, payload text)")
    try:
        await connection.execute(
            f"INSERT INTO {table} SELECT g, g % 1000, md5(g::text) || md5((g * 7)::text) "
            f"FROM generate_series(1, {CALIBRATION_ROWS}) g"
        )
        heap = int(await connection.fetchval(f"SELECT pg_relation_size('{table}')"))
        scan = await _timed(connection, f"ALTER TABLE {table} ALTER COLUMN n SET NOT NULL")
        index = await _timed(connection, f"CREATE INDEX {table}_n ON {table} (n)")
        total = int(await connection.fetchval(f"SELECT pg_total_relation_size('{table}')"))
        rewrite = await _timed(connection, f"ALTER TABLE {table} ALTER COLUMN n TYPE bigint")
    finally:
        await connection.execute(f"DROP TABLE IF EXISTS {table}")
    return Rates(heap / scan, heap / index, total / rewrite, CALIBRATION_ROWS, heap)


async def _timed(connection: Any, sql: str) -> float:
    """Return how long a statement took, in seconds (never zero)."""
    started = time.monotonic()
    await connection.execute(sql)
    return max(time.monotonic() - started, 1e-6)


@dataclass(frozen=True)
class Impact:
    """One table that one pending revision locks against writes, weighed on one database."""

    revision: str
    table: str
    mode: str
    rewrite: bool
    scan: bool
    present: bool
    rows: int | None
    rows_from: str | None
    bytes: int
    estimate_ms: int
    estimate: str

    def fields(self) -> dict[str, Any]:
        """Return the db.impact line's own fields."""
        return {
            "revision": self.revision,
            "table": self.table,
            "mode": self.mode,
            "blocks": lockmodes.blocks(self.mode),
            "rewrite": self.rewrite,
            "scan": self.scan,
            "rows": self.rows,
            "rows_from": self.rows_from,
            "bytes": self.bytes,
            "estimate_ms": self.estimate_ms,
            "estimate": self.estimate,
        }


def tables_of(traces: list[RevisionTrace]) -> list[str]:
    """Return every table that one of the traces locks against writes."""
    found = {t for one in traces for t, m in one.locks.items() if lockmodes.blocks_writes(m)}
    return sorted(found)


async def read_sizes(connection: Any, tables: list[str]) -> dict[str, dict[str, Any]]:
    """Return rows and bytes of each table on a real database, in a read-only transaction."""
    async with connection.transaction(readonly=True):
        rows = await connection.fetch(SIZES_SQL, tables)
    return {r["name"]: dict(r) for r in rows}


def weigh(
    traces: list[RevisionTrace], sizes: dict[str, dict[str, Any]], rates: Rates, lock_wait: str
) -> list[Impact]:
    """Return each write-blocking lock of the pending revisions, with its size and an estimate."""
    out = []
    for one in traces:
        for table, mode in sorted(one.locks.items()):
            if not lockmodes.blocks_writes(mode):
                continue
            found = sizes.get(table, {})
            present = bool(found.get("present"))
            rows, rows_from = _rows(found)
            total, heap = int(found.get("total_bytes") or 0), int(found.get("heap_bytes") or 0)
            rewrite, scan = table in one.rewritten, table in one.scanned
            ms, how = _estimate(one, table, rewrite, scan, total, heap, rates, lock_wait)
            if not present:
                how = "the table does not exist there yet (an earlier pending revision creates it): " + how
            out.append(
                Impact(one.revision, table, mode, rewrite, scan, present, rows, rows_from, total, ms, how)
            )
    return out


def _rows(found: dict[str, Any]) -> tuple[int | None, str | None]:
    """Return the table's row count from its statistics: reltuples, else the live-row counter."""
    if not found.get("present"):
        return None, None
    reltuples = found.get("reltuples")
    if reltuples is not None and reltuples >= 0:
        return int(reltuples), "pg_class.reltuples"
    live = found.get("n_live_tup")
    return (int(live), "pg_stat_user_tables.n_live_tup") if live is not None else (None, None)


def _estimate(
    one: RevisionTrace,
    table: str,
    rewrite: bool,
    scan: bool,
    total: int,
    heap: int,
    rates: Rates,
    lock_wait: str,
) -> tuple[int, str]:
    """Return the estimated time writes wait (ms) and how it was made."""
    queue = f"; before that, while it waits for the lock, queries queue behind it ({lock_wait})"
    if rewrite:
        ms = int(total / rates.rewrite * 1000)
        return ms, f"{size(total)} (table and indexes) at the rewrite rate {_rated(rates)}" + queue
    if scan:
        # ShareLock is what CREATE INDEX takes: the scan builds an index.
        building = one.locks.get(table) == "ShareLock"
        rate, kind = (rates.index, "index build") if building else (rates.scan, "full scan")
        ms = int(heap / rate * 1000)
        return ms, f"{size(heap)} (table) at the {kind} rate {_rated(rates)}" + queue
    return 0, "a catalog change only, milliseconds once the lock is granted" + queue


def _rated(rates: Rates) -> str:
    return f"({rates.describe()})"


def size(value: float) -> str:
    """Return a byte count for people: 812 B, 3.4 MB, 41.0 GB."""
    amount = float(value)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if amount < 1024 or unit == "TB":
            return f"{amount:.0f} {unit}" if unit == "B" else f"{amount:.1f} {unit}"
        amount /= 1024
    return f"{amount:.1f} TB"


def duration(ms: int) -> str:
    """Return an estimated duration for people: under 1 ms, about 35 ms, about 4.2 s, about 12 min."""
    if ms < 1:
        return "under 1 ms"
    if ms < 1000:
        return f"about {ms} ms"
    if ms < 120_000:
        return f"about {ms / 1000:.1f} s"
    return f"about {ms / 60_000:.0f} min"
