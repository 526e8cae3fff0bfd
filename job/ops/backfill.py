"""Backfills in batches by key, each committed on its own: resumable, logged, slowed when slow."""

from __future__ import annotations

import logging
import time
from typing import Any

from job.ops._base import (
    _dollar_quoted,
    _escape,
    _execute,
    _fetch_one,
    _fetch_value,
    _log,
    _offline,
    _qualified,
    _quote,
)
from job.ops._transaction import _outside, _without_statement_timeout

PROGRESS_EVERY_S = 2.0


# --- Backfills ---------------------------------------------------------------------------------


def backfill(
    table_name: str,
    set_sql: str,
    *,
    where: str,
    key: str = "id",
    batch_size: int = 1000,
    max_batch_ms: int = 500,
    pause_ms: int = 0,
    schema: str | None = None,
) -> None:
    """Run ``UPDATE table SET set_sql WHERE where`` in batches by key, each committed on its own.

    ``where`` must stop selecting a row once it is updated (``new_col IS NULL``): that is what
    makes the backfill resumable after a kill (a rerun finds only the rows left) and keeps any row
    from being updated twice. ``key`` is a unique, ordered column (the primary key). A batch that
    takes longer than max_batch_ms halves the batch size; pause_ms sleeps between batches. The rows
    to do are counted first and what is left at the end (one scan each), for the progress events.
    """
    if batch_size < 1:
        raise ValueError(f"job.ops.backfill on {table_name}: batch_size must be at least 1")
    with _outside("backfill", table_name):
        if _offline():
            _execute(_backfill_loop(table_name, set_sql, where, key, batch_size, schema))
            return
        _Backfill(table_name, set_sql, where, key, batch_size, max_batch_ms, pause_ms, schema).run()


