"""Tests for job/secrets.py: references resolve to exact values through the real client and emulator."""

from __future__ import annotations

import json
import socket
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.secretmanager_emulator import SecretManagerEmulator
from job import logs
from job.errors import ConfigError, SecretError
from job.secrets import SecretRef, SecretResolver, parse_reference
from tests.support import PASSWORD, PROJECT


@pytest.fixture(autouse=True)
def registered_secrets() -> Iterator[None]:
    """Forget the values these tests register with the log scrubber, so other tests see clean state."""
    saved = set(logs._secrets)
    logs._secrets.clear()
    yield
    logs._secrets.clear()
    logs._secrets.update(saved)


@pytest.fixture
def resolver(secret_manager: SecretManagerEmulator) -> SecretResolver:
    """A resolver whose real Secret Manager client talks to the emulator over REST."""
    return SecretResolver(secret_manager.endpoint, timeout_s=10)


def new_secret(emulator: SecretManagerEmulator, value: str | bytes | None, **faults: bool | int) -> str:
    """Create a uniquely named secret (the emulator is shared by the session) and return its name."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    emulator.add_secret(PROJECT, name, value, **faults)  # type: ignore[arg-type]
    return name


def full(name: str, version: str = "latest") -> SecretRef:
    """Return the full reference to a secret version in the test project."""
    return parse_reference(
        f"secretmanager://projects/{PROJECT}/secrets/{name}/versions/{version}", project=None
    )


def accesses(emulator: SecretManagerEmulator, name: str) -> int:
    """Return how many times any version of the named secret was requested."""
    prefix = f"/v1/projects/{PROJECT}/secrets/{name}/versions/"
    return sum(1 for _, path in emulator.access_log if path.startswith(prefix))


# --- parse_reference ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "scheme", "location"),
    [
        (
            f"secretmanager://projects/{PROJECT}/secrets/db-pw/versions/3",
            "secretmanager",
            f"projects/{PROJECT}/secrets/db-pw/versions/3",
        ),
        (
            f"secretmanager://projects/{PROJECT}/secrets/db-pw",
            "secretmanager",
            f"projects/{PROJECT}/secrets/db-pw/versions/latest",
        ),
        ("secretmanager://db-pw", "secretmanager", "projects/manifest-proj/secrets/db-pw/versions/latest"),
        ("env://DB_PASSWORD", "env", "DB_PASSWORD"),
        ("file:///run/secrets/db", "file", "/run/secrets/db"),
        ("postgresql+asyncpg://u:p@/db?host=/cloudsql/p:r:i", "literal", None),
        (PASSWORD, "literal", None),
    ],
)
def test_parse_reference(text: str, scheme: str, location: str | None) -> None:
    """Each documented form maps to one scheme and a canonical location; URLs and passwords are literal."""
    ref = parse_reference(text, project="manifest-proj")

    assert ref.scheme == scheme
    assert ref.location == (location if location is not None else text)


@pytest.mark.parametrize(
    "text",
    [
        "secretmanager://projects/x/secrets/",
        f"secretmanager://projects/{PROJECT}/secrets/s/versions/0",
        "secretmanager://a/b",
        "vault://x",
        "env://1BAD",
        "file://relative",
    ],
)
def test_parse_reference_rejects_malformed(text: str) -> None:
    """A malformed reference is a configuration error (exit 2), found before anything is read."""
    with pytest.raises(ConfigError):
        parse_reference(text, project=PROJECT)


def test_literal_display_never_shows_the_value() -> None:
    """`display` goes into log lines and errors, so a literal shows only that it is one."""
    ref = parse_reference(PASSWORD, project=None)

    assert ref.display == "<literal>"
    assert PASSWORD not in ref.display


def test_display_of_other_references() -> None:
    """Non-literal references are shown as written (canonicalised) so the operator can find them."""
    assert full("db-pw").display == f"secretmanager://projects/{PROJECT}/secrets/db-pw/versions/latest"
    assert parse_reference("env://DB_PW", project=None).display == "env://DB_PW"
    assert parse_reference("file:///run/s", project=None).display == "file:///run/s"


# --- Secret Manager through the emulator -----------------------------------------------------------


def test_full_reference_round_trips(secret_manager: SecretManagerEmulator, resolver: SecretResolver) -> None:
    """A password with every URL-hostile character comes back byte for byte."""
    name = new_secret(secret_manager, PASSWORD)

    assert resolver.resolve(full(name)).get_secret_value() == PASSWORD


def test_short_reference_round_trips(
    secret_manager: SecretManagerEmulator, resolver: SecretResolver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`secretmanager://S` reads `latest` in the manifest's project, or in GOOGLE_CLOUD_PROJECT."""
    name = new_secret(secret_manager, PASSWORD)
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", PROJECT)

    from_manifest = parse_reference(f"secretmanager://{name}", project=PROJECT)
    from_env = parse_reference(f"secretmanager://{name}", project=None)

    assert resolver.resolve(from_manifest).get_secret_value() == PASSWORD
    assert resolver.resolve(from_env).get_secret_value() == PASSWORD


