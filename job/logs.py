"""Structured logging: one Cloud Logging JSON object per line on stdout, or short text on a terminal.

Every line carries a stable dotted ``event`` name and context fields. Secret values registered with
:func:`redact` are replaced in every line, whatever path they took to get there.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import traceback
import urllib.parse
from collections.abc import Mapping
from typing import Any, TextIO

LOGGER_NAME = "migrate_job"
_logger = logging.getLogger(LOGGER_NAME)
_context: dict[str, Any] = {}
_secrets: set[str] = set()
MASK = "***"


def redact(value: str) -> None:
    """Register a secret value so that no log line ever shows it."""
    if len(value) >= 3:
        _secrets.add(value)


def scrub(text: str) -> str:
    """Return text with every registered secret (raw, JSON-escaped or URL-quoted) masked."""
    for secret in sorted(_secrets, key=len, reverse=True):
        for form in _forms(secret):
            if form in text:
                text = text.replace(form, MASK)
    return text


def _forms(secret: str) -> tuple[str, ...]:
    """Return the spellings a secret takes in logs: raw, inside a JSON string, URL-quoted."""
    return (
        secret,
        json.dumps(secret, ensure_ascii=False)[1:-1],
        json.dumps(secret)[1:-1],
        urllib.parse.quote(secret, safe=""),
        urllib.parse.quote_plus(secret, safe=""),
    )


def bind(**fields: Any) -> None:
    """Add fields (execution, task, command) to every following line."""
    _context.update({k: v for k, v in fields.items() if v is not None})


def event(
    name: str,
    message: str,
    *,
    level: int = logging.INFO,
    exc: BaseException | None = None,
    **fields: Any,
) -> None:
    """Write one log line: ``event`` name, a sentence for people, and context fields."""
    payload: dict[str, Any] = {"event": name, **_context}
    payload.update({k: v for k, v in fields.items() if v is not None})
    if exc is not None:
        # Cloud Error Reporting reads a stack trace from this field; the message stays a sentence.
        payload["stack_trace"] = "".join(traceback.format_exception(exc))
    _logger.log(level, message, extra={"json_fields": payload}, stacklevel=2)


class _Scrubbing(logging.Handler):
    """Mixin behaviour: mask secrets in whatever the wrapped handler formats."""

    def format(self, record: logging.LogRecord) -> str:
        """Return the formatted line with secrets masked."""
        return scrub(super().format(record))


def _structured_handler(stream: TextIO, labels: Mapping[str, str]) -> logging.Handler:
    """Return google-cloud-logging's structured handler, masking secrets, without its banner."""
    from google.cloud.logging_v2.handlers import StructuredLogHandler

    class Handler(_Scrubbing, StructuredLogHandler):
        """StructuredLogHandler that masks secrets and skips the one-off diagnostic line."""

        def emit(self, record: logging.LogRecord) -> None:
            # The library's first-line diagnostic entry has no event; every stdout line must.
            logging.StreamHandler.emit(self, record)

    return Handler(stream=stream, labels=dict(labels))


class TextFormatter(logging.Formatter):
    """Format a record as ``HH:MM:SS LEVEL event message key=value ...`` for people at a terminal."""

    HIDDEN = frozenset({"event", "job", "execution", "task_index", "task_attempt", "command"})

    def format(self, record: logging.LogRecord) -> str:
        """Return one readable line (plus the stack trace, if any)."""
        fields: dict[str, Any] = dict(getattr(record, "json_fields", {}) or {})
        name = fields.get("event", record.name)
        stack = fields.pop("stack_trace", None)
        extras = " ".join(
            f"{k}={_short(v)}" for k, v in fields.items() if k not in self.HIDDEN and k != "databases"
        )
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        line = f"{stamp} {record.levelname:<7} {name:<18} {record.getMessage()}"
        if extras:
            line += f"  [{extras}]"
        if stack:
            line += "\n" + stack.rstrip()
        return line


def _short(value: Any) -> str:
    """Return a compact rendering of a field value for text logs."""
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value) or "-"
    return str(value)


class _TextHandler(_Scrubbing, logging.StreamHandler):  # type: ignore[type-arg]
    """StreamHandler with secret masking."""


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
    handler.addFilter(_LibraryEvent())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    # Libraries (alembic, sqlalchemy, a migration's own logger) speak up only for warnings.
    root.setLevel(logging.WARNING)
    _logger.setLevel(logging.INFO)
    logging.captureWarnings(True)
    return fmt


class _LibraryEvent(logging.Filter):
    """Give a library's own log record an event name, so every line has one."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Attach ``event=library.log`` and the logger name to records that lack an event."""
        fields = getattr(record, "json_fields", None)
        if not fields or "event" not in fields:
            record.json_fields = {"event": "library.log", "logger": record.name, **_context}
        return True
