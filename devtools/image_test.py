"""``make image-test``: build the real image with podman and run it the way Cloud Run runs a job task.

1. Setup: podman, runc and debootstrap from Debian's packages when missing (as root), and the
   project's own podman configuration (devtools/podman.py).
2. A stand-in for the Dockerfile's base image, made from Debian bookworm packages and cached
   (devtools/standin.py), checked against what the image relies on in the real one.
3. The real Dockerfile, unmodified, built against it (``--build-arg PYTHON_IMAGE=<stand-in>``), from a
   temporary copy of the clone with credential files planted where a developer keeps them (a .env
   beside a service, in its migrations folder and in deploy/environments/, a key, a service-account
   key): ``make image``'s check must refuse that copy and name each one, and none may reach a layer.
4. The image run as a Cloud Run job task: its own ENTRYPOINT and USER, ``--memory 512m --cpus 1``,
   the ``CLOUD_RUN_*`` variables, a Cloud SQL-shaped socket directory at ``/cloudsql``, passwords
   from the Secret Manager emulator (reached over host networking), the ``local`` manifest the
   image bundles: three databases upgraded, every line JSON, a no-op second run, ``plan --check``,
   a bad manifest, a wrong password, a missing secret, no password in any output; then a run
   stopped mid-migration with ``podman stop`` (SIGTERM, SIGKILL 10 s later).
5. Image hygiene (devtools/image_hygiene.py): non-root, nothing writable under /app, no compilers,
   caches, dev dependencies, .git, credentials or secrets in any layer, the configuration or history.
6. The report: image size, layers, peak memory of a run, ``--help`` start-up inside the container;
   also written to build/image-test.json.
"""

from __future__ import annotations

import argparse
import json
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from devtools import build_context, image_hygiene, image_runs, jobfixture, podman, standin
from devtools.checklist import CheckFailed, Session, none

REPO = Path(__file__).resolve().parent.parent
IMAGE = "localhost/migrate-job:image-test"
BUILDER = "localhost/migrate-job:image-test-builder"
# Where developers keep credentials in a clone (seed 000 keeps a .env per service), and other shapes.
PLANTED = (
    "services/settlement/.env",
    "services/settlement/migrations/.env",
    "deploy/environments/.env",
    "deploy/environments/.env.prod",
    "services/compliance/client-key.pem",
    "job/tls.key",
    "services/risk-engine/prod-sa-key.json",
)
# A unique string in every planted file: found in any layer, it proves a planted file shipped.
MARKER = f"mj-planted-{secrets.token_hex(8)}"


# ---- setup, base, build ---------------------------------------------------------------------


def setup() -> str:
    """Install what is missing and write the podman configuration; say what was done."""
    installed = podman.install_tools()
    podman.configure()
    version = podman.podman("--version").stdout.strip()
    done = f"installed {', '.join(installed)}" if installed else "already installed"
    return f"{done}; {version}, runc, cgroupfs, ulimits {' '.join(podman.ulimits())}"


@contextmanager
def planted_clone() -> Iterator[Path]:
    """Yield a temporary copy of the clone with a credential file planted at each PLANTED path."""
    with tempfile.TemporaryDirectory(prefix="mjclone", dir=podman.CACHE) as tmp:
        clone = Path(tmp) / "clone"
        skipped = shutil.ignore_patterns(*build_context.SKIPPED_DIRS)
        shutil.copytree(REPO, clone, ignore=skipped, symlinks=True)
        for rel in PLANTED:
            content = f"DB_PASSWORD={MARKER}\n"
            if rel.endswith(".json"):
                content = json.dumps({"type": "service_account", "private_key": MARKER})
            (clone / rel).parent.mkdir(parents=True, exist_ok=True)
            (clone / rel).write_text(content)
        yield clone


def refuses_planted(clone: Path) -> str:
    """Raise unless make image's check refuses the planted clone naming every planted file."""
    named = {finding.path for finding in build_context.scan(clone)}
    missed = [rel for rel in PLANTED if rel not in named]
    if missed:
        raise CheckFailed(f"the check let these planted files through: {missed}")
    return f"refused, naming all {len(PLANTED)}: {', '.join(PLANTED)}"


def no_planted_file(scan: image_hygiene.LayerScan) -> str:
    """Raise if a planted file, or the marker of their content, is in any layer."""
    shipped = [f"/app/{rel}" for rel in PLANTED if f"app/{rel}" in scan.names]
    shipped += scan.hits.get(MARKER.encode(), [])
    if shipped:
        raise CheckFailed(f"planted credentials reached the image: {shipped}")
    return f"none of the {len(PLANTED)} by name or content"


