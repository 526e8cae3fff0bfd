"""Local stand-ins for the Dockerfile's base image, made from Debian bookworm packages.

No image registry is reachable from CI, so ``make image-test`` builds the real Dockerfile against a
stand-in for ``python:3.11-slim-bookworm`` (passed as the Dockerfile's own ``PYTHON_IMAGE`` build
argument): ``debootstrap --variant=minbase bookworm`` from the mirror this machine's apt uses, with
Debian's python3 (3.11) and pip, laid out where the official image has them (``/usr/local/bin/python3.11``,
``python3``, ``python``, ``pip``), pip allowed to install as in the official image, the same users,
shells, CA bundle, ``PATH``, ``LANG`` and ``CMD``, and without apt's lists, caches and docs, as the
slim image. It is imported into the project's podman storage under a name that carries a key of
everything it is made from, so it is made once and made again only when that changes.

What the stand-in adds for this machine: its own extra CA certificates in the trust store and
``/etc/uv/uv.toml`` saying ``system-certs = true``, because package downloads during the build go
through them. The real Dockerfile is not changed for either.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from devtools import podman

REAL_BASE = "python:3.11-slim-bookworm"
SUITE = "bookworm"
# Bumped when the recipe below changes in a way the key would not see.
RECIPE = "1"
PACKAGES = ("python3", "python3-pip", "ca-certificates", "netbase", "tzdata")
# The official image's configuration that the image relies on (its ENV and CMD).
ENV = {
    "PATH": "/usr/local/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
}
CMD = '["python3"]'
# The users of Debian bookworm's base-passwd (and apt), as in every bookworm image.
USERS = (
    "root",
    "daemon",
    "bin",
    "sys",
    "sync",
    "games",
    "man",
    "lp",
    "mail",
    "news",
    "uucp",
    "proxy",
    "www-data",
    "backup",
    "list",
    "irc",
    "_apt",
    "nobody",
)
# What the slim image removes or never has (dpkg excludes docs, man pages and translations).
PRUNED = ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man", "usr/share/locale")
EXTRA_CA_DIR = Path("/usr/local/share/ca-certificates")
UV_CONFIG = (
    "# make image-test: uv trusts the system CA bundle, with this machine's CAs.\nsystem-certs = true\n"
)

Say = Callable[[str], None]


@dataclass(frozen=True)
class Source:
    """Everything a stand-in is made from."""

    mirror: str
    certificates: dict[str, str]
    versions: dict[str, str]

    def key(self) -> str:
        """Return a short hash of the recipe and its inputs."""
        blob = json.dumps(
            {"recipe": RECIPE, "packages": PACKAGES, "env": ENV, "uv": UV_CONFIG, **self.__dict__},
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def tag(self) -> str:
        """Return the stand-in's image name in the project's podman storage."""
        return f"localhost/migrate-job-standin/python:3.11-slim-bookworm-{self.key()}"


def apt_mirror(etc: Path = Path("/etc/apt")) -> str:
    """Return the URI this machine's apt uses for the bookworm suite (deb822 or one-line sources)."""
    for path in sorted((etc / "sources.list.d").glob("*.sources")):
        for stanza in path.read_text().split("\n\n"):
            fields = _deb822(stanza)
            if "deb" in fields.get("Types", "").split() and SUITE in fields.get("Suites", "").split():
                return fields["URIs"].split()[0]
    lists = [etc / "sources.list", *sorted((etc / "sources.list.d").glob("*.list"))]
    for path in lists:
        for line in path.read_text().splitlines() if path.exists() else []:
            words = [w for w in line.split("#")[0].split() if not w.startswith("[")]
            if len(words) >= 3 and words[0] == "deb" and words[2] == SUITE:
                return words[1]
    raise podman.PodmanError(f"no apt source for Debian {SUITE} in {etc}: cannot make the stand-in base")


