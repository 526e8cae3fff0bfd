"""The warm job server: a forked job process must behave as ``python -m job`` does.

Most tests run the job through it (devtools/warmjob.py says why); these tests compare it with a
cold interpreter on what the other tests rely on: output, exit codes, environment, signals.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.warmjob import WarmServer
from tests.support import REPO, job_environment, write_manifest


@pytest.fixture(scope="module")
def server() -> Iterator[WarmServer]:
    """A warm server of this module's own (the session's is started lazily by tests.support)."""
    warm = WarmServer()
    yield warm
    warm.stop()


def cold(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run ``python -m job ARGS`` in a fresh interpreter."""
    return subprocess.run(
        [sys.executable, "-m", "job", *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=60
    )


def warm(server: WarmServer, *args: str, env: dict[str, str]) -> tuple[int, str, str]:
    """Run ``python -m job ARGS`` forked from the warm server; return code, stdout, stderr."""
    proc = server.start(list(args), env=env, cwd=REPO)
    out, err = proc.communicate(timeout=60)
    return proc.returncode, out, err


def test_help_and_a_configuration_error_match_a_cold_interpreter(server: WarmServer, tmp_path: Path) -> None:
    """Same stdout, stderr and exit code for --help (0) and a manifest that is not TOML (2)."""
    env = job_environment({})
    reference = cold("--help", env=env)
    assert warm(server, "--help", env=env) == (0, reference.stdout, reference.stderr)
    bad = tmp_path / "bad.toml"
    bad.write_text("x = [\n")
    env = job_environment({"MIGRATE_MANIFEST": str(bad)})
    reference = cold("plan", env=env)
    code, out, err = warm(server, "plan", env=env)
    assert (code, err) == (reference.returncode, reference.stderr) == (2, "")
    drop = ("duration_ms", "sourceLocation")  # timings and line numbers aside, the same lines
    assert [_without(line, drop) for line in out.splitlines()] == [
        _without(line, drop) for line in reference.stdout.splitlines()
    ]


def _without(line: str, keys: tuple[str, ...]) -> dict[str, object]:
    """Return a JSON log line without the given keys (anywhere in its key names)."""
    import json

    return {k: v for k, v in json.loads(line).items() if not any(key in k for key in keys)}


def test_each_process_has_only_its_own_environment(server: WarmServer, tmp_path: Path) -> None:
    """A variable given to one job process is not seen by the next one (nothing leaks between)."""
    bad = tmp_path / "bad.toml"
    bad.write_text("x = [\n")
    code, out, _ = warm(server, "plan", env=job_environment({"MIGRATE_MANIFEST": str(bad)}))
    assert code == 2 and "bad.toml" in out
    code, out, _ = warm(server, "plan", env=job_environment({"MIGRATE_ENV": "nosuchenv"}))
    assert code == 2 and "bad.toml" not in out and "nosuchenv" in out


def test_a_signal_ends_it_as_it_ends_a_cold_process(server: WarmServer, tmp_path: Path) -> None:
    """SIGKILL gives returncode -9, as subprocess reports it; the pid is the job's own."""
    # A database on a closed port: the job retries its connection for seconds, time to kill it.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    manifest = write_manifest(
        tmp_path / "closed.toml",
        [
            {
                "service": "settlement",
                "database": "d",
                "host": "127.0.0.1",
                "port": port,
                "user": "u",
                "password": "p",
            }
        ],
    )
    env = job_environment({"MIGRATE_MANIFEST": str(manifest), "MIGRATE_CONNECT_TIMEOUT_S": "30"})
    proc = server.start(["plan"], env=env, cwd=REPO)
    assert Path(f"/proc/{proc.pid}/status").exists()
    proc.kill()
    assert proc.wait(10) == -signal.SIGKILL