def build(base: str, session: Session, context: Path) -> str:
    """Build the real Dockerfile against the stand-in; keep the log in build/image-build.log.

    The builder stage is tagged too (a first build with ``--target builder``), so that its layers
    are not dangling images, which the clean-up at the end removes: the next run reuses them.
    """
    revision = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    started = time.monotonic()
    log = ""
    for target, tag in (("builder", BUILDER), (None, IMAGE)):
        result = podman.podman(
            *build_command(base, revision.stdout.strip(), target, tag, context), check=False, timeout=1800
        )
        log += result.stdout + result.stderr
        if result.returncode != 0:
            break
    (REPO / "build").mkdir(exist_ok=True)
    (REPO / "build" / "image-build.log").write_text(log)
    if result.returncode != 0:
        raise CheckFailed(f"podman build exited {result.returncode}:\n{log[-3000:]}")
    session.figures["build_s"] = round(time.monotonic() - started, 1)
    steps = len(re.findall(r"STEP \d+/\d+:", log))
    cached = f"{log.count('Using cache')} of {steps} steps from the cache"
    return f"{IMAGE} in {session.figures['build_s']} s ({cached})"


def build_command(base: str, revision: str, target: str | None, tag: str, context: Path) -> list[str]:
    """Return the podman build arguments: the real Dockerfile, with the stand-in as PYTHON_IMAGE."""
    command = ["build", "--pull=never", "--network", "host", "--build-arg", f"PYTHON_IMAGE={base}"]
    command += ["--build-arg", f"REVISION={revision or 'unknown'}", "-f", str(context / "Dockerfile")]
    command += ["--target", target] if target else []
    return [*command, "-t", tag, str(context)]


# ---- the Cloud Run task ---------------------------------------------------------------------


# ---- hygiene and report ---------------------------------------------------------------------


def hygiene_checks(session: Session) -> None:
    """Check the image's user, files, layers, configuration and history."""
    forbidden = [jobfixture.PASSWORD, image_runs.WRONG_PASSWORD, jobfixture.TOKEN, MARKER]
    session.check("runs as a non-root user", lambda: none(image_hygiene.user_problems(IMAGE)))
    with mounted(IMAGE) as root:
        session.check(
            "nothing under /app is writable by that user",
            lambda: none(image_hygiene.writable_problems(root, 10001, 10001)),
        )
        session.check("no dev dependencies in the venv", lambda: dev_dependencies(root))
    with tempfile.TemporaryDirectory(prefix="mjlayers", dir=podman.CACHE) as tmp:
        layers = image_hygiene.save(IMAGE, Path(tmp) / "oci")
        scan = image_hygiene.scan_layers(layers, forbidden)
        for kind, name in (
            (".git", "no .git"),
            ("compiler", "no compilers"),
            ("package cache", "no package caches"),
        ):
            session.check(f"{name} in any layer", lambda k=kind: none(scan.findings.get(k, [])))  # type: ignore[misc]
        found = [
            f"{k}: {w}"
            for k, ws in scan.findings.items()
            if k.startswith(("secret", "credential"))
            for w in ws
        ]
        session.check(
            f"no secret or credential in any layer ({len(layers)} layers, {scan.files} entries)",
            lambda: none(found) or exempted(scan.exempted),
        )
        session.check("no planted credential file reached any layer", lambda: no_planted_file(scan))
    session.check(
        "no secret in the image's configuration or history",
        lambda: none(image_hygiene.config_problems(IMAGE, forbidden)),
    )


def exempted(files: list[str]) -> str:
    """Say which files were exempted from the secret search, and why."""
    if not files:
        return ""
    return f"{len(files)} exempted:\n" + "\n".join(files)


def dev_dependencies(root: Path) -> str:
    """Raise if the venv holds a distribution that only the dev group needs."""
    found = image_hygiene.installed_distributions(root) & image_hygiene.dev_only(REPO)
    if found:
        raise CheckFailed(f"dev-only distributions in /app/.venv: {sorted(found)}")
    return f"{len(image_hygiene.installed_distributions(root))} distributions, none dev-only"


@contextmanager
def mounted(image: str) -> Iterator[Path]:
    """Mount the image's filesystem read-only on the host for inspection."""
    path = podman.podman("image", "mount", image).stdout.strip()
    try:
        yield Path(path)
    finally:
        podman.podman("image", "unmount", image, check=False)


