"""A service's revisions read from their files' text, without running them: ids, parents, files.

Loading a history through Alembic imports Alembic and SQLAlchemy and executes every revision
file: about 0.3 s before the first connection, on every execution and Cloud Run task. Most
executions find every database at head and need only the head's id and the applied files'
checksums. This index gives them that from the files' syntax (``ast``), for the histories whose
layout it reads exactly as Alembic does; for any other it says so (``read_index`` returns None)
and the job loads the history through Alembic, as it always did. Planning work is Alembic's.
"""

from __future__ import annotations

import ast
import configparser
import re
from dataclasses import dataclass
from pathlib import Path

# Alembic's own rule for which files in a versions folder are revisions (alembic.script.base).
_REVISION_FILE = re.compile(r"(?!\.\#|__init__)(.*\.py)$")
_NAMES = ("revision", "down_revision", "branch_labels", "depends_on")
# alembic.ini options that change where or how revision files are found: Alembic reads those.
_ALEMBIC_ONLY = ("version_locations", "recursive_version_locations", "sourceless")
# The blessed env.py (job/templates): it leaves the version table at Alembic's default.
BLESSED_ENV = Path(__file__).resolve().parent / "templates" / "service" / "migrations" / "env.py"


@dataclass(frozen=True)
class Index:
    """The revisions of one history: each id's parents and file, and the heads."""

    parents: dict[str, tuple[str, ...]]
    files: dict[str, Path]
    heads: tuple[str, ...]
    env_py: Path

    def ancestry(self, revision: str) -> set[str]:
        """Return the revision and every revision below it (what a database at it has applied)."""
        found: set[str] = set()
        todo = [revision]
        while todo:
            current = todo.pop()
            if current not in found:
                found.add(current)
                todo.extend(self.parents.get(current, ()))
        return found

    def blessed_env(self) -> bool:
        """Return whether env.py is the blessed one, byte for byte (default version table, in public)."""
        try:
            return self.env_py.read_bytes() == BLESSED_ENV.read_bytes()
        except OSError:
            return False


def read_index(ini: Path) -> Index | None:
    """Return the history's index, or None where only Alembic can read it exactly."""
    parser = configparser.ConfigParser(defaults={"here": str(ini.parent)})
    try:
        parser.read(ini, encoding="utf-8")
        options = parser["alembic"]
        location = options.get("script_location")
    except (configparser.Error, KeyError, OSError):
        return None
    if location is None or ":" in location or any(options.get(o) for o in _ALEMBIC_ONLY):
        return None  # a package resource, several folders, or .pyc revisions
    scripts = Path(location) if Path(location).is_absolute() else Path.cwd() / location
    versions = scripts / "versions"
    try:
        names = sorted(n.name for n in versions.iterdir() if n.is_file() and _REVISION_FILE.match(n.name))
    except OSError:
        return None
    parents: dict[str, tuple[str, ...]] = {}
    files: dict[str, Path] = {}
    for name in names:
        found = _literals(versions / name)
        if found is None or found[0] in parents:
            return None
        parents[found[0]] = found[1]
        files[found[0]] = versions / name
    known = set(parents)
    if any(set(p) - known for p in parents.values()):
        return None  # a dangling parent: Alembic's error says it best
    if _has_cycle(parents):
        return None
    below = {p for ps in parents.values() for p in ps}
    return Index(parents, files, tuple(sorted(known - below)), scripts / "env.py")


def _has_cycle(parents: dict[str, tuple[str, ...]]) -> bool:
    """Return whether the parent links loop (Alembic refuses such a history)."""
    children: dict[str, int] = {r: 0 for r in parents}
    for ps in parents.values():
        for p in ps:
            children[p] += 1
    leaves = [r for r, n in children.items() if n == 0]
    seen = 0
    while leaves:
        seen += 1
        for p in parents[leaves.pop()]:
            children[p] -= 1
            if children[p] == 0:
                leaves.append(p)
    return seen != len(parents)


def _literals(path: Path) -> tuple[str, tuple[str, ...]] | None:
    """Return a revision file's id and parents, if it states them as plain literals; else None."""
    try:
        tree = ast.parse(path.read_bytes(), str(path))
    except (OSError, SyntaxError, ValueError):
        return None
    values: dict[str, object] = {}
    for node in tree.body:
        target, value = _assignment(node)
        if target in _NAMES:
            try:
                values[target] = ast.literal_eval(value) if value is not None else None
            except ValueError:
                return None
    revision, parents = values.get("revision"), values.get("down_revision", ())
    if not isinstance(revision, str) or not revision or values.get("depends_on"):
        return None  # no id (Alembic's legacy names), or dependencies: Alembic's graph rules
    if parents is None:
        parents = ()
    elif isinstance(parents, str):
        parents = (parents,)
    if not (isinstance(parents, (tuple, list)) and all(isinstance(p, str) for p in parents)):
        return None
    return revision, tuple(parents)


def _assignment(node: ast.stmt) -> tuple[str | None, ast.expr | None]:
    """Return the name and value of a top-level ``name = value`` or ``name: T = value``."""
    if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
        return node.targets[0].id, node.value
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return node.target.id, node.value
    return None, None
