"""``make image`` and ``make push``: the real Dockerfile built with docker when a Docker engine
answers, else with podman (in the project's configuration, devtools/podman.py).

``ENGINE=docker`` or ``ENGINE=podman`` chooses; a docker command without an engine behind it does
not count as docker.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

from devtools import podman
from devtools.pgserver import docker_available

REPO = Path(__file__).resolve().parent.parent


def choose(requested: str) -> str:
    """Return the engine to use: the one asked for, else docker if its engine answers, else podman."""
    if requested in {"docker", "podman"}:
        return requested
    if requested:
        raise SystemExit(f"ENGINE={requested}: use docker or podman")
    if docker_available():
        return "docker"
    if shutil.which("podman"):
        return "podman"
    raise SystemExit("no Docker engine answers and podman is not installed (make image-test installs it)")


def run(engine: str, args: list[str]) -> int:
    """Echo and run one engine command; return its exit code."""
    print(f"+ {engine} {' '.join(args)}", flush=True)
    env = podman.configure() if engine == "podman" else dict(os.environ)
    return subprocess.run([engine, *args], env=env, check=False).returncode


def main(argv: list[str] | None = None) -> int:
    """Build or push the image with the chosen engine."""
    parser = argparse.ArgumentParser(prog="engine", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["build", "push", "which"])
    parser.add_argument("--image", default="migrate-job:dev")
    parser.add_argument("--revision", default="unknown")
    parser.add_argument("--base", default="", help="another PYTHON_IMAGE (a local stand-in, a mirror)")
    args = parser.parse_args(argv)
    engine = choose(os.environ.get("ENGINE", ""))
    if args.action == "which":
        print(engine)
        return 0
    if args.action == "push":
        return run(engine, ["push", args.image])
    build = ["build", "--build-arg", f"REVISION={args.revision}", "-t", args.image, str(REPO)]
    if args.base:
        build[1:1] = ["--build-arg", f"PYTHON_IMAGE={args.base}"]
    if engine == "podman":
        build[1:1] = ["--network", "host"]
    return run(engine, build)


if __name__ == "__main__":
    sys.exit(main())
