"""PostgreSQL's table lock modes: their order, what each one blocks, and how to say it.

The eight modes of ``pg_locks.mode``, weakest first. For an application's queries only three
requests matter: ``SELECT`` takes ACCESS SHARE, ``SELECT ... FOR UPDATE/SHARE`` takes ROW SHARE,
and ``INSERT``, ``UPDATE``, ``DELETE`` take ROW EXCLUSIVE. Every mode from SHARE up blocks writes;
only ACCESS EXCLUSIVE blocks plain reads. So the strongest mode a transaction holds on a table
says exactly which of the application's queries wait for it.
"""

from __future__ import annotations

from collections.abc import Iterable

MODES = (
    "AccessShareLock",
    "RowShareLock",
    "RowExclusiveLock",
    "ShareUpdateExclusiveLock",
    "ShareLock",
    "ShareRowExclusiveLock",
    "ExclusiveLock",
    "AccessExclusiveLock",
)
LEVEL = {mode: index + 1 for index, mode in enumerate(MODES)}
# The conflict table of PostgreSQL's documentation (explicit locking), by mode.
CONFLICTS: dict[str, frozenset[str]] = {
    "AccessShareLock": frozenset({"AccessExclusiveLock"}),
    "RowShareLock": frozenset({"ExclusiveLock", "AccessExclusiveLock"}),
    "RowExclusiveLock": frozenset(
        {"ShareLock", "ShareRowExclusiveLock", "ExclusiveLock", "AccessExclusiveLock"}
    ),
    "ShareUpdateExclusiveLock": frozenset(
        {
            "ShareUpdateExclusiveLock",
            "ShareLock",
            "ShareRowExclusiveLock",
            "ExclusiveLock",
            "AccessExclusiveLock",
        }
    ),
    "ShareLock": frozenset(
        {
            "RowExclusiveLock",
            "ShareUpdateExclusiveLock",
            "ShareRowExclusiveLock",
            "ExclusiveLock",
            "AccessExclusiveLock",
        }
    ),
    "ShareRowExclusiveLock": frozenset(MODES[2:]),
    "ExclusiveLock": frozenset(MODES[1:]),
    "AccessExclusiveLock": frozenset(MODES),
}
# What the application's queries ask for, and the word a report uses for each.
QUERIES = (("reads", "AccessShareLock"), ("writes", "RowExclusiveLock"))
# Statements that take each mode (PostgreSQL's documentation, abridged), for reports and docs/locks.md.
TAKEN_BY = {
    "AccessShareLock": "SELECT",
    "RowShareLock": "SELECT ... FOR UPDATE / FOR SHARE",
    "RowExclusiveLock": "INSERT, UPDATE, DELETE, MERGE",
    "ShareUpdateExclusiveLock": "VACUUM, ANALYZE, CREATE INDEX CONCURRENTLY, VALIDATE CONSTRAINT, "
    "ALTER TABLE SET STATISTICS",
    "ShareLock": "CREATE INDEX (without CONCURRENTLY)",
    "ShareRowExclusiveLock": "CREATE TRIGGER, ADD FOREIGN KEY (on both tables)",
    "ExclusiveLock": "REFRESH MATERIALIZED VIEW CONCURRENTLY",
    "AccessExclusiveLock": "most ALTER TABLE forms, DROP TABLE, TRUNCATE, VACUUM FULL, CLUSTER, LOCK TABLE",
}


def level(mode: str) -> int:
    """Return the mode's rank, 1 (ACCESS SHARE) to 8 (ACCESS EXCLUSIVE); 0 for anything else."""
    return LEVEL.get(mode, 0)


def strongest(modes: Iterable[str]) -> str | None:
    """Return the strongest of the modes, or None for none."""
    known = [m for m in modes if m in LEVEL]
    return max(known, key=level) if known else None


def blocks(mode: str | None) -> list[str]:
    """Return which of the application's queries a mode blocks: a subset of reads and writes."""
    if mode is None:
        return []
    return [word for word, asks in QUERIES if asks in CONFLICTS.get(mode, frozenset())]


def blocks_writes(mode: str | None) -> bool:
    """Return whether the mode makes INSERT, UPDATE and DELETE wait."""
    return "writes" in blocks(mode)


def describe_blocks(mode: str | None) -> str:
    """Return what a mode blocks in words: ``reads and writes``, ``writes``, or that it blocks neither."""
    found = blocks(mode)
    return " and ".join(found) if found else "none of the application's reads or writes"