class _Backfill:
    """One online backfill: batches by key, progress events, halving slow batches."""

    def __init__(
        self,
        table_name: str,
        set_sql: str,
        where: str,
        key: str,
        batch_size: int,
        max_batch_ms: int,
        pause_ms: int,
        schema: str | None,
    ) -> None:
        self.table_name = table_name
        self.table = _qualified(table_name, schema)
        self.set_sql, self.where, self.key = _escape(set_sql), _escape(where), _quote(key)
        self.batch_size, self.max_batch_ms, self.pause_ms = batch_size, max_batch_ms, pause_ms
        self.done = 0
        self.total = 0
        self.started = time.monotonic()
        self.logged_at = 0.0

    def run(self) -> None:
        """Update every row ``where`` selects: a pass in key order, and another if rows were left behind."""
        self.total = self._left()
        _log(
            "backfill.start",
            f"backfill of {self.table_name}: {self.total} row(s) to update, {self.batch_size} at a time",
            table=self.table_name,
            rows_left=self.total,
            batch_size=self.batch_size,
        )
        self._pass()
        left = self._left()
        if left:
            # Rows behind the pass's cursor: keys that do not increase (UUIDs), or rows set back.
            self._pass()
            left = self._left()
        elapsed, rate = time.monotonic() - self.started, self._rate()
        _log(
            "backfill.done",
            f"backfill of {self.table_name} done: {self.done} row(s) updated in {_duration(elapsed)}, "
            f"{rate} rows/s"
            + (f"; {left} row(s) match where again: the application still writes them" if left else ""),
            level=logging.WARNING if left else logging.INFO,
            table=self.table_name,
            rows_done=self.done,
            rows_left=left,
            rate=rate,
            duration_ms=int(elapsed * 1000),
        )

    def _left(self) -> int:
        """Return how many rows ``where`` selects now (one scan, with statement_timeout lifted)."""
        with _without_statement_timeout():
            return int(_fetch_value(f"SELECT count(*) FROM {self.table} WHERE ({self.where})"))

    def _pass(self) -> None:
        """Run batches over the table's keys in order, from the first to the last."""
        last: Any = None
        while True:
            started = time.monotonic()
            row = _fetch_one(self._batch_sql(first=last is None), last=last, size=self.batch_size)
            elapsed_ms = int((time.monotonic() - started) * 1000)
            if row is None or row.picked == 0:
                return
            last, self.done = row.last, self.done + int(row.updated)
            self._after_batch(elapsed_ms)
            if self.pause_ms:
                time.sleep(self.pause_ms / 1000)

    def _batch_sql(self, *, first: bool) -> str:
        """Return one batch: the next batch_size keys, the rows among them that ``where`` selects updated.

        Keys are taken whatever ``where`` says, so that each batch reads batch_size index entries
        however few rows are left to update. ``where`` on the UPDATE re-checks a row the
        application changed meanwhile (READ COMMITTED re-evaluates it): no row is updated twice.
        """
        after = "" if first else f" WHERE {self.key} > :last"
        return (
            f"WITH batch AS MATERIALIZED (SELECT {self.key} FROM {self.table}{after} "
            f"ORDER BY {self.key} LIMIT :size), "
            f"done AS (UPDATE {self.table} SET {self.set_sql} "
            f"WHERE {self.key} IN (SELECT {self.key} FROM batch) AND ({self.where}) RETURNING 1) "
            f"SELECT (SELECT count(*) FROM batch) AS picked, (SELECT count(*) FROM done) AS updated, "
            f"(SELECT {self.key} FROM batch ORDER BY {self.key} DESC LIMIT 1) AS last"
        )

    def _after_batch(self, elapsed_ms: int) -> None:
        """Halve the batch if it was slow; log progress every PROGRESS_EVERY_S (and on the first batch)."""
        halved = elapsed_ms > self.max_batch_ms and self.batch_size > 1
        if halved:
            self.batch_size = max(1, self.batch_size // 2)
        now = time.monotonic()
        if not halved and self.logged_at and now - self.logged_at < PROGRESS_EVERY_S:
            return
        self.logged_at = now
        left, rate = max(0, self.total - self.done), self._rate()
        note = f"; the batch took {elapsed_ms} ms, next ones {self.batch_size} rows" if halved else ""
        _log(
            "backfill.progress",
            f"backfill of {self.table_name}: {self.done} row(s) done, {left} left, {rate} rows/s{note}",
            table=self.table_name,
            rows_done=self.done,
            rows_left=left,
            rate=rate,
            batch_size=self.batch_size,
            batch_ms=elapsed_ms,
        )

    def _rate(self) -> float:
        """Return the rows updated per second so far."""
        return round(self.done / max(time.monotonic() - self.started, 1e-3), 1)


def _duration(seconds: float) -> str:
    """Return a duration for people: milliseconds under ten seconds, else seconds."""
    return f"{seconds * 1000:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"


def _backfill_loop(
    table_name: str, set_sql: str, where: str, key: str, batch_size: int, schema: str | None
) -> str:
    """Return the offline backfill: a DO block that runs the same batches, committing each."""
    table, key_q = _qualified(table_name, schema), _quote(key)

    def batch(after: str) -> str:
        return (
            f"WITH batch AS MATERIALIZED (SELECT {key_q} FROM {table}{after} "
            f"ORDER BY {key_q} LIMIT {int(batch_size)}), "
            f"done AS (UPDATE {table} SET {set_sql} WHERE {key_q} IN (SELECT {key_q} FROM batch) "
            f"AND ({where}) RETURNING 1) "
            f"SELECT (SELECT {key_q} FROM batch ORDER BY {key_q} DESC LIMIT 1) INTO next_key"
        )

    body = (
        f"DECLARE\n    last_key {table}.{key_q}%TYPE;\n    next_key {table}.{key_q}%TYPE;\nBEGIN\n"
        f"    LOOP\n        IF last_key IS NULL THEN\n            {batch('')};\n        ELSE\n"
        f"            {batch(f' WHERE {key_q} > last_key')};\n        END IF;\n"
        "        EXIT WHEN next_key IS NULL;\n        last_key := next_key;\n        COMMIT;\n"
        "    END LOOP;\nEND"
    )
    return _dollar_quoted(body)
