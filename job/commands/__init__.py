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

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from job.commands.authoring import merge, new_service, revision, show
    from job.commands.changes import acknowledge, downgrade, reset, stamp, upgrade
    from job.commands.guardrails import check, verify
    from job.commands.render import lint, sql
    from job.commands.reports import applied_history, current, heads, history, plan
    from job.commands.tracing import trace
    from job.run import Run, discover_databases, prepare

# Where each name lives. A run imports only its command's module: authoring alone pulls in the
# scratch databases' SQLAlchemy engine, tracing the lock rules; an upgrade needs neither.
_HOMES = {
    **dict.fromkeys(("merge", "new_service", "revision", "show"), "authoring"),
    **dict.fromkeys(("acknowledge", "downgrade", "reset", "stamp", "upgrade"), "changes"),
    **dict.fromkeys(("check", "verify"), "guardrails"),
    **dict.fromkeys(("lint", "sql"), "render"),
    **dict.fromkeys(("applied_history", "current", "heads", "history", "plan"), "reports"),
    "trace": "tracing",
}


def __getattr__(name: str) -> Any:
    """Return a command (or the run's helpers), importing its module on first use."""
    if name in ("Run", "discover_databases", "prepare"):
        return getattr(importlib.import_module("job.run"), name)
    if name in _HOMES:
        return getattr(importlib.import_module(f"job.commands.{_HOMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
