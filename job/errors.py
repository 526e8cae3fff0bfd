"""One exception class per outcome the operator must tell apart; cli.py maps them to exit codes."""

from __future__ import annotations

from typing import Any


class MigrateJobError(Exception):
    """A failure the operator can act on: what happened, where, and what to do next."""

    kind = "error"

    def __init__(
        self,
        message: str,
        *,
        hint: str | None = None,
        service: str | None = None,
        database: str | None = None,
        revision: str | None = None,
        **context: Any,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.service = service
        self.database = database
        self.revision = revision
        self.context = context

    def fields(self) -> dict[str, Any]:
        """Return the structured fields that go into the error's log line."""
        out: dict[str, Any] = {"error": self.kind}
        for key in ("service", "database", "revision", "hint"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        out.update({k: v for k, v in self.context.items() if v is not None})
        return out

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"


class ConfigError(MigrateJobError):
    """The command line, settings or manifest are wrong; nothing was touched."""

    kind = "config"


class SecretError(MigrateJobError):
    """A secret reference could not be resolved to a value."""

    kind = "secret"


class ConnectError(MigrateJobError):
    """A database could not be reached, or refused the login."""

    kind = "connect"


class LockTimeout(MigrateJobError):
    """Another run held the database's migration lock past the wait."""

    kind = "lock_timeout"


class HistoryError(MigrateJobError):
    """The database's revision is unknown to this image, or the history has several heads."""

    kind = "history"


class MigrationFailed(MigrateJobError):
    """A migration raised; its transaction rolled back."""

    kind = "migration_failed"
    # The revision's own frames (job.diagnosis), shown instead of the job's; "" shows none.
    stack_trace: str | None = None
    # The failing statement's first line, for the history row of the failed attempt.
    statement_line: str | None = None


class RoundTripFailed(MigrationFailed):
    """``verify``: a revision's downgrade does not undo its upgrade."""

    kind = "round_trip"


class PendingMigrations(MigrateJobError):
    """``plan --check`` found revisions still to apply."""

    kind = "pending"


class Interrupted(MigrateJobError):
    """The run was stopped by a signal; the running migration rolled back."""

    kind = "interrupted"

    def __init__(self, signum: int, **kwargs: Any) -> None:
        super().__init__(f"stopped by signal {signum}", **kwargs)
        self.signum = signum


class DriftFound(MigrateJobError):
    """``check``: models.py and the schema its migrations build differ."""

    kind = "drift"


class LintFindings(MigrateJobError):
    """``lint``: the SQL of one or more revisions breaks a PostgreSQL migration rule."""

    kind = "lint"


class TraceFindings(LintFindings):
    """``trace``: what PostgreSQL did while a revision ran breaks a rule (a rewrite, a scan under a lock)."""

    kind = "trace"


def error_class(kind: str) -> type[MigrateJobError]:
    """Return the error class of a kind (as another task recorded it); a migration's failure if unknown."""
    found: dict[str, type[MigrateJobError]] = {}
    todo: list[type[MigrateJobError]] = [MigrateJobError]
    while todo:
        cls = todo.pop()
        found.setdefault(cls.kind, cls)
        todo.extend(cls.__subclasses__())
    cls = found.get(kind, MigrationFailed)
    return MigrationFailed if cls in (Interrupted, MigrateJobError) else cls
