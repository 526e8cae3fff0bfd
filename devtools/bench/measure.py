"""How the bench measures: wall time and max RSS of processes, /proc memory sampling, repetitions."""

from __future__ import annotations

import os
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

REPO = Path(__file__).resolve().parents[2]
# Auto repeat: 5 repetitions when the projection stays under this, else 3.
AUTO_REPEAT_BUDGET_S = 600.0

# What a variant brings the databases from: already at head ("noop"), empty, or one revision behind.
Kind = Literal["noop", "empty", "next"]


class BenchError(RuntimeError):
    """A run that did not do what it should: the figures would mean nothing."""


@dataclass(frozen=True)
class ProcResult:
    """One finished process: wall time, max RSS (KB) from wait4, exit code and output."""

    seconds: float
    maxrss_kb: int
    returncode: int
    stdout: str
    stderr: str
    # When sampled: the peak RSS (VmHWM, KB) of each descendant, and the peak PSS of the tree.
    descendants_kb: tuple[int, ...] = ()
    tree_pss_kb: int | None = None


@dataclass(frozen=True)
class Sample:
    """One timed run of a variant; memory only for migrate-job runs (the process and its children)."""

    seconds: float
    maxrss_kb: int | None = None
    descendants_kb: tuple[int, ...] = ()
    tree_pss_kb: int | None = None


@dataclass
class Variant:
    """A way of bringing N databases to head, with its untimed preparation and check."""

    name: str
    kind: Kind
    run: Callable[[], Sample]
    prepare: Callable[[], None] | None = None
    verify: Callable[[], None] | None = None
    is_job: bool = False
    samples: list[Sample] = field(default_factory=list)


def clean_env(extra: Mapping[str, str]) -> dict[str, str]:
    """Return this process's environment without MIGRATE_*, PG* and DATABASE_URL, plus extra."""
    # The developer's own settings must not steer what a variant connects to or how the job runs.
    keep = {
        k: v for k, v in os.environ.items() if not (k.startswith(("MIGRATE_", "PG")) or k == "DATABASE_URL")
    }
    return {**keep, **extra}


def run_process(cmd: Sequence[str | Path], env: Mapping[str, str], *, tree: bool = False) -> ProcResult:
    """Run one process from the repository root; return wall time, max RSS and its output.

    With tree, /proc is polled for every descendant's peak RSS and the tree's PSS: wait4 only folds
    in children the process reaped itself, and multiprocessing's fork-server workers are not.
    """
    # Output goes to files, not pipes: a full pipe would stall the process and skew its time.
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(
            [str(c) for c in cmd], env=dict(env), cwd=REPO, stdin=subprocess.DEVNULL, stdout=out, stderr=err
        )
        sampler = TreeSampler(proc.pid) if tree else None
        if sampler is not None:
            sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        figures = sampler.stop() if sampler is not None else None
        proc.returncode = os.waitstatus_to_exitcode(status)  # already reaped: Popen must not wait
        out.seek(0)
        err.seek(0)
        return ProcResult(
            seconds=seconds,
            maxrss_kb=usage.ru_maxrss,
            returncode=proc.returncode,
            stdout=out.read().decode(errors="replace"),
            stderr=err.read().decode(errors="replace"),
            descendants_kb=tuple(figures.peaks.values()) if figures else (),
            tree_pss_kb=figures.tree_pss_kb if figures else None,
        )


class TreeSampler(threading.Thread):
    """Polls /proc: each descendant's peak RSS (VmHWM), and the peak PSS summed over the tree."""

    def __init__(self, root: int, interval: float = 0.1) -> None:
        """Sample root and its descendants every interval seconds until stop()."""
        super().__init__(name="bench-rss", daemon=True)
        self.root = root
        self.interval = interval
        self.peaks: dict[int, int] = {}
        # PSS splits pages shared after fork among their sharers: the sum is what the tree holds.
        self.tree_pss_kb = 0
        self.done = threading.Event()

    def run(self) -> None:
        """Thread body: sample until stopped."""
        while not self.done.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        """Record the VmHWM of every live descendant and the tree's current PSS."""
        pss = proc_kb(self.root, "smaps_rollup", "Pss:") or 0
        pending = children(self.root)
        while pending:
            pid = pending.pop()
            pending += children(pid)
            hwm = proc_kb(pid, "status", "VmHWM:")
            if hwm is not None:
                self.peaks[pid] = max(hwm, self.peaks.get(pid, 0))
            pss += proc_kb(pid, "smaps_rollup", "Pss:") or 0
        self.tree_pss_kb = max(self.tree_pss_kb, pss)

    def stop(self) -> TreeSampler:
        """Stop sampling and return self, whose figures are final."""
        self.done.set()
        self.join()
        return self


def children(pid: int) -> list[int]:
    """Return the pids of a process's children (of all its threads); [] once it is gone."""
    found: list[int] = []
    try:
        for task in os.scandir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task.name}/children") as fh:
                found += [int(child) for child in fh.read().split()]
    except OSError:  # gone meanwhile, or a kernel without the children file
        pass
    return found


def proc_kb(pid: int, name: str, key: str) -> int | None:
    """Return a ``key: N kB`` figure of /proc/<pid>/<name>, or None if the process is gone."""
    try:
        with open(f"/proc/{pid}/{name}") as fh:
            for line in fh:
                if line.startswith(key):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def tree_sum_kb(sample: Sample) -> int:
    """Return the job process's peak RSS plus each descendant's (an upper bound of the total)."""
    return (sample.maxrss_kb or 0) + sum(sample.descendants_kb)


def run_repetitions(variants: Sequence[Variant], repeat: int | None, started: float) -> int:
    """Run every variant once per repetition (interleaved); return the repetitions done.

    Interleaving makes drift on a shared machine hit every variant alike. With repeat None, the
    first repetition's time decides between 5 and 3 repetitions (see AUTO_REPEAT_BUDGET_S).
    """
    planned = repeat if repeat is not None else 3
    rep = 0
    while rep < planned:
        rep_start = time.perf_counter()
        for variant in variants:
            sample = run_once(variant)
            line = f"  rep {rep + 1}/{planned}  {variant.name:<36} {sample.seconds:8.2f} s"
            print(line + memory_text(sample), flush=True)
        rep += 1
        if repeat is None and rep == 1:
            rep_s = time.perf_counter() - rep_start
            projected = time.perf_counter() - started + 4 * rep_s
            planned = 5 if projected <= AUTO_REPEAT_BUDGET_S else 3
            print(f"  one repetition took {rep_s:.0f} s: {planned} repetitions in all", flush=True)
    return planned


def run_once(variant: Variant) -> Sample:
    """Prepare, time and check one run of variant (only run is timed); keep and return its sample."""
    if variant.prepare is not None:
        variant.prepare()
    sample = variant.run()
    if variant.verify is not None:
        variant.verify()
    variant.samples.append(sample)
    return sample


def memory_text(sample: Sample) -> str:
    """Return the progress line's memory part: max RSS, and the children's summed peaks if any."""
    text = ""
    if sample.maxrss_kb is not None:
        text = f"  max RSS {sample.maxrss_kb / 1024:.0f} MB"
    if sample.descendants_kb:
        kids = len(sample.descendants_kb)
        text += f" (+{kids} child process(es): {tree_sum_kb(sample) / 1024:.0f} MB summed)"
    return text
