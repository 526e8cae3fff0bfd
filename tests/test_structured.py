"""Tests for job/structured.py: the same bytes as google-cloud-logging's StructuredLogHandler.

The job writes Cloud Logging's structured lines itself (importing the library's handler costs its
whole client at every start). These tests hold it to the library: any record, both handlers, the
same line. A library upgrade that changes the format fails here first.
"""

from __future__ import annotations

import io
import logging
import sys
from typing import Any

import google.cloud.logging_v2
import pytest
from google.cloud.logging_v2.handlers import StructuredLogHandler

from job.structured import StructuredHandler

LABELS = {"job": "migrate-job", "execution": "migrate-job-abc12", "task_index": "0"}


def _record(msg: Any, *, level: int = logging.INFO, exc: bool = False, **extra: Any) -> logging.LogRecord:
    """Return a record as logger.log would make it, with extra attributes."""
    exc_info = None
    if exc:
        try:
            raise ValueError('boom "quoted" ü')
        except ValueError:
            exc_info = sys.exc_info()
    record = logging.LogRecord("migrate_job", level, "/app/job/x.py", 42, msg, None, exc_info, func="event")
    record.__dict__.update(extra)
    return record


def _both(record_factory: Any, labels: dict[str, str]) -> tuple[str, str]:
    """Return the line the library writes and the line the job writes, for equal records."""
    ours = StructuredHandler(io.StringIO(), labels).format(record_factory())
    library = StructuredLogHandler(stream=io.StringIO(), labels=dict(labels))
    record = record_factory()
    for log_filter in library.filters:  # the library's filter adds what its format reads
        log_filter.filter(record)  # type: ignore[union-attr]
    return library.format(record), ours


CASES: dict[str, Any] = {
    "event with fields": lambda: _record(
        "settlement/settlement upgraded to b277.",
        json_fields={"event": "db.done", "duration_ms": 12, "applied": ["a", "b"], "nested": {"k": None}},
    ),
    "unicode and quotes": lambda: _record(
        'the "ledger" of Zürich\n2nd line', json_fields={"event": "x.y", "who": "Łódź \\ tab\t"}
    ),
    "reserved keys dropped": lambda: _record(
        "m", json_fields={"event": "x", "severity": "LIE", "httpRequest": {"a": 1}, "time": "t"}
    ),
    "plain library message": lambda: _record("a library warning %s", level=logging.WARNING),
    "exception text kept in the message": lambda: _record("failed", level=logging.ERROR, exc=True),
    "json-looking message": lambda: _record('{"a": 1, "b": [2]}'),
    "broken json-looking message": lambda: _record("{not json"),
    "mapping message": lambda: _record({"event": "m", "n": 1}, json_fields={"extra": True}),
    "empty message": lambda: _record(""),
    "None message": lambda: _record(None),
    "record labels and trace": lambda: _record(
        "m", labels={"extra": "yes"}, trace="projects/p/traces/abc", span_id="123", trace_sampled=True
    ),
    "explicit source location": lambda: _record("m", source_location={"file": "f.py", "line": 1}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_line_as_the_library(case: str) -> None:
    """Cloud Logging parses these keys; the job's lines must stay exactly what the library wrote."""
    theirs, ours = _both(CASES[case], LABELS)
    assert ours == theirs


def test_same_line_without_labels() -> None:
    """Run locally there are no Cloud Run labels: only the logger's name is a label."""
    theirs, ours = _both(CASES["event with fields"], {})
    assert ours == theirs


def test_the_job_does_not_import_the_library_to_log() -> None:
    """The point of the module: logging must not pay for the Cloud Logging client at start-up."""
    import subprocess

    code = (
        "import sys, io\n"
        "from job import logs\n"
        "logs.setup('json', stream=io.StringIO())\n"
        "logs.event('run.start', 'x')\n"
        "print('google.cloud.logging_v2' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    assert google.cloud.logging_v2.__version__  # the reference stays installed for these tests