def _deb822(stanza: str) -> dict[str, str]:
    """Return the fields of one deb822 stanza (comments dropped, continuation lines joined)."""
    fields: dict[str, str] = {}
    name = ""
    for line in stanza.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        if line[0].isspace() and name:
            fields[name] += " " + line.strip()
            continue
        name, _, value = line.partition(":")
        fields[name] = value.strip()
    return fields


def candidate_versions() -> dict[str, str]:
    """Return the versions apt would install of the stand-in's packages (empty if apt cannot say)."""
    names = (*PACKAGES, "python3.11", "libc6", "libssl3")
    result = subprocess.run(["apt-cache", "policy", *names], capture_output=True, text=True, check=False)
    versions: dict[str, str] = {}
    package = ""
    for line in result.stdout.splitlines():
        if not line.startswith(" "):
            package = line.rstrip(":")
        elif line.strip().startswith("Candidate:"):
            versions[package] = line.split(":", 1)[1].strip()
    return versions


def source() -> Source:
    """Return what a stand-in made now would be made from."""
    certificates = {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(EXTRA_CA_DIR.glob("**/*.crt"))
    }
    return Source(apt_mirror(), certificates, candidate_versions())


def ensure(say: Say) -> str:
    """Return the stand-in's image name, making and importing it first if it is not cached."""
    src = source()
    tag = src.tag()
    if podman.image_exists(tag):
        say(f"cached stand-in {tag}")
        return tag
    say(f"making {tag} from Debian {SUITE} packages (debootstrap, a minute or so)")
    _remove_older(tag)
    work = Path(tempfile.mkdtemp(prefix="standin-", dir=podman.CACHE))
    try:
        rootfs = work / "rootfs"
        _debootstrap(src.mirror, rootfs)
        _lay_out(rootfs)
        _import(rootfs, tag)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return tag


def _remove_older(tag: str) -> None:
    """Remove stand-ins made from other inputs (their key differs)."""
    repository = tag.rsplit(":", 1)[0]
    listed = podman.podman("images", "--format", "{{.Repository}}:{{.Tag}}", repository, check=False)
    for name in listed.stdout.split():
        if name != tag:
            podman.podman("rmi", "--force", name, check=False)


def _debootstrap(mirror: str, rootfs: Path) -> None:
    """Install a minbase bookworm with the stand-in's packages into rootfs."""
    command = [
        "debootstrap",
        "--variant=minbase",
        f"--include={','.join(PACKAGES)}",
        SUITE,
        str(rootfs),
        mirror,
    ]
    result = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False)
    if result.returncode != 0:
        log = rootfs / "debootstrap" / "debootstrap.log"
        tail = log.read_text()[-3000:] if log.exists() else result.stderr[-3000:]
        raise podman.PodmanError(f"debootstrap failed ({result.returncode}):\n{tail}")


def _lay_out(rootfs: Path) -> None:
    """Put Python and pip where the official image has them; add this machine's CAs; prune."""
    local_bin = rootfs / "usr/local/bin"
    (local_bin / "python3.11").symlink_to("/usr/bin/python3.11")
    (local_bin / "python3").symlink_to("python3.11")
    (local_bin / "python").symlink_to("python3")
    for name in ("pip", "pip3", "pip3.11"):
        (local_bin / name).symlink_to("/usr/bin/pip3")
    # The official image's pip installs into /usr/local as root; Debian's marks its Python as managed.
    for marker in rootfs.glob("usr/lib/python3*/EXTERNALLY-MANAGED"):
        marker.unlink()
    for cert in sorted(EXTRA_CA_DIR.glob("**/*.crt")):
        shutil.copy2(cert, rootfs / "usr/local/share/ca-certificates" / cert.name)
    _chroot(rootfs, "update-ca-certificates")
    (rootfs / "etc/uv").mkdir()
    (rootfs / "etc/uv/uv.toml").write_text(UV_CONFIG)
    for rel in PRUNED:
        folder = rootfs / rel
        for child in folder.iterdir() if folder.is_dir() else []:
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()