def measure_image(session: Session, base: str) -> None:
    """Record the image's size and layers, and the stand-in base's size."""
    inspected = json.loads(podman.podman("image", "inspect", IMAGE, base).stdout)
    history = json.loads(podman.podman("history", "--format", "json", IMAGE).stdout)
    layers = [
        {
            "size_mib": round(h.get("size", 0) / 2**20, 2),
            "created_by": h.get("CreatedBy", h.get("createdBy", ""))[:120],
        }
        for h in history
        if h.get("size", 0) > 0
    ]
    session.figures["image"] = {
        "name": IMAGE,
        "size_mib": round(inspected[0]["Size"] / 2**20, 1),
        "base": base,
        "base_size_mib": round(inspected[1]["Size"] / 2**20, 1),
        "layers": len(inspected[0]["RootFS"]["Layers"]),
        "layers_with_content": layers,
    }


def say(text: str) -> None:
    """Print one line of the report."""
    print(f"image-test:   {text}", flush=True)


def report(session: Session, seconds: float) -> None:
    """Print the figures and write build/image-test.json."""
    image = session.figures.get("image", {})
    help_s = session.figures.get("help_startup_s", {})
    print("image-test: report", flush=True)
    if image:
        base = f"the stand-in base: {image['base_size_mib']} MiB"
        say(f"image size {image['size_mib']} MiB, {image['layers']} layers ({base})")
        for layer in image["layers_with_content"]:
            say(f"  {layer['size_mib']:>8} MiB  {layer['created_by']}")
    memory = session.figures.get("peak_memory_mib") or {}
    cgroup, rss = memory.get("container_cgroup"), memory.get("job_rss")
    say(f"peak memory of the 3-database upgrade: {cgroup} MiB in the container's cgroup, job RSS {rss} MiB")
    startup = help_s.get("median_in_container")
    say(f"--help start-up inside the container: {startup} s (median of {image_runs.HELP_REPEATS})")
    noop = session.figures.get("noop_inside_s", {})
    if noop:
        say(f"a no-op run inside the container (3 databases at head): {noop['median']} s (median)")
    say(f"build {session.figures.get('build_s')} s; image-test {seconds:.0f} s in all")
    result = {
        "passed": not session.failed(),
        "seconds": round(seconds, 1),
        "checks": [c.__dict__ for c in session.checks],
        **session.figures,
    }
    (REPO / "build").mkdir(exist_ok=True)
    (REPO / "build" / "image-test.json").write_text(json.dumps(result, indent=2) + "\n")


def cleanup() -> None:
    """Remove dangling images left by earlier builds (the layer cache of the current one stays)."""
    podman.podman("image", "prune", "--force", check=False)


def main(argv: list[str] | None = None) -> int:
    """Run every check; return 0 when all pass, 1 otherwise."""
    parser = argparse.ArgumentParser(prog="image-test", description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    started = time.monotonic()
    session = Session()
    try:
        session.check("podman, runc and debootstrap", setup, fatal=True)
        base = ""

        def make_base() -> str:
            nonlocal base
            base = standin.ensure(lambda text: print(f"image-test:      {text}", flush=True))
            return base

        session.check("stand-in base image from Debian bookworm packages", make_base, fatal=True)
        session.check(
            f"the stand-in matches {standin.REAL_BASE} in what the image relies on",
            lambda: (
                none(standin.contract_problems(base))
                or "interpreter path and version line, users, shells, CA bundle, ENV, CMD"
            ),
        )
        with planted_clone() as clone:
            session.check(
                f"make image refuses a clone holding {len(PLANTED)} planted credential files",
                lambda: refuses_planted(clone),
            )
            session.check(
                "the real Dockerfile builds, unmodified, against the stand-in, from that clone",
                lambda: build(base, session, clone),
                fatal=True,
            )
        measure_image(session, base)
        image_runs.cloud_run_checks(session, IMAGE)
        hygiene_checks(session)
    except CheckFailed as exc:
        print(f"image-test: stopped: {exc}", file=sys.stderr, flush=True)
    finally:
        cleanup()
    report(session, time.monotonic() - started)
    failed = session.failed()
    if failed:
        names = ", ".join(c.name for c in failed)
        print(f"image-test: FAILED: {len(failed)} of {len(session.checks)} checks: {names}", file=sys.stderr)
    # The plain closing line that CI reads, whatever the runner.
    print(f"image-test: {len(session.checks) - len(failed)} passed, {len(failed)} failed", flush=True)
    if failed:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
