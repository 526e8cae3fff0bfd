"""Tests for job/revisions.py: the index read from the files' text says what Alembic says, or nothing.

A run at head decides "nothing to do" from this index without loading Alembic. If the index ever
disagreed with Alembic, that run would skip work or refuse a good history: so every history this
repository ships is read both ways and compared, and the shapes the index cannot read exactly
must make it step aside (None).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from alembic.config import Config
from alembic.script import ScriptDirectory

from job.revisions import BLESSED_ENV, read_index
from tests.support import REPO

PATTERNS = (
    "services/*/alembic.ini",
    "devtools/bench/services/*/alembic.ini",
    "tests/fixtures/**/alembic.ini",
)
HISTORIES = sorted(p.parent for pattern in PATTERNS for p in REPO.glob(pattern))


def test_there_are_histories_to_compare() -> None:
    """The comparison below means something only over many histories (linear, branched, merged)."""
    assert len(HISTORIES) > 20


@pytest.mark.parametrize("service", HISTORIES, ids=lambda p: str(p.relative_to(REPO)))
def test_the_index_agrees_with_alembic(service: Path) -> None:
    """Heads, parents, files and ancestry: the same as Alembic's, wherever the index reads a history."""
    index = read_index(service / "alembic.ini")
    if index is None:
        return  # Alembic reads it: nothing to agree on
    script = ScriptDirectory.from_config(Config(str(service / "alembic.ini")))
    revisions = {r.revision: r for r in script.walk_revisions()}
    assert set(index.parents) == set(revisions)
    assert set(index.heads) == set(script.get_heads())
    for revision, found in revisions.items():
        assert index.parents[revision] == tuple(found._normalized_down_revisions)
        assert index.files[revision] == Path(found.path)
    for head in index.heads:
        below = script.revision_map.iterate_revisions(head, "base")
        assert index.ancestry(head) == {r.revision for r in below}


def _history(tmp_path: Path, *files: str) -> Path:
    """Return the alembic.ini of a history with these revision files (and the blessed env.py)."""
    (tmp_path / "migrations" / "versions").mkdir(parents=True)
    (tmp_path / "alembic.ini").write_text("[alembic]\nscript_location = %(here)s/migrations\n")
    shutil.copy(BLESSED_ENV, tmp_path / "migrations" / "env.py")
    for i, text in enumerate(files):
        (tmp_path / "migrations" / "versions" / f"r{i}.py").write_text(text)
    return tmp_path / "alembic.ini"


def test_a_plain_history_is_read(tmp_path: Path) -> None:
    """Both the annotated and the plain spelling of the ids, a merge, and the blessed env.py."""
    ini = _history(
        tmp_path,
        'revision: str = "a1"\ndown_revision = None\n',
        'revision = "b2"\ndown_revision: str | None = "a1"\n',
        'revision = "c3"\ndown_revision = "a1"\n',
        'revision = "d4"\ndown_revision = ("b2", "c3")\n',
    )
    index = read_index(ini)
    assert index is not None
    assert index.heads == ("d4",)
    assert index.ancestry("d4") == {"a1", "b2", "c3", "d4"}
    assert index.blessed_env()


@pytest.mark.parametrize(
    "text",
    [
        'revision = "b" + "2"\ndown_revision = None\n',  # computed: only running the file tells
        'revision = "b2"\ndown_revision = None\ndepends_on = "x"\n',  # dependencies: Alembic's rules
        "down_revision = None\n",  # no id in the file (Alembic's legacy file names)
        'revision = "a1"\ndown_revision = "zz"\n',  # a parent that does not exist
        "revision = (\n",  # not Python
    ],
)
def test_what_only_alembic_reads_exactly_is_left_to_it(tmp_path: Path, text: str) -> None:
    """Anything the index cannot state exactly makes it step aside, so Alembic reads (or refuses) it."""
    assert read_index(_history(tmp_path, 'revision = "a1"\ndown_revision = None\n', text)) is None


def test_a_loop_is_left_to_alembic(tmp_path: Path) -> None:
    """Alembic refuses a history whose parents loop; the index must not call one of them the head."""
    looped = ('revision = "a1"\ndown_revision = "b2"\n', 'revision = "b2"\ndown_revision = "a1"\n')
    ini = _history(tmp_path, *looped)
    assert read_index(ini) is None


def test_other_layouts_are_left_to_alembic(tmp_path: Path) -> None:
    """Several version folders, or a package resource as the script location: Alembic's to read."""
    ini = _history(tmp_path, 'revision = "a1"\ndown_revision = None\n')
    ini.write_text("[alembic]\nscript_location = %(here)s/migrations\nversion_locations = %(here)s/v2\n")
    assert read_index(ini) is None
    ini.write_text("[alembic]\nscript_location = myapp:migrations\n")
    assert read_index(ini) is None


def test_an_edited_env_py_is_not_blessed(tmp_path: Path) -> None:
    """Only the blessed env.py, byte for byte, says where the version table is without running it."""
    ini = _history(tmp_path, 'revision = "a1"\ndown_revision = None\n')
    env = tmp_path / "migrations" / "env.py"
    edited = env.read_text().replace('"compare_type": True,', '"compare_type": True, "version_table": "v",')
    env.write_text(edited)
    index = read_index(ini)
    assert index is not None and not index.blessed_env()
