"""The image run as Cloud Run runs a job task, for ``make image-test``: the checks of the runs.

The image's bundled ``local`` manifest, against a PostgreSQL of its own (devtools/pgserver.py) whose
socket is linked into a Cloud SQL-shaped directory mounted at ``/cloudsql``, with each database's
password in the Secret Manager emulator (devtools/jobfixture.py); the task itself is
devtools/cloudrun_sim.py.
"""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from devtools import jobfixture, podman
from devtools.checklist import CheckFailed, Session
from devtools.cloudrun_sim import Blocker, CloudRunTask, Outcome
from devtools.metadata_server import MetadataServer
from devtools.pgserver import start_local_server

REPO = Path(__file__).resolve().parent.parent
PROJECT = "fusion-prime-local"
WRONG_PASSWORD = "Wr0ng (image-test) p@ss's %s"
STOP_DATABASE = "settlement_stop"
STOP_FROM = "c81a6c877761"
GRACE_S = 10
HELP_REPEATS = 5
NOOP_REPEATS = 5


@dataclass
class Stage:
    """The database server, the fixture, and the folders mounted into the container."""

    fixture: jobfixture.Databases
    task: CloudRunTask
    tmp: Path


@contextmanager
def stage(image: str) -> Iterator[Stage]:
    """Start PostgreSQL and the emulator, create the local manifest's databases; clean up after."""
    tmp = Path(tempfile.mkdtemp(prefix="mjimgtest", dir="/tmp"))
    tmp.chmod(0o755)
    server = start_local_server()
    entries = jobfixture.manifest_entries(REPO / "deploy" / "environments" / "local.toml")
    account = jobfixture.service_account(PROJECT)
    try:
        with (
            jobfixture.databases(server, PROJECT, entries) as fixture,
            MetadataServer(email=account, project=PROJECT, token=jobfixture.TOKEN) as metadata,
        ):
            sockets = jobfixture.cloudsql_sockets(
                server, tmp / "cloudsql", sorted({e.instance for e in entries}), hard=True
            )
            config = tmp / "config"
            config.mkdir(mode=0o755)
            write_manifests(config, fixture)
            task = CloudRunTask(image, sockets, config, fixture.emulator.endpoint)
            # The IAM entry's token comes from the fake metadata server, over host networking as
            # the emulator; no gcloud configuration exists in the image.
            task.env.update(metadata.environment(Path("/nonexistent-gcloud-config")))
            try:
                yield Stage(fixture, task, tmp)
            finally:
                task.remove_all()
                jobfixture.drop(fixture, extra=(STOP_DATABASE,))
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def write_manifests(config: Path, fixture: jobfixture.Databases) -> None:
    """Write the manifests the container reads from /etc/image-test: a broken one, the stop test's."""
    settlement = next(e for e in fixture.entries if e.service == "settlement")
    (config / "bad.toml").write_text(f'project = "{PROJECT}"\nunknown_setting = true\n')
    stop = jobfixture.Databases(
        fixture.server,
        fixture.emulator,
        PROJECT,
        [
            jobfixture.Entry(
                "settlement", STOP_DATABASE, settlement.user, settlement.secret, settlement.instance
            )
        ],
    )
    (config / "stop.toml").write_text(
        stop.manifest(f'instance = "{settlement.instance}"\n', extra="lock_timeout_s = 120\n")
    )
    for path in config.iterdir():
        path.chmod(0o644)


def json_problems(outcome: Outcome) -> list[str]:
    """Return the stdout lines that are not JSON objects, and anything written to stderr."""
    problems = []
    for number, line in enumerate(outcome.stdout.splitlines(), 1):
        try:
            if not isinstance(json.loads(line), dict):
                raise ValueError
        except ValueError:
            problems.append(f"stdout line {number} is not a JSON object: {line[:200]}")
    if outcome.stderr.strip():
        problems.append(f"stderr is not empty: {outcome.stderr.strip()[:300]}")
    return problems


def expect(outcome: Outcome, code: int, what: str) -> None:
    """Raise unless the run exited with the code and wrote JSON lines only."""
    problems = json_problems(outcome)
    if outcome.code != code:
        problems.insert(0, f"{what}: exit {outcome.code}, expected {code}")
    if problems:
        raise CheckFailed("\n".join([*problems, *outcome.tail()]))


def help_startup(task: CloudRunTask, session: Session) -> str:
    """Run --help with the image's entrypoint; time it inside the container as well."""
    outcome = task.run("--help")
    session.outputs.append(outcome.stdout + outcome.stderr)
    if outcome.code != 0 or "usage: migrate-job" not in outcome.stdout:
        raise CheckFailed(f"--help exited {outcome.code}\n{outcome.stdout}{outcome.stderr}")
    inside = task.time_inside(["migrate-job", "--help"], HELP_REPEATS)
    session.figures["help_startup_s"] = {"median_in_container": round(statistics.median(inside), 3)}
    session.figures["help_startup_s"]["podman_run_wall"] = round(outcome.seconds, 3)
    return (
        f"median {statistics.median(inside):.3f} s inside the container; podman run {outcome.seconds:.2f} s"
    )


