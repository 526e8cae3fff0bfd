"""The job's commands as typed functions, one module per family; the CLI and the API call them.

- ``changes``: what changes a database (upgrade, downgrade, stamp, acknowledge)
- ``reports``: what reads and reports (plan, current, heads, history, history --applied)
- ``render``: what renders SQL without running it (sql, lint)
- ``guardrails``: what checks authors' work on scratch databases (verify, check)
- ``authoring``: what helps authors on a workstation (revision, new-service)

Every command takes the run context (``job.run.Run``) first; nothing below this package imports it.
"""

from __future__ import annotations

from job.commands.authoring import new_service, revision
from job.commands.changes import acknowledge, downgrade, stamp, upgrade
from job.commands.guardrails import check, verify
from job.commands.render import lint, sql
from job.commands.reports import applied_history, current, heads, history, plan
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
    "new_service",
    "plan",
    "prepare",
    "revision",
    "sql",
    "stamp",
    "upgrade",
    "verify",
]
