"""One Cloud Run job task, played by podman on this machine, for ``make image-test``.

What a task gets on Cloud Run and gets here: the image's own ENTRYPOINT, USER and working
directory; ``--memory 512m --cpus 1`` (the job YAMLs' limits); the ``CLOUD_RUN_*`` variables;
the Cloud SQL sockets under ``/cloudsql``; Secret Manager over the network (here the emulator,
reached over host networking); and on stop, SIGTERM then SIGKILL after 10 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import asyncpg

from devtools import podman

LABEL = "org.migrate-job.image-test"
CGROUP_PARENT = "migrate-job-image-test"
CGROUP_ROOT = Path("/sys/fs/cgroup")
MEMORY = "512m"
CPUS = "1"
CLOUD_RUN = {
    "CLOUD_RUN_JOB": "migrate-job-local",
    "CLOUD_RUN_EXECUTION": "migrate-job-local-7xk2p",
    "CLOUD_RUN_TASK_INDEX": "0",
    "CLOUD_RUN_TASK_COUNT": "1",
    "CLOUD_RUN_TASK_ATTEMPT": "0",
}
TIMER = (
    "import json, subprocess, sys, time\n"
    "runs = []\n"
    "for _ in range(int(sys.argv[1])):\n"
    "    t = time.perf_counter()\n"
    "    subprocess.run(sys.argv[2:], stdout=subprocess.DEVNULL, check=True)\n"
    "    runs.append(time.perf_counter() - t)\n"
    "print(json.dumps(runs))\n"
)


@dataclass
class Outcome:
    """How one task ended: exit code, stdout, stderr, wall time and peak memory (when measured)."""

    code: int
    stdout: str
    stderr: str
    seconds: float
    peak_bytes: int | None = None
    peak_rss_bytes: int | None = None

    def tail(self, lines: int = 8) -> list[str]:
        """Return the last lines of the output, for a failure message."""
        return ["--- last output lines:", *(self.stdout + self.stderr).strip().splitlines()[-lines:]]


class CloudRunTask:
    """Runs the image as a Cloud Run job task, with the sockets and manifests mounted."""

    def __init__(self, image: str, sockets: Path, config: Path, endpoint: str) -> None:
        """Remember the image, the folders to mount and the Secret Manager endpoint."""
        self.image = image
        self.mounts = ["-v", f"{sockets}:/cloudsql", "-v", f"{config}:/etc/image-test:ro"]
        self.env = {
            **CLOUD_RUN,
            "MIGRATE_ENV": "local",
            "MIGRATE_SECRET_MANAGER_ENDPOINT": endpoint,
            "MIGRATE_IMAGE": image,
        }
        self._count = 0

    def _options(self, env: dict[str, str] | None) -> list[str]:
        """Return the podman run options of a task (no --user, no --entrypoint: the image's own)."""
        self._count += 1
        name = f"migrate-job-image-test-{os.getpid()}-{self._count}"
        options = ["--name", name, "--label", f"{LABEL}={os.getpid()}", "--network", "host"]
        options += ["--memory", MEMORY, "--cpus", CPUS, "--cgroup-parent", f"/{CGROUP_PARENT}", *self.mounts]
        for key, value in {**self.env, **(env or {})}.items():
            options += ["--env", f"{key}={value}"]
        return options

    def run(self, *args: str, env: dict[str, str] | None = None, measure: bool = False) -> Outcome:
        """Run the task to its end and return its outcome (with the peak memory if measure)."""
        if measure:
            started = time.monotonic()
            name = self.start(*args, env=env)
            peak, rss = self._watch_memory(name)
            outcome = self.finish(name)
            outcome.seconds, outcome.peak_bytes, outcome.peak_rss_bytes = (
                time.monotonic() - started,
                peak,
                rss,
            )
            return outcome
        started = time.monotonic()
        result = podman.podman("run", "--rm", *self._options(env), self.image, *args, check=False)
        return Outcome(result.returncode, result.stdout, result.stderr, time.monotonic() - started)

    def start(self, *args: str, env: dict[str, str] | None = None) -> str:
        """Start the task in the background; return the container's name."""
        options = self._options(env)
        podman.podman("run", "--detach", *options, self.image, *args)
        return options[1]

    def finish(self, name: str) -> Outcome:
        """Wait for a started task, collect its exit code and output, and remove it."""
        started = time.monotonic()
        code = int(podman.podman("wait", name, timeout=3600).stdout.strip() or -1)
        logs = podman.podman("logs", name, check=False)
        podman.podman("rm", "--force", name, check=False)
        return Outcome(code, logs.stdout, logs.stderr, time.monotonic() - started)

    def running(self, name: str) -> bool:
        """Say whether a started task is still running."""
        state = podman.podman("inspect", "--format", "{{.State.Running}}", name, check=False)
        return state.stdout.strip() == "true"

    def logs(self, name: str) -> str:
        """Return what a started task has written so far."""
        result = podman.podman("logs", name, check=False)
        return (result.stdout + result.stderr)[-3000:]

    def _watch_memory(self, name: str) -> tuple[int | None, int | None]:
        """Follow the task until its cgroup goes away; return the cgroup's peak and PID 1's peak RSS.

        The cgroup's figure is what the memory limit applies to (anonymous memory and the page
        cache the task brought in); VmHWM is the job process's own high-water mark.
        """
        inspected = podman.podman("inspect", "--format", "{{.Id}} {{.State.Pid}}", name).stdout.split()
        cid, pid = inspected[0], inspected[1]
        files = [
            CGROUP_ROOT / "memory" / CGROUP_PARENT / f"libpod-{cid}" / "memory.max_usage_in_bytes",
            CGROUP_ROOT / CGROUP_PARENT / f"libpod-{cid}" / "memory.peak",
        ]
        peak: int | None = None
        rss: int | None = None
        deadline = time.monotonic() + 1800
        while time.monotonic() < deadline:
            rss = max(rss or 0, _vm_hwm(pid)) or rss
            values = [v for v in (_read_int(f) for f in files) if v is not None]
            if not values:
                if peak is not None or not self.running(name):
                    break
            else:
                peak = max([*values, peak or 0])
            time.sleep(0.05)
        return peak, rss

    def time_inside(self, command: list[str], repeats: int) -> list[float]:
        """Return the wall times of a command run repeatedly inside one container of the image."""
        options = [*self._options(None), "--entrypoint", "python"]
        result = podman.podman("run", "--rm", *options, self.image, "-c", TIMER, str(repeats), *command)
        return [float(x) for x in json.loads(result.stdout)]

    def remove_all(self) -> None:
        """Remove every container this process started, and the cgroups podman made for them."""
        listed = podman.podman(
            "ps", "--all", "--quiet", "--filter", f"label={LABEL}={os.getpid()}", check=False
        )
        for cid in listed.stdout.split():
            podman.podman("rm", "--force", cid, check=False)
        for controller in [CGROUP_ROOT, *CGROUP_ROOT.iterdir()] if CGROUP_ROOT.is_dir() else []:
            parent = controller / CGROUP_PARENT
            for child in sorted(parent.glob("*/"), reverse=True) if parent.is_dir() else []:
                _rmdir(child)
            _rmdir(parent)


def _read_int(path: Path) -> int | None:
    """Return the integer in a cgroup file, or None if it is not there."""
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _vm_hwm(pid: str) -> int:
    """Return a process's peak resident set size in bytes (0 once it is gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    line = next((x for x in status.splitlines() if x.startswith("VmHWM:")), "VmHWM: 0 kB")
    return int(line.split()[1]) * 1024


def _rmdir(path: Path) -> None:
    """Remove an empty cgroup directory if it exists."""
    with contextlib.suppress(OSError):
        path.rmdir()


class Blocker:
    """A superuser session that holds a lock in an open transaction until the block ends."""

    def __init__(self, dsn: str, statement: str) -> None:
        """Remember where to connect and what to run in the transaction."""
        self._dsn, self._statement = dsn, statement
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="blocker", daemon=True)
        self._conn: Any = None

    def _call(self, coroutine: Any) -> Any:
        """Run a coroutine on the blocker's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=60)

    def __enter__(self) -> Blocker:
        """Connect, begin, and take the lock."""
        self._thread.start()
        self._conn = self._call(asyncpg.connect(self._dsn))
        self._call(self._conn.execute("BEGIN"))
        self._call(self._conn.execute(self._statement))
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Roll back (releasing the lock), close, and stop the loop."""
        try:
            if self._conn is not None:
                self._call(self._conn.execute("ROLLBACK"))
                self._call(self._conn.close())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._loop.close()
