"""The README is a front page and docs/ holds the rest: a reader who follows a link lands on a page
and a heading that exist, and a command or log event the docs name is one the job has."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from job.cli import build_parser

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
PAGES = sorted([README, *(REPO / "docs").glob("*.md"), REPO / "deploy" / "README.md"])
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~)")
# The prefixes of the job's event names (DESIGN.md, Logs); a backticked name with one is an event.
EVENT = re.compile(
    r"`((?:run|db|lock|migration|service|revision|verify|history|check|lint|trace|manifest|auth|"
    r"backfill|ops|execution|library)\.[a-z_]+)`"
)


def prose(path: Path) -> Iterator[tuple[int, str]]:
    """Yield the numbered lines of a Markdown file that are outside fenced code blocks."""
    fenced = False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if FENCE.match(line.strip()):
            fenced = not fenced
            continue
        if not fenced:
            yield number, line


def slug(heading: str) -> str:
    """Return GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Return every anchor a page's headings make (a repeated heading gets -1, -2, ...)."""
    seen: dict[str, int] = {}
    found = set()
    for _, line in prose(path):
        match = re.match(r"^#{1,6} (.+)$", line)
        if match:
            base = slug(match.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(path: Path) -> Iterator[tuple[int, str]]:
    """Yield each relative link of a page (no scheme), with its line number."""
    for number, line in prose(path):
        for target in LINK.findall(line):
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target):
                yield number, target


def broken(path: Path, root: Path = REPO) -> list[str]:
    """Return the links of a page whose file or heading does not exist (paths relative to root)."""
    problems = []
    for number, target in links(path):
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(root)}:{number}: {target}"
        if not dest.exists():
            problems.append(f"{where}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{where}: no heading #{anchor} in {dest.relative_to(root)}")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_and_anchor_resolves(page: Path) -> None:
    assert broken(page) == []


def test_the_link_check_catches_a_missing_page_and_a_missing_heading(tmp_path: Path) -> None:
    (tmp_path / "b.md").write_text("# Bee\n\n## Has `code` (here)\n")
    page = tmp_path / "a.md"
    page.write_text("[ok](b.md#has-code-here) [gone](c.md) [bad](b.md#nope)\n```\n[x](in-code.md)\n```\n")
    problems = [p.split(": ", 1)[1] for p in broken(page, tmp_path)]
    assert problems == ["c.md: no such file", "b.md#nope: no heading #nope in b.md"]


def test_every_docs_page_is_reachable_from_the_readme() -> None:
    reached, todo = {README}, [README]
    while todo:
        page = todo.pop()
        for _, target in links(page):
            dest = (page.parent / target.partition("#")[0]).resolve()
            if dest.suffix == ".md" and dest.exists() and dest not in reached:
                reached.add(dest)
                todo.append(dest)
    assert sorted(p.name for p in PAGES if p not in reached) == []


def test_the_readme_is_a_front_page() -> None:
    assert len(README.read_text().splitlines()) <= 250


def commands_table(path: Path) -> list[str]:
    """Return the command names in the first column of the table under a page's "Commands" heading."""
    names, inside = [], False
    for _, line in prose(path):
        if line.startswith("#"):
            inside = bool(re.match(r"^#+ Commands$", line))
        match = re.match(r"^\| `([a-z-]+)[ `]", line)
        if inside and match:
            names.append(match.group(1))
    return names


def cli_commands() -> set[str]:
    """Return the job's command names, as its parser knows them."""
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return set(sub.choices)  # type: ignore[attr-defined]


def test_the_readme_names_only_commands_the_job_has() -> None:
    named = commands_table(README)
    assert len(named) >= 15
    assert sorted(set(named) - cli_commands()) == []


def cli_flags() -> set[str]:
    """Return every option the job's parser and its commands accept."""
    parser = build_parser()
    known = {o for a in parser._actions for o in a.option_strings}
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for command in sub.choices.values():  # type: ignore[attr-defined]
        known |= {o for a in command._actions for o in a.option_strings}
    return known


def job_flags(path: Path) -> set[str]:
    """Return the flags in a page's code spans that show the job's own command line."""
    commands = cli_commands() | {"migrate-job"}
    named: set[str] = set()
    for _, line in prose(path):
        for span in re.findall(r"`([^`]+)`", line):
            first = span.split()[0]
            if first in commands or first.startswith("--"):
                named |= set(re.findall(r"(?<![\w-])--[a-z][a-z-]+", span))
    return named


def test_the_readme_names_only_flags_the_job_has() -> None:
    named = job_flags(README)
    assert {"--service", "--jobs", "--check", "--scratch"} <= named
    assert sorted(named - cli_flags()) == []


def code_events() -> set[str]:
    """Return every event name the job's code spells as a string."""
    found: set[str] = set()
    for source in (REPO / "job").rglob("*.py"):
        found |= set(re.findall(r"\"([a-z_]+\.[a-z_]+)\"", source.read_text()))
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_the_docs_name_only_events_the_job_logs(page: Path) -> None:
    named = {m for _, line in prose(page) for m in EVENT.findall(line)}
    assert sorted(named - code_events()) == []
