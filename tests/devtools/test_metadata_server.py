"""Tests for devtools.metadata_server, driven by google-auth's own metadata client."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator

import google.auth.transport.requests
import pytest
from google.auth import exceptions
from google.auth.compute_engine import _metadata

from devtools.metadata_server import MetadataServer

EMAIL = "migrate-job@demo-project.iam.gserviceaccount.com"
SCOPE = "https://www.googleapis.com/auth/sqlservice.login"


@pytest.fixture
def server() -> Iterator[MetadataServer]:
    """A fake metadata server handing out token-one."""
    with MetadataServer(email=EMAIL, project="demo-project", token="token-one") as running:
        yield running


def get(server: MetadataServer, path: str, **params: str) -> object:
    """Return google-auth's answer for a metadata path (root given: GCE_METADATA_HOST is read at import)."""
    request = google.auth.transport.requests.Request()
    root = f"http://{server.host}/computeMetadata/v1/"
    return _metadata.get(request, path, root=root, params=params or None, retry_count=1)


def test_google_auth_finds_it_and_reads_the_identity(
    server: MetadataServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """google-auth's ping (GCE_METADATA_IP, read per call) says Google; the account and project answer."""
    monkeypatch.setenv("GCE_METADATA_IP", server.host)

    assert _metadata.ping(google.auth.transport.requests.Request(), retry_count=1)
    info = get(server, "instance/service-accounts/default/", recursive="true")
    assert isinstance(info, dict) and info["email"] == EMAIL
    assert get(server, f"instance/service-accounts/{EMAIL}/email") == EMAIL
    assert get(server, "project/project-id") == "demo-project"


def test_tokens_record_their_scopes_rotate_and_can_be_refused(server: MetadataServer) -> None:
    """A test sees which scopes were asked for, hands out a new token, or makes token requests fail."""
    first = get(server, "instance/service-accounts/default/token", scopes=SCOPE)
    server.rotate("token-two")
    second = get(server, "instance/service-accounts/default/token", scopes=SCOPE)
    server.deny_tokens()
    with pytest.raises(exceptions.TransportError, match="403"):
        get(server, "instance/service-accounts/default/token", scopes=SCOPE)

    assert isinstance(first, dict) and first["access_token"] == "token-one" and first["expires_in"] > 0
    assert isinstance(second, dict) and second["access_token"] == "token-two"
    assert [t.scopes for t in server.token_requests()] == [[SCOPE]] * 3


def test_a_request_without_the_flavor_header_is_refused(server: MetadataServer) -> None:
    """As on Cloud Run, the metadata server answers only requests that say Metadata-Flavor: Google."""
    url = f"http://{server.host}/computeMetadata/v1/instance/service-accounts/default/token"
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(url, timeout=5)
    assert info.value.code == 403
    assert server.requests[-1].flavored is False and server.token_requests()[-1].scopes == []
