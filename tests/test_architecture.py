"""The job's module layers: commands on top, the run context and the machinery below, no circles.

These exist so that a newcomer can trust the layout: a module named for a concept holds it, and
what sits below never reaches back up (workers once imported the commands that imported them).
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

JOB = Path(__file__).resolve().parent.parent / "job"
# Only these may import the command modules: the layers that dispatch to them.
ABOVE_COMMANDS = {"job.cli", "job.api", "job.__main__"}
MAX_LINES = 450


def _modules() -> dict[str, Path]:
    """Return every module of the job package by dotted name."""
    found = {}
    for path in sorted(JOB.rglob("*.py")):
        parts = path.relative_to(JOB.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Return the job modules a file imports anywhere: top level, in functions, for type checking."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            # `from job import db` imports the module job.db, not only the package.
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name in modules}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    """Return each job module's imports of other job modules."""
    modules = _modules()
    return {name: _imports(path, modules) - {name} for name, path in modules.items()}


def test_no_import_circle(graph: dict[str, set[str]]) -> None:
    """A circle means two modules are one concept split in two, or a lower layer reaching up."""
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as exc:
        pytest.fail(f"import circle in job/: {' -> '.join(exc.args[1])}")


def test_nothing_below_imports_the_cli_or_the_commands(graph: dict[str, set[str]]) -> None:
    """The CLI and the commands are the top: workers, the executor and the rest never import them."""
    wrong = []
    for name, imported in graph.items():
        if name in ABOVE_COMMANDS or name.startswith("job.commands"):
            continue
        wrong += [f"{name} imports {m}" for m in imported if m == "job.cli" or m.startswith("job.commands")]
    assert not wrong, wrong


def test_commands_import_no_cli(graph: dict[str, set[str]]) -> None:
    """Commands are typed functions: only the CLI maps their errors to exit codes."""
    assert not [n for n, imported in graph.items() if n != "job.__main__" and "job.cli" in imported]


def test_ops_imports_nothing_else_of_the_job(graph: dict[str, set[str]]) -> None:
    """Revisions import job.ops: plain `alembic upgrade` must run them without the rest of the job."""
    wrong = {
        n: sorted(m for m in i if not m.startswith("job.ops"))
        for n, i in graph.items()
        if n.startswith("job.ops")
    }
    assert not {n: m for n, m in wrong.items() if m}


def test_modules_stay_small() -> None:
    """A module past a few hundred lines holds more than one concept: split it by concept."""
    sizes = {name: len(path.read_text(encoding="utf-8").splitlines()) for name, path in _modules().items()}
    assert not {n: s for n, s in sizes.items() if s > MAX_LINES}
