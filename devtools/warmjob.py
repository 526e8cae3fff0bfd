"""Warm job processes for the tests: a fork server that imported the job once.

Most of a job process's start-up is importing (the Google clients, SQLAlchemy, Alembic, pydantic):
about half a second of CPU that the test suite paid some two hundred times. This server imports
the job once; each request forks a fresh process that runs ``python -m job ARGS`` from there, with
its own environment, working directory, stdout and stderr. The child is a real process (its own
pid, signals, exit status, connections), like the ``--jobs`` workers, which come from a fork server
too; what it skips is only the import. Tests about start-up itself (signals that land while the
interpreter starts, what ``--help`` imports) start a cold interpreter instead.

Protocol, over a unix socket: the client sends one JSON line (args, env, cwd) with its stdout and
stderr descriptors attached (SCM_RIGHTS); the server answers ``{"pid": N}`` once forked and
``{"returncode": R}`` (negative for a signal, as subprocess says it) when the child has exited.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import runpy
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

# What a job process imports on its way to any command; the children find it loaded.
PRELOAD = (
    "job.cli",
    "job.commands",
    "job.logs",
    "job.secrets",
    "job.drift",
    "job.lint",
    "job.scaffold",
    "job.structured",
    "google.cloud.secretmanager",
    "google.auth",  # never google.auth.compute_engine: it reads GCE_METADATA_HOST when imported
    "sqlalchemy.ext.asyncio",
    "sqlalchemy.dialects.postgresql.asyncpg",
    "asyncpg",
    "alembic.command",
    "alembic.autogenerate",
    "alembic.runtime.environment",
    "alembic.script",
    "pydantic_settings",
    "tenacity",
)
MAX_REQUEST = 1 << 20


# ---- the server ------------------------------------------------------------------------------


def serve(path: str) -> None:
    """Import the job, listen on path, and fork a job process per request until stdin closes."""
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ, "accept")
    # The server ends with the test session: when its parent closes our stdin.
    selector.register(sys.stdin, selectors.EVENT_READ, "stdin")
    print("ready", flush=True)
    while True:
        for key, _ in selector.select():
            if key.data == "stdin":
                return
            if key.data == "accept":
                client, _ = listener.accept()
                _start(client, selector, listener)
            else:
                _reap(key, selector)


def _start(client: socket.socket, selector: selectors.BaseSelector, listener: socket.socket) -> None:
    """Read one request, fork its job process, and watch it through a pidfd."""
    message, fds, _, _ = socket.recv_fds(client, MAX_REQUEST, 2)
    request = json.loads(message)
    pid = os.fork()
    if pid == 0:
        _child(request, fds)  # never returns
    for fd in fds:
        os.close(fd)  # the child has them; the client must see EOF when the child ends
    client.sendall(json.dumps({"pid": pid}).encode() + b"\n")
    selector.register(os.pidfd_open(pid), selectors.EVENT_READ, (pid, client))


def _reap(key: selectors.SelectorKey, selector: selectors.BaseSelector) -> None:
    """Send a finished child's return code to its client and forget both."""
    pid, client = key.data
    selector.unregister(key.fileobj)
    os.close(key.fd)
    _, status = os.waitpid(pid, 0)
    code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    with contextlib.suppress(OSError):
        client.sendall(json.dumps({"returncode": code}).encode() + b"\n")
    client.close()


def _child(request: dict[str, Any], fds: list[int]) -> None:
    """Become ``python -m job ARGS`` with the request's environment, directory and streams."""
    code = 1
    try:
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(fds[0], 1)
        os.dup2(fds[1], 2)
        # Like subprocess's close_fds: the server's sockets and the other clients' pipes go.
        os.closerange(3, 1 << 16)
        sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False))
        sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8")
        sys.stderr = io.TextIOWrapper(
            io.FileIO(2, "w", closefd=False), encoding="utf-8", errors="backslashreplace", line_buffering=True
        )
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # as a fresh interpreter has it
        _take_pythonpath(request["env"].get("PYTHONPATH", ""))
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        sys.argv = [sys.executable, *request["args"]]
        code = _run_job()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _take_pythonpath(wanted: str) -> None:
    """Put PYTHONPATH's folders on sys.path as a fresh interpreter would (after the first entry).

    It is the one start-up variable a test sets; others that act at interpreter start (-X options,
    PYTHONHASHSEED) need a cold job process (tests.support.start_job(cold=True)).
    """
    known = set(os.environ.get("PYTHONPATH", "").split(os.pathsep))
    added = [p for p in wanted.split(os.pathsep) if p and p not in known]
    sys.path[1:1] = added
    if added:
        import importlib

        importlib.invalidate_caches()


