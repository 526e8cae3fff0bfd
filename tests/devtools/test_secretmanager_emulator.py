"""Tests for devtools.secretmanager_emulator, driven by the real Secret Manager client over REST."""

from __future__ import annotations

import json
import select
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import google_crc32c
import pytest
from google.api_core import exceptions as gexc
from google.api_core import retry as gretry
from google.api_core.client_options import ClientOptions
from google.auth.credentials import AnonymousCredentials
from google.cloud.secretmanager import SecretManagerServiceClient

from devtools.secretmanager_emulator import SecretManagerEmulator, load_seed_file

# Characters that break naive URL building or quoting, plus non-ASCII text.
NASTY_PASSWORD = "p@ss:/#?%<>&()' w0rd ü€"
PROJECT = "demo-project"
REPO_ROOT = Path(__file__).resolve().parents[2]


def make_client(endpoint: str) -> SecretManagerServiceClient:
    """Build the client exactly as job/secrets.py does for an emulator endpoint."""
    return SecretManagerServiceClient(
        transport="rest",
        client_options=ClientOptions(api_endpoint=endpoint),
        credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
    )


def version_name(secret: str, version: str = "latest") -> str:
    """Return the full resource name of a secret version in PROJECT."""
    return f"projects/{PROJECT}/secrets/{secret}/versions/{version}"


@pytest.fixture
def emulator() -> Iterator[SecretManagerEmulator]:
    """A running emulator seeded with one good, one corrupt and one denied secret."""
    seed = {
        PROJECT: {
            "db-password": NASTY_PASSWORD,
            "corrupted": {"value": "tampered-in-transit", "corrupt": True},
            "forbidden": {"value": "nobody-may-read", "denied": True},
        }
    }
    with SecretManagerEmulator(secrets=seed) as emu:
        yield emu


@pytest.fixture
def client(emulator: SecretManagerEmulator) -> SecretManagerServiceClient:
    """The real client pointed at the emulator."""
    return make_client(emulator.endpoint)


def test_access_latest_and_by_number(
    emulator: SecretManagerEmulator, client: SecretManagerServiceClient
) -> None:
    """The job reads `latest` or a pinned number; both must resolve to the right bytes and name."""
    emulator.add_version(PROJECT, "db-password", "second")

    latest = client.access_secret_version(name=version_name("db-password"))
    first = client.access_secret_version(name=version_name("db-password", "1"))

    assert latest.name == version_name("db-password", "2")
    assert latest.payload.data == b"second"
    assert first.name == version_name("db-password", "1")
    assert first.payload.data.decode("utf-8") == NASTY_PASSWORD
    assert emulator.access_log[-1] == (
        "GET",
        f"/v1/projects/{PROJECT}/secrets/db-password/versions/1:access",
    )


def test_payload_checksum_is_crc32c_of_data(client: SecretManagerServiceClient) -> None:
    """The job verifies dataCrc32c; a good secret must carry the true CRC32C or it would fail."""
    response = client.access_secret_version(name=version_name("db-password"))

    assert response.payload.data_crc32c == google_crc32c.value(response.payload.data)


def test_corrupt_secret_serves_a_wrong_checksum(client: SecretManagerServiceClient) -> None:
    """Fault injection: a corrupt secret must let tests prove the job's CRC32C check fires."""
    response = client.access_secret_version(name=version_name("corrupted"))

    assert response.payload.data == b"tampered-in-transit"
    assert response.payload.data_crc32c != google_crc32c.value(response.payload.data)


def test_missing_secret_and_version_raise_not_found(client: SecretManagerServiceClient) -> None:
    """Callers map NotFound to "secret missing"; the emulator must produce it, with SM's wording."""
    with pytest.raises(gexc.NotFound, match=r"not found or has no versions"):
        client.access_secret_version(name=version_name("no-such-secret"))
    with pytest.raises(gexc.NotFound, match=r"Secret Version \[.*/versions/9\] not found"):
        client.access_secret_version(name=version_name("db-password", "9"))


def test_denied_secret_raises_forbidden_not_permission_denied(
    client: SecretManagerServiceClient,
) -> None:
    """Fault injection for 403. Over REST the client maps by HTTP code, so it raises Forbidden.

    PermissionDenied is a *subclass* of Forbidden used for gRPC; `except PermissionDenied` misses
    a REST 403. This test pins that behaviour so callers know to catch Forbidden.
    """
    with pytest.raises(gexc.Forbidden, match=r"secretmanager\.versions\.access") as caught:
        client.access_secret_version(name=version_name("forbidden"))

    assert not isinstance(caught.value, gexc.PermissionDenied)
    assert "nobody-may-read" not in str(caught.value)


