"""A second connection that watches the migrating backend's locks while it runs outside its transaction.

Inside a revision's transaction, the locks it took are still held when ``trace`` reads
``pg_locks`` before the commit. A statement outside the transaction (CREATE INDEX CONCURRENTLY,
an ``autocommit_block``, the job.ops helpers) commits on its own: its locks are gone by the next
reading. So, while such a statement runs, this connection:

* holds a *gate*: a transaction with ROW EXCLUSIVE on every table that existed before the
  revision, what an application's writes hold. A statement that asks for a lock that blocks writes
  waits for it, and CREATE INDEX CONCURRENTLY waits for it after taking its own lock (it waits for
  the writers of the table). While the statement waits, its locks and the one it asks for are in
  ``pg_locks``; the watch records them and opens the gate at once (the statement goes on a few
  milliseconds later). The gate is never held longer than GATE_MAX_S.
* samples ``pg_locks`` for the migrating backend: SAMPLE_BURST samples back to back, then at
  growing intervals up to SAMPLE_MAX_S, until the statement ends (bounded, and idle between
  statements). A lock that blocks no writes and is held for less than one sample can be missed.

Each sample is kept once as (local transaction id, table, mode); job.lockrules gives it to the
statement whose readings enclose that transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from typing import Any

from job.background import Background

SAMPLE_BURST, SAMPLE_MIN_S, SAMPLE_MAX_S = 25, 0.0005, 0.02
GATE_MAX_S = 1.0
SAMPLE_SQL = """
SELECT virtualtransaction, relation::bigint, mode, granted, locktype FROM pg_locks
WHERE pid = $1 AND (NOT granted OR (locktype = 'relation' AND database = (
  SELECT oid FROM pg_database WHERE datname = current_database())))
"""
GATE_TABLES_SQL = (
    "SELECT c.oid::regclass::text FROM pg_class c WHERE c.oid = ANY($1::oid[]) AND c.relkind IN ('r', 'p')"
)


class Sampler(Background):
    """Watches one backend's locks while it runs statements outside its transaction (see the module)."""

    def __init__(self, connection: Any) -> None:
        self.connection = connection
        self.pid: int | None = None
        self.active = False
        self.samples: set[tuple[int, int, str]] = set()
        self.count = 0
        self.waits = 0  # statements seen waiting at the gate
        self._loop = asyncio.get_running_loop()
        self._thread = threading.get_ident()
        self._wake = asyncio.Event()
        self._busy = asyncio.Lock()  # one operation at a time on the connection
        self._gate: Any = None
        self._gate_since = 0.0

    async def __aexit__(self, *exc: Any) -> None:
        await super().__aexit__(*exc)
        with contextlib.suppress(Exception):
            await self._open_gate()

    # --- called from the migration (a greenlet on the loop, or env.py's own thread) -------------

    def watch(self) -> None:
        """A statement outside the transaction starts."""
        self.active = True
        self._loop.call_soon_threadsafe(self._wake.set)

    def unwatch(self) -> None:
        """It ended."""
        self.active = False

    def gate(self, oids: list[int]) -> None:
        """Hold the gate on these tables before the statement is sent."""
        self._call(self._close_gate(oids))

    def ungate(self) -> None:
        """Let go of the gate (if the statement did not make it go already)."""
        self._call(self._open_gate())

    def _call(self, coroutine: Any) -> None:
        """Run a coroutine on the watch's loop, from the migration's greenlet or from another thread."""
        if threading.get_ident() == self._thread:
            from sqlalchemy.util import await_only

            await_only(coroutine)
        else:
            asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=10)

    # --- on the loop ---------------------------------------------------------------------------

    async def _close_gate(self, oids: list[int]) -> None:
        async with self._busy:
            if self._gate is not None or not oids or self._task is None or self._task.done():
                return  # no watch running to let go of it: the statement is not gated
            names = [r[0] for r in await self.connection.fetch(GATE_TABLES_SQL, oids)]
            if not names:
                return
            gate = self.connection.transaction()
            await gate.start()
            try:
                await self.connection.execute("SET LOCAL lock_timeout = '200ms'")
                await self.connection.execute(f"LOCK TABLE {', '.join(names)} IN ROW EXCLUSIVE MODE")
            except Exception:
                await gate.rollback()  # not held: the statement is only sampled
                return
            self._gate, self._gate_since = gate, time.monotonic()

    async def _open_gate(self) -> None:
        async with self._busy:
            await self._release()

    async def _release(self) -> None:
        gate, self._gate = self._gate, None
        if gate is not None:
            await gate.rollback()

    async def _run(self) -> None:
        statement = await self.connection.prepare(SAMPLE_SQL)
        while True:
            await self._wake.wait()
            self._wake.clear()
            taken, delay = 0, SAMPLE_MIN_S
            while self.active and self.pid is not None:
                async with self._busy:
                    rows = await statement.fetch(self.pid)
                    waiting = any(not row[3] for row in rows)
                    for row in rows:
                        if row[4] == "relation":
                            self.samples.add((int(str(row[0]).rsplit("/", 1)[-1]), int(row[1]), str(row[2])))
                    overdue = time.monotonic() - self._gate_since > GATE_MAX_S
                    if self._gate is not None and (waiting or overdue):
                        self.waits += waiting
                        await self._release()
                self.count, taken = self.count + 1, taken + 1
                if taken < SAMPLE_BURST:
                    await asyncio.sleep(0)
                else:
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, SAMPLE_MAX_S)
