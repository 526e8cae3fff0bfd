"""The job's commands as typed functions, one module per family; the CLI and the API call them.

- ``changes``: what changes a database (upgrade, downgrade, stamp, acknowledge, reset)
- ``reports``: what reads and reports (plan, current, heads, history, history --applied)
- ``render``: what renders SQL without running it (sql, lint)
- ``guardrails``: what checks authors' work on scratch databases (verify, check)
- ``tracing``: what runs revisions on a scratch database and reads what PostgreSQL did (trace,
  and the tracing behind plan --impact)
- ``authoring``: what helps authors (show; on a workstation: revision, merge, new-service)

Every command takes the run context (``job.run.Run``) first; nothing below this package imports it.
"""

from __future__ import annotations

from job.commands.authoring import merge, new_service, revision, show
from job.commands.changes import acknowledge, downgrade, reset, stamp, upgrade
from job.commands.guardrails import check, verify
from job.commands.render import lint, sql
from job.commands.reports import applied_history, current, heads, history, plan
from job.commands.tracing import trace
from job.run import Run, discover_databases, prepare

__all__ = [
    "Run",
    "acknowledge",
    "applied_history",
    "check",
    "current",
    "discover_databases",
    "downgrade",
    "heads",
    "history",
    "lint",
    "merge",
    "new_service",
    "plan",
    "prepare",
    "reset",
    "revision",
    "show",
    "sql",
    "stamp",
    "trace",
    "upgrade",
    "verify",
]