def first_upgrade(staged: Stage, session: Session) -> str:
    """Upgrade the three databases; check the summary, every line, each database's revision, IAM."""
    outcome = staged.task.run(measure=True)
    session.outputs.append(outcome.stdout + outcome.stderr)
    expect(outcome, 0, "upgrade")
    execution = staged.task.env["CLOUD_RUN_EXECUTION"]
    problems = jobfixture.summary_problems(outcome.stdout, applied=True, execution=execution)
    summary = json.loads(outcome.stdout.splitlines()[-1])
    for db in summary["databases"]:
        found = staged.fixture.revision(db["database"])
        if found is None or found != db["to_revision"]:
            problems.append(f"{db['database']} is at {found}, the summary says {db['to_revision']}")
    problems += iam_problems(staged.fixture, outcome)
    if problems:
        raise CheckFailed("\n".join(problems))
    session.figures["peak_memory_mib"] = {
        "container_cgroup": _mib(outcome.peak_bytes),
        "job_rss": _mib(outcome.peak_rss_bytes),
    }
    applied = sum(len(db["applied"]) for db in summary["databases"])
    lines = len(outcome.stdout.splitlines())
    iam = sum(e.auth == "iam" for e in staged.fixture.entries)
    return (
        f"{applied} revisions on 3 databases ({iam} by IAM login, as its owner role), {lines} JSON lines, "
        f"{outcome.seconds:.1f} s"
    )


def iam_problems(fixture: jobfixture.Databases, outcome: Outcome) -> list[str]:
    """Return what is wrong with the IAM entries: the identity logged, the owner of their tables."""
    problems = []
    for entry in (e for e in fixture.entries if e.auth == "iam"):
        if not any(
            json.loads(line).get("event") == "auth.iam" and json.loads(line).get("user") == entry.user
            for line in outcome.stdout.splitlines()
        ):
            problems.append(f"no auth.iam line for {entry.database}'s login {entry.user}")
        owners = fixture.server.fetch(
            "SELECT DISTINCT tableowner FROM pg_tables WHERE schemaname = 'public'", database=entry.database
        )
        if entry.owner and [r["tableowner"] for r in owners] != [entry.owner]:
            problems.append(f"{entry.database}'s tables belong to {owners}, not to {entry.owner}")
    return problems


def _mib(value: int | None) -> float | None:
    """Return bytes in MiB, one decimal."""
    return round(value / 2**20, 1) if value else None


def second_upgrade(staged: Stage, session: Session) -> str:
    """Run again: nothing to apply."""
    outcome = staged.task.run()
    session.outputs.append(outcome.stdout + outcome.stderr)
    expect(outcome, 0, "second upgrade")
    execution = staged.task.env["CLOUD_RUN_EXECUTION"]
    problems = jobfixture.summary_problems(outcome.stdout, applied=False, execution=execution)
    if problems:
        raise CheckFailed("\n".join(problems))
    return f"nothing applied, {outcome.seconds:.1f} s"


def noop_inside(staged: Stage, session: Session) -> str:
    """Time a whole no-op run inside the container (what every Cloud Run task pays), NOOP_REPEATS times."""
    inside = staged.task.time_inside(["migrate-job"], NOOP_REPEATS)
    median = statistics.median(inside)
    session.figures["noop_inside_s"] = {"median": round(median, 3), "min": round(min(inside), 3)}
    return f"three databases at head: median {median:.3f} s, min {min(inside):.3f} s inside the container"


def exits(staged: Stage, session: Session, code: int, *args: str, **env: str) -> Callable[[], str]:
    """Return a check that runs the job with args and env and expects an exit code."""

    def body() -> str:
        outcome = staged.task.run(*args, env=env)
        session.outputs.append(outcome.stdout + outcome.stderr)
        expect(outcome, code, " ".join(args) or "upgrade")
        events = [json.loads(line).get("event") for line in outcome.stdout.splitlines()]
        return f"exit {outcome.code}, last event {events[-1] if events else None}"

    return body


def with_secret(staged: Stage, value: str | None, body: Callable[[], str]) -> Callable[[], str]:
    """Return a check that runs body while every secret holds value, then restores the password."""

    def wrapped() -> str:
        staged.fixture.set_secrets(value)
        try:
            return body()
        finally:
            staged.fixture.set_secrets(jobfixture.PASSWORD)

    return wrapped


