"""What must never reach an image: credential files a developer keeps in a clone, found before a build.

``make image`` runs :func:`main` before it calls docker or podman: a ``.env`` beside a service, a key
in ``deploy/environments/`` or a service-account key anywhere under the folders the Dockerfile copies
stops the build, named, whether or not ``.dockerignore`` would keep it out. ``.dockerignore`` is one
edit away from letting such a file through, and other builders read other ignore files
(``gcloud builds submit`` uploads what ``.gcloudignore`` admits), so the guard does not rely on it.
The same rules name credential files in the image's layers (devtools/image_hygiene.py).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from devtools import dockerfile

REPO = Path(__file__).resolve().parent.parent
# Folders never searched: they are not copied and can be large.
SKIPPED_DIRS = {".git", ".venv", "build", "node_modules", "__pycache__", ".mypy_cache", ".ruff_cache"}
# Files that hold credentials by their name.
CREDENTIAL_NAMES = {
    ".netrc",
    ".pypirc",
    ".git-credentials",
    ".npmrc",
    ".pgpass",
    ".envrc",
    "id_rsa",
    "id_dsa",
    "id_ecdsa",
    "id_ed25519",
    "credentials.json",
    "application_default_credentials.json",
    "access_tokens.db",
    "credentials.db",
}
# Stores of keys by their suffix, wherever they are.
STORE_SUFFIXES = (".p12", ".pfx", ".jks", ".keystore")
# Suffixes that mark a key where the job's files are, though a system image has public ones
# (CA certificates in .pem, apt keyrings in .gpg).
KEY_SUFFIXES = (".pem", ".key", ".gpg", ".asc")
# A JSON file whose name says it is a key: the usual names of downloaded service-account keys.
KEY_JSON = re.compile(r"(service[-_]?account|credential|[-_]key|^key|[-_]sa[-_.]|^sa[-_.])", re.I)
SERVICE_ACCOUNT = re.compile(rb'"type"\s*:\s*"(service_account|authorized_user|external_account)"')
PRIVATE_KEY = re.compile(rb"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----")
MAX_READ = 1024 * 1024


@dataclass(frozen=True)
class Finding:
    """One file that looks like a credential, and why."""

    path: str
    kind: str

    def __str__(self) -> str:
        return f"{self.path} ({self.kind})"


def named_credential(name: str) -> str | None:
    """Return why a file's name marks a credential anywhere, even in a system image (None: it does not)."""
    base = PurePosixPath(name).name
    if base == ".env" or base.startswith(".env."):
        return "an environment file"
    if base in CREDENTIAL_NAMES:
        return "a credential file"
    if base.lower().endswith(STORE_SUFFIXES):
        return "a key store"
    return None


def credential_kind(name: str) -> str | None:
    """Return why a file's name marks a credential among the job's own files (None: it does not)."""
    base = PurePosixPath(name).name.lower()
    if base.endswith(KEY_SUFFIXES):
        return "a key or certificate"
    if base.endswith(".json") and KEY_JSON.search(base):
        return "a key file by its name"
    return named_credential(name)


def content_kind(data: bytes) -> str | None:
    """Return why a file's content marks a credential (None: it does not)."""
    if PRIVATE_KEY.search(data):
        return "holds a private key"
    if SERVICE_ACCOUNT.search(data) and (b'"private_key"' in data or b'"refresh_token"' in data):
        return "holds a Google credential"
    return None


def inspect(root: Path, rel: str) -> Finding | None:
    """Return the finding for one file of the tree, by name then by content."""
    kind = credential_kind(rel)
    if kind is None:
        path = root / rel
        try:
            with path.open("rb") as handle:
                kind = content_kind(handle.read(MAX_READ))
        except OSError:
            return None
    return Finding(rel, kind) if kind else None


def copied_roots(root: Path) -> list[str]:
    """Return the paths (relative to root) that the Dockerfile's COPY instructions take from the context."""
    text = (root / "Dockerfile").read_text()
    sources: list[str] = []
    for stage in dockerfile.stages(text):
        for copy in dockerfile.copies(stage):
            if copy.from_stage is None:
                sources += [s.rstrip("/") or "." for s in copy.sources]
    return sorted(set(sources))


def walk(root: Path, start: str) -> list[str]:
    """Return every file under root/start (relative to root), skipping caches and VCS folders."""
    top = root / start
    if not top.is_dir():
        return [start]
    found: list[str] = []
    for folder, dirs, files in os.walk(top):
        dirs[:] = sorted(d for d in dirs if d not in SKIPPED_DIRS)
        rel = Path(folder).relative_to(root)
        found += [(rel / f).as_posix() for f in sorted(files)]
    return found


def scan(root: Path) -> list[Finding]:
    """Return the credential-like files in what the image copies, or in what the build context sends."""
    candidates = set(dockerfile.context_files(root))
    for source in copied_roots(root):
        candidates.update(walk(root, source))
    findings = (inspect(root, rel) for rel in sorted(candidates))
    return [f for f in findings if f is not None]


def refusal(findings: list[Finding], root: Path) -> str:
    """Return the message that stops a build, naming each file and what to do."""
    sent = set(dockerfile.context_files(root))
    count = len(findings)
    lines = [f"refusing to build: {count} file(s) like credentials lie where the image copies from:"]
    for finding in findings:
        where = "would be sent to the builder" if finding.path in sent else "kept out by .dockerignore today"
        lines.append(f"  {finding}: {where}")
    lines.append(
        "Move them out of the clone (a .env belongs outside the repository, a key in Secret Manager), "
        "then run the build again. .dockerignore is not relied on: one edit to it, or a builder that "
        "reads another ignore file, and such a file ships inside the image."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Check a build context; print what was found; return 0 when clean, 1 otherwise."""
    parser = argparse.ArgumentParser(prog="build_context", description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=REPO)
    args = parser.parse_args(argv)
    findings = scan(args.repo)
    if findings:
        print(refusal(findings, args.repo), file=sys.stderr)
        return 1
    print(f"build context: {len(dockerfile.context_files(args.repo))} files, no credential among them")
    return 0


if __name__ == "__main__":
    sys.exit(main())
