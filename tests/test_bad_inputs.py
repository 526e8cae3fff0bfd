"""A catalog of bad inputs: each one ends the job with the right exit code and one clear error line.

Every case is one row of ``CASES``: how to set it up (manifest, environment, arguments, secrets in
the emulator, database state), the exit code, the ``error`` kind of the single ``run.error`` line, and
the words its message or hint must hold so that the operator knows what is wrong and what to do.
For every case, the output must also be clean: nothing on stderr (argparse's usage errors aside), one
JSON object with an ``event`` per stdout line, ``run.summary`` last with the same exit code, no loose
traceback, and none of the secret values planted below anywhere.

Each case runs the job as a process (0.5 to 2 s of imports alone, more without compiled bytecode in
the venv), so the module runs the selected cases a few at a time on threads, once, in a module-scoped
fixture; each test then judges one case's recorded outcome. The databases are module-scoped too, one
per family of cases, and no case may migrate them (the cases that need an unreachable server use a
closed port). A case marked with ``bug`` documents a defect of job/ as a strict xfail.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from devtools.pgserver import PgServer
from devtools.secretmanager_emulator import SecretManagerEmulator
from tests import support
from tests.conftest import INSTANCE, Database
from tests.support import ALL_PASSWORDS, FIXTURES, PROJECT, JobRun, run_job, toml_value, write_manifest

# Secret values planted wherever a secret can live. They all contain MARKER, so that even part of
# one (or a URL-quoted spelling of one) in the output is caught.
MARKER = "S3cr3t"
LOGIN_PASSWORD = f"{MARKER}:/#?%<>&()' x-login"  # the login role's real password, as a literal
MANAGER_VALUE = f"{MARKER}:/#?%<>&()' x-manager"  # stored in the Secret Manager emulator
ENVIRON_VALUE = f"{MARKER}:/#?%<>&()' x-environ"  # an environment variable of every run
MOUNTED_VALUE = f"{MARKER}:/#?%<>&()' x-mounted"  # a mounted secret file
NOLOGIN_PASSWORD = f"{MARKER}:/#?%<>&()' x-nologin"  # a role that may not log in
MYSQL_URL = f"mysql://app:{urllib.parse.quote(MANAGER_VALUE, safe='')}@db.internal/app"
WRONG_PASSWORD = ALL_PASSWORDS[1]
PLANTED = (LOGIN_PASSWORD, MANAGER_VALUE, ENVIRON_VALUE, MOUNTED_VALUE, NOLOGIN_PASSWORD, MYSQL_URL)

STAMPED = "feedfacecafe"  # a revision risk-engine does not ship
DROP = object()  # in World.entry(): remove this key from the entry
FAST = {"MIGRATE_CONNECT_TIMEOUT_S": "1"}  # for cases that wait out the connection retries
WORKERS = 4  # job processes at once: most of a case is imports (CPU) or connect retries (sleep)


@dataclass
class World:
    """What the cases are set up against: a scratch folder, the test doubles, one database per family."""

    root: Path
    pg: PgServer
    socket_root: Path | None
    secret_manager: SecretManagerEmulator
    creds: Database  # risk-engine, never migrated: config, secret, login and argument cases
    history: Database  # risk-engine, stamped at a revision the image does not know
    broken: Database  # the broken fixture service: its second revision fails
    nologin_role: str
    closed_port: int
    short_dir: Path  # a short folder under /tmp: a unix socket path has at most 107 bytes

    @property
    def env(self) -> dict[str, str]:
        """Return the environment of a Cloud Run execution (as conftest's job_env), plus a secret."""
        env = {
            "MIGRATE_SECRET_MANAGER_ENDPOINT": self.secret_manager.endpoint,
            "GOOGLE_CLOUD_PROJECT": PROJECT,
            "CLOUD_RUN_JOB": "migrate-job",
            "CLOUD_RUN_EXECUTION": "migrate-job-bad01",
            "CLOUD_RUN_TASK_INDEX": "0",
            "CLOUD_RUN_TASK_COUNT": "1",
            "CLOUD_RUN_TASK_ATTEMPT": "0",
            "MIGRATE_CONNECT_TIMEOUT_S": "2",
            "MJ_UNRELATED_SECRET": ENVIRON_VALUE,  # must never be echoed, whatever goes wrong
        }
        if self.socket_root is not None:
            env["MIGRATE_SOCKET_DIR"] = str(self.socket_root)
        return env

    def entry(self, db: Database | None = None, **changes: Any) -> dict[str, Any]:
        """Return a working manifest entry (literal password) with changes; DROP removes a key."""
        entry = (db or self.creds).entry()
        if db is None:
            entry["password"] = LOGIN_PASSWORD
        entry.update(changes)
        return {k: v for k, v in entry.items() if v is not DROP}

    def tcp(self, **changes: Any) -> dict[str, Any]:
        """Return a working entry over TCP instead of the Cloud SQL socket."""
        base = {
            "instance": DROP,
            "host": self.pg.host or "127.0.0.1",
            "port": self.pg.port,
            "sslmode": "disable",
        }
        return self.entry(**{**base, **changes})

    def manifest(self, name: str, entries: list[dict[str, Any]], **top: Any) -> dict[str, str]:
        """Write a manifest; return the run's environment pointing at it."""
        path = write_manifest(self.root / f"{name}.toml", entries, **top)
        return {**self.env, "MIGRATE_MANIFEST": str(path)}

    def raw(self, name: str, text: str) -> dict[str, str]:
        """Write a manifest from text; return the run's environment pointing at it."""
        path = self.root / f"{name}.toml"
        path.write_text(text, encoding="utf-8")
        return {**self.env, "MIGRATE_MANIFEST": str(path)}

    def good(self, name: str, **env: str) -> dict[str, str]:
        """Return the environment of a run whose manifest is fine (one entry, the creds database)."""
        return {**self.manifest(name, [self.entry()]), **env}


Setup = Callable[[World], dict[str, str]]
Needle = str | Callable[[World], str]


@dataclass(frozen=True)
class Case:
    """One bad input and what the job must answer to it."""

    id: str
    family: str
    setup: Setup  # returns the run's whole environment (its manifest written, secrets planted)
    code: int
    kind: str | None  # the run.error line's `error`; None: argparse's usage error on stderr
    needles: tuple[Needle, ...]  # each must be in the message or the hint (stderr for argparse)
    args: tuple[str, ...] = ()
    absent: tuple[str, ...] = ()  # none of these may be in the message or the hint
    bug: str | None = None  # a known bug in job/: the case is xfail(strict=True) with this reason

    def param(self) -> Any:
        """Return the case as a pytest parameter, xfail when it documents a bug."""
        marks = [pytest.mark.xfail(strict=True, reason=self.bug)] if self.bug else []
        return pytest.param(self, id=self.id, marks=marks)


def _manifest_text(name: str) -> Setup:
    """Return a setup that writes one of the hand-written manifests below."""
    return lambda w: w.raw(name, MANIFEST_TEXTS[name](w))


def _entry_lines(w: World, **changes: Any) -> str:
    """Return one [[databases]] table as TOML."""
    return "[[databases]]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in w.entry(**changes).items())


MANIFEST_TEXTS: dict[str, Callable[[World], str]] = {
    # An unclosed table header, after a literal password that must not be quoted back.
    "not-toml": lambda w: _entry_lines(w) + "[[databases]\nservice = 'risk-engine'\n",
    "empty-databases": lambda w: f'project = "{PROJECT}"\ndatabases = []\n',
    "no-databases": lambda w: f'project = "{PROJECT}"\nsocket_dir = "/cloudsql"\n',
    "port-not-a-number": lambda w: _entry_lines(w, instance=DROP, host="127.0.0.1", port="abc"),
}


def _secret(name: str, value: str | None = None, **faults: bool) -> Callable[[World], str]:
    """Plant a secret in the emulator; return its full reference."""

    def plant(w: World) -> str:
        w.secret_manager.add_secret(PROJECT, name, value, **faults)
        return f"secretmanager://projects/{PROJECT}/secrets/{name}/versions/latest"

    return plant


def _with_password(name: str, ref: Callable[[World], str], **env: str) -> Setup:
    """Return a setup whose only entry reads its password from the reference ref(world) returns."""
    return lambda w: {**w.manifest(name, [w.entry(password=ref(w))]), **env}


def _with_url(name: str, ref: Callable[[World], str], **env: str) -> Setup:
    """Return a setup whose only entry (the creds database) is a whole-URL secret reference."""
    return lambda w: {
        **w.manifest(name, [{"service": "risk-engine", "database": w.creds.name, "url": ref(w)}]),
        **env,
    }


def _mounted(name: str, value: str) -> Callable[[World], str]:
    """Write a mounted secret file; return its file:// reference."""

    def mount(w: World) -> str:
        path = w.root / name
        path.write_text(value + "\n", encoding="utf-8")
        return f"file://{path}"

    return mount


def _unmounted(name: str, instance: str) -> Setup:
    """An instance whose socket is not in MIGRATE_SOCKET_DIR (an empty /cloudsql)."""

    def setup(w: World) -> dict[str, str]:
        entry = w.entry(instance=instance, host=DROP, port=DROP)
        return {
            **w.manifest(name, [entry]),
            "MIGRATE_SOCKET_DIR": str(w.short_dir),
            **FAST,
        }

    return setup


def _wrong_password_url(w: World) -> str:
    """Plant a whole-URL secret that reaches the creds database with a wrong (planted) password."""
    password = urllib.parse.quote(MANAGER_VALUE, safe="")
    if w.socket_root is not None:
        where = f"@/{w.creds.name}?host={urllib.parse.quote(str(w.socket_root / INSTANCE), safe='/:')}"
    else:
        where = f"@{w.pg.host or '127.0.0.1'}:{w.pg.port}/{w.creds.name}"
    return _secret("mj-url-wrong-password", f"postgresql://{w.creds.role}:{password}{where}")(w)


def _closed_url(name: str, path: str) -> Callable[[World], str]:
    """Plant a whole-URL secret to the closed port (nothing can be migrated there); path is /DB?QUERY."""

    def plant(w: World) -> str:
        password = urllib.parse.quote(MANAGER_VALUE, safe="")
        return _secret(name, f"postgresql://{w.creds.role}:{password}@127.0.0.1:{w.closed_port}{path}")(w)

    return plant


def _stamped(w: World) -> dict[str, str]:
    """The history database (stamped at an unknown revision) as the only entry."""
    return w.manifest("stamped", [w.entry(w.history)])


def _bad_history(service: str) -> Setup:
    """A service from tests/fixtures/services_badhistory as the only entry."""
    return lambda w: {
        **w.manifest(service, [w.entry(service=service)]),
        "MIGRATE_SERVICES_DIR": str(FIXTURES / "services_badhistory"),
    }


def _broken(w: World) -> dict[str, str]:
    """The broken fixture service, whose second revision fails."""
    return {
        **w.manifest("broken", [w.entry(w.broken)]),
        "MIGRATE_SERVICES_DIR": str(FIXTURES / "services"),
    }


CASES: list[Case] = [
    # --- manifest -------------------------------------------------------------------------------
    Case("not-toml", "manifest", _manifest_text("not-toml"), 2, "config", ("not-toml.toml", "TOML")),
    Case(
        "unknown-top-level-key",
        "manifest",
        lambda w: w.manifest("unknown-top-level-key", [w.entry()], projct=PROJECT),
        2,
        "config",
        ("unknown-top-level-key.toml", "projct: unknown key"),
    ),
    Case(
        "unknown-entry-key",
        "manifest",
        lambda w: w.manifest("unknown-entry-key", [w.entry(passwrd=LOGIN_PASSWORD)]),
        2,
        "config",
        ("databases[0].passwrd: unknown key",),
    ),
    Case(
        "missing-service-key",
        "manifest",
        lambda w: w.manifest("missing-service-key", [w.entry(service=DROP)]),
        2,
        "config",
        ("databases[0].service",),
    ),
    Case(
        "unknown-service",
        "manifest",
        lambda w: w.manifest("unknown-service", [w.entry(service="ledger")]),
        2,
        "config",
        ("ledger", "risk-engine"),  # the hint lists the services the image ships
    ),
    Case(
        "duplicate-database",
        "manifest",
        lambda w: w.manifest("duplicate-database", [w.entry(), w.entry()]),
        2,
        "config",
        (lambda w: w.creds.name, "databases[1]", "databases[0]"),
    ),
    Case(
        "url-with-user-and-password",
        "manifest",
        lambda w: w.manifest(
            "url-with-user-and-password",
            [w.entry(url=f"postgresql://app:{urllib.parse.quote(LOGIN_PASSWORD)}@/x", instance=DROP)],
        ),
        2,
        "config",
        ("url excludes user, password",),
    ),
    Case(
        "neither-instance-nor-host",
        "manifest",
        lambda w: w.manifest("neither-instance-nor-host", [w.entry(instance=DROP, host=DROP, port=DROP)]),
        2,
        "config",
        ("databases[0]", "instance", "host"),
    ),
    Case(
        "both-instance-and-host",
        "manifest",
        lambda w: w.manifest("both-instance-and-host", [w.entry(instance=INSTANCE, host="127.0.0.1")]),
        2,
        "config",
        ("exactly one of instance",),
    ),
    Case(
        "bad-instance-format",
        "manifest",
        lambda w: w.manifest("bad-instance-format", [w.entry(instance="fp-test-db", host=DROP, port=DROP)]),
        2,
        "config",
        ("databases[0].instance",),
    ),
    Case("empty-databases", "manifest", _manifest_text("empty-databases"), 2, "config", ("databases:",)),
    Case(
        "entry-error-blames-empty-list",
        "manifest",
        lambda w: w.manifest(
            "entry-error-blames-empty-list", [w.entry(instance=DROP, host="db", port=70000)]
        ),
        2,
        "config",
        ("databases[0].port",),
        absent=("at least 1 item",),
    ),
    Case("no-databases", "manifest", _manifest_text("no-databases"), 2, "config", ("databases:",)),
    Case(
        "port-not-a-number",
        "manifest",
        _manifest_text("port-not-a-number"),
        2,
        "config",
        ("databases[0].port",),
    ),
    Case(
        "missing-password",
        "manifest",
        lambda w: w.manifest("missing-password", [w.entry(password=DROP)]),
        2,
        "config",
        ("missing password",),
    ),
    Case(
        "manifest-file-missing",
        "manifest",
        lambda w: {**w.env, "MIGRATE_MANIFEST": str(w.root / "nowhere.toml")},
        2,
        "config",
        ("nowhere.toml", "MIGRATE_MANIFEST"),
    ),
    Case(
        "manifest-is-a-directory",
        "manifest",
        lambda w: {**w.env, "MIGRATE_MANIFEST": str(w.root)},
        2,
        "config",
        ("cannot read manifest",),
    ),
    Case(
        "environment-missing",
        "manifest",
        lambda w: {**w.env, "MIGRATE_ENV": "nosuchenv"},
        2,
        "config",
        ("nosuchenv.toml", "MIGRATE_ENV"),
    ),
    # --- secret references (malformed: configuration errors before anything is read) ----------
    Case(
        "reference-unknown-scheme",
        "references",
        lambda w: w.manifest("reference-unknown-scheme", [w.entry(password="vault://db/password")]),
        2,
        "config",
        ("databases[0].password", "scheme is unknown", "secretmanager://"),
    ),
    Case(
        "reference-env-bad-name",
        "references",
        lambda w: w.manifest("reference-env-bad-name", [w.entry(password="env://1BAD")]),
        2,
        "config",
        ("databases[0].password", "env://1BAD"),
    ),
    Case(
        "reference-file-relative",
        "references",
        lambda w: w.manifest("reference-file-relative", [w.entry(password="file://run/secrets/pw")]),
        2,
        "config",
        ("file://run/secrets/pw", "absolute"),
    ),
    Case(
        "reference-short-without-project",
        "references",
        lambda w: {
            **w.manifest("reference-short-without-project", [w.entry(password="secretmanager://db-pw")]),
            "GOOGLE_CLOUD_PROJECT": "",
        },
        2,
        "config",
        ("secretmanager://db-pw", "GOOGLE_CLOUD_PROJECT"),
    ),
    Case(
        "reference-secretmanager-version-zero",
        "references",
        lambda w: w.manifest(
            "reference-secretmanager-version-zero",
            [w.entry(password=f"secretmanager://projects/{PROJECT}/secrets/db-pw/versions/0")],
        ),
        2,
        "config",
        ("databases[0].password", "versions/V"),
    ),
    Case(
        "reference-bad-user",
        "references",
        lambda w: w.manifest("reference-bad-user", [w.entry(user="env://")]),
        2,
        "config",
        ("databases[0].user", "env://"),
    ),
    # --- secrets that cannot be read (exit 3, nothing touched) --------------------------------
    Case(
        "secret-missing",
        "secrets",
        _with_password("secret-missing", lambda w: "secretmanager://mj-no-such-secret"),
        3,
        "secret",
        ("mj-no-such-secret", "gcloud secrets versions add"),
    ),
    Case(
        "secret-without-version",
        "secrets",
        _with_password("secret-without-version", _secret("mj-no-version")),
        3,
        "secret",
        ("mj-no-version",),
    ),
    Case(
        "secret-denied",
        "secrets",
        _with_password("secret-denied", _secret("mj-denied", MANAGER_VALUE, denied=True)),
        3,
        "secret",
        ("mj-denied", "roles/secretmanager.secretAccessor"),
    ),
    Case(
        "secret-corrupt-crc32c",
        "secrets",
        _with_password("secret-corrupt-crc32c", _secret("mj-corrupt", MANAGER_VALUE, corrupt=True)),
        3,
        "secret",
        ("mj-corrupt", "CRC32C"),
    ),
    Case(
        "secret-env-unset",
        "secrets",
        _with_password("secret-env-unset", lambda w: "env://MJ_NOT_SET_ANYWHERE"),
        3,
        "secret",
        ("MJ_NOT_SET_ANYWHERE", "--set-secrets"),
    ),
    Case(
        "secret-file-missing",
        "secrets",
        _with_password("secret-file-missing", lambda w: f"file://{w.root}/not-mounted-pw"),
        3,
        "secret",
        ("not-mounted-pw",),
    ),
    Case(
        "url-secret-not-a-url",
        "secrets",
        _with_url("url-secret-not-a-url", _mounted("url-not-a-url", MOUNTED_VALUE)),
        3,
        "secret",
        ("url-not-a-url", "does not hold a database URL"),
    ),
    Case(
        "url-secret-mysql",
        "secrets",
        _with_url("url-secret-mysql", _secret("mj-mysql-url", MYSQL_URL)),
        3,
        "secret",
        ("mj-mysql-url", "mysql"),
    ),
    Case(
        "url-secret-other-database",
        "secrets",
        _with_url("url-secret-other-database", _closed_url("mj-url-other-db", "/mj_other_database"), **FAST),
        3,
        "secret",
        ("mj-url-other-db", "mj_other_database", lambda w: w.creds.name),
    ),
    Case(
        "url-secret-without-database",
        "secrets",
        _with_url("url-secret-without-database", _closed_url("mj-url-no-db", "/"), **FAST),
        3,
        "secret",
        ("mj-url-no-db", "database"),
    ),
    Case(
        "url-secret-bad-sslmode",
        "secrets",
        _with_url(
            "url-secret-bad-sslmode",
            lambda w: _closed_url("mj-url-sslmode", f"/{w.creds.name}?sslmode=bogus")(w),
        ),
        3,
        "secret",
        ("mj-url-sslmode", "sslmode"),
    ),
    Case(
        "secret-manager-not-answering",
        "secrets",
        lambda w: {
            **w.manifest("secret-manager-not-answering", [w.entry(password=_secret("mj-good", "x1")(w))]),
            "MIGRATE_SECRET_MANAGER_ENDPOINT": f"http://127.0.0.1:{w.closed_port}",
        },
        3,
        "secret",
        ("mj-good", "did not answer"),
    ),
    # --- credentials and databases (exit 4) ---------------------------------------------------
    Case(
        "wrong-password",
        "credentials",
        _with_password(
            "wrong-password", lambda w: "env://MJ_WRONG_PASSWORD", MJ_WRONG_PASSWORD=WRONG_PASSWORD
        ),
        4,
        "connect",
        ("password", "env://MJ_WRONG_PASSWORD"),
    ),
    Case(
        "role-missing",
        "credentials",
        lambda w: w.manifest("role-missing", [w.entry(user="mj_no_such_role")]),
        4,
        "connect",
        ("mj_no_such_role",),
    ),
    Case(
        "role-cannot-log-in",
        "credentials",
        lambda w: w.manifest("role-cannot-log-in", [w.entry(user=w.nologin_role, password=NOLOGIN_PASSWORD)]),
        4,
        "connect",
        (lambda w: w.nologin_role, "log in"),
    ),
    Case(
        "database-missing",
        "credentials",
        lambda w: w.manifest("database-missing", [w.entry(database="mj_no_such_database")]),
        4,
        "connect",
        ("mj_no_such_database", "create database"),
    ),
    Case(
        "tcp-port-closed",
        "credentials",
        lambda w: {
            **w.manifest("tcp-port-closed", [w.tcp(host="127.0.0.1", port=w.closed_port)]),
            **FAST,
        },
        4,
        "connect",
        (lambda w: f"127.0.0.1:{w.closed_port}",),
    ),
    Case(
        "socket-not-mounted",
        "credentials",
        _unmounted("socket-not-mounted", f"{PROJECT}:us-central1:not-mounted"),
        4,
        "connect",
        ("not-mounted", "--set-cloudsql-instances"),
        absent=("too long",),
    ),
    Case(
        "socket-path-too-long",
        "credentials",
        _unmounted("socket-path-too-long", f"{PROJECT}:us-central1:{'long-instance-name-' * 4}x"),
        2,
        "config",
        ("too long", "MIGRATE_SOCKET_DIR"),
    ),
    Case(
        "url-secret-wrong-password",
        "credentials",
        _with_url("url-secret-wrong-password", _wrong_password_url),
        4,
        "connect",
        ("password", "mj-url-wrong-password"),
    ),
    Case(
        "url-secret-port-closed",
        "credentials",
        _with_url(
            "url-secret-port-closed", lambda w: _closed_url("mj-url-closed", f"/{w.creds.name}")(w), **FAST
        ),
        4,
        "connect",
        (lambda w: f"127.0.0.1:{w.closed_port}",),
    ),
    # --- histories ------------------------------------------------------------------------------
    Case("unknown-revision", "histories", _stamped, 6, "history", (STAMPED, "deploy")),
    Case("two-heads", "histories", _bad_history("twoheads"), 6, "history", ("twoheads", "merge")),
    Case(
        "dangling-down-revision",
        "histories",
        _bad_history("dangling"),
        6,
        "history",
        ("dangling", "cccc00000001"),
    ),
    Case("failing-migration", "histories", _broken, 7, "migration_failed", ("aaaa00000002", "stays at")),
    # --- arguments and environment --------------------------------------------------------------
    Case(
        "select-unknown-service",
        "arguments",
        lambda w: w.good("select-unknown-service"),
        2,
        "config",
        ("nope", "--service", "risk-engine"),
        args=("--service", "nope"),
    ),
    Case(
        "select-unknown-database",
        "arguments",
        lambda w: w.good("select-unknown-database"),
        2,
        "config",
        ("nope", "--database", lambda w: w.creds.name),
        args=("plan", "--database", "nope"),
    ),
    Case(
        "plan-to-unknown-revision",
        "arguments",
        lambda w: w.good("plan-to-unknown-revision"),
        2,
        "config",
        ("nosuchrev", "risk-engine"),
        args=("plan", "--to", "nosuchrev"),
    ),
    Case(
        "upgrade-to-unknown-revision-unreachable",
        "arguments",
        lambda w: {
            **w.manifest(
                "upgrade-to-unknown-revision-unreachable", [w.tcp(host="127.0.0.1", port=w.closed_port)]
            ),
            **FAST,
        },
        2,
        "config",
        ("nosuchrev",),
        args=("upgrade", "--to", "nosuchrev"),
    ),
    Case(
        "unknown-flag",
        "arguments",
        lambda w: w.good("unknown-flag"),
        2,
        None,
        ("--bogus",),
        args=("plan", "--bogus"),
    ),
    Case(
        "selector-without-value",
        "arguments",
        lambda w: w.good("selector-without-value"),
        2,
        None,
        ("--service",),
        args=("--service",),
    ),
    Case(
        "log-format-xml",
        "arguments",
        lambda w: w.good("log-format-xml", MIGRATE_LOG_FORMAT="xml"),
        2,
        "config",
        ("MIGRATE_LOG_FORMAT",),
    ),
    Case(
        "connect-timeout-not-a-number",
        "arguments",
        lambda w: w.good("connect-timeout-not-a-number", MIGRATE_CONNECT_TIMEOUT_S="abc"),
        2,
        "config",
        ("MIGRATE_CONNECT_TIMEOUT_S",),
    ),
    Case(
        "cloud-run-task-index-not-a-number",
        "arguments",
        lambda w: w.good("cloud-run-task-index-not-a-number", CLOUD_RUN_TASK_INDEX="abc"),
        2,
        "config",
        ("CLOUD_RUN_TASK_INDEX",),
    ),
    Case(
        "services-dir-missing",
        "arguments",
        lambda w: w.good("services-dir-missing", MIGRATE_SERVICES_DIR=str(w.root / "no-services")),
        2,
        "config",
        ("no-services", "MIGRATE_SERVICES_DIR"),
    ),
]
FAMILIES = {"manifest", "references", "secrets", "credentials", "histories", "arguments"}
assert {c.family for c in CASES} == FAMILIES and len({c.id for c in CASES}) == len(CASES)


def _free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _module_database(pg: PgServer, socket_root: Path | None, service: str, password: str) -> Database:
    """Create a database owned by its own login role, as conftest's make_database does."""
    name = f"t{os.getpid()}_bad_{service.replace('-', '_')}"
    role = f"{name}_migrator"
    pg.create_role(role, password)
    pg.create_database(name, owner=role)
    return Database(service, name, role, password, pg, socket_root)


def stamp_unknown_revision(db: Database, revision: str = STAMPED) -> None:
    """Put the database at a revision its service does not ship (a newer image migrated it)."""
    db.pg.execute(
        "CREATE TABLE alembic_version (version_num varchar(32) NOT NULL PRIMARY KEY);"
        f"INSERT INTO alembic_version VALUES ('{revision}');"
        f'ALTER TABLE alembic_version OWNER TO "{db.role}"',
        database=db.name,
    )


@pytest.fixture(scope="module")
def world(
    pg: PgServer,
    socket_root: Path | None,
    secret_manager: SecretManagerEmulator,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[World]:
    """The databases and folders the catalog's cases share (none of them migrates creds)."""
    creds = _module_database(pg, socket_root, "risk-engine", LOGIN_PASSWORD)
    history = _module_database(pg, socket_root, "risk-engine-ahead", LOGIN_PASSWORD)
    history.service = "risk-engine"
    stamp_unknown_revision(history)
    broken = _module_database(pg, socket_root, "broken", LOGIN_PASSWORD)
    nologin = f"t{os.getpid()}_bad_nologin"
    pg.create_role(nologin, NOLOGIN_PASSWORD)
    pg.execute(f'ALTER ROLE "{nologin}" NOLOGIN')
    short_dir = Path(tempfile.mkdtemp(prefix="mjs", dir="/tmp"))
    yield World(
        root=tmp_path_factory.mktemp("bad_inputs"),
        pg=pg,
        socket_root=socket_root,
        secret_manager=secret_manager,
        creds=creds,
        history=history,
        broken=broken,
        nologin_role=nologin,
        closed_port=_free_port(),
        short_dir=short_dir,
    )
    shutil.rmtree(short_dir, ignore_errors=True)
    for db in (creds, history, broken):
        pg.drop_database(db.name)
    for role in (creds.role, history.role, broken.role, nologin):
        with contextlib.suppress(Exception):
            pg.execute(f'DROP ROLE IF EXISTS "{role}"')


@dataclass
class Outcome:
    """A case's finished run, or why it could not be set up."""

    run: JobRun | None
    seconds: float
    error: BaseException | None = None


@pytest.fixture(scope="module")
def outcomes(world: World, request: pytest.FixtureRequest) -> dict[str, Outcome]:
    """Run every selected case once, a few processes at a time; return the outcomes by case id."""
    selected: list[Case] = []
    for item in request.session.items:  # only the cases this session runs (-k, node ids)
        params = getattr(getattr(item, "callspec", None), "params", {})
        if getattr(item, "module", None) is request.module and isinstance(params.get("case"), Case):
            selected.append(params["case"])
    envs: dict[str, dict[str, str]] = {}
    results: dict[str, Outcome] = {}
    for case in selected:  # set-ups write files and plant secrets: do them in order, here
        try:
            envs[case.id] = case.setup(world)
        except Exception as exc:
            results[case.id] = Outcome(None, 0.0, exc)

    def execute(case: Case) -> Outcome:
        started = time.monotonic()
        run = run_job(*case.args, env=envs[case.id], timeout=60)
        return Outcome(run, time.monotonic() - started)

    lock = threading.Lock()
    record = support.record_output

    def record_locked(text: str) -> None:  # the session's leak log, appended from several threads
        with lock:
            record(text)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(support, "record_output", record_locked)
        with ThreadPoolExecutor(WORKERS) as pool:
            futures = {c.id: pool.submit(execute, c) for c in selected if c.id in envs}
            for case_id, future in futures.items():
                try:
                    results[case_id] = future.result()
                except Exception as exc:
                    results[case_id] = Outcome(None, 0.0, exc)
    return results


def assert_no_secret(text: str) -> None:
    """No planted secret, test password, or any spelling or part of one, is in text."""
    assert MARKER not in text, "a planted secret value reached the output"
    for value in (*PLANTED, *ALL_PASSWORDS):
        for form in (value, urllib.parse.quote(value, safe=""), urllib.parse.quote_plus(value, safe="")):
            assert form not in text, "a secret value reached the output"


def assert_usage_error(run: JobRun, needles: list[str]) -> None:
    """argparse's own error: exit 2, usage on stderr, nothing on stdout."""
    assert run.code == 2, run.stdout + run.stderr
    assert run.stdout == "", run.stdout
    assert run.stderr.startswith("usage: migrate-job"), run.stderr
    for needle in needles:
        assert needle in run.stderr, (needle, run.stderr)


def assert_one_clear_error(
    run: JobRun, code: int, kind: str, needles: list[str], absent: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Clean JSON output, one run.error of this kind naming the needles, run.summary last."""
    assert run.code == code, run.stdout + run.stderr
    assert run.stderr == "", run.stderr
    lines = run.lines  # fails on any line that is not JSON
    assert lines, "no output at all"
    for line in lines:
        assert isinstance(line, dict) and line.get("event"), line
        assert line.get("message"), line
        shown = {k: v for k, v in line.items() if k != "stack_trace"}
        assert "Traceback" not in json.dumps(shown), line
    errors = [line for line in lines if line["event"] == "run.error"]
    assert len(errors) == 1, errors
    error = errors[0]
    assert error["error"] == kind, error
    assert error["exit_code"] == code, error
    assert error["severity"] == "ERROR", error
    if code not in (1, 7):  # a stack trace is for a bug or a failed migration, not an operator's typo
        assert "stack_trace" not in error, error
    assert lines[-1]["event"] == "run.summary", lines[-1]
    assert lines[-1]["exit_code"] == code and lines[-1]["status"] == "failed", lines[-1]
    said = f"{error['message']}\n{error.get('hint', '')}"
    for needle in needles:
        assert needle in said, (needle, said)
    for wrong in absent:
        assert wrong not in said, (wrong, said)
    return error


@pytest.mark.parametrize("case", [c.param() for c in CASES])
def test_bad_input_ends_with_one_clear_error(case: Case, outcomes: dict[str, Outcome], world: World) -> None:
    """The job answers a bad input with its exit code, one error line that says what to fix, no secret."""
    outcome = outcomes[case.id]
    if outcome.error is not None:
        raise outcome.error
    run = outcome.run
    assert run is not None
    assert_no_secret(run.stdout + run.stderr)
    needles = [n(world) if callable(n) else n for n in case.needles]
    if case.kind is None:
        assert_usage_error(run, needles)
    else:
        assert_one_clear_error(run, case.code, case.kind, needles, case.absent)
    assert outcome.seconds < 30, f"{case.id} took {outcome.seconds:.1f}s"


def test_no_bad_input_touched_the_shared_database(outcomes: dict[str, Outcome], world: World) -> None:
    """Configuration, secret, login and argument errors stop before any table is created."""
    assert world.creds.tables() == set()
    assert world.history.version() == [STAMPED]


def test_allow_ahead_skips_a_database_at_an_unknown_revision(
    make_database: Callable[..., Database], job_env: dict[str, str], tmp_path: Path
) -> None:
    """Positive control of the unknown-revision case: with --allow-ahead it is a warning, exit 0."""
    db = make_database("risk-engine")
    stamp_unknown_revision(db)
    manifest = write_manifest(tmp_path / "ahead.toml", [db.entry()])
    run = run_job("upgrade", "--allow-ahead", env={**job_env, "MIGRATE_MANIFEST": str(manifest)})
    assert run.code == 0, run.stdout + run.stderr
    assert run.stderr == ""
    assert_no_secret(run.stdout)
    assert all(line["event"] for line in run.lines)
    assert run.events("run.error") == []
    (warning,) = run.events("db.ahead")
    assert warning["severity"] == "WARNING" and warning["revision"] == STAMPED
    assert warning["database"] == db.name
    assert run.summary["exit_code"] == 0 and run.summary["status"] == "succeeded"
    result = run.by_database()[db.name]
    assert result["status"] == "ahead" and result["from_revision"] == STAMPED
    assert db.version() == [STAMPED], "a database ahead of the image is left alone"
