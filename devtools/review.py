"""``python -m devtools.review``: the migration authors' checks of a pull request, on a throwaway PostgreSQL.

What ``deploy/cloudbuild-pr.yaml`` runs. It starts a PostgreSQL the way ``make test`` does
(devtools.pgserver: MIGRATE_TEST_DATABASE_URL, else testcontainers, else a local initdb), writes a
manifest with one entry per service under the services directory (only scratch databases are made;
the entries are never connected to), then runs, each as ``migrate-job`` would be run:

    lint
    check --scratch env://SCRATCH_URL
    verify --scratch env://SCRATCH_URL
    trace --scratch env://SCRATCH_URL --output DIR

Every check runs even when an earlier one failed. DIR receives ``trace.md`` (for the pull request),
``trace.json``, one ``<check>.log`` per check and ``exit_code`` (0, or the first failing check's
code). The process exits with that code, or 0 with ``--defer`` (the build keeps the report first,
then fails on ``exit_code``: Cloud Build uploads nothing after a failed step).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from devtools.pgserver import acquire_server

REPO = Path(__file__).resolve().parent.parent
CHECKS: tuple[tuple[str, list[str]], ...] = (
    ("lint", ["lint"]),
    ("check", ["check", "--scratch", "env://SCRATCH_URL"]),
    ("verify", ["verify", "--scratch", "env://SCRATCH_URL"]),
    ("trace", ["trace", "--scratch", "env://SCRATCH_URL", "--output", "{output}"]),
)


def manifest(services: Path) -> str:
    """Return a manifest with one entry per service folder (never connected to: scratch only)."""
    entries = []
    for folder in sorted(p for p in services.iterdir() if (p / "alembic.ini").is_file()):
        entries.append(
            f'[[databases]]\nservice = "{folder.name}"\ndatabase = "{folder.name.replace("-", "_")}"\n'
            'host = "127.0.0.1"\nuser = "review"\npassword = "unused"\n'
        )
    return "# Written by devtools.review: the services to check, on scratch databases only.\n\n" + "\n".join(
        entries
    )


def run_checks(output: Path, scratch_url: str, services: Path) -> int:
    """Run every check; return 0 if all passed, else the first failing check's exit code."""
    output.mkdir(parents=True, exist_ok=True)
    path = output / "review.toml"
    path.write_text(manifest(services), encoding="utf-8")
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("MIGRATE_", "CLOUD_RUN_"))}
    env = {
        **keep,
        "MIGRATE_MANIFEST": str(path),
        "MIGRATE_SERVICES_DIR": str(services),
        "MIGRATE_LOG_FORMAT": os.environ.get("MIGRATE_LOG_FORMAT", "text"),
        "SCRATCH_URL": scratch_url,
    }
    first = 0
    for name, args in CHECKS:
        command = [sys.executable, "-m", "job", *(a.format(output=output) for a in args)]
        print(f"review: migrate-job {' '.join(command[3:])}", flush=True)
        proc = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, check=False)
        (output / f"{name}.log").write_text(proc.stdout + proc.stderr, encoding="utf-8")
        sys.stdout.write(proc.stdout)
        sys.stderr.write(proc.stderr)
        print(f"review: {name} exited {proc.returncode}", flush=True)
        first = first or proc.returncode
    (output / "exit_code").write_text(f"{first}\n", encoding="utf-8")
    return first


def main(argv: list[str] | None = None) -> int:
    """Start a throwaway PostgreSQL, run the checks against it, stop it."""
    parser = argparse.ArgumentParser(prog="review", description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, required=True, help="where trace.md and the logs go")
    parser.add_argument("--services", type=Path, default=REPO / "services", help="the services to check")
    parser.add_argument("--defer", action="store_true", help="exit 0; the outcome is in OUTPUT/exit_code")
    args = parser.parse_args(argv)
    server = acquire_server()
    try:
        code = run_checks(args.output.resolve(), server.scratch_url(), args.services.resolve())
    finally:
        if server.kind != "env":
            server.stop()
    print(f"review: {'all checks passed' if code == 0 else f'failed (exit {code})'}", flush=True)
    return 0 if args.defer else code


if __name__ == "__main__":
    sys.exit(main())
