"""The environment manifest (``deploy/environments/<env>.toml``): which databases, in which order."""

from __future__ import annotations

import hashlib
import tomllib
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from job import tls
from job.errors import ConfigError
from job.secrets import SecretRef, literal_password, parse_reference

INSTANCE_PATTERN = r"^(?:[a-z0-9.-]+:)?[a-z][a-z0-9-]*:[a-z0-9-]+:[a-z0-9][a-z0-9-]*$"
NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_$-]{0,62}$"
# The environment where literal passwords are allowed (MIGRATE_ENV's default).
LOCAL_ENV = "local"
# Databases of every PostgreSQL (templates, postgres) and of Cloud SQL (cloudsqladmin).
SYSTEM_DATABASES = frozenset({"template0", "template1", "postgres", "cloudsqladmin"})


class DatabaseEntry(BaseModel):
    """One database to migrate: its service, where it lives, and how to log in."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    service: str = Field(min_length=1)
    # One database; ``databases = [...]`` in the file expands to one entry per name, and
    # ``discover`` lists them from the server at run time (see expand_discovered).
    database: str | None = Field(default=None, pattern=NAME_PATTERN)
    discover: str | None = Field(default=None, min_length=1)
    discover_database: str = Field(default="postgres", pattern=NAME_PATTERN)
    # Where the tasks of one Cloud Run execution meet (job.coordination): a database on the
    # entry's server where its login may create a table. A discover entry's default: discover_database.
    coordination_database: str | None = Field(default=None, pattern=NAME_PATTERN)
    instance: str | None = Field(default=None, pattern=INSTANCE_PATTERN)
    host: str | None = None
    port: int = Field(default=5432, ge=1, le=65535)
    user: str | None = None
    password: str | None = None
    url: str | None = None
    # "iam": Cloud SQL IAM database login, the job's service account as user and a fresh OAuth2
    # token as password (job/iam.py); no password to store or rotate.
    auth: Literal["password", "iam"] = "password"
    # TLS over TCP (job/tls.py): host entries default to "require"; sockets need none.
    sslmode: Literal["disable", "require", "verify-ca", "verify-full"] | None = None
    # A secret reference to the CA certificate (PEM) that verify-ca and verify-full trust.
    sslrootcert: str | None = None
    # A role every connection of the entry switches to (SET ROLE at login), so the objects
    # migrations create belong to it, whoever logs in.
    owner: str | None = Field(default=None, pattern=NAME_PATTERN)
    # A DDL statement waits at most this long for a table lock, so it never queues the
    # application's traffic behind it; 0 means no limit.
    lock_timeout_s: float = Field(default=5.0, ge=0)
    # A statement runs at most this long; 0 means no limit.
    statement_timeout_s: float = Field(default=0.0, ge=0)
    # A migration that hit lock_timeout is retried (it rolled back whole) at most this many
    # times and for at most this long in all.
    lock_retries: int = Field(default=5, ge=0, le=100)
    lock_retry_s: float = Field(default=120.0, ge=0)
    # Migrate the entry's first N databases with work alone; the rest only if they all succeed.
    canary: int | None = Field(default=None, ge=1)
    # "continue": a failing database of the entry does not stop the others (tenants); max_failures
    # of them are tolerated, and the next one stops the run anyway.
    on_failure: Literal["stop", "continue"] = "stop"
    max_failures: int | None = Field(default=None, ge=1)
    # Downgrades and reset of this entry's databases; None follows the manifest's top-level key.
    allow_downgrade: bool | None = None
    # reset (drop and recreate) of this entry's databases; None follows the manifest's top-level key.
    allow_reset: bool | None = None
    # false: a failed migration's log lines leave out the server's DETAIL (it can quote a row's
    # values), and a data error's message (which can quote a value) shows only the error's name.
    log_detail: bool = True
    # Which [[databases]] block of the file the entry came from: a ``databases = [...]`` list
    # expands to several entries that share their canary and max_failures.
    _block: int | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _one_way_to_connect(self) -> DatabaseEntry:
        """Require either a whole URL, or user, password and one of instance or host (IAM: no password)."""
        if (self.database is None) == (self.discover is None):
            raise ValueError("give exactly one of database, databases or discover")
        if self.max_failures is not None and self.on_failure != "continue":
            raise ValueError(
                'max_failures needs on_failure = "continue" (with "stop", the first failure stops)'
            )
        if self.discover is not None and self.url is not None:
            raise ValueError(
                'discover needs instance or host and a login (user and password, or auth = "iam"), not url'
            )
        tls.check_entry(self)
        if self.auth == "iam":
            self._check_iam_login()
        elif self.url is not None:
            extra = [k for k in ("instance", "host", "user", "password") if getattr(self, k)]
            if extra:
                raise ValueError(f"url excludes {', '.join(extra)}: give one or the other")
            return self
        else:
            missing = [k for k in ("user", "password") if getattr(self, k) is None]
            if missing:
                raise ValueError(f"missing {' and '.join(missing)} (or give url)")
        if (self.instance is None) == (self.host is None):
            raise ValueError("give exactly one of instance (Cloud SQL socket) or host (TCP)")
        return self

    def _check_iam_login(self) -> None:
        """Refuse a stored password or URL for an IAM entry, and a user that is not a plain name."""
        extra = [k for k in ("password", "url") if getattr(self, k) is not None]
        if extra:
            raise ValueError(
                f'auth = "iam" logs in with a token, so it excludes {" and ".join(extra)}: remove '
                f'{"it" if len(extra) == 1 else "them"}, or use auth = "password"'
            )
        if self.user is not None and "://" in self.user:
            raise ValueError(
                'with auth = "iam", user is the IAM database user\'s name itself (or leave it out: '
                "the job's service account gives it), not a secret reference"
            )

    @property
    def never_discovered(self) -> frozenset[str]:
        """Return the databases a discover query of this entry may list but the job never migrates.

        The templates (a table in template1 appears in every database created after), the
        server's maintenance databases, and the databases the job itself works in.
        """
        return SYSTEM_DATABASES | {
            self.discover_database,
            self.coordination_database or self.discover_database,
        }

    @property
    def block(self) -> int | None:
        """Return the index of the manifest block the entry came from (None: built in code)."""
        return self._block

    @property
    def coordination(self) -> str | None:
        """Return the coordination database: the key, else a discover entry's discover_database."""
        if self.coordination_database is not None:
            return self.coordination_database
        return self.discover_database if self.discover is not None else None

    @property
    def label(self) -> str:
        """Return ``service/database`` for messages."""
        return f"{self.service}/{self.database or '<discover>'}"

    @property
    def name(self) -> str:
        """Return the database name (entries still to be discovered have none yet)."""
        if self.database is None:
            raise ValueError(f"entry for {self.service} has not been discovered yet")
        return self.database

    @property
    def server_database(self) -> tuple[str, str | None]:
        """Return what identifies the database across entries: its server (or URL reference) and name."""
        return (self.url or self.location, self.database)

    @property
    def location(self) -> str:
        """Return where the database lives, for messages and the duplicate check."""
        if self.instance:
            return self.instance
        if self.host:
            return f"{self.host}:{self.port}"
        return "url"


