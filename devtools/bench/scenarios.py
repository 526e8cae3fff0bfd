"""What the bench times: migrate-job (with and without --jobs) and its peers on three states; start-up."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from devtools.bench import peers
from devtools.bench.databases import (
    PASSWORD,
    PASSWORD_ENV,
    SERVICES_DIR,
    TEMPLATES,
    Database,
    Endpoint,
    check_at_head,
    check_dbmate,
    create_database,
    execute,
    mask,
    record_dbmate,
    render_manifest,
    reset_databases,
    revisions,
)
from devtools.bench.measure import BenchError, Kind, ProcResult, Sample, Variant, clean_env, run_process
from devtools.pgserver import PgServer

# Manifest form: True, one [[databases]] block per service with `databases = [...]`; False, one
# block per database. With True, a job that rejects the list (exit 2, unknown key) gets False.
LIST_FORM = True
MANIFEST_FORMS = {
    True: "one [[databases]] block per service, databases = [...]",
    False: "one [[databases]] block per database",
}
HELP_RUNS = 10
# What the databases are at before a run: at head (most executions: nothing to do), empty (a release
# that adds databases), one revision behind (the release that happens every week).
KIND_TITLES: dict[Kind, str] = {"noop": "no-op", "empty": "from empty", "next": "one new revision"}
STATE_BEFORE: dict[Kind, str] = {"noop": "head", "empty": "empty", "next": "prev"}
# The baselines the ratios divide by: what teams run today (one alembic process per database) for
# the no-op, and for changes the floor no migration tool beats by much: the same SQL fed to psql -f,
# with no Python, Alembic, lock, version check or history.
BASELINES: dict[Kind, str] = {
    "noop": "alembic loop, no-op",
    "empty": "psql -f floor, from empty",
    "next": "psql -f floor, one new revision",
}


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


class JobRunner:
    """Runs the job as Cloud Run does (a process with a manifest) and checks its run.summary."""

    def __init__(self, manifest: Path, endpoint: Endpoint, count: int) -> None:
        """Remember the manifest, where the server is, and how many databases to expect."""
        extra = {
            "MIGRATE_MANIFEST": str(manifest),
            "MIGRATE_SERVICES_DIR": str(SERVICES_DIR),
            "MIGRATE_LOG_FORMAT": "json",
            PASSWORD_ENV: PASSWORD,
        }
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


def startup(runs: int) -> dict[str, list[float]]:
    """Time ``migrate-job --help`` and ``alembic --help``, interleaved, runs times each."""
    # Paid on every container start, before the job does anything.
    tools = {
        "migrate-job --help": peers.venv_tool("migrate-job"),
        "alembic --help": peers.venv_tool("alembic"),
    }
    env = clean_env({})
    times: dict[str, list[float]] = {name: [] for name in tools}
    for _ in range(runs):
        for name, exe in tools.items():
            result = run_process([exe, "--help"], env)
            if result.returncode != 0:
                raise BenchError(f"{name} exited {result.returncode}\n{tail(result)}")
            times[name].append(result.seconds)
    return times


# The moments of a one-database run that Cloud Run pays on every execution and every task.
FIRST_DATABASE_MARKS = ("first connection", "run.summary", "exit after run.summary", "whole run")


def one_database(runner: JobRunner, runs: int) -> dict[str, list[float]]:
    """Time a no-op run on one database at head, runs times: start to first connection, summary to exit.

    Read from the job's own lines as they arrive on a pipe: ``db.connected`` says when the
    connection was made (its duration_ms before the line), ``run.summary`` when the outcome was
    written; the process's exit is its wait.
    """
    import time

    marks: dict[str, list[float]] = {name: [] for name in FIRST_DATABASE_MARKS}
    for _ in range(runs):
        started = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "job", "upgrade"], env=runner.env, stdout=subprocess.PIPE, text=True
        )
        seen: dict[str, float] = {}
        assert proc.stdout is not None
        for line in proc.stdout:
            now = time.perf_counter() - started
            event = json.loads(line)
            if event.get("event") == "db.connected" and "first connection" not in seen:
                seen["first connection"] = now  # made, and said: the line follows the connection
            if event.get("event") == "run.summary":
                seen["run.summary"] = now
        if proc.wait() != 0 or len(seen) != 2:
            raise BenchError(f"the one-database no-op exited {proc.returncode}: {sorted(seen)}")
        ended = time.perf_counter() - started
        seen["exit after run.summary"] = ended - seen["run.summary"]
        seen["whole run"] = ended
        for name in FIRST_DATABASE_MARKS:
            marks[name].append(seen[name])
    return marks


@dataclass
class Bench:
    """One benchmark's server, databases and findings, and the variants it times on them."""

    server: PgServer
    endpoint: Endpoint
    databases: list[Database]
    workdir: Path
    jobs: int
    only: tuple[str, ...] = ()
    heads: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    resets: list[float] = field(default_factory=list)
    manifest_form: str = ""
    jobs_supported: bool = False
    tools: dict[str, str] = field(default_factory=dict)

    def reset(self, state: str) -> None:
        """Make every database empty, or a copy of the template at head or one revision before."""
        template = None if state == "empty" else TEMPLATES[state]
        self.resets.append(reset_databases(self.server, self.databases, template))

    def verify(self) -> None:
        """Check every database is at head."""
        check_at_head(self.server, self.databases, self.heads)

    def _runner(self, databases: list[Database], *, list_form: bool, name: str = "bench") -> JobRunner:
        """Write a manifest of databases in the chosen form; return a runner on it."""
        path = self.workdir / f"{name}.toml"
        path.write_text(render_manifest(databases, self.endpoint, list_form=list_form))
        return JobRunner(path, self.endpoint, len(databases))

    def one_database_runner(self) -> JobRunner:
        """Return a runner on a manifest of the first database alone."""
        return self._runner(self.databases[:1], list_form=False, name="one")

    def job_runner(self) -> JobRunner:
        """Return a runner on a manifest the job accepts: per-service lists, else one block each."""
        list_form = LIST_FORM
        runner = self._runner(self.databases, list_form=list_form)
        first = runner.start()
        if list_form and first.returncode == 2 and "unknown key" in first.stdout + first.stderr:
            list_form = False
            self.notes.append("the job rejected `databases = [...]` (exit 2, unknown key)")
            runner = self._runner(self.databases, list_form=False)
            first = runner.start()
        self.manifest_form = MANIFEST_FORMS[list_form]
        print(f"  manifest: {self.manifest_form}", flush=True)
        runner.check(first, "applied")  # the warm-up run migrates every database from empty
        return runner

    def make_templates(self, dbmate_versions: Sequence[str]) -> None:
        """Create the templates at head and one revision before it, with the job and dbmate's records."""
        (service,) = {db.service for db in self.databases}
        revs = revisions(service)
        for state, name in TEMPLATES.items():
            execute(self.server, [f"DROP DATABASE IF EXISTS {name}", create_database(name)])
            runner = self._runner([Database(name, service)], list_form=False, name=name)
            to = ["--to", revs[-2]] if state == "prev" else []
            runner.run(["upgrade", *to], "applied")
            count = len(revs) - (1 if state == "prev" else 0)
            if dbmate_versions:
                record_dbmate(self.server, name, dbmate_versions[:count])

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

    def wanted(self, name: str) -> bool:
        """Return whether --only selects the variant (all of them without --only)."""
        return not self.only or any(word in name for word in self.only)

    def variants(self, runner: JobRunner) -> list[Variant]:
        """Return the variants in the order each repetition runs them: no-op, from empty, new revision."""
        psql = peers.find_psql()
        sql = peers.render_offline_sql(self.databases, self.endpoint, self.workdir)
        dbmate, version = peers.find_dbmate()
        self.tools["dbmate"] = version
        dirs = {}
        versions: list[str] = []
        if dbmate is None:
            self.notes.append(version)
        else:
            for service, rendered in sql.items():
                dirs[service] = self.workdir / f"dbmate-{service}"
                versions = peers.write_dbmate_dir(rendered.per_revision, dirs[service])
        print("templates: at head and one revision before (migrate-job, plus dbmate's records)", flush=True)
        self.make_templates(versions)
        found: list[Variant] = []
        for kind in KIND_TITLES:
            for variant in self._variants(kind, runner, psql, sql, dbmate, dirs):
                if self.wanted(variant.name):
                    found.append(variant)
        # The no-op runs change nothing: one reset to head per repetition serves them all.
        noop = [v for v in found if v.kind == "noop"]
        for later in noop[1:]:
            later.prepare = None
        return found

    def _variants(
        self,
        kind: Kind,
        runner: JobRunner,
        psql: Path,
        sql: Mapping[str, peers.OfflineSql],
        dbmate: Path | None,
        dirs: Mapping[str, Path],
    ) -> list[Variant]:
        """Return one state's variants: the job (with and without --jobs), alembic, dbmate, psql."""
        dbs, ep, title = self.databases, self.endpoint, KIND_TITLES[kind]
        state = STATE_BEFORE[kind]
        expect = "current" if kind == "noop" else "applied"

        def reset() -> None:
            """Bring every database to the state this kind starts from."""
            self.reset(state)

        flavours: list[tuple[str, list[str]]] = [("migrate-job", [])]
        if self.jobs_supported:
            flavours.append((f"migrate-job --jobs {self.jobs}", ["--jobs", str(self.jobs)]))

        def job(args: list[str]) -> Callable[[], Sample]:
            """Return a timed job run that must leave every database in status expect."""
            return lambda: runner.run(args, expect)

        def psql_args(db: Database) -> list[str]:
            """Return what psql runs on db in this state."""
            if kind == "noop":
                return ["-c", peers.NOOP_QUERY]
            chosen = sql[db.service]
            return ["-f", str(chosen.from_empty if kind == "empty" else chosen.last_revision)]

        found = [
            Variant(f"{name}, {title}", kind, job(args), prepare=reset, is_job=True)
            for name, args in flavours
        ]
        found.append(
            Variant(
                f"alembic loop, {title}",
                kind,
                lambda: peers.alembic_loop(dbs, ep),
                prepare=reset,
                verify=self.verify,
            )
        )
        if dbmate is not None:
            count = len(revisions(dbs[0].service))
            found.append(
                Variant(
                    f"dbmate, {title}",
                    kind,
                    lambda: peers.dbmate_loop(dbs, ep, dbmate, dirs),
                    prepare=reset,
                    verify=lambda: check_dbmate(self.server, dbs, count),
                )
            )
        floor = BASELINES[kind] if kind != "noop" else f"psql floor, {title}"
        found.append(
            Variant(
                floor,
                kind,
                lambda: peers.psql_loop(dbs, ep, psql, psql_args),
                prepare=reset,
                verify=self.verify,
            )
        )
        return found
