"""Tests for job/logs.py: one Cloud Logging JSON object per line, every line with an event, no secret."""

from __future__ import annotations

import io
import json
import logging
import urllib.parse
from collections.abc import Iterator
from typing import Any

import pytest

from job import logs

# A quote, a backslash and an apostrophe: JSON and repr() both escape it differently from the raw text.
SECRET = "p\"a\\ss'w0rd"
LABELS = {"job": "migrate-job", "execution": "migrate-job-abc12"}


@pytest.fixture(autouse=True)
def restore_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Put the root logger, the job's logger and the module's registries back as they were."""
    root, job_logger = logging.getLogger(), logging.getLogger(logs.LOGGER_NAME)
    handlers, level, job_level = list(root.handlers), root.level, job_logger.level
    capturing = logging._warnings_showwarning is not None  # type: ignore[attr-defined]
    context, secrets = dict(logs._context), set(logs._secrets)
    logs._context.clear()
    logs._secrets.clear()
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    job_logger.setLevel(job_level)
    logging.captureWarnings(capturing)
    logs._context.clear()
    logs._context.update(context)
    logs._secrets.clear()
    logs._secrets.update(secrets)


def json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    """Return every line written, each parsed as one JSON object (fails on any other line)."""
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def json_setup(labels: dict[str, str] | None = None) -> io.StringIO:
    """Route logging to a JSON stream and return it."""
    stream = io.StringIO()
    assert logs.setup("json", stream=stream, labels=labels or {}) == "json"
    return stream


def strings(value: Any) -> Iterator[str]:
    """Yield every string (keys and values) inside a parsed JSON value."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)


def test_event_writes_one_structured_line() -> None:
    """Cloud Logging reads severity, message and labels from fixed keys; the rest is the event's context."""
    stream = json_setup(LABELS)

    logs.event(
        "db.done", "settlement/settlement upgraded to b277be36eb38.", service="settlement", duration_ms=12
    )

    assert stream.getvalue().count("\n") == 1
    (line,) = json_lines(stream)
    assert line["event"] == "db.done"
    assert line["severity"] == "INFO"
    assert line["message"] == "settlement/settlement upgraded to b277be36eb38."
    assert line["service"] == "settlement"
    assert line["duration_ms"] == 12
    assert line["logging.googleapis.com/labels"].items() >= LABELS.items()


def test_no_diagnostic_line() -> None:
    """The library's handler writes a diagnostic entry before its first line, with no event: not here."""
    stream = json_setup()

    logs.event("run.start", "migrate-job upgrade on 3 database(s) of dev.toml.")
    logs.event("run.summary", "upgrade done (exit 0): 3 done.")

    assert [line["event"] for line in json_lines(stream)] == ["run.start", "run.summary"]
    assert "logging.googleapis.com/diagnostic" not in stream.getvalue()


def test_level_becomes_severity() -> None:
    """Cloud Logging filters and alerts on severity, so the level must map onto it."""
    stream = json_setup()

    logs.event("lock.waiting", "Waiting for the lock.", level=logging.WARNING)
    logs.event("run.error", "It failed.", level=logging.ERROR)

    assert [line["severity"] for line in json_lines(stream)] == ["WARNING", "ERROR"]


def test_none_fields_are_left_out() -> None:
    """Optional context that is absent (no revision yet) is omitted rather than written as null."""
    stream = json_setup()

    logs.event("db.connected", "Connected.", database="settlement", revision=None)

    (line,) = json_lines(stream)
    assert line["database"] == "settlement"
    assert "revision" not in line


def test_bound_context_is_on_every_line() -> None:
    """The execution and command, bound once, let one run's lines be found together."""
    stream = json_setup()
    logs.bind(execution="migrate-job-abc12", command="upgrade", task_index=None)

    logs.event("run.start", "Started.")
    logging.getLogger("alembic").warning("something odd")

    for line in json_lines(stream):
        assert line["execution"] == "migrate-job-abc12"
        assert line["command"] == "upgrade"
        assert "task_index" not in line


