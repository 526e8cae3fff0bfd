"""devtools.review: the pull-request checks (lint, check, verify, trace) on one server, every check run."""

from __future__ import annotations

import shutil
from pathlib import Path

from devtools import review
from devtools.pgserver import PgServer
from tests.support import FIXTURES, SERVICES_DIR, record_output


def test_every_check_runs_and_the_first_failure_is_the_outcome(pg: PgServer, tmp_path: Path) -> None:
    services = tmp_path / "services"
    shutil.copytree(SERVICES_DIR / "risk-engine", services / "risk-engine")
    assert 'service = "risk-engine"' in review.manifest(services)
    clean = review.run_checks(tmp_path / "clean", pg.scratch_url(), services)
    assert clean == 0
    assert (tmp_path / "clean" / "exit_code").read_text() == "0\n"
    assert "### `9da4646821fb` create escrows" in (tmp_path / "clean" / "trace.md").read_text()
    # A service whose revisions rewrite and scan under locks: trace fails (9), and so may lint;
    # every check still ran, and trace.md is there for the pull request.
    shutil.copytree(FIXTURES / "trace" / "locks", services / "locks")
    failed = review.run_checks(tmp_path / "failed", pg.scratch_url(), services)
    logs = {name: (tmp_path / "failed" / f"{name}.log").read_text() for name, _ in review.CHECKS}
    record_output("".join(logs.values()))
    assert failed != 0 and (tmp_path / "failed" / "exit_code").read_text() == f"{failed}\n"
    assert "trace.finding" in logs["trace"] and "table-rewrite" in logs["trace"]
    assert "**table-rewrite**" in (tmp_path / "failed" / "trace.md").read_text()
