"""What ``make image-test`` requires of the built image besides running: image hygiene.

Every layer is read (a file deleted in a later layer still ships in the image), and so are the
image's configuration and history. Each function returns the problems it found, as sentences.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from devtools import build_context, podman

APP = "app"
# Content that is a credential wherever it appears.
SECRET_PATTERNS = {
    # A whole PEM block (base64 body and end line), not the marker strings that parsers carry.
    "a private key": re.compile(
        rb"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----\s*(?:[\w-]+: [^\n]*\n)*\s*[A-Za-z0-9+/=\s]{64,}-----END"
    ),
    "a service account key": re.compile(rb'"type"\s*:\s*"service_account"'),
    "an AWS access key": re.compile(rb"\bAKIA[0-9A-Z]{16}\b"),
    "a Google API key": re.compile(rb"\bAIza[0-9A-Za-z_\-]{35}\b"),
    "a GitHub token": re.compile(rb"\bgh[pousr]_[A-Za-z0-9]{36}\b"),
    "a Slack token": re.compile(rb"\bxox[abprs]-[A-Za-z0-9-]{10,}"),
}
COMPILERS = re.compile(
    r"^(?:[\w-]+-)?(?:gcc|g\+\+|cc|c\+\+|clang|clang\+\+|tcc|cc1|cc1plus|gfortran)(?:-[\d.]+)?$"
)
BIN_DIRS = (
    "bin",
    "sbin",
    "usr/bin",
    "usr/sbin",
    "usr/local/bin",
    "usr/local/sbin",
    "usr/lib/gcc",
    "usr/libexec",
)
CACHES = re.compile(
    r"(?:^|/)\.cache/(?:pip|uv)(?:/|$)|^var/cache/apt/archives/.+\.deb$|^var/lib/apt/lists/[^/]+_(?:Packages|Sources|Release)"
    r"|(?:^|/)__pypackages__/|^root/\.cache/"
)
ENV_SECRET_NAME = re.compile(r"(PASSWORD|PASSWD|SECRET|TOKEN|CREDENTIAL|PRIVATE_KEY|API_KEY)", re.I)
MAX_SCANNED = 64 * 1024 * 1024
DPKG_SUMS = re.compile(r"^var/lib/dpkg/info/[^/]+\.md5sums$")


@dataclass
class LayerScan:
    """What the layers hold that an image must not."""

    files: int = 0
    findings: dict[str, list[str]] = field(default_factory=dict)
    # Secrets found in files a Debian package ships: (kind, where, path, md5 of the content).
    packaged: list[tuple[str, str, str, str]] = field(default_factory=list)
    dpkg_sums: dict[str, str] = field(default_factory=dict)
    exempted: list[str] = field(default_factory=list)
    # Every entry's path, and where each forbidden string was found: what the planted-file check reads.
    names: set[str] = field(default_factory=set)
    hits: dict[bytes, list[str]] = field(default_factory=dict)

    def add(self, kind: str, where: str) -> None:
        """Record one finding of a kind."""
        self.findings.setdefault(kind, []).append(where)

    def settle(self) -> None:
        """Exempt secrets in files that a Debian package ships unchanged (dpkg's md5sums say so).

        Such a file is public, the same in every image with that package: libgnutls, for one,
        carries the keys of its own self-tests. Changed or unknown files stay findings.
        """
        for kind, where, path, digest in self.packaged:
            if self.dpkg_sums.get(path) == digest:
                self.exempted.append(f"{where} ({kind}; unchanged from its Debian package)")
            else:
                self.add(kind, where)


def save(image: str, dest: Path) -> list[Path]:
    """Save the image as an OCI directory (layers uncompressed); return its layer tars in order."""
    podman.podman("save", "--format", "oci-dir", "--uncompressed", "-o", str(dest), image)
    index = json.loads((dest / "index.json").read_text())
    manifest = json.loads(_blob(dest, index["manifests"][0]["digest"]).read_text())
    return [_blob(dest, layer["digest"]) for layer in manifest["layers"]]


def _blob(root: Path, digest: str) -> Path:
    """Return the path of a blob of an OCI directory."""
    algorithm, _, value = digest.partition(":")
    return root / "blobs" / algorithm / value


def members(layer: Path) -> Iterator[tuple[tarfile.TarFile, tarfile.TarInfo]]:
    """Yield every entry of a layer tar."""
    with tarfile.open(layer, "r:") as tar:
        for info in tar:
            yield tar, info


def scan_layers(layers: list[Path], forbidden: list[str]) -> LayerScan:
    """Search every file of every layer for .git, caches, compilers, credentials and secrets."""
    scan = LayerScan()
    needles = [text.encode() for text in forbidden]
    for number, layer in enumerate(layers, 1):
        for tar, info in members(layer):
            scan.files += 1
            name = info.name.removeprefix("./")
            scan.names.add(name)
            where = f"layer {number}: /{name}"
            _scan_name(scan, name, where)
            handle = tar.extractfile(info) if info.isfile() and 0 < info.size <= MAX_SCANNED else None
            if handle is not None:
                data = handle.read()
                _scan_content(scan, data, needles, where, name)
                if DPKG_SUMS.match(name):
                    scan.dpkg_sums.update(_md5sums(data))
    scan.settle()
    return scan


def _md5sums(data: bytes) -> dict[str, str]:
    """Return {path: md5} from a dpkg .md5sums file."""
    pairs = (line.split(maxsplit=1) for line in data.decode(errors="replace").splitlines())
    return {path.strip(): digest for digest, path in (p for p in pairs if len(p) == 2)}


def _scan_name(scan: LayerScan, name: str, where: str) -> None:
    """Record what a path says by itself."""
    path = PurePosixPath(name)
    if ".git" in path.parts:
        scan.add(".git", where)
    if CACHES.search(name):
        scan.add("package cache", where)
    base = path.name.removeprefix(".wh.")
    # Among the files copied from the clone (/app but its venv) the build's stricter rule applies;
    # a system image and the venv's packages have public .pem certificates and .gpg keyrings.
    copied = name.startswith(APP + "/") and not name.startswith(APP + "/.venv/")
    rule = build_context.credential_kind if copied else build_context.named_credential
    if rule(base):
        scan.add("credential file", where)
    if any(name.startswith(d + "/") for d in BIN_DIRS) and COMPILERS.match(base):
        scan.add("compiler", where)


def _scan_content(scan: LayerScan, data: bytes, needles: list[bytes], where: str, name: str) -> None:
    """Record secrets found in a file's content."""
    for kind, pattern in SECRET_PATTERNS.items():
        if pattern.search(data):
            scan.packaged.append((f"secret ({kind})", where, name, hashlib.md5(data).hexdigest()))
    found = [needle for needle in needles if needle in data]
    for needle in found:
        scan.hits.setdefault(needle, []).append(where)
    if found:
        scan.add("secret (a password used by the tests)", where)


def config_problems(image: str, forbidden: list[str]) -> list[str]:
    """Return secrets in the image's configuration (env, labels, entrypoint) and its history."""
    inspected = json.loads(podman.podman("image", "inspect", image).stdout)[0]
    config = inspected.get("Config", {})
    history = json.loads(podman.podman("image", "inspect", "--format", "{{json .History}}", image).stdout)
    texts = [json.dumps(config), json.dumps(history or [])]
    problems = []
    for item in config.get("Env", []):
        name, _, value = item.partition("=")
        if ENV_SECRET_NAME.search(name) and value:
            problems.append(f"ENV {name} has a value in the image's configuration")
    for text in texts:
        data = text.encode()
        problems += [
            f"{kind} in the image's configuration or history"
            for kind, p in SECRET_PATTERNS.items()
            if p.search(data)
        ]
        problems += [
            "a test password in the image's configuration or history" for n in forbidden if n in text
        ]
    return problems


def user_problems(image: str) -> list[str]:
    """Return what is wrong with the image's user: it must be set, and not root."""
    config = json.loads(podman.podman("image", "inspect", image).stdout)[0].get("Config", {})
    user = config.get("User", "")
    if not user or user.split(":")[0] in {"0", "root"}:
        return [f"the image runs as {user or 'root (no USER)'}"]
    return []


def writable_problems(root: Path, uid: int, gid: int) -> list[str]:
    """Return the paths under /app (of a mounted image) that the image's user could change."""
    problems = []
    for path in [root / APP, *(root / APP).rglob("*")]:
        st = path.lstat()
        if path.is_symlink():
            continue
        if st.st_uid == uid or (st.st_mode & 0o020 and st.st_gid == gid) or st.st_mode & 0o002:
            problems.append(f"/{path.relative_to(root)} is writable by {uid}:{gid}")
    return problems[:20]


def installed_distributions(root: Path) -> set[str]:
    """Return the normalised names of the distributions in the image's venv."""
    names = set()
    for info in (root / APP / ".venv").glob("lib/python*/site-packages/*.dist-info"):
        names.add(normalise(info.name.removesuffix(".dist-info").rsplit("-", 1)[0]))
    return names


def normalise(name: str) -> str:
    """Return a distribution name normalised as PEP 503 says."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _uv() -> list[str]:
    """Return the command that runs uv (on PATH, else the one pip installed for this Python)."""
    found = shutil.which("uv")
    return [found] if found else ["python3", "-m", "uv"]


def dev_only(repo: Path) -> set[str]:
    """Return the locked distributions that only the dev group needs (from uv.lock via uv export)."""

    def export(*flags: str) -> set[str]:
        command = [*_uv(), "export", "--frozen", "--no-hashes", "--no-emit-project", "--no-header", *flags]
        out = subprocess.run(command, cwd=repo, capture_output=True, text=True, check=True).stdout
        return {normalise(line.split("==")[0]) for line in out.splitlines() if "==" in line}

    return export("--only-dev") - export("--no-dev")