def _run_job() -> int:
    """Run the job's __main__ as ``python -m job`` would; return the interpreter's exit code."""
    import atexit
    import threading
    import traceback

    try:
        runpy.run_module("job", run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if exc.code is not None and not isinstance(exc.code, int):
            print(exc.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        code = 1
    # What the interpreter does on its way out: join threads, then the atexit handlers.
    threading._shutdown()  # type: ignore[attr-defined]
    atexit._run_exitfuncs()
    return code


# ---- the client ------------------------------------------------------------------------------


class WarmServer:
    """The session's fork server, started on first use and stopped with the session."""

    def __init__(self, python: str = sys.executable) -> None:
        self.dir = tempfile.mkdtemp(prefix="mjwarm")
        self.path = str(Path(self.dir) / "s")
        self.proc = subprocess.Popen(
            [python, "-m", "devtools.warmjob", self.path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=Path(__file__).resolve().parent.parent,
        )
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != b"ready":
            raise RuntimeError("the warm job server did not start")

    def start(
        self,
        args: list[str],
        *,
        env: dict[str, str],
        cwd: str | Path,
        stdout: IO[Any] | None = None,
        stderr: IO[Any] | None = None,
    ) -> WarmProcess:
        """Fork a job process; stdout and stderr go to the given files, else to pipes."""
        return WarmProcess(self.path, args, env=env, cwd=str(cwd), stdout=stdout, stderr=stderr)

    def stop(self) -> None:
        """End the server (its children have ended with their tests)."""
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
            os.rmdir(self.dir)


class WarmProcess:
    """A forked job process, with the part of subprocess.Popen's interface the tests use."""

    def __init__(
        self,
        path: str,
        args: list[str],
        *,
        env: dict[str, str],
        cwd: str,
        stdout: IO[Any] | None,
        stderr: IO[Any] | None,
    ) -> None:
        self.returncode: int | None = None
        self.stdout: IO[str] | None = None
        self.stderr: IO[str] | None = None
        ends = []
        for given, attr in ((stdout, "stdout"), (stderr, "stderr")):
            if given is not None:
                ends.append(given.fileno())
                continue
            read, write = os.pipe()
            setattr(self, attr, open(read, encoding="utf-8", errors="replace"))  # noqa: SIM115
            ends.append(write)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        request = json.dumps({"args": args, "env": env, "cwd": cwd}).encode()
        socket.send_fds(self.sock, [request], ends)
        for given, end in zip((stdout, stderr), ends, strict=True):
            if given is None:
                os.close(end)
        self.buffer = b""
        self.pid: int = json.loads(self._line(None))["pid"]

    def _line(self, timeout: float | None) -> bytes:
        """Return the server's next line, waiting up to timeout (None: forever)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self.buffer:
            self.sock.settimeout(None if deadline is None else max(0.0, deadline - time.monotonic()))
            try:
                data = self.sock.recv(4096)
            except (TimeoutError, BlockingIOError):
                raise subprocess.TimeoutExpired(["python", "-m", "job"], timeout or 0) from None
            if not data:
                raise RuntimeError("the warm job server closed the connection of a job process")
            self.buffer += data
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line

    def poll(self) -> int | None:
        """Return the return code if the process has ended, else None."""
        if self.returncode is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.wait(0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the end and return the return code; raise TimeoutExpired as subprocess does."""
        if self.returncode is None:
            self.returncode = json.loads(self._line(timeout))["returncode"]
            self.sock.close()
        return self.returncode

    def send_signal(self, signum: int) -> None:
        """Send a signal, unless the process has already ended."""
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)

    def kill(self) -> None:
        """Send SIGKILL."""
        self.send_signal(signal.SIGKILL)

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        """Read stdout and stderr to their end, wait for the exit, and return both."""
        import threading

        found: dict[str, str] = {}

        def drain(name: str, stream: IO[str] | None) -> None:
            found[name] = stream.read() if stream is not None else ""

        readers = [
            threading.Thread(target=drain, args=("out", self.stdout), daemon=True),
            threading.Thread(target=drain, args=("err", self.stderr), daemon=True),
        ]
        deadline = None if timeout is None else time.monotonic() + timeout
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        if any(r.is_alive() for r in readers):
            raise subprocess.TimeoutExpired(["job", str(self.pid)], timeout or 0)
        self.wait(None if deadline is None else max(0.1, deadline - time.monotonic()))
        for stream in (self.stdout, self.stderr):
            if stream is not None:
                stream.close()
        return found["out"], found["err"]


if __name__ == "__main__":
    serve(sys.argv[1])
