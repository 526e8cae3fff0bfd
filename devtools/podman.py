"""Podman as this project runs it: installed from Debian's packages, configured in files of its own.

``make image`` and ``make image-test`` never edit the machine's container configuration. Every
podman command here runs with ``CONTAINERS_CONF``, ``CONTAINERS_STORAGE_CONF`` and
``CONTAINERS_REGISTRIES_CONF`` pointing at files under the cache directory (``MIGRATE_JOB_CACHE``,
default ``/var/cache/migrate-job``): the runc runtime (crun refuses hybrid cgroup hierarchies), the
cgroupfs manager (no systemd as PID 1), default ulimits within this machine's hard limits, a storage
root of its own (the stand-in bases and the build's layer cache live there), and no registry to
search for short names.
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
from pathlib import Path

CACHE = Path(os.environ.get("MIGRATE_JOB_CACHE", "/var/cache/migrate-job"))
# What make image-test needs from Debian's packages (as root, when missing): command -> package.
TOOLS = {"podman": "podman", "runc": "runc", "debootstrap": "debootstrap"}
# Ulimits for containers, capped by this machine's hard limits.
NOFILE = (1024, 20000)
RUNROOT = "/run/migrate-job-podman"
NPROC = (4096, 4096)


class PodmanError(Exception):
    """A podman command failed, or podman cannot be set up here."""


def home() -> Path:
    """Return the directory of the project's podman configuration and storage."""
    return CACHE / "podman"


def missing_tools() -> list[str]:
    """Return the Debian packages whose commands are not on PATH."""
    return [package for command, package in TOOLS.items() if shutil.which(command) is None]


def install_tools() -> list[str]:
    """apt-get install what is missing (as root); return the packages installed."""
    packages = missing_tools()
    if not packages:
        return []
    if os.geteuid() != 0:
        raise PodmanError(
            f"{', '.join(packages)} missing: install them (apt-get install {' '.join(packages)})"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages],
    ):
        result = subprocess.run(command, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if result.returncode != 0:
            raise PodmanError(f"{' '.join(command)} failed:\n{(result.stdout + result.stderr)[-3000:]}")
    return packages


def _limit(kind: int, wanted: tuple[int, int]) -> str:
    """Return soft:hard for a ulimit, each at most this machine's hard limit."""
    hard = resource.getrlimit(kind)[1]
    cap = wanted[1] if hard == resource.RLIM_INFINITY else min(wanted[1], hard)
    return f"{min(wanted[0], cap)}:{cap}"


def ulimits() -> list[str]:
    """Return the nofile and nproc ulimits every container gets."""
    return [
        f"nofile={_limit(resource.RLIMIT_NOFILE, NOFILE)}",
        f"nproc={_limit(resource.RLIMIT_NPROC, NPROC)}",
    ]


def config_files() -> dict[str, str]:
    """Return {file name: text} of the project's podman configuration."""
    root = home()
    limits = ", ".join(f'"{u}"' for u in ulimits())
    return {
        "containers.conf": (
            "# Written by devtools/podman.py for make image and make image-test; not the machine's.\n"
            f'[containers]\ndefault_ulimits = [{limits}]\nlog_driver = "k8s-file"\n\n'
            f'[network]\nnetwork_config_dir = "{root / "networks"}"\n\n'
            '[engine]\nruntime = "runc"\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n'
            f'tmp_dir = "{RUNROOT}/libpod"\n'
        ),
        "storage.conf": (
            f'[storage]\ndriver = "overlay"\ngraphroot = "{root / "storage"}"\nrunroot = "{RUNROOT}"\n'
        ),
        "registries.conf": 'unqualified-search-registries = ["docker.io"]\nshort-name-mode = "permissive"\n',
    }


def configure() -> dict[str, str]:
    """Write the configuration files (when they changed); return the environment podman needs."""
    root = home()
    root.mkdir(parents=True, exist_ok=True)
    for name, text in config_files().items():
        path = root / name
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
    return environment()


def environment() -> dict[str, str]:
    """Return os.environ plus the variables that point podman at the project's configuration."""
    root = home()
    return {
        **os.environ,
        "CONTAINERS_CONF": str(root / "containers.conf"),
        "CONTAINERS_STORAGE_CONF": str(root / "storage.conf"),
        "CONTAINERS_REGISTRIES_CONF": str(root / "registries.conf"),
    }


def podman(*args: str, check: bool = True, timeout: float | None = 600) -> subprocess.CompletedProcess[str]:
    """Run one podman command with the project's configuration; raise PodmanError if it fails."""
    result = subprocess.run(
        ["podman", *args],
        env=environment(),
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=timeout,
        check=False,
    )
    if check and result.returncode != 0:
        raise PodmanError(
            f"podman {' '.join(args[:3])} ... exited {result.returncode}:\n{result.stderr[-3000:]}"
        )
    return result


def image_exists(name: str) -> bool:
    """Say whether the project's podman storage holds an image of that name."""
    return podman("image", "exists", name, check=False).returncode == 0
