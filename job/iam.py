"""Cloud SQL IAM database login: the job's Google identity is the user, an OAuth2 token the password.

Cloud Run's ``/cloudsql`` socket does not log in for the job (automatic IAM authentication is not
offered there), so the job logs in the manual way: user = the service account's email without
``.gserviceaccount.com``, password = an access token with the ``sqlservice.login`` scope, from
google-auth's application default credentials (on Cloud Run, the metadata server). Tokens live
an hour and only a new connection needs a valid one, so every new connection asks for a token
again: the metadata server hands out the one it caches and a new one before that one expires.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from job import logs
from job.errors import SecretError

if TYPE_CHECKING:
    from job.manifest import DatabaseEntry

SCOPE = "https://www.googleapis.com/auth/sqlservice.login"
SERVICE_ACCOUNT_DOMAIN = ".gserviceaccount.com"
NO_CREDENTIALS_HINT = (
    "on Cloud Run the job's service account is used (serviceAccountName in the job YAML); locally run "
    '`gcloud auth application-default login`, or log in with auth = "password"'
)


@dataclass(frozen=True)
class Identity:
    """Who the job is to Cloud SQL: its Google principal (if known) and its IAM database user."""

    principal: str | None
    user: str


class Login:
    """The process's Google credentials, refreshed for every new connection (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._credentials: Any = None
        self._request: Any = None
        self._principal: str | None = None
        self._logged: set[str] = set()

    def token(self) -> str:
        """Return a fresh access token, registered with the log scrubber; raise SecretError."""
        with self._lock:
            if self._credentials is None:
                self._credentials, self._request = _default_credentials()
            _refresh(self._credentials, self._request)
            token = str(self._credentials.token)
            self._principal = self._principal or _principal(self._credentials)
        logs.redact(token)
        return token

    def identity(self, user: str | None = None) -> Identity:
        """Return the principal and the database user (a manifest's user wins); log it once each."""
        if self._credentials is None:
            self.token()  # the principal is known after a refresh; a failure stops the preflight
        name = user or (database_user(self._principal) if self._principal else None)
        if not name:
            raise SecretError(
                "cannot tell the IAM database user of these Google credentials (they name no account)",
                hint="set user in the manifest entry to the IAM database user's name",
            )
        if name not in self._logged:
            self._logged.add(name)
            logs.event(
                "auth.iam",
                f"logging in to Cloud SQL with IAM database authentication as {name}",
                identity=self._principal,
                user=name,
            )
        return Identity(self._principal, name)


_login = Login()


def identity(user: str | None = None) -> Identity:
    """Return who the job logs in as (checking that a token can be had)."""
    return _login.identity(user)


def token() -> str:
    """Return a fresh Cloud SQL login token for this process's Google identity."""
    return _login.token()


async def password() -> str:
    """Return a fresh token without blocking the event loop: asyncpg's password, called per connection."""
    return await asyncio.to_thread(token)


def login_args(entry: DatabaseEntry) -> dict[str, Any]:
    """Return asyncpg.connect's password for an IAM entry: a coroutine function, called per connection."""
    return {"password": password} if entry.auth == "iam" else {}


def database_user(principal: str) -> str:
    """Return the IAM database user of a principal: a service account's email loses its domain."""
    return principal.removesuffix(SERVICE_ACCOUNT_DOMAIN)


def _default_credentials() -> tuple[Any, Any]:
    """Return the application default credentials, scoped for Cloud SQL login, and an HTTP transport."""
    import google.auth
    import google.auth.transport.requests
    from google.auth import exceptions

    try:
        credentials, _ = google.auth.default(scopes=[SCOPE])
    except exceptions.GoogleAuthError as exc:
        raise SecretError(
            f"no Google credentials for the IAM database login: {_reason(exc)}", hint=NO_CREDENTIALS_HINT
        ) from None
    return credentials, google.auth.transport.requests.Request()


def _refresh(credentials: Any, request: Any) -> None:
    """Get a new token from the credentials' source (on Cloud Run, the metadata server)."""
    from google.auth import exceptions

    try:
        credentials.refresh(request)
    except (exceptions.GoogleAuthError, OSError) as exc:
        raise SecretError(
            f"could not get a Cloud SQL login token for the job's Google identity: {_reason(exc)}",
            hint="retry the execution; if it persists, check that the job runs as its service account "
            "and that the metadata server answers (or your application default credentials locally)",
        ) from None


def _principal(credentials: Any) -> str | None:
    """Return the account the credentials stand for (a compute engine one is known after a refresh)."""
    email = getattr(credentials, "service_account_email", None) or getattr(credentials, "account", None)
    return str(email) if email and email != "default" else None


def _reason(exc: BaseException) -> str:
    """Return the first line of a google-auth error, masked and kept short."""
    lines = str(exc).strip().splitlines()
    return logs.scrub(f"{type(exc).__name__}: {lines[0] if lines else ''}")[:300]


def refused_hint(entry: DatabaseEntry, user: str) -> str:
    """Return what to check when Cloud SQL refuses the job's IAM login as user."""
    principal = user + SERVICE_ACCOUNT_DOMAIN if user.endswith(".iam") else user
    name = entry.instance.rsplit(":", 1)[-1] if entry.instance else "INSTANCE"
    return (
        f"check that instance {entry.location} has the flag cloudsql.iam_authentication=on, that {principal} "
        "has roles/cloudsql.instanceUser and roles/cloudsql.client, that the IAM database user exists "
        f"(gcloud sql users create {user} --instance {name} --type cloud_iam_service_account), "
        f"and that it has its GRANTs on database {entry.database} (deploy/README.md, IAM login)"
    )
