"""Three real databases and their secrets, as one Cloud Run execution of the job sees them.

Shared by ``make image-check`` (the job run from the image's files rebuilt on the host) and
``make image-test`` (the job run from the built image in a container): a login role with a password
full of awkward characters, one database per shipped service owned by it, the password as a secret
in the Secret Manager emulator, the manifest lines that reach the databases, and the checks of a
run's ``run.summary``.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from devtools.pgserver import PgServer
from devtools.secretmanager_emulator import SecretManagerEmulator

PASSWORD = "Image ch&ck (p@ss) w0rd's %s"
# The access token the fake metadata server hands an IAM entry's login (devtools/metadata_server.py).
TOKEN = "ya29.image-test-iam-token-from-the-fake-metadata-server"
SERVICES = ("settlement", "risk-engine", "compliance")
SECRET = "jobfixture-db-password"
SOCKET_NAME = ".s.PGSQL.5432"
# What Cloud Run sets in every task's environment (the job reads each of them).
CLOUD_RUN = {
    "CLOUD_RUN_JOB": "migrate-job-check",
    "CLOUD_RUN_EXECUTION": "migrate-job-check-abc12",
    "CLOUD_RUN_TASK_INDEX": "0",
    "CLOUD_RUN_TASK_COUNT": "1",
    "CLOUD_RUN_TASK_ATTEMPT": "0",
}


@dataclass(frozen=True)
class Entry:
    """One database of a manifest: its service, name, login role, secret and Cloud SQL instance.

    An IAM entry (auth = "iam") has no secret: its login is the service account's database user,
    whose password is the metadata server's token, and what it creates belongs to its owner role.
    """

    service: str
    database: str
    user: str
    secret: str
    instance: str
    auth: str = "password"
    owner: str | None = None


def service_account(project: str) -> str:
    """Return the job's service account in a project (the fake metadata server's identity)."""
    return f"migrate-job@{project}.iam.gserviceaccount.com"


def named_entries(prefix: str, project: str) -> list[Entry]:
    """Return one database per shipped service, named with a prefix, sharing one role and secret."""
    instance = f"{project}:us-central1:{prefix}"
    return [
        Entry(service, f"{prefix}_{service.replace('-', '_')}", f"{prefix}_migrator", SECRET, instance)
        for service in SERVICES
    ]


def manifest_entries(path: Path) -> list[Entry]:
    """Return the databases of a shipped manifest (instances and short secretmanager:// references)."""
    raw = tomllib.loads(path.read_text())
    iam_user = service_account(raw["project"]).removesuffix(".gserviceaccount.com")
    return [
        Entry(e["service"], e["database"], e.get("user", iam_user), "", e["instance"], "iam", e.get("owner"))
        if e.get("auth") == "iam"
        else Entry(
            e["service"],
            e["database"],
            e["user"],
            e["password"].removeprefix("secretmanager://"),
            e["instance"],
        )
        for e in raw["databases"]
    ]


@dataclass
class Databases:
    """The roles, databases and secrets of one fixture, and the emulator that serves the secrets."""

    server: PgServer
    emulator: SecretManagerEmulator
    project: str
    entries: list[Entry]

    def manifest(self, where: str, extra: str = "") -> str:
        """Return a manifest for the fixture's databases, each reached as ``where`` says."""
        return f'project = "{self.project}"\n\n' + "".join(
            f'[[databases]]\nservice = "{e.service}"\ndatabase = "{e.database}"\n{where}'
            f'user = "{e.user}"\npassword = "secretmanager://{e.secret}"\n{extra}\n'
            for e in self.entries
        )

    def set_secrets(self, value: str | None) -> None:
        """Store value as every fixture secret (None: a secret with no version, which cannot be read)."""
        for secret in {e.secret for e in self.entries if e.auth == "password"}:
            self.emulator.add_secret(self.project, secret, value)

    def revision(self, database: str) -> str | None:
        """Return the revision in a database's alembic_version table, or None."""
        exists = "SELECT to_regclass('public.alembic_version')::text AS t"
        if self.server.fetch(exists, database=database)[0]["t"] is None:
            return None
        rows = self.server.fetch("SELECT version_num FROM alembic_version", database=database)
        return rows[0]["version_num"] if rows else None


@contextmanager
def databases(server: PgServer, project: str, entries: list[Entry]) -> Iterator[Databases]:
    """Create each role and empty database, serve the password as each secret; drop all after."""
    fixture = Databases(server, SecretManagerEmulator(secrets={project: {}}), project, entries)
    fixture.set_secrets(PASSWORD)
    try:
        drop(fixture)
        for entry in entries:
            server.create_role(entry.user, TOKEN if entry.auth == "iam" else PASSWORD)
        for owner in sorted({e.owner for e in entries if e.owner}):
            server.create_role(owner, PASSWORD + " owner")  # nobody logs in as an owner role
        for entry in entries:
            if entry.owner:
                server.execute(f'GRANT "{entry.owner}" TO "{entry.user}"')
            server.create_database(entry.database, owner=entry.owner or entry.user)
        with fixture.emulator:
            yield fixture
    finally:
        drop(fixture)


def drop(fixture: Databases, extra: tuple[str, ...] = ()) -> None:
    """Drop the fixture's databases (and any extra ones) and its roles, if they exist."""
    for name in (*(e.database for e in fixture.entries), *extra):
        fixture.server.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    for role in sorted({e.user for e in fixture.entries} | {e.owner for e in fixture.entries if e.owner}):
        fixture.server.execute(f'DROP ROLE IF EXISTS "{role}"')


def cloudsql_sockets(server: PgServer, root: Path, instances: list[str], hard: bool = False) -> Path:
    """Lay out root/<PROJECT:REGION:INSTANCE>/.s.PGSQL.5432 for the server's socket.

    Symlinks (the test suite's way) serve a process on this machine. A container sees only what is
    mounted into it, so ``hard`` makes each entry a hard link to the socket itself, as the Cloud SQL
    connector's socket is a real socket inside ``/cloudsql``.
    """
    if not hard:
        return server.cloudsql_dir(root, instances)
    if server.socket_dir is None:
        raise ValueError(f"{server.kind} server has no unix socket to link to")
    target = server.socket_dir / f".s.PGSQL.{server.port}"
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)
    for instance in instances:
        folder = root / instance
        folder.mkdir(exist_ok=True)
        folder.chmod(0o755)
        link = folder / SOCKET_NAME
        link.unlink(missing_ok=True)
        os.link(target, link)
    return root


def summary_problems(stdout: str, *, applied: bool, execution: str) -> list[str]:
    """Return what is wrong with a successful upgrade's run.summary (the output's last line)."""
    lines = stdout.strip().splitlines()
    if not lines:
        return ["no output"]
    summary = json.loads(lines[-1])
    if summary.get("event") != "run.summary" or summary.get("status") != "succeeded":
        return [f"unexpected summary {lines[-1]}"]
    problems = []
    if len(summary["databases"]) != len(SERVICES):
        problems.append(f"the summary lists {len(summary['databases'])} databases, not {len(SERVICES)}")
    if any(bool(db["applied"]) != applied for db in summary["databases"]):
        problems.append(f"applied lists {[db['applied'] for db in summary['databases']]}")
    labels = summary.get("logging.googleapis.com/labels", {})
    if labels.get("execution") != execution:
        problems.append(f"the Cloud Run execution is not in the labels: {labels}")
    return problems
