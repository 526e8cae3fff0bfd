"""Cloud Logging's structured JSON lines, byte for byte as google-cloud-logging's StructuredLogHandler.

The library's handler can only be imported with its whole client (the package's ``__init__`` loads
the API client, protobuf types and ``requests``): about 0.15 s on every execution and every Cloud
Run task, for a class whose work is one ``json.dumps``. This module writes the same line: the same
keys, in the same order, with the same spacing. ``tests/test_structured.py`` feeds the same records
to both and compares the bytes, so a library upgrade that changes the format fails a test.

What a job never has is left out: the library reads a trace and an HTTP request from a web
framework's request context (Flask, Django) or an OpenTelemetry span, and a job runs in neither.
"""

from __future__ import annotations

import collections.abc
import json
import logging
from collections.abc import Mapping
from typing import Any, TextIO

# Keys Cloud Logging reads itself (https://cloud.google.com/logging/docs/structured-logging): a
# payload field with one of these names is dropped, as the library drops it.
RESERVED = frozenset(
    {
        "severity",
        "httpRequest",
        "time",
        "timestamp",
        "timestampSeconds",
        "timestampNanos",
        "logging.googleapis.com/insertId",
        "logging.googleapis.com/labels",
        "logging.googleapis.com/operation",
        "logging.googleapis.com/sourceLocation",
        "logging.googleapis.com/spanId",
        "logging.googleapis.com/trace",
        "logging.googleapis.com/trace_sampled",
    }
)
_PLAIN = logging.Formatter()


class StructuredHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Write each record as one Cloud Logging JSON object on the stream, with the given labels."""

    def __init__(self, stream: TextIO, labels: Mapping[str, str] | None = None) -> None:
        super().__init__(stream)
        self.labels = dict(labels or {})

    def format(self, record: logging.LogRecord) -> str:
        """Return the record's line: its payload fields, then Cloud Logging's own keys."""
        payload = _payload(record)
        if isinstance(payload, Mapping):
            fields = {k: v for k, v in payload.items() if k not in RESERVED}
            encoded = json.dumps(fields, ensure_ascii=False)
            head = encoded[1:-1] + "," if len(encoded) > 2 else ""
        elif payload:
            head = f'"message": {json.dumps(payload, ensure_ascii=False)},'
        else:
            head = ""
        user_labels = getattr(record, "labels", {})
        labels = {**({"python_logger": record.name} if record.name else {}), **self.labels, **user_labels}
        trace = getattr(record, "trace", None) or ""
        span = getattr(record, "span_id", None) or ""
        sampled = "true" if getattr(record, "trace_sampled", False) else "false"
        return (
            "{" + head + f'"severity": "{record.levelname}", '
            f'"logging.googleapis.com/labels": {json.dumps(labels or {}, ensure_ascii=False)}, '
            f'"logging.googleapis.com/trace": "{trace}", '
            f'"logging.googleapis.com/spanId": "{span}", '
            f'"logging.googleapis.com/trace_sampled": {sampled}, '
            f'"logging.googleapis.com/sourceLocation": {json.dumps(_source(record), ensure_ascii=False)}, '
            f'"httpRequest": {json.dumps(getattr(record, "http_request", None) or {}, ensure_ascii=False)} '
            "}"
        )


def _payload(record: logging.LogRecord) -> Any:
    """Return the record's payload: a mapping (its json_fields with the message) or a string."""
    fields = getattr(record, "json_fields", {})
    if isinstance(record.msg, collections.abc.Mapping):
        return {**record.msg, **fields} if isinstance(fields, Mapping) and fields else record.msg
    message: Any = _PLAIN.format(record)  # the message, then any traceback, as logging writes them
    if message[:1] == "{":
        try:
            parsed = json.loads(message)
        except json.JSONDecodeError:
            parsed = None
        if isinstance(parsed, Mapping):
            message = parsed
    if fields and isinstance(fields, Mapping):
        return {**fields, **({"message": message} if message != "None" else {})}
    return message if message != "None" else None


def _source(record: logging.LogRecord) -> dict[str, Any]:
    """Return where the record was logged, as Cloud Logging's sourceLocation."""
    if hasattr(record, "source_location"):
        return record.source_location or {}
    names = (("line", "lineno"), ("file", "pathname"), ("function", "funcName"))
    return {gcp: value for gcp, name in names if (value := getattr(record, name, None)) is not None}