def _chroot(rootfs: Path, *command: str) -> None:
    """Run a command inside the rootfs; raise with its output if it fails."""
    result = subprocess.run(["chroot", str(rootfs), *command], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise podman.PodmanError(f"chroot {' '.join(command)} failed:\n{result.stdout}{result.stderr}")


def _import(rootfs: Path, tag: str) -> None:
    """Import rootfs as an image with the official image's ENV and CMD."""
    version = subprocess.run(
        ["chroot", str(rootfs), "python3", "-c", "import platform; print(platform.python_version())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    changes = [f"ENV {name}={value}" for name, value in {**ENV, "PYTHON_VERSION": version}.items()]
    changes += [f"CMD {CMD}", f"LABEL org.migrate-job.standin-for={REAL_BASE}"]
    tar = subprocess.Popen(
        ["tar", "-C", str(rootfs), "--numeric-owner", "-cf", "-", "."], stdout=subprocess.PIPE
    )
    args = [arg for change in changes for arg in ("--change", change)]
    result = subprocess.run(
        ["podman", "import", *args, "-", tag],
        stdin=tar.stdout,
        env=podman.environment(),
        capture_output=True,
        text=True,
        check=False,
    )
    tar.wait()
    if result.returncode != 0 or tar.returncode != 0:
        raise podman.PodmanError(f"podman import of the stand-in failed:\n{result.stderr[-3000:]}")


PROBE = """
import json, os, pwd, shutil, subprocess, sys
print(json.dumps({
    "executable": os.path.realpath(shutil.which("python3.11") or ""),
    "python3.11": shutil.which("python3.11"),
    "python3": shutil.which("python3"),
    "python": shutil.which("python"),
    "pip": shutil.which("pip"),
    "version": sys.version.split()[0],
    "users": [p.pw_name for p in pwd.getpwall()],
    "sh": os.path.exists("/bin/sh"),
    "bash": os.path.exists("/bin/bash"),
    "ca_bundle": os.path.getsize("/etc/ssl/certs/ca-certificates.crt"),
    "useradd": bool(shutil.which("useradd")) and bool(shutil.which("groupadd")),
    "uid": os.getuid(),
}))
"""


def contract_problems(tag: str) -> list[str]:
    """Return where the stand-in differs from the official image in what the image relies on."""
    result = podman.podman("run", "--rm", "--network", "none", tag, "python3", "-c", PROBE, check=False)
    if result.returncode != 0:
        return [f"python3 does not run in the stand-in: {result.stderr.strip()}"]
    found = json.loads(result.stdout)
    expected = {
        "python3.11": "/usr/local/bin/python3.11",
        "python3": "/usr/local/bin/python3",
        "python": "/usr/local/bin/python",
        "pip": "/usr/local/bin/pip",
    }
    problems = [
        f"{name} is {found[name]}, not {path}" for name, path in expected.items() if found[name] != path
    ]
    if not found["version"].startswith("3.11."):
        problems.append(f"Python {found['version']}, not 3.11.x")
    if sorted(found["users"]) != sorted(USERS):
        problems.append(f"users {found['users']}, not {list(USERS)}")
    if not (found["sh"] and found["bash"] and found["useradd"]):
        problems.append("the official image has /bin/sh, bash, groupadd and useradd")
    if found["ca_bundle"] < 100_000:
        problems.append("no CA bundle at /etc/ssl/certs/ca-certificates.crt")
    if found["uid"] != 0:
        problems.append(f"the official image runs as root (uid 0), the stand-in as {found['uid']}")
    config = json.loads(podman.podman("image", "inspect", tag).stdout)[0]["Config"]
    env = dict(item.split("=", 1) for item in config.get("Env", []))
    problems += [f"ENV {k}={env.get(k)}, not {v}" for k, v in ENV.items() if env.get(k) != v]
    if config.get("Cmd") != json.loads(CMD):
        problems.append(f"CMD {config.get('Cmd')}, not {CMD}")
    return problems