def test_version_number(secret_manager: SecretManagerEmulator, resolver: SecretResolver) -> None:
    """A pinned version reads that version; `latest` reads the newest."""
    name = new_secret(secret_manager, "first-value")
    secret_manager.add_version(PROJECT, name, "second-value")

    assert resolver.resolve(full(name, "1")).get_secret_value() == "first-value"
    assert resolver.resolve(full(name, "2")).get_secret_value() == "second-value"
    assert resolver.resolve(full(name)).get_secret_value() == "second-value"


@pytest.mark.parametrize(
    ("stored", "value"),
    [
        ("s3cret\n", "s3cret"),  # `echo s3cret | gcloud secrets create --data-file=-`
        ("s3cret\r\n", "s3cret"),
        ("s3cret\n\n", "s3cret\n"),  # only one: the rest belongs to the value
        ("s3cret \n", "s3cret "),  # spaces are part of the value
    ],
)
def test_one_trailing_newline_is_stripped(
    secret_manager: SecretManagerEmulator, resolver: SecretResolver, stored: str, value: str
) -> None:
    """`echo x | gcloud secrets create` stores a newline the password does not have; strip just that."""
    name = new_secret(secret_manager, stored)

    assert resolver.resolve(full(name)).get_secret_value() == value


def test_not_found(secret_manager: SecretManagerEmulator, resolver: SecretResolver) -> None:
    """A missing secret is a SecretError (exit 3) naming it, with the command that creates it."""
    name = f"missing-{uuid.uuid4().hex[:8]}"

    with pytest.raises(SecretError) as info:
        resolver.resolve(full(name))

    assert info.value.kind == "secret"
    assert f"projects/{PROJECT}/secrets/{name}" in info.value.message
    assert info.value.hint is not None
    assert f"gcloud secrets versions add {name} --project {PROJECT}" in info.value.hint


def test_secret_without_versions_is_not_found(
    secret_manager: SecretManagerEmulator, resolver: SecretResolver
) -> None:
    """A secret created without a version (a half-done setup) reads as not found, not as a bug."""
    name = new_secret(secret_manager, None)

    with pytest.raises(SecretError) as info:
        resolver.resolve(full(name))

    assert name in info.value.message


def test_permission_denied(secret_manager: SecretManagerEmulator, resolver: SecretResolver) -> None:
    """A 403 says which role the job's service account is missing, on which secret."""
    name = new_secret(secret_manager, PASSWORD, denied=True)

    with pytest.raises(SecretError) as info:
        resolver.resolve(full(name))

    assert "permission denied" in info.value.message
    assert name in info.value.message
    assert info.value.hint is not None
    assert "roles/secretmanager.secretAccessor" in info.value.hint
    assert f"projects/{PROJECT}/secrets/{name}" in info.value.hint
    assert PASSWORD not in str(info.value)