def test_unavailable_times_then_success_exercises_retries(
    emulator: SecretManagerEmulator, client: SecretManagerServiceClient
) -> None:
    """Transient 503s must be retryable by the client's Retry and then succeed."""
    emulator.add_secret(PROJECT, "flaky", "eventually", unavailable_times=2)
    fast_retry = gretry.Retry(
        predicate=gretry.if_exception_type(gexc.ServiceUnavailable),
        initial=0.01,
        maximum=0.05,
        timeout=5,
    )

    with pytest.raises(gexc.ServiceUnavailable):
        client.access_secret_version(name=version_name("flaky"), retry=None)
    response = client.access_secret_version(name=version_name("flaky"), retry=fast_retry)

    assert response.payload.data == b"eventually"
    flaky_calls = [entry for entry in emulator.access_log if "/secrets/flaky/" in entry[1]]
    assert len(flaky_calls) == 3


def test_create_and_add_version_through_the_client(client: SecretManagerServiceClient) -> None:
    """The demo seeds secrets with the client itself; create, addVersion and access must agree."""
    secret = client.create_secret(
        request={
            "parent": f"projects/{PROJECT}",
            "secret_id": "created",
            "secret": {"replication": {"automatic": {}}},
        }
    )
    for value in (b"v1", NASTY_PASSWORD.encode("utf-8")):
        client.add_secret_version(
            request={
                "parent": secret.name,
                "payload": {"data": value, "data_crc32c": google_crc32c.value(value)},
            }
        )

    latest = client.access_secret_version(name=version_name("created"))

    assert secret.name == f"projects/{PROJECT}/secrets/created"
    assert latest.name == version_name("created", "2")
    assert latest.payload.data.decode("utf-8") == NASTY_PASSWORD
    assert client.get_secret(name=secret.name).name == secret.name


def test_create_conflict_and_checksum_mismatch_are_rejected(
    client: SecretManagerServiceClient,
) -> None:
    """Duplicate creates (409) and bad upload checksums (400) must fail as Secret Manager does."""
    parent = f"projects/{PROJECT}"
    with pytest.raises(gexc.Conflict, match="already exists"):
        client.create_secret(request={"parent": parent, "secret_id": "db-password", "secret": {}})
    with pytest.raises(gexc.BadRequest, match="Checksum mismatch"):
        client.add_secret_version(
            request={
                "parent": f"{parent}/secrets/db-password",
                "payload": {"data": b"x", "data_crc32c": google_crc32c.value(b"y")},
            }
        )


def test_delete_secret_then_access_is_not_found(client: SecretManagerServiceClient) -> None:
    """DeleteSecret is offered for cleanup; a deleted secret must really be gone."""
    client.delete_secret(name=f"projects/{PROJECT}/secrets/db-password")

    with pytest.raises(gexc.NotFound):
        client.access_secret_version(name=version_name("db-password"))


def test_bad_path_answers_400_in_google_error_shape(emulator: SecretManagerEmulator) -> None:
    """Unknown paths must fail loudly in Google's JSON error shape, not with an HTML page."""
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(f"{emulator.endpoint}/v1/nonsense?%24alt=json", timeout=5)

    body = json.loads(caught.value.read())
    assert caught.value.code == 400
    assert body["error"]["code"] == 400
    assert body["error"]["status"] == "INVALID_ARGUMENT"


def test_seed_file_rejects_unknown_keys(tmp_path: Path) -> None:
    """A typo in a seed file (e.g. `corupt`) must fail rather than silently drop the fault."""
    seed = tmp_path / "seed.json"
    seed.write_text(json.dumps({"projects": {PROJECT: {"s": {"value": "x", "corupt": True}}}}))

    with pytest.raises(ValueError, match="unknown keys"):
        SecretManagerEmulator(load_seed_file(seed))


def test_cli_prints_listening_line_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    """The demo runs the CLI as a subprocess: it must announce its URL, serve, exit 0 on SIGTERM,
    and never print a secret value."""
    seed = tmp_path / "seed.json"
    seed.write_text(json.dumps({"projects": {PROJECT: {"db-password": NASTY_PASSWORD}}}))
    command = [sys.executable, "-m", "devtools.secretmanager_emulator", "--port", "0"]
    proc = subprocess.Popen(
        [*command, "--seed", str(seed)],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 10)
        assert ready, "emulator did not print its listening line within 10 s"
        line = proc.stdout.readline()
        assert line.startswith("listening http://127.0.0.1:")
        endpoint = line.split(" ", 1)[1].strip()

        response = make_client(endpoint).access_secret_version(name=version_name("db-password"))
        assert response.payload.data.decode("utf-8") == NASTY_PASSWORD

        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    assert proc.returncode == 0
    assert stdout == ""
    assert NASTY_PASSWORD not in stderr
    assert stderr == ""