class Manifest(BaseModel):
    """A whole manifest file, validated."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    project: str | None = None
    socket_dir: Path = Path("/cloudsql")
    allow_downgrade: bool = True
    # reset drops databases: only a manifest (or entry) that says so allows it, never by default.
    allow_reset: bool = False
    # The one server a --scratch reference may share with the manifest's databases (a reference).
    scratch_server: str | None = None
    databases: tuple[DatabaseEntry, ...] = Field(min_length=1)
    path: Path = Path("<memory>")

    def downgrades_refused(self, entries: Sequence[DatabaseEntry]) -> list[DatabaseEntry]:
        """Return the entries whose databases may not be downgraded (their key, else the top level's)."""
        return [
            e
            for e in entries
            if not (self.allow_downgrade if e.allow_downgrade is None else e.allow_downgrade)
        ]

    def protected(self, entries: Sequence[DatabaseEntry]) -> list[DatabaseEntry]:
        """Return the entries whose database is protected: any entry naming it refuses downgrades."""
        shielded = {e.server_database for e in self.downgrades_refused(self.databases)}
        return [e for e in entries if e.server_database in shielded or e in self.downgrades_refused([e])]

    def resets_refused(self, entries: Sequence[DatabaseEntry]) -> list[DatabaseEntry]:
        """Return the entries whose databases may not be reset (allow_reset not true for them)."""
        return [e for e in entries if not (self.allow_reset if e.allow_reset is None else e.allow_reset)]

    def protected_sharing(self, entries: Sequence[DatabaseEntry]) -> list[DatabaseEntry]:
        """Return the manifest's protected entries (downgrades refused) on a database of entries.

        Two services may share a database: dropping it for one drops the other's tables too, so
        one protected entry anywhere in the manifest protects the whole database.
        """
        wanted = {e.server_database for e in entries}
        return [e for e in self.downgrades_refused(self.databases) if e.server_database in wanted]

    def reference(self, text: str) -> SecretRef:
        """Return the secret reference text names, resolved against the manifest's project."""
        return parse_reference(text, project=self.project)


def load_manifest(path: Path, services: Collection[str]) -> Manifest:
    """Return the validated manifest at path; raise ConfigError before any database is touched."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            f"manifest {path} not found",
            hint="set MIGRATE_ENV to an environment under deploy/environments/ or MIGRATE_MANIFEST",
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read manifest {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"manifest {path} is not valid TOML: {exc}") from None
    return parse_manifest(raw, services, path=path)


def parse_manifest(raw: dict[str, Any], services: Collection[str], *, path: Path) -> Manifest:
    """Return the validated manifest for parsed TOML data."""
    if "path" in raw:  # Manifest.path is where the file was read from, not a manifest key
        raise ConfigError(f"manifest {path} is invalid: path: unknown key")
    expanded, blocks = _expand_lists(raw, path)
    try:
        manifest = Manifest.model_validate({**raw, "databases": expanded, "path": path})
    except ValidationError as exc:
        raise ConfigError(f"manifest {path} is invalid: {_describe(exc)}") from None
    for entry, block in zip(manifest.databases, blocks, strict=True):
        entry._block = block
    _check_services(manifest, services)
    _check_unique(manifest)
    _check_references(manifest)
    return manifest


def _expand_lists(raw: dict[str, Any], path: Path) -> tuple[Any, list[int]]:
    """Return the raw entries with each ``databases = [...]`` entry expanded, and each one's block."""
    entries = raw.get("databases")
    if not isinstance(entries, list):
        return entries, []
    expanded: list[Any] = []
    blocks: list[int] = []
    for i, entry in enumerate(entries):
        if not (isinstance(entry, dict) and "databases" in entry):
            expanded.append(entry)
            blocks.append(i)
            continue
        names = entry["databases"]
        if "database" in entry or not isinstance(names, list) or not names:
            raise ConfigError(
                f"manifest {path} is invalid: databases[{i}].databases must be a non-empty list "
                "of names, and excludes database",
                hint='databases = ["tenant_001", "tenant_002"] (one entry per name, same settings)',
            )
        rest = {k: v for k, v in entry.items() if k != "databases"}
        expanded.extend({**rest, "database": name} for name in names)
        blocks.extend(i for _ in names)
    return expanded, blocks


def with_entries(manifest: Manifest, entries: list[DatabaseEntry]) -> Manifest:
    """Return the manifest with its entries replaced (after discovery), checked for duplicates."""
    updated = manifest.model_copy(update={"databases": tuple(entries)})
    _check_unique(updated)
    return updated


def shard(entries: list[DatabaseEntry], index: int, count: int) -> list[DatabaseEntry]:
    """Return task ``index``'s share of ``count``: the entries whose database hashes to it, in order.

    A database's task depends only on its own identity (server and name), never on its position:
    when a database is created or dropped between two tasks' discover queries, no other database
    changes task, so none is skipped by every task (or taken by two). Every entry of one database
    (several services may share it) goes to the same task.
    """
    if count < 1 or not 0 <= index < count:
        raise ConfigError(
            f"task index {index} is not within a task count of {count}",
            hint="CLOUD_RUN_TASK_INDEX must be at least 0 and below CLOUD_RUN_TASK_COUNT",
        )
    if count == 1:
        return list(entries)
    return [e for e in entries if task_of(e, count) == index]


def task_of(entry: DatabaseEntry, count: int) -> int:
    """Return the task (of count) that migrates an entry's database: a stable hash of its identity."""
    where, database = entry.server_database
    digest = hashlib.sha256(f"{where}\0{database}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % count


def _describe(exc: ValidationError) -> str:
    """Return pydantic's errors as ``databases[1].passwrd: unknown key; ...``."""
    errors = exc.errors()
    if any(len(e["loc"]) > 1 and e["loc"][0] == "databases" for e in errors):
        # An invalid entry also empties the list; saying so would only mislead.
        errors = [e for e in errors if tuple(e["loc"]) != ("databases",)]
    parts = []
    for err in errors:
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"]).lstrip(".")
        what = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        parts.append(f"{where or 'top level'}: {what}")
    return "; ".join(parts)


def _check_services(manifest: Manifest, services: Collection[str]) -> None:
    """Raise ConfigError for an entry whose service is not shipped in the image."""
    for i, entry in enumerate(manifest.databases):
        if entry.service not in services:
            raise ConfigError(
                f"manifest {manifest.path}: databases[{i}] names unknown service {entry.service!r}",
                hint=f"known services: {', '.join(sorted(services)) or 'none'}",
                service=entry.service,
                database=entry.database,
            )


def _check_unique(manifest: Manifest) -> None:
    """Raise ConfigError when two entries name the same database on the same server."""
    seen: dict[tuple[str, str | None, str], int] = {}
    for i, entry in enumerate(manifest.databases):
        # Several services may share a database (each with its own version table); one service
        # may not list the same database twice.
        key = (*entry.server_database, entry.service)
        if key in seen:
            raise ConfigError(
                f"manifest {manifest.path}: databases[{i}] repeats database {entry.database!r} "
                f"of service {entry.service} on {entry.location} (already databases[{seen[key]}])",
                hint="each database appears once; several databases may share one service",
                database=entry.database,
            )
        seen[key] = i


def refuse_literal_passwords(manifest: Manifest, env: str) -> None:
    """Raise ConfigError for a literal password (or URL with one) outside the local environment.

    Local means MIGRATE_ENV=local (the default, a workstation or a test); the deploy job
    definitions set MIGRATE_ENV to their environment, so Cloud Run executions never accept one.
    """
    if env == LOCAL_ENV:
        return
    if manifest.scratch_server is not None and literal_password(manifest.scratch_server):
        raise ConfigError(
            f"manifest {manifest.path}: scratch_server is a literal URL with a password, refused for "
            f"environment {env!r} (MIGRATE_ENV); the value is not shown",
            hint="name the scratch server by the same secret reference that --scratch is given",
        )
    for i, entry in enumerate(manifest.databases):
        for key in ("password", "url"):
            text = getattr(entry, key)
            literal = text is not None and manifest.reference(text).scheme == "literal"
            if literal and (key == "password" or literal_password(text)):
                raise ConfigError(
                    f"manifest {manifest.path}: databases[{i}].{key} is a literal password, refused "
                    f"for environment {env!r} (MIGRATE_ENV); the value is not shown",
                    hint=f"use a secret reference (secretmanager://NAME, env://VAR, file:///path) for "
                    f"{key}; literals are for MIGRATE_ENV={LOCAL_ENV} only",
                    service=entry.service,
                    database=entry.database,
                )


def _check_references(manifest: Manifest) -> None:
    """Raise ConfigError for a malformed secret reference, naming the entry."""
    for i, entry in enumerate(manifest.databases):
        for key in ("user", "password", "url", "sslrootcert"):
            text = getattr(entry, key)
            if text is None:
                continue
            try:
                manifest.reference(text)
            except ConfigError as exc:
                exc.message = f"manifest {manifest.path}: databases[{i}].{key}: {exc.message}"
                exc.service, exc.database = entry.service, entry.database
                raise
