"""Zero-downtime helpers for revisions: ``from job.ops import create_index_concurrently, ...``.

Each helper does one risky schema change the way that keeps the application running: a statement
that takes a lock the application's reads or writes need is brief, and waits for that lock at most
``lock_timeout`` (so the queries queued behind it wait no longer), and long work (an index build,
a validation scan, a backfill) runs under locks that the application's queries do not conflict
with. This package imports only the standard library, Alembic and
SQLAlchemy, so a tree that uses it still runs with plain ``alembic upgrade`` (the job installed).
The helpers need PostgreSQL 13 or newer.

Two kinds of helper, and where they go in a revision:

* Helpers that leave the revision's transaction (Alembic's ``autocommit_block()``), each of their
  statements committed on its own: ``create_index_concurrently``, ``drop_index_concurrently``,
  ``add_not_null``, ``add_foreign_key_not_valid``, ``backfill`` and the first part of
  ``add_column_with_default``. Leaving commits what the revision's transaction did so far, so they
  refuse to run after the revision changed anything (``HelperRefused``): put them first in a
  revision, or in a revision of their own.
* Helpers that stay in the revision's transaction: ``validate_not_null``, ``validate_constraint``
  (and the end of ``add_column_with_default`` for a NOT NULL column). Their work commits with the
  version table, so they go after the first kind, as do the revision's plain ``op.*`` calls.

A run killed at any point leaves the database at the previous revision (the version row moves
only at the end), and running the revision again finishes the work: every step checks the catalog
first (an index that exists and is valid is kept, an INVALID one left by a killed build is dropped
and built again, a constraint that exists is not added twice, a backfill updates only the rows its
``where`` still selects).

Offline (``alembic upgrade --sql``, and the job's ``sql`` and ``lint``) the helpers render the same
statements without the catalog checks, in forms that can run again: ``IF [NOT] EXISTS`` where
PostgreSQL has it, and a ``DO`` block where it has not (adding a constraint that may exist,
dropping the helper's own temporary check, setting a default outside a transaction, the batched
backfill loop), so that squawk's ``prefer-robust-stmts`` and ``ban-drop-constraint`` have nothing
to flag.

Timeouts: the statements that take a lock the application waits for (ADD CONSTRAINT ... NOT
VALID, SET NOT NULL, ADD COLUMN, SET DEFAULT, DROP of the temporary check, each backfill batch's
row locks) keep the session's ``lock_timeout`` (the job sets it from the manifest; set it in
env.py when running plain Alembic). The long ones that take only SHARE UPDATE EXCLUSIVE (CREATE or
DROP INDEX CONCURRENTLY, VALIDATE CONSTRAINT) and the backfill's row counts run with
``statement_timeout`` lifted for that one statement, then restored: a timeout there would only
throw the work away (and leave an INVALID index behind) while blocking nobody. They keep
``lock_timeout``: a build that waits too long for an old transaction fails, the job retries the
revision, and the retry drops the INVALID index and builds it again.

Progress is logged through the ``job.ops`` logger with a ``json_fields`` event (``backfill.start``,
``backfill.progress``, ``backfill.done``, ``ops.skipped``, ``ops.invalid_index_dropped``); the job
prints each as a line of its own log, with the run's context.
"""

from __future__ import annotations

from job.ops._base import HelperRefused
from job.ops.backfill import backfill
from job.ops.columns import add_column_with_default
from job.ops.constraints import (
    add_foreign_key_not_valid,
    add_not_null,
    not_null_check_name,
    validate_constraint,
    validate_not_null,
)
from job.ops.indexes import create_index_concurrently, drop_index_concurrently

__all__ = [
    "HelperRefused",
    "add_column_with_default",
    "add_foreign_key_not_valid",
    "add_not_null",
    "backfill",
    "create_index_concurrently",
    "drop_index_concurrently",
    "not_null_check_name",
    "validate_constraint",
    "validate_not_null",
]