def test_library_warning_gets_an_event() -> None:
    """Alembic, SQLAlchemy or a migration's own logger may warn: the line still has an event name."""
    stream = json_setup(LABELS)

    logging.getLogger("alembic").warning("revision %s has no down_revision", "abc123")

    (line,) = json_lines(stream)
    assert line["event"] == "library.log"
    assert line["logger"] == "alembic"
    assert line["severity"] == "WARNING"
    assert line["message"] == "revision abc123 has no down_revision"
    assert line["logging.googleapis.com/labels"].items() >= LABELS.items()


def test_library_info_is_not_written() -> None:
    """Alembic's INFO chatter ("Running upgrade ...") would duplicate the job's own events."""
    stream = json_setup()

    logging.getLogger("alembic.runtime.migration").info("Running upgrade -> abc123")
    logging.getLogger("sqlalchemy.engine").info("SELECT 1")

    assert stream.getvalue() == ""


def test_a_library_event_is_kept_with_the_run_context() -> None:
    """job.ops logs backfill progress through stdlib logging: its event stays, with the run's context.

    Revisions import job.ops without the job's logging, so the helpers name their event in
    json_fields; the line must read like the job's own (event, execution, the migration's database).
    """
    stream = json_setup()
    logs.bind(execution="migrate-job-abc12")

    with logs.scoped(database="ledger", revision="ledger000007"):
        logging.getLogger("job.ops").info(
            "backfill of payments: 1000 row(s) done",
            extra={"json_fields": {"event": "backfill.progress", "rows_done": 1000}},
        )
    logs.event("run.summary", "Done.")

    logs.also(revision="ledger000008")  # outside any scope: no effect
    logs.event("run.summary", "Done again.")

    progress, summary, again = json_lines(stream)
    assert "revision" not in again, "nothing sticks outside a scope (offline rendering has none)"
    assert progress["event"] == "backfill.progress" and progress["rows_done"] == 1000
    assert progress["execution"] == "migrate-job-abc12"
    assert (progress["database"], progress["revision"]) == ("ledger", "ledger000007")
    assert "database" not in summary, "the scope ends with the block"


def test_python_warnings_become_library_lines() -> None:
    """A DeprecationWarning printed to stderr would be a loose line; it goes through logging instead."""
    import warnings

    stream = json_setup()

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("old API", UserWarning, stacklevel=1)

    (line,) = json_lines(stream)
    assert line["event"] == "library.log"
    assert "old API" in line["message"]


def test_exception_goes_to_stack_trace() -> None:
    """Error Reporting reads `stack_trace`; `message` stays a sentence without the traceback."""
    stream = json_setup()
    try:
        raise ValueError("boom")
    except ValueError as exc:
        logs.event("run.error", "The migration raised ValueError.", level=logging.ERROR, exc=exc)

    (line,) = json_lines(stream)
    assert line["message"] == "The migration raised ValueError."
    assert line["stack_trace"].startswith("Traceback (most recent call last):")
    assert "ValueError: boom" in line["stack_trace"]
    assert "test_exception_goes_to_stack_trace" in line["stack_trace"]


def test_secret_never_appears() -> None:
    """A registered secret is masked in the message, a field, a library line and a traceback, in every
    spelling it can take there: raw, JSON-escaped, repr'd (a KeyError) and URL-quoted."""
    stream = json_setup()
    logs.redact(SECRET)
    quoted = urllib.parse.quote(SECRET, safe="")

    logs.event(
        "db.connect", f"Connecting with {SECRET}.", password=SECRET, dsn=f"postgresql://u:{quoted}@/db"
    )
    logs.event("db.nested", "Nested.", details={"attempts": [{"password": SECRET}]})
    logging.getLogger("asyncpg").warning("login %r failed", SECRET)
    for exc in (ValueError(f"password {SECRET} refused"), KeyError(SECRET)):
        try:
            raise exc
        except Exception as caught:
            logs.event("run.error", "It failed.", level=logging.ERROR, exc=caught)

    text = stream.getvalue()
    lines = json_lines(stream)
    assert len(lines) == 5
    for spelling in (SECRET, json.dumps(SECRET)[1:-1], repr(SECRET)[1:-1], quoted):
        assert spelling not in text
    for line in lines:
        for value in strings(line):
            assert SECRET not in value
            assert repr(SECRET)[1:-1] not in value
            assert quoted not in value
    assert logs.MASK in lines[0]["password"]
    assert lines[4]["stack_trace"].rstrip().endswith(f"KeyError: '{logs.MASK}'")


