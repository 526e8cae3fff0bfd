"""Session fixtures: a real PostgreSQL, a Cloud SQL-shaped socket directory, a Secret Manager emulator."""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from devtools.metadata_server import MetadataServer
from devtools.pgserver import PgServer, acquire_server
from devtools.secretmanager_emulator import SecretManagerEmulator
from tests import support
from tests.support import ALL_PASSWORDS, IAM_USER, PASSWORD, PROJECT, SERVICE_ACCOUNT, TOKENS

INSTANCE = f"{PROJECT}:us-central1:fp-test-db"
_counter = itertools.count()


@pytest.fixture(scope="session")
def pg() -> Iterator[PgServer]:
    """A real PostgreSQL: MIGRATE_TEST_DATABASE_URL, else testcontainers, else a local server."""
    server = acquire_server()
    yield server
    if server.kind != "env":
        server.stop()


@pytest.fixture(scope="session")
def socket_root(pg: PgServer) -> Iterator[Path | None]:
    """A /cloudsql-shaped directory whose instance socket leads to the test server (None: TCP only)."""
    if pg.socket_dir is None:
        yield None
        return
    root = Path(tempfile.mkdtemp(prefix="mjsock"))
    pg.cloudsql_dir(root, [INSTANCE])
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def secret_manager() -> Iterator[SecretManagerEmulator]:
    """The Secret Manager emulator, reached only through the real client library."""
    with SecretManagerEmulator(secrets={PROJECT: {}}) as emulator:
        yield emulator


@dataclass
class Database:
    """A fresh database with its own login role, and the manifest entry that reaches it."""

    service: str
    name: str
    role: str
    password: str
    pg: PgServer
    socket_root: Path | None

    def entry(self, password_ref: str | None = None) -> dict[str, Any]:
        """Return the manifest entry: over the Cloud SQL socket when there is one, else TCP."""
        where: dict[str, Any] = (
            {"instance": INSTANCE} if self.socket_root else {"host": self.pg.host, "port": self.pg.port}
        )
        return {
            "service": self.service,
            "database": self.name,
            **where,
            "user": self.role,
            "password": password_ref or self.password,
        }

    def iam_entry(self, **extra: Any) -> dict[str, Any]:
        """Return the manifest entry for an IAM login that acts as the database's owner role."""
        entry = {**self.entry(), "auth": "iam", "owner": self.role, **extra}
        del entry["user"], entry["password"]
        return entry

    def owners(self) -> dict[str, str]:
        """Return the owner role of each table in the public schema."""
        rows = self.pg.fetch(
            "SELECT tablename, tableowner FROM pg_tables WHERE schemaname = 'public'", database=self.name
        )
        return {r["tablename"]: r["tableowner"] for r in rows}

    def tables(self) -> set[str]:
        """Return the tables in the public schema."""
        rows = self.pg.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'", database=self.name
        )
        return {r["tablename"] for r in rows}

    def version(self) -> list[str]:
        """Return the revisions in alembic_version (empty if the table does not exist)."""
        if "alembic_version" not in self.tables():
            return []
        rows = self.pg.fetch("SELECT version_num FROM alembic_version", database=self.name)
        return sorted(r["version_num"] for r in rows)


@pytest.fixture
def make_database(pg: PgServer, socket_root: Path | None) -> Iterator[Callable[..., Database]]:
    """Return a factory of fresh databases owned by a login role with the special password."""
    made: list[Database] = []

    def make(service: str, password: str = PASSWORD) -> Database:
        n = next(_counter)
        name = f"t{os.getpid()}_{n}_{service.replace('-', '_')}"
        role = f"{name}_migrator"
        pg.create_role(role, password)
        pg.create_database(name, owner=role)
        db = Database(service, name, role, password, pg, socket_root)
        made.append(db)
        return db

    yield make
    for db in made:
        pg.drop_database(db.name)


@pytest.fixture
def job_env(socket_root: Path | None, secret_manager: SecretManagerEmulator) -> dict[str, str]:
    """The environment a Cloud Run execution of the job would have, pointed at the test doubles."""
    env = {
        "MIGRATE_SECRET_MANAGER_ENDPOINT": secret_manager.endpoint,
        "GOOGLE_CLOUD_PROJECT": PROJECT,
        "CLOUD_RUN_JOB": "migrate-job",
        "CLOUD_RUN_EXECUTION": "migrate-job-abc12",
        "CLOUD_RUN_TASK_INDEX": "0",
        "CLOUD_RUN_TASK_COUNT": "1",
        "CLOUD_RUN_TASK_ATTEMPT": "0",
    }
    if socket_root is not None:
        env["MIGRATE_SOCKET_DIR"] = str(socket_root)
    return env


@pytest.fixture
def metadata(pg: PgServer, tmp_path: Path) -> Iterator[MetadataServer]:
    """The fake metadata server handing out TOKENS[0], and the IAM database user that accepts it.

    As on Cloud SQL, the IAM user is a login role of its own; here its password is the token.
    """
    with MetadataServer(email=SERVICE_ACCOUNT, project=PROJECT, token=TOKENS[0]) as server:
        pg.create_role(IAM_USER, TOKENS[0])
        yield server


@pytest.fixture
def iam_env(job_env: dict[str, str], metadata: MetadataServer, tmp_path: Path) -> dict[str, str]:
    """The job's environment with its Google identity from the fake metadata server, and no other."""
    config_dir = tmp_path / "gcloud"
    config_dir.mkdir()
    return {**job_env, **metadata.environment(config_dir)}


def grant_membership(pg: PgServer, role: str, member: str = IAM_USER) -> None:
    """Let member SET ROLE to role (as Cloud SQL's GRANT owner_role TO "sa@project.iam")."""
    pg.execute(f'GRANT "{role}" TO "{member}"')


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run the tests marked long first (the order is otherwise kept).

    Under pytest-xdist a long test collected last keeps one worker busy while the other has
    nothing left; started first, it overlaps with the short ones.
    """
    items.sort(key=lambda item: item.get_closest_marker("long") is None)


# Under pytest-xdist, each worker appends its processes' output to a file of its own in this
# directory, which the controller (or a run without workers) searches at the end.
OUTPUT_DIR_VARIABLE = "MIGRATE_TEST_OUTPUT_DIR"


def pytest_configure(config: pytest.Config) -> None:
    """Make the session's directory of child-process output (workers inherit it through the environment)."""
    if not hasattr(config, "workerinput"):
        os.environ[OUTPUT_DIR_VARIABLE] = tempfile.mkdtemp(prefix="migrate-job-test-output-")


def pytest_sessionstart(session: pytest.Session) -> None:
    """Start this process's log of child-process output for the secret leak check."""
    fd, path = tempfile.mkstemp(suffix=".log", dir=os.environ[OUTPUT_DIR_VARIABLE])
    os.close(fd)
    support.OUTPUT_LOG = Path(path)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the session if any test password reached the output of any process the tests ran."""
    support.stop_warm_server()
    if hasattr(session.config, "workerinput"):
        return  # the controller searches every worker's log once they are all done
    folder = Path(os.environ[OUTPUT_DIR_VARIABLE])
    text = "".join(log.read_text(encoding="utf-8") for log in sorted(folder.glob("*.log")))
    shutil.rmtree(folder, ignore_errors=True)
    leaked = [p for p in ALL_PASSWORDS if any(form in text for form in support.spellings(p))]
    if leaked:
        print(f"\nSECRET LEAK: {len(leaked)} test password(s) appeared in job output")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
