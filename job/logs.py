"""Structured logging: one Cloud Logging JSON object per line on stdout, or short text on a terminal.

Every line carries a stable dotted ``event`` name and context fields. Secret values registered with
:func:`redact` are replaced in every line, whatever path they took to get there.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import json
import logging
import re
import sys
import time
import traceback
import types
import urllib.parse
from collections.abc import Iterator, Mapping
from typing import Any, TextIO

LOGGER_NAME = "migrate_job"
# The migration helpers (job.ops) log progress events at INFO through this logger.
OPS_LOGGER_NAME = "job.ops"
_logger = logging.getLogger(LOGGER_NAME)
_context: dict[str, Any] = {}
# Fields of what runs now (the database and revision a migration's own lines belong to): a
# ContextVar, so that databases inspected side by side in one event loop keep theirs apart.
_scope: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar(
    "migrate_job_log_scope", default=types.MappingProxyType({})
)
_in_scope: contextvars.ContextVar[bool] = contextvars.ContextVar("migrate_job_in_log_scope", default=False)
_secrets: set[str] = set()
_setup: tuple[str, dict[str, str]] = ("json", {})
MASK = "***"
# Erases the current terminal line (carriage return, then ANSI "erase to end of line").
ERASE = "\r\x1b[K"
# The terminal's updating progress line, while one is shown (text format on a TTY only).
_status: dict[str, Any] = {"shown": False, "stream": None}


def redact(value: str) -> None:
    """Register a secret value so that no log line ever shows it."""
    if len(value) >= 3:
        _secrets.add(value)


def scrub(text: str) -> str:
    """Return text with every registered secret masked, and passwords written in SQL or URLs too.

    Registered secrets go in every spelling (raw, JSON-escaped, URL-quoted). A revision's own
    secrets are not registered: a failing ``CREATE ROLE ... PASSWORD '...'`` puts its SQL into
    the error line, so password clauses and connection strings are masked by their shape.
    """
    for secret in sorted(_secrets, key=len, reverse=True):
        for form in _forms(secret):
            if form in text:
                text = text.replace(form, MASK)
    if _MAYBE_SECRET.search(text):
        for pattern, replacement in _SECRET_SHAPES:
            text = pattern.sub(replacement, text)
    return text


# Cheap test first: most lines hold none of these words, and scrub() runs for every line.
_MAYBE_SECRET = re.compile(r"password|://|secret", re.IGNORECASE)
_SECRET_SHAPES = (
    # PASSWORD 'x' (also ENCRYPTED, E'x', doubled quotes), and PASSWORD $tag$x$tag$.
    (re.compile(r"(PASSWORD\s+E?)'(?:[^'\\]|''|\\.)*'", re.IGNORECASE), rf"\1'{MASK}'"),
    (re.compile(r"(PASSWORD\s+)(\$[A-Za-z_0-9]*\$).*?\2", re.IGNORECASE | re.DOTALL), rf"\1'{MASK}'"),
    # scheme://user:password@host
    (re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^\s:/@'\"]*):([^\s@'\"]+)@"), rf"\1:{MASK}@"),
    # password=x in a libpq connection string or a URL query
    (re.compile(r"(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s&'\",;]+)", re.IGNORECASE), rf"\1{MASK}"),
)


@functools.cache  # scrub() runs for every log line: each secret's spellings are worked out once
def _forms(secret: str) -> tuple[str, ...]:
    """Return a secret's spellings in logs: raw or repr'd (KeyError, ``!r``), JSON-escaped, URL-quoted.

    URL-quoted three ways (fully, as a form value, and as SQLAlchemy renders a URL's password), each
    also with ``%`` doubled, as a URL stands in an Alembic Config (``sqlalchemy.url``).
    """
    spelled = (secret, repr(secret)[1:-1])
    quoted = (
        urllib.parse.quote(secret, safe=""),
        urllib.parse.quote_plus(secret, safe=""),
        urllib.parse.quote(secret, safe=" +"),
    )
    return (
        *spelled,
        *(json.dumps(s, ensure_ascii=False)[1:-1] for s in spelled),
        *(json.dumps(s)[1:-1] for s in spelled),
        *quoted,
        *(q.replace("%", "%%") for q in quoted),
    )


def context() -> dict[str, Any]:
    """Return the fields bound to every line (a copy)."""
    return dict(_context)


def current_setup() -> tuple[str, dict[str, str]]:
    """Return the format and labels logging was set up with (worker processes copy them)."""
    return _setup[0], dict(_setup[1])


def bind(**fields: Any) -> None:
    """Add fields (execution, task, command) to every following line."""
    _context.update({k: v for k, v in fields.items() if v is not None})


@contextlib.contextmanager
def scoped(**fields: Any) -> Iterator[None]:
    """Add fields to every line written inside the block (a migration's database), in this task only."""
    token = _scope.set({**_scope.get(), **{k: v for k, v in fields.items() if v is not None}})
    inside = _in_scope.set(True)
    try:
        yield
    finally:
        _in_scope.reset(inside)
        _scope.reset(token)


def also(**fields: Any) -> None:
    """Add fields to the enclosing scoped() block's lines from here on; nothing outside such a block.

    (Rendering SQL offline runs the same steps with no scope around them: nothing may stick.)
    """
    if _in_scope.get():
        _scope.set({**_scope.get(), **{k: v for k, v in fields.items() if v is not None}})


def event(
    name: str,
    message: str,
    *,
    level: int = logging.INFO,
    exc: BaseException | None = None,
    **fields: Any,
) -> None:
    """Write one log line: ``event`` name, a sentence for people, and context fields."""
    payload: dict[str, Any] = {"event": name, **_context, **_scope.get()}
    payload.update({k: v for k, v in fields.items() if v is not None})
    if exc is not None:
        # Cloud Error Reporting reads a stack trace from this field; the message stays a sentence.
        payload["stack_trace"] = "".join(traceback.format_exception(exc))
    _logger.log(level, message, extra={"json_fields": payload}, stacklevel=2)


def progress(name: str, message: str, **fields: Any) -> None:
    """Log a progress event: on a terminal (text format), one line updated in place; else a line."""
    stream = _status["stream"]
    if _setup[0] != "text" or stream is None or not stream.isatty():
        event(name, message, **fields)
        return
    stream.write(f"{ERASE}{time.strftime('%H:%M:%S')} {'PROGRESS':<7} {scrub(message)}")
    stream.flush()
    _status["shown"] = True


def end_progress() -> None:
    """Erase the terminal's progress line, if one is shown."""
    if _status["shown"] and _status["stream"] is not None:
        _status["stream"].write(ERASE)
        _status["stream"].flush()
        _status["shown"] = False


class _Scrubbing(logging.Handler):
    """Mixin behaviour: mask secrets in whatever the wrapped handler formats."""

    def format(self, record: logging.LogRecord) -> str:
        """Return the formatted line with secrets masked."""
        return scrub(super().format(record))


def _structured_handler(stream: TextIO, labels: Mapping[str, str]) -> logging.Handler:
    """Return the Cloud Logging structured handler (job.structured), masking secrets."""
    from job.structured import StructuredHandler

    class Handler(_Scrubbing, StructuredHandler):
        """StructuredHandler that masks secrets."""

    return Handler(stream, labels)


class TextFormatter(logging.Formatter):
    """Format a record as ``HH:MM:SS LEVEL event message [key=value ...]`` for people."""

    # Already in the message, or only useful to machines.
    HIDDEN = frozenset(
        {"event", "job", "execution", "task_index", "task_attempt", "command", "url"}
        | {"service", "database", "instance", "databases", "groups", "counts", "stack_trace"}
    )

    def format(self, record: logging.LogRecord) -> str:
        """Return one readable line, plus a table for the summary and the stack trace, if any."""
        fields: dict[str, Any] = dict(getattr(record, "json_fields", {}) or {})
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        line = f"{stamp} {record.levelname:<7} {fields.get('event', record.name):<18} {record.getMessage()}"
        if "error" in fields and ("revision_file" in fields or "statement" in fields):
            return line + _failure_block(fields)
        extras = " ".join(f"{k}={_short(v)}" for k, v in fields.items() if k not in self.HIDDEN)
        if extras:
            line += f"  [{extras}]"
        # The summary's databases, then its groups of databases that went the same way (past 200).
        rows = [*(fields.get("databases") or ()), *(fields.get("groups") or ())]
        for db in rows:
            name = db["database"] if "count" not in db else f"[{db['count']} databases]"
            line += (
                f"\n    {db['service']:<14} {name:<20} {db['status']:<8} "
                f"{db['from_revision'] or 'base'} -> {db['to_revision'] or 'base'}"
                + (f"  applied {_short(db['applied'])}" if db["applied"] else "")
            )
        if fields.get("stack_trace"):
            line += "\n" + str(fields["stack_trace"]).rstrip()
        return line


# A failed revision's fields, shown as a block of their own in the text format.
FAILURE_FIELDS = ("statement", "revision_file", "line", "sqlstate", "position", "detail", "server_hint")
SERVER_OBJECTS = ("constraint", "schema", "table", "column")


def _failure_block(fields: dict[str, Any]) -> str:
    """Return the short block under a failed revision's line: statement, where, what the server said."""
    rows = []
    statement = str(fields.get("statement", "")).strip().splitlines()
    if statement:
        rows.append(("statement", statement[0] + (" ..." if len(statement) > 1 else "")))
    if "revision_file" in fields:
        rows.append(("at", f"{fields['revision_file']} line {fields.get('line', '?')}"))
    server = [f"SQLSTATE {fields['sqlstate']}"] if fields.get("sqlstate") else []
    server += [f"{k} {fields[k]}" for k in (*SERVER_OBJECTS, "position") if fields.get(k) is not None]
    if server:
        rows.append(("server", ", ".join(server)))
    rows += [(k, fields[k]) for k in ("detail", "server_hint", "hint") if fields.get(k)]
    hidden = {*TextFormatter.HIDDEN, *FAILURE_FIELDS, *SERVER_OBJECTS, "hint"}
    extras = " ".join(f"{k}={_short(v)}" for k, v in fields.items() if k not in hidden)
    if extras:
        rows.append(("", extras))
    return "".join(f"\n    {name:<10} {value}" for name, value in rows)


def _short(value: Any) -> str:
    """Return a compact rendering of a field value for text logs."""
    if isinstance(value, (list, tuple)):
        items = [v.get("revision", v) if isinstance(v, dict) else v for v in value]
        return ",".join(str(v) for v in items) or "-"
    return str(value)


class _TextHandler(_Scrubbing, logging.StreamHandler):  # type: ignore[type-arg]
    """StreamHandler with secret masking, that first erases a terminal's progress line."""

    def emit(self, record: logging.LogRecord) -> None:
        """Write the record on a line of its own (the progress line is drawn again at its next tick)."""
        end_progress()
        super().emit(record)


def setup(fmt: str, *, labels: Mapping[str, str] | None = None, stream: TextIO | None = None) -> str:
    """Route all logging to one handler on stdout; return the format chosen (json or text)."""
    stream = stream or sys.stdout
    if fmt == "auto":
        fmt = "text" if stream.isatty() else "json"
    handler: logging.Handler
    if fmt == "json":
        handler = _structured_handler(stream, labels or {})
    else:
        handler = _TextHandler(stream)
        handler.setFormatter(TextFormatter())
        _status.update(shown=False, stream=handler.stream)
    handler.addFilter(_LibraryEvent())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    # Libraries (alembic, sqlalchemy, a migration's own logger) speak up only for warnings.
    root.setLevel(logging.WARNING)
    _logger.setLevel(logging.INFO)
    logging.getLogger(OPS_LOGGER_NAME).setLevel(logging.INFO)
    # Installed afresh: logging keeps the hook it replaced and will not install itself again, so a
    # caller that restored warnings.showwarning since (warnings.catch_warnings) would lose the capture.
    logging.captureWarnings(False)
    logging.captureWarnings(True)
    global _setup
    _setup = (fmt, dict(labels or {}))
    return fmt


class _LibraryEvent(logging.Filter):
    """Give a library's own log record an event name and the run's context, so every line has them."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Attach ``event=library.log`` to records that lack an event; keep an event a library gave.

        A record that names its event in ``json_fields`` (job.ops's ``backfill.progress``) keeps it,
        with the run's context added as on the job's own lines.
        """
        fields = getattr(record, "json_fields", None)
        if not fields or "event" not in fields:
            record.json_fields = {"event": "library.log", "logger": record.name, **_context, **_scope.get()}
        elif record.name != LOGGER_NAME:
            record.json_fields = {"event": fields["event"], **_context, **_scope.get(), **fields}
        return True