def test_short_values_are_not_registered() -> None:
    """Masking a one- or two-character value would shred every line; such values are not secrets."""
    logs.redact("ab")

    assert logs.scrub("ab cab") == "ab cab"


def test_scrub_longest_first() -> None:
    """When one secret contains another, the longer is masked whole, leaving no fragment behind."""
    logs.redact("hunter2")
    logs.redact("hunter2-and-more")

    assert logs.scrub("x hunter2-and-more y hunter2") == f"x {logs.MASK} y {logs.MASK}"


def test_text_format_is_one_readable_line() -> None:
    """At a terminal a person reads `time LEVEL event message [fields]`, not JSON."""
    stream = io.StringIO()
    assert logs.setup("text", stream=stream) == "text"

    logs.event("migration.applied", "Applied b277be36eb38.", revision="b277be36eb38", duration_ms=12)

    text = stream.getvalue()
    assert text.count("\n") == 1
    assert not text.startswith("{")
    assert " INFO " in text
    assert "migration.applied" in text
    assert "Applied b277be36eb38." in text
    assert "revision=b277be36eb38" in text
    assert "duration_ms=12" in text


def test_text_format_masks_secrets_and_shows_tracebacks() -> None:
    """The text format is masked like the JSON one, and a traceback follows its error line."""
    stream = io.StringIO()
    logs.setup("text", stream=stream)
    logs.redact(SECRET)
    try:
        raise KeyError(SECRET)
    except KeyError as exc:
        logs.event("run.error", f"Bad {SECRET}.", level=logging.ERROR, exc=exc, reason=SECRET)

    text = stream.getvalue()
    assert SECRET not in text
    assert repr(SECRET)[1:-1] not in text
    first, *rest = text.splitlines()
    assert "run.error" in first and "ERROR" in first
    assert rest[0] == "Traceback (most recent call last):"


def test_auto_is_json_off_a_terminal() -> None:
    """`auto` chooses JSON when stdout is not a terminal, which is the case on Cloud Run."""
    stream = io.StringIO()

    assert logs.setup("auto", stream=stream) == "json"

    logs.event("run.start", "Started.")
    assert json_lines(stream)[0]["event"] == "run.start"


def test_setup_replaces_handlers() -> None:
    """Calling setup twice (settings read after an early error) must not write every line twice."""
    logs.setup("json", stream=io.StringIO())
    stream = json_setup()

    logs.event("run.start", "Started.")

    assert len(json_lines(stream)) == 1
    assert len(logging.getLogger().handlers) == 1


def test_scrub_masks_a_password_as_a_url_and_an_alembic_option_show_it() -> None:
    """SQLAlchemy quotes a URL's password but keeps spaces; in an Alembic Config every % is doubled.

    Both spellings reach output when an env.py or a library prints the URL it was given.
    """
    from sqlalchemy.engine import URL

    password = "p@ss:/#?%<>&()' w0rd"
    logs.redact(password)
    url = URL.create("postgresql+asyncpg", username="u", password=password, database="d")
    rendered = url.render_as_string(hide_password=False)

    for text in (rendered, rendered.replace("%", "%%")):
        masked = logs.scrub(text)
        assert masked.startswith("postgresql+asyncpg://u:") and logs.MASK in masked
        assert "w0rd" not in masked and "p%40ss" not in masked and "p%%40ss" not in masked
