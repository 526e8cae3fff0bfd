"""Read a Dockerfile and its .dockerignore the way the Docker builder does, for ``make image-check``.

Only what the image check needs: instructions per stage (continuations and comments handled, ARG
defaults and ENV values expanded), and the build context that .dockerignore lets through (with
docker-py's implementation of the rules).
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

_VAR = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")


@dataclass
class Instruction:
    """One instruction: its keyword (upper case), its text, and where it starts."""

    keyword: str
    value: str
    line: int

    def words(self) -> list[str]:
        """Return the instruction's arguments split as a shell would (flags included)."""
        return shlex.split(self.value)


@dataclass
class Stage:
    """One FROM ... [AS name] stage and its instructions."""

    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        """Return this stage's instructions with the given keyword."""
        return [i for i in self.instructions if i.keyword == keyword]


@dataclass
class Copy:
    """A COPY instruction: sources, destination, and the stage it copies from (None: the context)."""

    sources: list[str]
    dest: str
    from_stage: str | None


def instructions(text: str) -> Iterator[Instruction]:
    """Yield the instructions of a Dockerfile, with line continuations joined."""
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        joined = " ".join(p for p in pending if p)
        pending = []
        keyword, _, value = joined.partition(" ")
        yield Instruction(keyword.upper(), value.strip(), start)


def stages(text: str) -> list[Stage]:
    """Return the stages of a Dockerfile, with global ARG defaults substituted into FROM lines."""
    args: dict[str, str] = {}
    result: list[Stage] = []
    for inst in instructions(text):
        if inst.keyword == "ARG" and not result:
            arg, _, default = inst.value.partition("=")
            args[arg.strip()] = default.strip()
        elif inst.keyword == "FROM":
            words = expand(inst.value, args).split()
            alias = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            result.append(Stage(base=words[0], name=alias))
        elif result:
            result[-1].instructions.append(inst)
    return result


def expand(value: str, variables: dict[str, str]) -> str:
    """Return value with $NAME and ${NAME} replaced (unknown names become empty, as in Docker)."""
    return _VAR.sub(lambda m: variables.get(m.group(1) or m.group(2), ""), value)


def env_of(stage: Stage, base: dict[str, str] | None = None) -> dict[str, str]:
    """Return the ENV a stage sets, in order, each value expanded against the ones before."""
    env = dict(base or {})
    for inst in stage.all("ENV"):
        for word in inst.words():
            name, sep, value = word.partition("=")
            if not sep:
                raise ValueError(f"line {inst.line}: use ENV NAME=value, not the legacy ENV NAME value")
            env[name] = expand(value, env)
    return env


def copies(stage: Stage) -> list[Copy]:
    """Return a stage's COPY instructions."""
    result = []
    for inst in stage.all("COPY"):
        words = inst.words()
        flags = [w for w in words if w.startswith("--")]
        paths = [w for w in words if not w.startswith("--")]
        from_stage = next((f.partition("=")[2] for f in flags if f.startswith("--from=")), None)
        result.append(Copy(sources=paths[:-1], dest=paths[-1], from_stage=from_stage))
    return result


def workdir(stage: Stage, before: Instruction | None = None) -> str:
    """Return the stage's WORKDIR in effect at an instruction (or at its end)."""
    current = "/"
    for inst in stage.instructions:
        if before is not None and inst is before:
            break
        if inst.keyword == "WORKDIR":
            current = os.path.join(current, inst.value)
    return current


def context_files(root: Path) -> list[str]:
    """Return the files (relative paths) of the build context at root that .dockerignore admits.

    docker-py's ``exclude_paths`` applies Docker's own .dockerignore rules (last match wins,
    ``!`` exceptions, ``**``); it also keeps the Dockerfile and .dockerignore, as the builder does.
    """
    from docker.utils.build import exclude_paths

    ignore = root / ".dockerignore"
    patterns = ignore.read_text().splitlines() if ignore.exists() else []
    patterns = [p.strip() for p in patterns if p.strip() and not p.strip().startswith("#")]
    kept = exclude_paths(str(root), patterns)
    return sorted(p for p in kept if (root / p).is_file() and not p.startswith(".git/"))
