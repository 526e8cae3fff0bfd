"""A local stand-in for the metadata server of Cloud Run (and Compute Engine), for google-auth's real client.

google-auth finds it through two environment variables of the process that uses it::

    GCE_METADATA_HOST=127.0.0.1:PORT   # read once, when google.auth.compute_engine._metadata is imported
    GCE_METADATA_IP=127.0.0.1:PORT     # read at each ping (is this Google's metadata server?)

``MetadataServer.environment()`` returns both, plus what keeps the process away from any real
credentials (no GOOGLE_APPLICATION_CREDENTIALS, an empty gcloud configuration directory). Routes
served, each only with the ``Metadata-Flavor: Google`` header as the real server requires (403
without): ``/`` (the ping), ``project/project-id``, ``instance/service-accounts/default/`` (with
``?recursive=true``: email, scopes, aliases), ``.../default/email`` and ``.../default/token`` (with
``?scopes=``). A test rotates the token (``rotate``), refuses tokens (``deny_tokens``, answered 403,
which google-auth does not retry), and reads every request it got (``requests``) to see, say, which
scopes were asked for. Nothing it serves or receives is logged.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit

ROOT = "/computeMetadata/v1/"
DEFAULT_ACCOUNT = "instance/service-accounts/default/"
CLOUD_PLATFORM = "https://www.googleapis.com/auth/cloud-platform"


@dataclass(frozen=True)
class Seen:
    """One request the server got: its path, its query and whether it carried the flavor header."""

    path: str
    query: dict[str, list[str]]
    flavored: bool

    @property
    def scopes(self) -> list[str]:
        """Return the scopes a token request asked for (comma-separated in ``?scopes=``)."""
        return [s for value in self.query.get("scopes", []) for s in value.split(",") if s]


class _State:
    """The server's identity, current token and request log, shared by its handler threads."""

    def __init__(self, email: str, project: str, token: str, expires_in: int) -> None:
        self.lock = threading.Lock()
        self.email = email
        self.project = project
        self.token = token
        self.expires_in = expires_in
        self.deny_tokens = False
        self.seen: list[Seen] = []

    def answer(self, path: str, query: dict[str, list[str]], flavored: bool) -> tuple[HTTPStatus, Any]:
        """Return the status and body (str: text, dict: JSON) for one request, and log it."""
        with self.lock:
            self.seen.append(Seen(path, query, flavored))
            if not flavored:
                return HTTPStatus.FORBIDDEN, "Missing required header: Metadata-Flavor"
            if path == "/":
                return HTTPStatus.OK, "computeMetadata/"
            return self._route(path.removeprefix(ROOT) if path.startswith(ROOT) else None)

    def _route(self, route: str | None) -> tuple[HTTPStatus, Any]:
        """Return the answer for a path under /computeMetadata/v1/ (call with the lock held)."""
        aliases = {DEFAULT_ACCOUNT, f"instance/service-accounts/{self.email}/"}
        account = next((a for a in aliases if route is not None and route.startswith(a)), None)
        if route == "project/project-id":
            return HTTPStatus.OK, self.project
        if route == "universe/universe-domain":
            return HTTPStatus.OK, "googleapis.com"
        if account is None or route is None:
            return HTTPStatus.NOT_FOUND, "not found"
        rest = route.removeprefix(account)
        if rest == "":
            return HTTPStatus.OK, {"aliases": ["default"], "email": self.email, "scopes": [CLOUD_PLATFORM]}
        if rest == "email":
            return HTTPStatus.OK, self.email
        if rest == "token":
            if self.deny_tokens:
                return HTTPStatus.FORBIDDEN, "the service account may not get tokens (deny_tokens)"
            return HTTPStatus.OK, {
                "access_token": self.token,
                "expires_in": self.expires_in,
                "token_type": "Bearer",
            }
        return HTTPStatus.NOT_FOUND, "not found"


