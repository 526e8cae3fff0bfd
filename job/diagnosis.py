"""What a failed revision did: which statement, where in the revision file, what PostgreSQL said.

A revision's statements mostly reach the server as one batch (job.batching), so the driver's
error alone cannot say which of them failed. Each deferred statement keeps the frame of the
revision file that issued it (a walk up the stack to that file, only when the revision's file is
known); when the batch fails, :func:`locate` names the statement:

* by the server's error position, when it sent one: the position counts characters in the whole
  query, and the job knows where each statement starts in it;
* else by sending the batch again one statement at a time, from the state the batch started in
  (the transaction rolled back and begun again if the batch opened it, else rolled back to the
  savepoint the batch then began with), in the same session, under the same lock: the first
  statement that fails again with the same SQLSTATE is the one. Errors that another run would
  not reproduce, or only slowly (a lock or statement timeout, a lost connection), are not
  replayed.

A statement sent on its own (an autocommit block, job.ops helpers, reads, bound parameters)
is named by the driver's error itself, and its line by the revision's frame in the traceback.
"""

from __future__ import annotations

import os
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The batch's savepoint when it is not the first thing its transaction runs.
SAVEPOINT = "migrate_job_batch"
# SQLSTATE classes not replayed: connection, transaction state, rollback, resources, locks and
# object in use, cancel (a timeout) and shutdown, system and internal errors.
NO_REPLAY = ("08", "25", "40", "53", "55", "57", "58", "XX")
# What PostgreSQL sent besides its message, by log field: asyncpg's attribute for each.
SERVER_FIELDS = {
    "detail": "detail",
    "server_hint": "hint",
    "schema": "schema_name",
    "table": "table_name",
    "column": "column_name",
    "constraint": "constraint_name",
}
# How much of a failing statement a log line shows.
STATEMENT_CHARS = 1000
# Where the culprit of a batch is kept on the driver's exception.
ATTR = "migrate_job_culprit"


@dataclass(frozen=True)
class Origin:
    """The line of a revision file that issued a statement."""

    file: str
    line: int
    function: str


@dataclass(frozen=True)
class Culprit:
    """The statement of a batch that failed (None: the job could not tell which)."""

    statement: str | None
    origin: Origin | None = None
    position: int | None = None  # 1-based, in the statement


def caller(file: str | None) -> Origin | None:
    """Return the innermost frame of the revision file on the stack (cheap: no traceback is built)."""
    if file is None:
        return None
    frame: Any = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_filename == file:
            return Origin(file, frame.f_lineno, frame.f_code.co_name)
        frame = frame.f_back
    return None


def server_error(exc: BaseException | None) -> Any:
    """Return the driver's PostgreSQL error behind an exception (asyncpg's PostgresError), if any."""
    # asyncpg's error carries the server's fields; the DBAPI error that wraps it has sqlstate only.
    found = (e for e in _chain(exc) if hasattr(e, "as_dict") and isinstance(getattr(e, "sqlstate", 0), str))
    return next(found, None)


def _chain(exc: BaseException | None) -> list[BaseException]:
    """Return exc and what it wraps (SQLAlchemy's .orig, __cause__, __context__), outermost first."""
    seen: list[BaseException] = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = getattr(exc, "orig", None) or exc.__cause__ or exc.__context__
    return seen


def locate(
    error: BaseException,
    adapter: Any,
    parts: list[str],
    origins: list[Origin | None],
    *,
    savepoint: bool,
) -> Culprit:
    """Return the statement of a failed batch (see the module doc), to be kept on its error (ATTR).

    parts are the statements as sent (the savepoint first, if any), joined by ``JOINER``.
    """
    server = server_error(error)
    if server is None:
        return Culprit(None)
    found: tuple[int, int | None] | None = _by_position(server, parts) if server.position else None
    candidates = [i for i in range(len(parts)) if not (savepoint and i == 0)]
    if found is None and len(candidates) == 1:
        found = (candidates[0], None)
    if found is None and not str(server.sqlstate).startswith(NO_REPLAY):
        from sqlalchemy.util import await_

        again = await_(_replay(adapter, parts, server.sqlstate, savepoint=savepoint))
        found = None if again is None else (again, None)
    if found is None or (savepoint and found[0] == 0):
        return Culprit(None)
    index, position = found
    return Culprit(parts[index], origins[index], position)