def stop_mid_migration(staged: Stage, session: Session) -> str:
    """Stop a run that waits inside a revision's transaction; check exit, rollback and sessions."""
    server, stop_env = staged.fixture.server, {"MIGRATE_MANIFEST": "/etc/image-test/stop.toml"}
    settlement = next(e for e in staged.fixture.entries if e.service == "settlement")
    server.create_database(STOP_DATABASE, owner=settlement.user)
    expect(staged.task.run("upgrade", "--to", STOP_FROM, env=stop_env), 0, f"upgrade --to {STOP_FROM}")
    # SHARE mode lets the job read alembic_version but not update it: the next revision creates
    # its table and indexes, then waits to record itself, inside its transaction.
    with Blocker(server.admin_dsn(STOP_DATABASE), "LOCK TABLE alembic_version IN SHARE MODE"):
        name = staged.task.start(env=stop_env)
        query = wait_for_lock(server, settlement.user, name, staged.task)
        started = time.monotonic()
        podman.podman("stop", "-t", str(GRACE_S), name, timeout=GRACE_S + 60)
        stopped_in = time.monotonic() - started
        outcome = staged.task.finish(name)
    session.outputs.append(outcome.stdout + outcome.stderr)
    session.figures["sigterm_exit_s"] = round(stopped_in, 2)
    problems = json_problems(outcome)
    if outcome.code != 143:
        problems.append(
            f"exit {outcome.code} after podman stop, expected 143 (137: killed after {GRACE_S} s)"
        )
    if stopped_in >= GRACE_S:
        problems.append(f"the container took {stopped_in:.1f} s to stop: past the {GRACE_S} s grace period")
    problems += rollback_problems(staged, settlement.user, outcome)
    if problems:
        raise CheckFailed("\n".join([*problems, *outcome.tail()]))
    return (
        f"exit 143 {stopped_in:.2f} s after SIGTERM (waiting in: {query[:60]}); rolled back, no session left"
    )


def wait_for_lock(server: Any, user: str, name: str, task: CloudRunTask) -> str:
    """Wait until the job's session waits on a lock in the stop database; return its query."""
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        rows = server.fetch(
            "SELECT query FROM pg_stat_activity"
            " WHERE usename = $1 AND datname = $2 AND wait_event_type = 'Lock'",
            user,
            STOP_DATABASE,
        )
        if rows:
            return str(rows[0]["query"])
        if not task.running(name):
            raise CheckFailed("the job ended before it waited inside the migration:\n" + task.logs(name))
        time.sleep(0.2)
    raise CheckFailed("the job never waited on the held lock within 90 s:\n" + task.logs(name))


def rollback_problems(staged: Stage, user: str, outcome: Outcome) -> list[str]:
    """Return what the stop left behind: a revision applied, a table created, a session open."""
    server, problems = staged.fixture.server, []
    lines = [json.loads(line) for line in outcome.stdout.splitlines() if line.startswith("{")]
    if not any(line.get("event") == "run.signal" for line in lines):
        problems.append("no run.signal line: the job did not see SIGTERM")
    if not lines or lines[-1].get("status") != "interrupted":
        problems.append("the last line is not a run.summary with status interrupted")
    revision = staged.fixture.revision(STOP_DATABASE)
    if revision != STOP_FROM:
        problems.append(
            f"{STOP_DATABASE} is at {revision}, not {STOP_FROM}: the revision was not rolled back"
        )
    table = server.fetch("SELECT to_regclass('public.escrows')::text AS t", database=STOP_DATABASE)
    if table[0]["t"] is not None:
        problems.append("the interrupted revision's table escrows exists: not rolled back")
    deadline = time.monotonic() + 5
    while (left := server.fetch("SELECT pid FROM pg_stat_activity WHERE usename = $1", user)) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.2)
    if left:
        problems.append(f"{len(left)} session(s) of {user} still open 5 s after the stop")
    return problems


def no_password(session: Session) -> str:
    """Search every output of every run for the passwords."""
    joined = "\n".join(session.outputs)
    found = [
        name
        for name, value in (
            ("the password", jobfixture.PASSWORD),
            ("the wrong one", WRONG_PASSWORD),
            ("the IAM token", jobfixture.TOKEN),
        )
        if value in joined
    ]
    if found:
        raise CheckFailed(f"{' and '.join(found)} appear in the job's output")
    return f"searched {len(session.outputs)} runs"


def cloud_run_checks(session: Session, image: str) -> None:
    """Run the image as Cloud Run runs a job task, check after check."""
    with stage(image) as staged:
        session.check(
            "--help with the image's ENTRYPOINT and USER", lambda: help_startup(staged.task, session)
        )
        session.check("three databases upgraded, every line JSON", lambda: first_upgrade(staged, session))
        session.check("a second run is a no-op", lambda: second_upgrade(staged, session))
        session.check("a no-op timed inside the container", lambda: noop_inside(staged, session))
        session.check("plan --check exits 0 at head", exits(staged, session, 0, "plan", "--check"))
        bad = {"MIGRATE_MANIFEST": "/etc/image-test/bad.toml"}
        session.check("a bad manifest exits 2", exits(staged, session, 2, **bad))
        session.check(
            "a wrong password exits 4 (login refused)",
            with_secret(staged, WRONG_PASSWORD, exits(staged, session, 4)),
        )
        session.check("an unreadable secret exits 3", with_secret(staged, None, exits(staged, session, 3)))
        session.check(
            f"podman stop mid-migration (SIGTERM, SIGKILL after {GRACE_S} s)",
            lambda: stop_mid_migration(staged, session),
        )
        session.check("no password in any output", lambda: no_password(session))
