"""``make bench``: what migrate-job costs over many databases, next to what teams run today."""

from __future__ import annotations

import argparse
import compileall
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from devtools.bench import report
from devtools.bench.databases import (
    PASSWORD,
    ROLE,
    SERVICES_DIR,
    Database,
    bench_databases,
    drop_all,
    endpoint_for,
    mask,
    service_heads,
)
from devtools.bench.measure import REPO, BenchError, run_repetitions
from devtools.bench.scenarios import HELP_RUNS, Bench, one_database, startup
from devtools.pgserver import PgServer, acquire_server


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Return the command-line options."""
    parser = argparse.ArgumentParser(prog="python -m devtools.bench", description=__doc__)
    parser.add_argument("--databases", type=int, default=100, metavar="N", help="databases (default 100)")
    parser.add_argument(
        "--repeat",
        type=int,
        default=None,
        metavar="R",
        help="repetitions (default 5 if under ~10 min, else 3)",
    )
    parser.add_argument("--jobs", type=int, default=2, metavar="J", help="the job's --jobs (default 2)")
    parser.add_argument("--help-runs", type=int, default=HELP_RUNS, metavar="K", help="--help start-up runs")
    parser.add_argument("--output", type=Path, default=report.DEFAULT_OUTPUT, help="JSON results file")
    parser.add_argument("--strict", action="store_true", help="exit 1 if a target is missed")
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="WORD",
        help="only variants whose name holds WORD (repeat), e.g. --only migrate-job --only floor",
    )
    args = parser.parse_args(argv)
    if args.databases < 1 or (args.repeat is not None and args.repeat < 1) or args.jobs < 1:
        parser.error("--databases, --repeat and --jobs must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; return 0, or 1 for a missed target under --strict, 2 if a run broke."""
    args = parse_args(argv)
    started = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="mjbench", dir="/tmp"))  # short: socket paths are capped
    print("acquiring PostgreSQL", flush=True)
    server = acquire_server()
    databases = bench_databases(args.databases)
    try:
        result = run_bench(args, server, databases, workdir, started)
    except BenchError as exc:
        # A run that broke (a failed migration, a wrong status) makes every figure meaningless.
        print(f"\nBENCH FAILED: {mask(str(exc))}", file=sys.stderr, flush=True)
        return 2
    finally:
        # Everything the bench created goes, whatever happened.
        print("cleaning up: dropping the bench databases and role", flush=True)
        try:
            drop_all(server, databases)
        finally:
            server.stop()
            shutil.rmtree(workdir, ignore_errors=True)
    result["total_s"] = time.perf_counter() - started
    report.print_report(result)
    print(f"total run time {result['total_s']:.0f} s (setup, warm-up, start-up, measurements, clean-up)")
    report.write_json(result, args.output)
    return report.exit_code(result, strict=args.strict)


def run_bench(
    args: argparse.Namespace, server: PgServer, databases: list[Database], workdir: Path, started: float
) -> dict[str, Any]:
    """Set up the databases, warm the job up, measure every variant and return the results."""
    load_at_start = os.getloadavg()[0]
    endpoint = endpoint_for(server, workdir)
    bench = Bench(server, endpoint, databases, workdir, args.jobs, tuple(args.only))
    bench.heads = service_heads()
    print(f"creating role {ROLE} and {args.databases} databases", flush=True)
    server.create_role(ROLE, PASSWORD)
    bench.reset("empty")

    # As the image does (Dockerfile: compileall job services): no run compiles the job's modules or
    # a revision file from source, even where PYTHONDONTWRITEBYTECODE keeps Python from caching them.
    compileall.compile_dir(REPO / "job", quiet=1)
    compileall.compile_dir(SERVICES_DIR, quiet=1)
    # Untimed: the first runs pay for cold caches, and tell which manifest form and options work.
    print("warm-up: migrate-job from empty, then a no-op with --jobs", flush=True)
    runner = bench.job_runner()
    bench.probe_jobs(runner)
    bench.verify()
    variants = bench.variants(runner)

    print(f"start-up: --help x{args.help_runs}, interleaved; then a no-op on one database", flush=True)
    startup_s = startup(args.help_runs)
    bench.reset("head")
    first_s = one_database(bench.one_database_runner(), args.help_runs)
    print("measuring (interleaved: every repetition runs every variant)", flush=True)
    repeat = run_repetitions(variants, args.repeat, started)

    return report.build_result(
        machine=report.machine_info(server, load_at_start),
        endpoint=endpoint,
        databases=args.databases,
        repeat=repeat,
        jobs=args.jobs,
        manifest_form=bench.manifest_form,
        variants=variants,
        startup_s=startup_s,
        first_s=first_s,
        reset_s=bench.resets,
        notes=bench.notes,
        tools=bench.tools,
    )


if __name__ == "__main__":
    sys.exit(main())
