"""Local Google Secret Manager emulator that speaks the v1 REST surface the official client uses.

Point the real client at it::

    from google.api_core.client_options import ClientOptions
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import secretmanager

    with SecretManagerEmulator(secrets={"proj": {"db-password": "s3cret"}}) as emu:
        client = secretmanager.SecretManagerServiceClient(
            transport="rest",
            client_options=ClientOptions(api_endpoint=emu.endpoint),
            credentials=AnonymousCredentials(),
        )
        client.access_secret_version(name="projects/proj/secrets/db-password/versions/latest")

or run it in the foreground (prints one line, ``listening http://127.0.0.1:PORT``)::

    python -m devtools.secretmanager_emulator --port 0 --seed secrets.json

Seed files look like ``{"projects": {"P": {"S": "value" | {...spec...}}}}`` where a spec may hold
``value`` (or ``versions``, a list), ``corrupt`` (serve a wrong ``dataCrc32c``), ``denied`` (answer
403) and ``unavailable_times`` (answer 503 that many times first). Routes served: access a
version, create a secret, add a version, get and delete a secret. Errors use Google's JSON error
shape, so the client raises ``google.api_core.exceptions.NotFound`` and friends. Secret values are
never logged.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Self
from urllib.parse import parse_qs, unquote, urlsplit

import google_crc32c

__all__ = ["ApiError", "SecretManagerEmulator", "load_seed_file", "main"]

_PROJECT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,254}")
_SECRET_RE = re.compile(r"[A-Za-z0-9_-]{1,255}")
_SPEC_KEYS = frozenset({"value", "versions", "corrupt", "denied", "unavailable_times"})
_MAX_BODY = 2 * 1024 * 1024
_POLL_INTERVAL_S = 0.05  # how quickly stop() is noticed by serve_forever
_STATE_ENABLED = ("ENABLED", 1)

Value = str | bytes
Json = dict[str, Any]


class ApiError(Exception):
    """A request failure, rendered as Google's JSON error body."""

    def __init__(self, http: HTTPStatus, status: str, message: str) -> None:
        """Remember the HTTP code, the canonical status name and the message."""
        super().__init__(message)
        self.http = http
        self.status = status
        self.message = message

    def body(self) -> Json:
        """Return ``{"error": {"code", "message", "status"}}`` as Google APIs send it."""
        return {"error": {"code": int(self.http), "message": self.message, "status": self.status}}


def _invalid(message: str) -> ApiError:
    """Return a 400 INVALID_ARGUMENT error."""
    return ApiError(HTTPStatus.BAD_REQUEST, "INVALID_ARGUMENT", message)


def _not_found(message: str) -> ApiError:
    """Return a 404 NOT_FOUND error."""
    return ApiError(HTTPStatus.NOT_FOUND, "NOT_FOUND", message)


def _denied(permission: str, resource: str) -> ApiError:
    """Return a 403 PERMISSION_DENIED error worded like Secret Manager's."""
    message = f"Permission '{permission}' denied for resource '{resource}' (or it may not exist)."
    return ApiError(HTTPStatus.FORBIDDEN, "PERMISSION_DENIED", message)


def _unavailable() -> ApiError:
    """Return a 503 UNAVAILABLE error, the kind the client retries."""
    return ApiError(HTTPStatus.SERVICE_UNAVAILABLE, "UNAVAILABLE", "The service is unavailable.")


def _internal(exc: Exception) -> ApiError:
    """Return a 500 INTERNAL error naming only the exception type (never its text)."""
    message = f"Emulator error: {type(exc).__name__}."
    return ApiError(HTTPStatus.INTERNAL_SERVER_ERROR, "INTERNAL", message)


def _now() -> str:
    """Return the current UTC time as an RFC 3339 timestamp."""
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _to_bytes(value: Value) -> bytes:
    """Return value as bytes, encoding text as UTF-8."""
    return value.encode("utf-8") if isinstance(value, str) else bytes(value)


def _b64decode(text: str) -> bytes:
    """Decode proto-JSON bytes (standard or URL-safe base64, padding optional)."""
    normalized = text.replace("-", "+").replace("_", "/")
    return base64.b64decode(normalized + "=" * (-len(normalized) % 4), validate=True)


def _secret_name(project: str, secret: str) -> str:
    """Return the resource name of a secret."""
    return f"projects/{project}/secrets/{secret}"


