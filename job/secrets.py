"""Secret references: ``secretmanager://``, ``env://``, ``file://`` or a literal, resolved to values.

Values are held as ``SecretStr`` and registered with the log scrubber as soon as they are read.
Google Secret Manager is reached through the official client; its CRC32C checksum is verified.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import SecretStr

from job import logs
from job.errors import ConfigError, SecretError

if TYPE_CHECKING:
    from google.cloud.secretmanager import SecretManagerServiceClient

Scheme = Literal["secretmanager", "env", "file", "literal"]

_FULL = re.compile(
    r"^projects/(?P<project>[a-z0-9][a-z0-9.:-]{0,98})/secrets/(?P<secret>[A-Za-z0-9_-]{1,255})"
    r"(?:/versions/(?P<version>latest|[1-9][0-9]*))?$"
)
_SHORT = re.compile(r"^(?P<secret>[A-Za-z0-9_-]{1,255})$")
_ENV_VAR = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class SecretRef:
    """Where a secret value lives; ``display`` is safe to show, the literal value is not."""

    scheme: Scheme
    location: str = field(repr=False)  # a literal's location is the secret itself

    @property
    def display(self) -> str:
        """Return the reference as an operator can read it, never the value of a literal."""
        if self.scheme == "literal":
            return "<literal>"
        if self.scheme == "secretmanager":
            return f"secretmanager://{self.location}"
        return f"{self.scheme}://{self.location}"


def parse_reference(text: str, *, project: str | None) -> SecretRef:
    """Return the reference that text names; raise ConfigError for a malformed one."""
    if text.startswith("secretmanager://"):
        return _parse_secretmanager(text.removeprefix("secretmanager://"), project)
    if text.startswith("env://"):
        name = text.removeprefix("env://")
        if not _ENV_VAR.fullmatch(name):
            raise ConfigError(f"bad secret reference env://{name}: not an environment variable name")
        return SecretRef("env", name)
    if text.startswith("file://"):
        path = text.removeprefix("file://")
        if not path.startswith("/"):
            raise ConfigError(
                f"bad secret reference file://{path}: the path must be absolute (file:///run/...)"
            )
        return SecretRef("file", path)
    if re.match(r"^[a-z][a-z0-9+.-]*://", text) and not text.startswith("postgres"):
        # Not echoed: a literal password may look like a reference.
        raise ConfigError(
            "a value looks like a secret reference but its scheme is unknown",
            hint="use secretmanager://, env://, file:// or a literal value for local work",
        )
    return SecretRef("literal", text)


def literal_password(text: str) -> bool:
    """Return whether a manifest value or flag is a literal that holds a password.

    A literal URL with a password counts (``postgresql://u:p@h/db``), as does any literal given
    for a ``password`` key (the caller knows which key it is).
    """
    import urllib.parse

    if text.startswith(("secretmanager://", "env://", "file://")):
        return False
    try:
        return bool(urllib.parse.urlsplit(text).password)
    except ValueError:
        return "@" in text  # unparsable, but it may still hold user:password@


def refuse_literal_url(text: str, flag: str) -> None:
    """Raise ConfigError for a flag given a literal URL with a password (ps and shell history show it)."""
    if literal_password(text):
        raise ConfigError(
            f"{flag} was given a literal URL with a password; it is not used (the value is not shown)",
            hint=f"store the URL in a secret and pass its reference: {flag} env://VAR, file:///path "
            "or secretmanager://NAME; a URL without a password (trust or peer login) may stay literal",
        )


def _parse_secretmanager(rest: str, project: str | None) -> SecretRef:
    """Return a Secret Manager reference as a full version resource name."""
    full = _FULL.fullmatch(rest)
    if full:
        version = full["version"] or "latest"
        return SecretRef(
            "secretmanager",
            f"projects/{full['project']}/secrets/{full['secret']}/versions/{version}",
        )
    short = _SHORT.fullmatch(rest)
    if not short:
        raise ConfigError(
            f"bad secret reference secretmanager://{rest}",
            hint="write secretmanager://projects/P/secrets/S/versions/V or secretmanager://S",
        )
    project = project or os.environ.get("GOOGLE_CLOUD_PROJECT")
    if not project:
        raise ConfigError(
            f"secret reference secretmanager://{rest} names no project",
            hint="set project in the manifest or GOOGLE_CLOUD_PROJECT, or use the full form",
        )
    return SecretRef("secretmanager", f"projects/{project}/secrets/{rest}/versions/latest")


class SecretResolver:
    """Resolve references to values, each once per run, with one lazily built Secret Manager client."""

    def __init__(self, endpoint: str | None = None, timeout_s: float = 30.0) -> None:
        self._endpoint = endpoint
        self._timeout_s = timeout_s
        self._client: SecretManagerServiceClient | None = None
        self._cache: dict[SecretRef, SecretStr] = {}

    def resolve(self, ref: SecretRef, *, secret: bool = True) -> SecretStr:
        """Return the value (masked in all logs when secret); raise SecretError if unreadable."""
        if ref not in self._cache:
            raw = _strip_newline(self._read(ref))
            if not raw:
                raise SecretError(f"secret {ref.display} is empty", hint="add a version with the value")
            self._cache[ref] = SecretStr(raw)
        value = self._cache[ref]
        if secret:
            logs.redact(value.get_secret_value())
        return value

    def _read(self, ref: SecretRef) -> str:
        """Return the raw value from wherever the reference points."""
        if ref.scheme == "literal":
            return ref.location
        if ref.scheme == "env":
            return _read_env(ref)
        if ref.scheme == "file":
            return _read_file(ref)
        return self._access(ref)

    def _access(self, ref: SecretRef) -> str:
        """Return a Secret Manager version's payload, CRC32C verified."""
        from google.api_core import exceptions as gexc
        from google.auth import exceptions as auth_exc

        try:
            response = self._get_client().access_secret_version(
                name=ref.location, retry=_retry(self._timeout_s), timeout=self._timeout_s
            )
        except gexc.NotFound:
            raise _not_found(ref) from None
        except gexc.Forbidden:  # PermissionDenied over gRPC, plain Forbidden over REST
            raise _denied(ref) from None
        except (gexc.Unauthorized, auth_exc.DefaultCredentialsError) as exc:
            raise SecretError(
                f"no credentials to read {ref.display}: {type(exc).__name__}",
                hint="on Cloud Run the job uses its service account; locally run "
                "`gcloud auth application-default login` or set MIGRATE_SECRET_MANAGER_ENDPOINT",
            ) from None
        except (gexc.GoogleAPIError, auth_exc.TransportError, OSError) as exc:
            # OSError: over REST (the emulator endpoint) a refused or dropped connection is a
            # requests.ConnectionError, not an API error; it is still "no answer", not a bug.
            raise SecretError(
                f"Secret Manager did not answer for {ref.display}: {type(exc).__name__}",
                hint="retry the execution; check Secret Manager's status and the job's network",
            ) from None
        payload = response.payload
        crc = payload.data_crc32c if payload._pb.HasField("data_crc32c") else None
        return _verified_payload(ref, payload.data, crc)

    def _get_client(self) -> SecretManagerServiceClient:
        """Return the Secret Manager client, pointed at the emulator when one is configured."""
        if self._client is None:
            from google.cloud.secretmanager import SecretManagerServiceClient

            if self._endpoint:
                from google.api_core.client_options import ClientOptions
                from google.auth.credentials import AnonymousCredentials

                self._client = SecretManagerServiceClient(
                    transport="rest",
                    credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
                    client_options=ClientOptions(api_endpoint=self._endpoint),
                )
            else:
                self._client = SecretManagerServiceClient()
        return self._client


def _retry(timeout_s: float):  # type: ignore[no-untyped-def]
    """Return the bounded retry for transient Secret Manager errors (reads are safe to repeat)."""
    from google.api_core import exceptions as gexc
    from google.api_core import retry

    return retry.Retry(
        predicate=retry.if_exception_type(
            gexc.ServiceUnavailable,
            gexc.DeadlineExceeded,
            gexc.InternalServerError,
            gexc.TooManyRequests,
        ),
        initial=0.2,
        maximum=5.0,
        multiplier=2.0,
        timeout=timeout_s,
    )


def _verified_payload(ref: SecretRef, data: bytes, crc: int | None) -> str:
    """Return the payload as text after checking its CRC32C; raise SecretError on a mismatch."""
    import google_crc32c

    if crc is not None and google_crc32c.value(data) != crc:
        raise SecretError(
            f"the payload of {ref.display} failed its CRC32C check (corrupted in transit)",
            hint="retry the execution; if it persists, add a new version of the secret",
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise SecretError(f"the payload of {ref.display} is not UTF-8 text") from None


def _not_found(ref: SecretRef) -> SecretError:
    """Return the error for a secret or version that does not exist."""
    secret = ref.location.split("/versions/")[0]
    return SecretError(
        f"secret {ref.location} not found or has no enabled version",
        hint=f"create it or add a version (gcloud secrets versions add {secret.split('/')[-1]} "
        f"--project {secret.split('/')[1]} --data-file=-), or fix the reference in the manifest",
        secret=ref.display,
    )


def _denied(ref: SecretRef) -> SecretError:
    """Return the error for a secret the job's identity may not read."""
    secret = ref.location.split("/versions/")[0]
    return SecretError(
        f"permission denied reading {ref.location}",
        hint=f"grant roles/secretmanager.secretAccessor on {secret} to the job's service account",
        secret=ref.display,
    )


def _read_env(ref: SecretRef) -> str:
    """Return an environment variable's value (what Cloud Run's --set-secrets injects)."""
    value = os.environ.get(ref.location)
    if value is None:
        raise SecretError(
            f"environment variable {ref.location} is not set",
            hint=f"on Cloud Run: gcloud run jobs update JOB --set-secrets {ref.location}=SECRET:latest",
            secret=ref.display,
        )
    return value


def _read_file(ref: SecretRef) -> str:
    """Return a mounted secret file's content."""
    try:
        return Path(ref.location).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SecretError(
            f"cannot read secret file {ref.location}: {type(exc).__name__}",
            hint="check the secret volume mount (--set-secrets /path=SECRET:latest)",
            secret=ref.display,
        ) from None


def _strip_newline(value: str) -> str:
    """Return value without one trailing newline, which `echo x | gcloud secrets create` adds."""
    if value.endswith("\r\n"):
        return value[:-2]
    return value.removesuffix("\n")