def test_corrupt_checksum(secret_manager: SecretManagerEmulator, resolver: SecretResolver) -> None:
    """A payload whose CRC32C does not match is refused, and the error does not echo the payload."""
    name = new_secret(secret_manager, PASSWORD, corrupt=True)

    with pytest.raises(SecretError) as info:
        resolver.resolve(full(name))

    assert "CRC32C" in info.value.message
    assert name in info.value.message
    assert PASSWORD not in str(info.value)
    assert PASSWORD not in repr(info.value.context)


def test_not_utf8(secret_manager: SecretManagerEmulator, resolver: SecretResolver) -> None:
    """Binary data cannot be a password; the error says so without showing the bytes."""
    name = new_secret(secret_manager, b"\xff\xfebinary-blob")

    with pytest.raises(SecretError) as info:
        resolver.resolve(full(name))

    assert "not UTF-8" in info.value.message
    assert "binary-blob" not in str(info.value)


def test_transient_unavailability_is_retried(
    secret_manager: SecretManagerEmulator, resolver: SecretResolver
) -> None:
    """Two 503s in a row (Secret Manager hiccups) are retried, quickly; the third answer is used."""
    name = new_secret(secret_manager, PASSWORD, unavailable_times=2)

    start = time.monotonic()
    value = resolver.resolve(full(name))

    assert value.get_secret_value() == PASSWORD
    assert accesses(secret_manager, name) == 3
    assert time.monotonic() - start < 3, "the backoff must start small"


def test_unreachable_endpoint() -> None:
    """No server at the endpoint is "Secret Manager did not answer" (exit 3), not a bug (exit 1)."""
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    resolver = SecretResolver(f"http://127.0.0.1:{port}", timeout_s=2)

    with pytest.raises(SecretError) as info:
        resolver.resolve(full("anything"))

    assert "did not answer" in info.value.message


def test_each_reference_is_fetched_once(
    secret_manager: SecretManagerEmulator, resolver: SecretResolver
) -> None:
    """Several databases may share a password; one run asks Secret Manager for it once."""
    name = new_secret(secret_manager, PASSWORD)
    short = parse_reference(f"secretmanager://{name}", project=PROJECT)

    values = [resolver.resolve(full(name)), resolver.resolve(full(name)), resolver.resolve(short)]

    assert {v.get_secret_value() for v in values} == {PASSWORD}
    assert accesses(secret_manager, name) == 1


def test_resolvers_do_not_share_values(secret_manager: SecretManagerEmulator) -> None:
    """The cache lives as long as one resolver (one run): a new run sees a rotated password."""
    name = new_secret(secret_manager, "before-rotation")
    first = SecretResolver(secret_manager.endpoint, timeout_s=10)
    assert first.resolve(full(name)).get_secret_value() == "before-rotation"

    secret_manager.add_version(PROJECT, name, "after-rotation")

    assert first.resolve(full(name)).get_secret_value() == "before-rotation"
    second = SecretResolver(secret_manager.endpoint, timeout_s=10)
    assert second.resolve(full(name)).get_secret_value() == "after-rotation"


def test_value_is_a_secret_str(secret_manager: SecretManagerEmulator, resolver: SecretResolver) -> None:
    """The value is wrapped so that printing or repr'ing it by accident shows a mask."""
    name = new_secret(secret_manager, PASSWORD)

    value = resolver.resolve(full(name))

    assert PASSWORD not in str(value)
    assert PASSWORD not in repr(value)


# --- env:// and file:// ---------------------------------------------------------------------------


def test_env_reference(resolver: SecretResolver, monkeypatch: pytest.MonkeyPatch) -> None:
    """`env://VAR` reads what Cloud Run's --set-secrets injected, with its newline stripped."""
    monkeypatch.setenv("MJ_TEST_DB_PASSWORD", PASSWORD + "\n")

    value = resolver.resolve(parse_reference("env://MJ_TEST_DB_PASSWORD", project=None))

    assert value.get_secret_value() == PASSWORD