JOINER = "\n;\n"  # the newline ends a trailing -- comment, which would otherwise swallow the semicolon


def _by_position(server: Any, parts: list[str]) -> tuple[int, int] | None:
    """Return the statement holding the server's position, and the position within it."""
    try:
        at = int(server.position) - 1  # characters from the start of the whole query
    except (TypeError, ValueError):
        return None
    start = 0
    for index, part in enumerate(parts):
        # A position in the separator after a statement is its end ("at end of input" alone).
        if start <= at < start + len(part) + len(JOINER):
            return index, min(at - start, len(part)) + 1
        start += len(part) + len(JOINER)
    return None


async def _replay(adapter: Any, parts: list[str], sqlstate: str, *, savepoint: bool) -> int | None:
    """Send the batch again statement by statement from where it started; return the one that fails."""
    raw = adapter._connection
    try:
        async with adapter._execute_mutex:
            if savepoint:
                await raw.execute(f"ROLLBACK TO SAVEPOINT {SAVEPOINT}")
            else:
                # The batch opened the transaction: start it again, as the adapter does.
                if adapter._transaction is not None:
                    await adapter._transaction.rollback()
                adapter._transaction = None
                await adapter._start_transaction()
            for index, part in enumerate(parts):
                if savepoint and index == 0:
                    continue
                try:
                    await raw.execute(part)
                except Exception as again:
                    return index if getattr(again, "sqlstate", None) == sqlstate else None
    except Exception:
        return None  # the connection broke: the original error is what the operator gets
    return None


@dataclass
class Report:
    """What a failure log line says about the failing statement and the server's error."""

    fields: dict[str, Any]
    reason: str
    sentence: str
    stack_trace: str | None
    statement_line: str | None


def report(exc: BaseException, revision_file: str | None, service_dir: Path, *, log_detail: bool) -> Report:
    """Return the fields, the extra sentence and the revision-only stack trace for a failure."""
    server = server_error(exc)
    culprit = _culprit(exc, server, revision_file)
    service_dir = service_dir.resolve()  # frames name files absolutely; MIGRATE_SERVICES_DIR may not
    fields: dict[str, Any] = {}
    if culprit.statement is not None:
        fields["statement"] = _truncated(culprit.statement.strip())
    if culprit.origin is not None:
        fields["revision_file"] = _shown(culprit.origin.file, service_dir)
        fields["line"] = culprit.origin.line
    if server is not None:
        for name, attr in SERVER_FIELDS.items():
            value = getattr(server, attr, None)
            if value and (log_detail or name != "detail"):
                fields[name] = str(value)
        fields["position"] = culprit.position
    reason = _reason(exc, server, log_detail=log_detail)
    lines = (culprit.statement or "").strip().splitlines()
    first = lines[0] if lines else None
    return Report(
        fields={k: v for k, v in fields.items() if v is not None},
        reason=reason,
        sentence=_sentence(fields, first),
        stack_trace=_stack(exc, culprit, service_dir, reason, env_too=revision_file is None),
        statement_line=first[:200] if first else None,
    )


def _batched(exc: BaseException) -> Culprit | None:
    """Return what the job found out about a failed batch (None: the statement was sent alone)."""
    return next((getattr(e, ATTR) for e in _chain(exc) if hasattr(e, ATTR)), None)


def _culprit(exc: BaseException, server: Any, revision_file: str | None) -> Culprit:
    """Return the failing statement: the batch's culprit, else the statement the driver ran alone."""
    batched = _batched(exc)
    if batched is not None:
        return batched
    frames = _frames(exc)
    origin = next(
        (Origin(f.filename, f.lineno or 0, f.name) for f in reversed(frames) if f.filename == revision_file),
        None,
    )
    statement = getattr(exc, "statement", None)
    position = getattr(server, "position", None) if server is not None else None
    return Culprit(
        statement if isinstance(statement, str) else None,
        origin,
        int(position) if position and str(position).isdigit() else None,
    )