def _check_ids(project: str, secret: str) -> None:
    """Raise INVALID_ARGUMENT unless project and secret are well-formed IDs."""
    if not _PROJECT_RE.fullmatch(project):
        raise _invalid(f"Invalid project ID [{project}].")
    if not _SECRET_RE.fullmatch(secret):
        raise _invalid(f"Invalid secret ID [{secret}]: use letters, digits, '-' and '_'.")


@dataclass
class _Version:
    """One immutable secret version."""

    data: bytes
    create_time: str = field(default_factory=_now)


@dataclass
class _Secret:
    """A secret, its versions (version n is ``versions[n - 1]``) and its injected faults."""

    versions: list[_Version] = field(default_factory=list)
    create_time: str = field(default_factory=_now)
    corrupt: bool = False
    denied: bool = False
    unavailable_times: int = 0


@dataclass(frozen=True)
class _Request:
    """What a route handler needs from an HTTP request."""

    params: tuple[str, ...]
    query: Mapping[str, list[str]]
    body: bytes

    @property
    def enums_as_int(self) -> bool:
        """Return whether the client asked for ``$alt=json;enum-encoding=int``."""
        return any("enum-encoding=int" in alt for alt in self.query.get("$alt", []))

    def json(self) -> Json:
        """Return the body parsed as a JSON object, ``{}`` when empty."""
        if not self.body.strip():
            return {}
        try:
            parsed = json.loads(self.body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise _invalid(f"Invalid JSON payload received: {exc.__class__.__name__}.") from None
        if not isinstance(parsed, dict):
            raise _invalid("Invalid JSON payload received: expected an object.")
        return parsed


class _Store:
    """Thread-safe secrets, faults and the access log; methods implement the REST calls."""

    def __init__(self) -> None:
        """Start empty."""
        self._lock = threading.Lock()
        self._secrets: dict[tuple[str, str], _Secret] = {}
        self._log: list[tuple[str, str]] = []

    def record(self, method: str, path: str) -> None:
        """Append one request to the access log."""
        with self._lock:
            self._log.append((method, path))

    def log(self) -> list[tuple[str, str]]:
        """Return a copy of the access log."""
        with self._lock:
            return list(self._log)

    def clear_log(self) -> None:
        """Forget all logged requests."""
        with self._lock:
            self._log.clear()

    def put(self, project: str, secret: str, values: list[bytes], **faults: Any) -> None:
        """Create or replace a secret holding values as versions 1..n."""
        _check_ids(project, secret)
        versions = [_Version(value) for value in values]
        with self._lock:
            self._secrets[(project, secret)] = _Secret(versions=versions, **faults)

    def append(self, project: str, secret: str, data: bytes) -> int:
        """Add a version to an existing secret and return its number."""
        with self._lock:
            entry = self._secrets.get((project, secret))
            if entry is None:
                raise KeyError(_secret_name(project, secret))
            entry.versions.append(_Version(data))
            return len(entry.versions)

    def _guarded(self, project: str, secret: str, permission: str, resource: str) -> _Secret | None:
        """Apply injected faults, then return the secret or None; call with the lock held."""
        _check_ids(project, secret)
        entry = self._secrets.get((project, secret))
        if entry is not None and entry.unavailable_times > 0:
            entry.unavailable_times -= 1
            raise _unavailable()
        if entry is not None and entry.denied:
            raise _denied(permission, resource)
        return entry

    def access(self, request: _Request) -> Json:
        """AccessSecretVersion: return the payload with its (possibly corrupted) CRC32C."""
        project, secret, version = request.params
        resource = f"{_secret_name(project, secret)}/versions/{version}"
        with self._lock:
            entry = self._guarded(project, secret, "secretmanager.versions.access", resource)
            number, found = _resolve_version(entry, _secret_name(project, secret), version)
            corrupt = entry is not None and entry.corrupt
        checksum = google_crc32c.value(found.data)
        if corrupt:
            checksum = (checksum + 1) % 2**32
        return {
            "name": f"{_secret_name(project, secret)}/versions/{number}",
            "payload": {
                "data": base64.b64encode(found.data).decode("ascii"),
                "dataCrc32c": str(checksum),
            },
        }

    def create(self, request: _Request) -> Json:
        """CreateSecret: make an empty secret named by the ``secretId`` query parameter."""
        (project,) = request.params
        secret = (request.query.get("secretId") or [""])[0]
        if not secret:
            raise _invalid("secret_id must be set.")
        _check_ids(project, secret)
        request.json()
        with self._lock:
            if (project, secret) in self._secrets:
                message = f"Secret [{_secret_name(project, secret)}] already exists."
                raise ApiError(HTTPStatus.CONFLICT, "ALREADY_EXISTS", message)
            entry = self._secrets[(project, secret)] = _Secret()
        return _secret_resource(project, secret, entry)

    def add_version(self, request: _Request) -> Json:
        """AddSecretVersion: store the payload as a new version after checking its CRC32C."""
        project, secret = request.params
        data = _payload_data(request.json())
        name = _secret_name(project, secret)
        with self._lock:
            entry = self._guarded(project, secret, "secretmanager.versions.add", name)
            if entry is None:
                raise _not_found(f"Secret [{name}] not found.")
            entry.versions.append(_Version(data))
            number, version = len(entry.versions), entry.versions[-1]
        return _version_resource(f"{name}/versions/{number}", version, request.enums_as_int)

    def get(self, request: _Request) -> Json:
        """GetSecret: return the secret's metadata."""
        project, secret = request.params
        name = _secret_name(project, secret)
        with self._lock:
            entry = self._guarded(project, secret, "secretmanager.secrets.get", name)
        if entry is None:
            raise _not_found(f"Secret [{name}] not found.")
        return _secret_resource(project, secret, entry)

    def delete(self, request: _Request) -> Json:
        """DeleteSecret: remove the secret and all its versions."""
        project, secret = request.params
        name = _secret_name(project, secret)
        with self._lock:
            if self._guarded(project, secret, "secretmanager.secrets.delete", name) is None:
                raise _not_found(f"Secret [{name}] not found.")
            del self._secrets[(project, secret)]
        return {}


def _resolve_version(entry: _Secret | None, name: str, version: str) -> tuple[int, _Version]:
    """Return (number, version) for ``latest`` or a version number; raise NOT_FOUND otherwise."""
    if version != "latest" and not re.fullmatch(r"[1-9][0-9]{0,18}", version):
        raise _invalid(f"Invalid secret version [{version}]: use 'latest' or a positive number.")
    if entry is None or not entry.versions:
        raise _not_found(f"Secret [{name}] not found or has no versions.")
    number = len(entry.versions) if version == "latest" else int(version)
    if number > len(entry.versions):
        raise _not_found(f"Secret Version [{name}/versions/{version}] not found.")
    return number, entry.versions[number - 1]


def _payload_data(body: Json) -> bytes:
    """Return the decoded ``payload.data`` of an AddSecretVersion body, verifying its CRC32C."""
    payload = body.get("payload")
    if not isinstance(payload, dict):
        raise _invalid("payload must be set.")
    try:
        data = _b64decode(str(payload.get("data", "")))
    except (binascii.Error, ValueError):
        raise _invalid("payload.data is not valid base64.") from None
    claimed = payload.get("dataCrc32c")
    if claimed is not None and str(claimed) != str(google_crc32c.value(data)):
        raise _invalid("Checksum mismatch: payload.data_crc32c does not match payload.data.")
    return data


def _secret_resource(project: str, secret: str, entry: _Secret) -> Json:
    """Return the JSON form of a Secret."""
    return {
        "name": _secret_name(project, secret),
        "replication": {"automatic": {}},
        "createTime": entry.create_time,
    }


def _version_resource(name: str, version: _Version, enums_as_int: bool) -> Json:
    """Return the JSON form of a SecretVersion, with the state enum encoded as asked."""
    return {
        "name": name,
        "createTime": version.create_time,
        "state": _STATE_ENABLED[1] if enums_as_int else _STATE_ENABLED[0],
        "replicationStatus": {"automatic": {}},
        "clientSpecifiedPayloadChecksum": True,
    }


Handler = Callable[[_Store, _Request], Json]
_SEGMENT = r"([^/]+)"
_ID = r"([^/:]+)"
_ROUTES: tuple[tuple[str, re.Pattern[str], Handler], ...] = (
    (
        "GET",
        re.compile(rf"/v1/projects/{_SEGMENT}/secrets/{_ID}/versions/{_ID}:access"),
        _Store.access,
    ),
    ("POST", re.compile(rf"/v1/projects/{_SEGMENT}/secrets"), _Store.create),
    ("POST", re.compile(rf"/v1/projects/{_SEGMENT}/secrets/{_ID}:addVersion"), _Store.add_version),
    ("GET", re.compile(rf"/v1/projects/{_SEGMENT}/secrets/{_ID}"), _Store.get),
    ("DELETE", re.compile(rf"/v1/projects/{_SEGMENT}/secrets/{_ID}"), _Store.delete),
)


def _route(method: str, path: str) -> tuple[Handler, tuple[str, ...]]:
    """Return the handler and decoded path parameters for a request."""
    known_path = False
    for route_method, pattern, handler in _ROUTES:
        match = pattern.fullmatch(path)
        if match and route_method == method:
            return handler, tuple(unquote(group) for group in match.groups())
        known_path = known_path or match is not None
    if known_path:
        message = f"{method} {path} is not implemented by the Secret Manager emulator."
        raise ApiError(HTTPStatus.NOT_IMPLEMENTED, "UNIMPLEMENTED", message)
    raise _invalid(f"Invalid request path [{path}]; expected a Secret Manager v1 resource.")


class _Server(ThreadingHTTPServer):
    """HTTP server carrying the store, with quiet error handling."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], store: _Store) -> None:
        """Bind to address and serve store."""
        super().__init__(address, _RequestHandler)
        self.store = store

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Swallow per-connection errors (dropped clients) instead of printing tracebacks."""


class _RequestHandler(BaseHTTPRequestHandler):
    """Translate HTTP requests into store calls and store results into JSON responses."""

    server: _Server
    server_version = "SecretManagerEmulator/1"
    timeout = 30

    def do_GET(self) -> None:
        """Serve a GET."""
        self._serve("GET")

    def do_POST(self) -> None:
        """Serve a POST."""
        self._serve("POST")

    def do_DELETE(self) -> None:
        """Serve a DELETE."""
        self._serve("DELETE")

    def do_PATCH(self) -> None:
        """Serve a PATCH (no route uses it; answered in Google's error shape)."""
        self._serve("PATCH")

    def do_PUT(self) -> None:
        """Serve a PUT (no route uses it; answered in Google's error shape)."""
        self._serve("PUT")

    def log_message(self, format: str, *args: Any) -> None:
        """Log nothing: request lines must never reach stdout or stderr."""

    def _serve(self, method: str) -> None:
        """Route the request, run it and send the JSON result or error."""
        url = urlsplit(self.path)
        self.server.store.record(method, url.path)
        try:
            handler, params = _route(method, url.path)
            request = _Request(params, parse_qs(url.query), self._read_body())
            self._send(HTTPStatus.OK, handler(self.server.store, request))
        except ApiError as error:
            self._send(error.http, error.body())
        except Exception as exc:
            internal = _internal(exc)
            self._send(internal.http, internal.body())

    def _read_body(self) -> bytes:
        """Return the request body, bounded by Content-Length."""
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise _invalid("Invalid Content-Length header.") from None
        if not 0 <= length <= _MAX_BODY:
            raise _invalid("Request body is too large.")
        return self.rfile.read(length) if length else b""

    def _send(self, status: HTTPStatus, body: Json) -> None:
        """Write a JSON response."""
        data = json.dumps(body).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=UTF-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def _parse_spec(project: str, secret: str, spec: Any) -> dict[str, Any]:
    """Return ``put`` keyword arguments for one seed entry; raise ValueError if malformed."""
    where = _secret_name(project, secret)
    if isinstance(spec, str | bytes):
        return {"values": [_to_bytes(spec)]}
    if not isinstance(spec, Mapping):
        raise ValueError(f"seed for {where}: expected a string or an object")
    unknown = set(spec) - _SPEC_KEYS
    if unknown:
        raise ValueError(f"seed for {where}: unknown keys {sorted(unknown)}")
    if "value" in spec and "versions" in spec:
        raise ValueError(f"seed for {where}: give 'value' or 'versions', not both")
    values = spec.get("versions", [spec["value"]] if "value" in spec else [])
    if not isinstance(values, list) or not all(isinstance(v, str | bytes) for v in values):
        raise ValueError(f"seed for {where}: values must be strings")
    times = spec.get("unavailable_times", 0)
    if not isinstance(times, int) or isinstance(times, bool) or times < 0:
        raise ValueError(f"seed for {where}: unavailable_times must be a non-negative integer")
    return {
        "values": [_to_bytes(v) for v in values],
        "corrupt": bool(spec.get("corrupt", False)),
        "denied": bool(spec.get("denied", False)),
        "unavailable_times": times,
    }


def load_seed_file(path: str | Path) -> dict[str, dict[str, Any]]:
    """Return the ``projects`` mapping of a JSON seed file; raise ValueError if malformed."""
    document = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(document, dict) or not isinstance(document.get("projects"), dict):
        raise ValueError(f"{path}: expected {{'projects': {{PROJECT: {{SECRET: ...}}}}}}")
    projects = document["projects"]
    for project, secrets in projects.items():
        if not isinstance(secrets, dict):
            raise ValueError(f"{path}: project {project!r} must map secret names to values")
    return projects


class SecretManagerEmulator:
    """An in-process Secret Manager REST server on 127.0.0.1, for tests and local demos."""

    def __init__(
        self,
        secrets: Mapping[str, Mapping[str, Any]] | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        """Seed secrets (``{project: {secret: value-or-spec}}``); the server starts on ``start``."""
        self._address = (host, port)
        self._store = _Store()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.load_seed(secrets or {})

    @classmethod
    def from_seed_file(cls, path: str | Path, **kwargs: Any) -> SecretManagerEmulator:
        """Return an emulator seeded from a JSON seed file."""
        return cls(load_seed_file(path), **kwargs)

    def load_seed(self, projects: Mapping[str, Mapping[str, Any]]) -> None:
        """Add every ``{project: {secret: value-or-spec}}`` entry, replacing same-named secrets."""
        for project, secrets in projects.items():
            for secret, spec in secrets.items():
                kwargs = _parse_spec(project, secret, spec)
                self._store.put(project, secret, kwargs.pop("values"), **kwargs)

    def add_secret(
        self,
        project: str,
        secret: str,
        value: Value | None = None,
        *,
        corrupt: bool = False,
        denied: bool = False,
        unavailable_times: int = 0,
    ) -> None:
        """Create or replace a secret; value (if any) becomes version 1."""
        values = [] if value is None else [_to_bytes(value)]
        faults = {"corrupt": corrupt, "denied": denied, "unavailable_times": unavailable_times}
        self._store.put(project, secret, values, **faults)

    def add_version(self, project: str, secret: str, value: Value) -> int:
        """Add a version to an existing secret and return its number; KeyError if none."""
        return self._store.append(project, secret, _to_bytes(value))

    @property
    def access_log(self) -> list[tuple[str, str]]:
        """Return the (method, URL path without query) of every request so far."""
        return self._store.log()

    def clear_access_log(self) -> None:
        """Forget the requests logged so far."""
        self._store.clear_log()

    @property
    def port(self) -> int:
        """Return the bound TCP port; RuntimeError if not started."""
        if self._server is None:
            raise RuntimeError("the emulator is not running; call start() first")
        return int(self._server.server_address[1])

    @property
    def endpoint(self) -> str:
        """Return the base URL to pass as ``ClientOptions(api_endpoint=...)``."""
        return f"http://{self._address[0]}:{self.port}"

    def start(self) -> Self:
        """Bind the socket and serve from a daemon thread; return self."""
        if self._server is not None:
            return self
        self._server = _Server(self._address, self._store)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": _POLL_INTERVAL_S},
            name="secretmanager-emulator",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and release the port; safe to call twice."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        if thread is not None and thread.ident is not None:
            server.shutdown()
            thread.join(timeout=5)
        server.server_close()

    def __enter__(self) -> Self:
        """Start the server."""
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the server."""
        self.stop()


class _StopRequested(Exception):
    """Raised by the signal handler to leave the foreground loop."""


def _request_stop(signum: int, frame: FrameType | None) -> None:
    """Signal handler for SIGTERM/SIGINT: unwind the main loop."""
    raise _StopRequested


def _set_stop_handlers(handler: Any) -> None:
    """Install handler for SIGTERM and SIGINT."""
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Return the parsed command line."""
    parser = argparse.ArgumentParser(
        prog="python -m devtools.secretmanager_emulator",
        description="Serve a local Secret Manager v1 REST API until SIGTERM or SIGINT.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="TCP port; 0 picks a free one")
    parser.add_argument("--seed", type=Path, help="JSON seed file {'projects': {P: {S: value}}}")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the emulator in the foreground; print ``listening URL`` once ready; 0 on SIGTERM."""
    args = _parse_args(argv)
    try:
        emulator = SecretManagerEmulator(
            load_seed_file(args.seed) if args.seed else None, host=args.host, port=args.port
        )
    except (OSError, ValueError) as exc:
        print(f"secretmanager_emulator: bad seed: {exc}", file=sys.stderr)
        return 2
    try:
        _set_stop_handlers(_request_stop)
        emulator.start()
        print(f"listening {emulator.endpoint}", flush=True)
        while True:
            time.sleep(3600)
    except _StopRequested:
        pass
    except OSError as exc:
        print(f"secretmanager_emulator: cannot serve: {exc}", file=sys.stderr)
        return 1
    finally:
        _set_stop_handlers(signal.SIG_IGN)
        emulator.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