class _Server(ThreadingHTTPServer):
    """HTTP server carrying the state, with quiet error handling."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], state: _State) -> None:
        """Bind to address and serve state."""
        super().__init__(address, _Handler)
        self.state = state

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Swallow per-connection errors (dropped clients) instead of printing tracebacks."""


class _Handler(BaseHTTPRequestHandler):
    """Answer GETs from the state; every response names its content type, as google-auth expects."""

    server: _Server
    server_version = "Metadata Server for VM"

    def do_GET(self) -> None:
        """Serve a GET."""
        url = urlsplit(self.path)
        flavored = self.headers.get("Metadata-Flavor", "") == "Google"
        status, body = self.server.state.answer(url.path, parse_qs(url.query), flavored)
        is_json = isinstance(body, dict)
        data = (json.dumps(body) if is_json else str(body)).encode("utf-8")
        self.send_response(status)
        self.send_header("Metadata-Flavor", "Google")
        self.send_header("Content-Type", "application/json" if is_json else "application/text")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        """Log nothing: a request line may carry a token request, and tokens never reach output."""


class MetadataServer:
    """The fake metadata server on 127.0.0.1, serving one service account's identity and token."""

    def __init__(
        self,
        *,
        email: str,
        project: str,
        token: str,
        expires_in: int = 3599,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        """Serve email's identity and token (valid expires_in seconds) once started."""
        self._address = (host, port)
        self._state = _State(email, project, token, expires_in)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def host(self) -> str:
        """Return ``127.0.0.1:PORT``, the value of GCE_METADATA_HOST and GCE_METADATA_IP."""
        if self._server is None:
            raise RuntimeError("the metadata server is not running; call start() first")
        return f"{self._address[0]}:{self._server.server_address[1]}"

    def environment(self, config_dir: Path) -> dict[str, str]:
        """Return the variables a process needs to take its identity from here and nowhere else.

        config_dir stands in for gcloud's configuration (an empty directory: no user credentials).
        """
        return {
            "GCE_METADATA_HOST": self.host,
            "GCE_METADATA_IP": self.host,
            "GOOGLE_APPLICATION_CREDENTIALS": "",
            "CLOUDSDK_CONFIG": str(config_dir),
        }

    def rotate(self, token: str) -> None:
        """Hand out a new token from now on (the metadata server's refresh before expiry)."""
        with self._state.lock:
            self._state.token = token

    def deny_tokens(self, deny: bool = True) -> None:
        """Answer token requests 403 from now on (or again normally with deny=False)."""
        with self._state.lock:
            self._state.deny_tokens = deny

    @property
    def requests(self) -> list[Seen]:
        """Return every request so far, in order."""
        with self._state.lock:
            return list(self._state.seen)

    def token_requests(self) -> list[Seen]:
        """Return the token requests so far."""
        return [s for s in self.requests if s.path.endswith("/token")]

    def start(self) -> Self:
        """Bind the socket and serve from a daemon thread; return self."""
        if self._server is None:
            self._server = _Server(self._address, self._state)
            self._thread = threading.Thread(
                target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and release the port; safe to call twice."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.shutdown()
            if thread is not None:
                thread.join(timeout=5)
            server.server_close()

    def __enter__(self) -> Self:
        """Start the server."""
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Stop the server."""
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """Serve in the foreground until interrupted; print the variables a process needs, once ready."""
    parser = argparse.ArgumentParser(
        prog="python -m devtools.metadata_server", description="Serve a fake metadata server."
    )
    parser.add_argument("--email", default="migrate-job@fusion-prime-local.iam.gserviceaccount.com")
    parser.add_argument("--project", default="fusion-prime-local")
    parser.add_argument("--token", required=True, help="the access token to hand out")
    parser.add_argument("--port", type=int, default=0, help="TCP port; 0 picks a free one")
    args = parser.parse_args(argv)
    with MetadataServer(email=args.email, project=args.project, token=args.token, port=args.port) as server:
        print(f"GCE_METADATA_HOST={server.host} GCE_METADATA_IP={server.host}", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