def _frames(exc: BaseException) -> list[traceback.FrameSummary]:
    """Return the frames of an exception's traceback, outermost first."""
    return list(traceback.extract_tb(exc.__traceback__, limit=None))


def _reason(exc: BaseException, server: Any, *, log_detail: bool) -> str:
    """Return the error's type and the first line of its message, without SQLAlchemy's SQL echo.

    Without detail, a data exception (class 22) shows its name only: its message can quote a value.
    """
    if server is not None:
        if not log_detail and str(server.sqlstate).startswith("22"):
            return f"{type(exc).__name__}: {type(server).__name__}"
        return f"{type(exc).__name__}: {server.message}"
    orig: Any = getattr(exc, "orig", None)
    source = orig if orig is not None else exc
    text = str(source).strip().splitlines()
    first = text[0] if text else type(source).__name__
    # asyncpg errors arrive as "<class 'asyncpg.exceptions.X'>: message" through SQLAlchemy.
    if first.startswith("<class '") and ">: " in first:
        first = first.split(">: ", 1)[1]
    return f"{type(exc).__name__}: {first}"


def _sentence(fields: dict[str, Any], first: str | None) -> str:
    """Return the sentence the message gains: the server's detail and the failing statement."""
    parts = []
    if fields.get("detail"):
        parts.append(str(fields["detail"]).rstrip("."))
    if first is not None:
        where = f" ({fields['revision_file']} line {fields['line']})" if "line" in fields else ""
        parts.append(f"the statement{where}: {first[:200]}")
    elif "line" in fields:
        parts.append(f"at {fields['revision_file']} line {fields['line']}")
    return "; ".join(parts)


def _truncated(statement: str) -> str:
    """Return the statement, cut to STATEMENT_CHARS with a note of how much was left out."""
    if len(statement) <= STATEMENT_CHARS:
        return statement
    return statement[:STATEMENT_CHARS] + f" ... ({len(statement) - STATEMENT_CHARS} more characters)"


def _shown(file: str, service_dir: Path) -> str:
    """Return a revision file's path relative to its service's folder, where it is inside it."""
    path = Path(os.path.abspath(file))
    return str(path.relative_to(service_dir)) if path.is_relative_to(service_dir) else file


# The job's own modules; job.ops runs as part of the revisions that call it.
JOB_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
OPS_DIR = os.path.join(JOB_DIR, "ops") + os.sep


def _raised_by_the_job(exc: BaseException) -> bool:
    """Return whether the exception came from the job's own code, not from the server or a revision."""
    frames = _frames(exc)
    last = _absolute(frames[-1].filename) if frames else ""
    return server_error(exc) is None and last.startswith(JOB_DIR) and not last.startswith(OPS_DIR)


def _absolute(file: str) -> str:
    """Return a frame's file name as an absolute path."""
    return os.path.abspath(file)


def _stack(
    exc: BaseException, culprit: Culprit, service_dir: Path, reason: str, *, env_too: bool
) -> str | None:
    """Return a stack trace of the revision's own frames only ("" if none ran; None: a bug of the job's).

    A statement of a batch failed when the batch was sent, wherever that was: its frame is the
    line that issued it, or none when the job could not tell which statement failed. env_too
    keeps env.py's frames (a failure before any revision ran).
    """
    if _raised_by_the_job(exc):
        return None  # a bug of the job's own, not the revision's: its whole trace is shown
    env = "" if env_too else os.path.join(str(service_dir), "migrations", "env.py")
    inside = str(service_dir) + os.sep
    if _batched(exc) is not None:
        origin = culprit.origin
        frames = [traceback.FrameSummary(origin.file, origin.line, origin.function)] if origin else []
    else:
        frames = [
            f
            for f in _frames(exc)
            if _absolute(f.filename).startswith(inside) and _absolute(f.filename) != env
        ]
    if not frames:
        return ""  # none of the revision's frames ran: no stack trace is shown
    module = type(exc).__module__
    name = type(exc).__qualname__ if module == "builtins" else f"{module}.{type(exc).__qualname__}"
    text = "".join(traceback.StackSummary.from_list(frames).format())
    return f"Traceback (most recent call last):\n{text}{name}: {reason.split(': ', 1)[-1]}\n"
