"""``make image`` refuses a clone that holds a developer's credential where the image copies from,
and .dockerignore keeps such files out of the build context wherever they are: a `.env` beside a
service (seed 000 keeps one per service) must never ship inside the image."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from devtools import build_context, dockerfile

REPO = Path(__file__).resolve().parents[2]
KEY = (
    b"-----BEGIN PRIVATE KEY-----\n"
    b"MC4CAQAwBQYDK2VwBCIEIKz3cQ0E6v2bW4wq0cT1H0m2m4pX2g2xQ0J7wq8vR5nU\n"
    b"-----END PRIVATE KEY-----\n"
)
SERVICE_ACCOUNT = b'{"type": "service_account", "private_key_id": "1", "private_key": "x"}'
# What the issue found in a developer's clone, and the other usual shapes of a local credential.
PLANTED = {
    "services/settlement/.env": b"DB_PASSWORD=planted\n",
    "services/settlement/migrations/.env": b"DB_PASSWORD=planted\n",
    "deploy/environments/.env": b"DB_PASSWORD=planted\n",
    "deploy/environments/.env.prod": b"DB_PASSWORD=planted\n",
    "services/compliance/client.pem": KEY,
    "job/server.key": b"planted\n",
    "services/risk-engine/prod-sa-key.json": SERVICE_ACCOUNT,
}


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A copy of what a build reads: the Dockerfile, .dockerignore and the folders it copies."""
    for name in ("Dockerfile", ".dockerignore", "pyproject.toml", "uv.lock", "README.md"):
        shutil.copy2(REPO / name, tmp_path / name)
    for folder in ("job", "services", "deploy"):
        shutil.copytree(REPO / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def plant(root: Path, files: dict[str, bytes]) -> None:
    """Write files into a checkout."""
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)


def check(root: Path) -> subprocess.CompletedProcess[str]:
    """Run the check as ``make image`` does; return the finished process."""
    return subprocess.run(
        [sys.executable, "-m", "devtools.build_context", "--repo", str(root)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )


def test_the_shipped_tree_passes() -> None:
    assert build_context.scan(REPO) == []


def test_planted_credentials_stop_the_build_and_each_is_named(checkout: Path) -> None:
    plant(checkout, PLANTED)
    result = check(checkout)
    assert result.returncode == 1
    assert result.stdout == ""
    assert "refusing to build" in result.stderr
    for rel in PLANTED:
        assert f"  {rel} (" in result.stderr, rel
    # Nothing of the files' content is printed.
    assert "planted" not in result.stderr and "PRIVATE KEY" not in result.stderr


def test_once_removed_the_build_may_go_on(checkout: Path) -> None:
    plant(checkout, PLANTED)
    for rel in PLANTED:
        (checkout / rel).unlink()
    result = check(checkout)
    assert result.returncode == 0, result.stderr
    assert "no credential among them" in result.stdout


def test_dockerignore_keeps_every_planted_credential_out_of_the_context(checkout: Path) -> None:
    plant(checkout, PLANTED)
    sent = set(dockerfile.context_files(checkout))
    assert "services/settlement/alembic.ini" in sent
    assert sorted(set(PLANTED) & sent) == []


def test_a_credential_found_by_content_is_said_to_reach_the_builder(checkout: Path) -> None:
    # A key under an innocent name passes .dockerignore: only the content gives it away.
    plant(checkout, {"services/settlement/notes.txt": KEY})
    findings = build_context.scan(checkout)
    assert [str(f) for f in findings] == ["services/settlement/notes.txt (holds a private key)"]
    assert "notes.txt (holds a private key): would be sent to the builder" in build_context.refusal(
        findings, checkout
    )


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        (".env", "an environment file"),
        (".env.local", "an environment file"),
        ("tls.key", "a key or certificate"),
        ("svc-service-account.json", "a key file by its name"),
        (".pgpass", "a credential file"),
        ("keystore.p12", "a key store"),
        ("env.py", None),
        ("settings.json", None),
        ("alembic.ini", None),
    ],
)
def test_names_that_mark_a_credential(name: str, kind: str | None) -> None:
    assert build_context.credential_kind(name) == kind