def test_missing_env_var(resolver: SecretResolver, monkeypatch: pytest.MonkeyPatch) -> None:
    """An unset variable is a SecretError whose hint shows how to inject it on Cloud Run."""
    monkeypatch.delenv("MJ_TEST_UNSET", raising=False)

    with pytest.raises(SecretError) as info:
        resolver.resolve(parse_reference("env://MJ_TEST_UNSET", project=None))

    assert "MJ_TEST_UNSET" in info.value.message
    assert info.value.hint is not None and "--set-secrets" in info.value.hint


def test_empty_value_is_a_secret_error(resolver: SecretResolver, monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty password is a broken secret (exit 3 naming it), not a login the database refuses later."""
    monkeypatch.setenv("MJ_TEST_EMPTY", "")

    with pytest.raises(SecretError, match="env://MJ_TEST_EMPTY is empty"):
        resolver.resolve(parse_reference("env://MJ_TEST_EMPTY", project=None))


def test_file_reference(resolver: SecretResolver, tmp_path: Path) -> None:
    """`file:///path` reads a mounted secret, with one trailing newline stripped."""
    path = tmp_path / "db-password"
    path.write_text(PASSWORD + "\n", encoding="utf-8")

    value = resolver.resolve(parse_reference(f"file://{path}", project=None))

    assert value.get_secret_value() == PASSWORD


def test_missing_file(resolver: SecretResolver, tmp_path: Path) -> None:
    """A secret volume that is not mounted is a SecretError naming the path."""
    path = tmp_path / "not-mounted"

    with pytest.raises(SecretError) as info:
        resolver.resolve(parse_reference(f"file://{path}", project=None))

    assert str(path) in info.value.message
    assert info.value.hint is not None and "mount" in info.value.hint


def test_literal(resolver: SecretResolver) -> None:
    """A literal (local work) is its own value."""
    assert resolver.resolve(parse_reference(PASSWORD, project=None)).get_secret_value() == PASSWORD


# --- no value in any output ------------------------------------------------------------------------


def test_resolved_value_is_scrubbed_from_logs(
    secret_manager: SecretManagerEmulator, resolver: SecretResolver
) -> None:
    """Once read, the value is masked wherever it shows up: raw, inside JSON, or URL-quoted in a DSN."""
    name = new_secret(secret_manager, PASSWORD)
    assert logs.scrub(PASSWORD) == PASSWORD  # not masked before it is read

    resolver.resolve(full(name))

    for form in (
        PASSWORD,
        json.dumps(PASSWORD)[1:-1],
        urllib.parse.quote(PASSWORD, safe=""),
        urllib.parse.quote_plus(PASSWORD, safe=""),
    ):
        assert logs.scrub(f"before {form} after") == f"before {logs.MASK} after"


def test_every_scheme_registers_its_value(
    resolver: SecretResolver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """env://, file:// and literal values are secrets too: each is masked after it is resolved."""
    monkeypatch.setenv("MJ_TEST_ENV_SECRET", "from-the-env-var")
    path = tmp_path / "pw"
    path.write_text("from-the-file\n", encoding="utf-8")

    for text in ("env://MJ_TEST_ENV_SECRET", f"file://{path}", "a-literal-value"):
        resolver.resolve(parse_reference(text, project=None))

    assert logs.scrub("from-the-env-var from-the-file a-literal-value") == " ".join([logs.MASK] * 3)


def test_non_secret_values_stay_readable(resolver: SecretResolver) -> None:
    """User names are resolved with secret=False so that log lines can still say who logged in."""
    resolver.resolve(parse_reference("settlement_migrator", project=None), secret=False)

    assert logs.scrub("user settlement_migrator") == "user settlement_migrator"
