"""The checks of ``make image-test``: one line each, pass or FAIL, and what they measured."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from devtools import podman


class CheckFailed(Exception):
    """A check's finding, said in one sentence (details may follow on further lines)."""


@dataclass
class Check:
    """One line of the result."""

    name: str
    ok: bool
    detail: str
    seconds: float


@dataclass
class Session:
    """The checks run so far, the figures measured, and every output of the job to search."""

    checks: list[Check] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)

    def check(self, name: str, body: Callable[[], str | None], fatal: bool = False) -> bool:
        """Run one check, print its line, and record it; return whether it passed."""
        started = time.monotonic()
        try:
            detail, ok = body() or "", True
        except (CheckFailed, podman.PodmanError, subprocess.SubprocessError, OSError) as exc:
            detail, ok = str(exc), False
        seconds = time.monotonic() - started
        self.checks.append(Check(name, ok, detail, seconds))
        first, *rest = detail.splitlines() or [""]
        mark = "pass" if ok else "FAIL"
        suffix = f": {first}" if first else ""
        print(f"image-test: {mark} {name}{suffix} [{seconds:.1f} s]", flush=True)
        for line in rest[:40]:
            print(f"image-test:      {line}", flush=True)
        if fatal and not ok:
            raise CheckFailed(f"{name}: cannot go on")
        return ok

    def failed(self) -> list[Check]:
        """Return the checks that failed."""
        return [c for c in self.checks if not c.ok]


def none(problems: list[str]) -> str:
    """Raise with the problems if there are any."""
    if problems:
        raise CheckFailed(f"{len(problems)} found:\n" + "\n".join(problems[:30]))
    return ""
