"""The failed-run and failed-execution metrics and their alerts are checked offline, as the job YAMLs
are: a typo in a field, a status the job never writes, or an alert on another metric fails
``make image-check``."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from devtools import image_check

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def monitoring(tmp_path: Path) -> Path:
    """A copy of deploy/monitoring/ to break one file at a time; returns the checkout root."""
    shutil.copytree(REPO / "deploy" / "monitoring", tmp_path / "deploy" / "monitoring")
    return tmp_path


def edit(path: Path, old: str, new: str) -> None:
    """Replace text that must be there."""
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new))


def test_the_shipped_metric_and_alert_pass() -> None:
    assert image_check.monitoring_problems(REPO) == []


def test_the_metric_counts_failed_and_interrupted_summaries() -> None:
    metric, _ = image_check.metric_problems(REPO / image_check.METRIC_FILE)
    assert 'jsonPayload.event="run.summary"' in metric.filter
    assert {"failed", "interrupted"} <= image_check.run_statuses()


def test_a_status_the_job_never_writes_is_reported(monitoring: Path) -> None:
    edit(monitoring / image_check.METRIC_FILE, '"failed" OR "interrupted"', '"failure" OR "interrupted"')
    problems = image_check.monitoring_problems(monitoring)
    assert any("status 'failure', which run.summary never has" in p for p in problems)
    assert any('must select jsonPayload.status="failed"' in p for p in problems)


def test_a_misspelt_metric_field_names_the_field(monitoring: Path) -> None:
    edit(monitoring / image_check.METRIC_FILE, "labelExtractors:", "labelExtractor:")
    with pytest.raises(image_check.CheckFailed, match="labelExtractor: Extra inputs are not permitted"):
        image_check.monitoring_problems(monitoring)


def test_an_extractor_of_a_field_the_summary_lacks_is_reported(monitoring: Path) -> None:
    edit(
        monitoring / image_check.METRIC_FILE,
        "EXTRACT(jsonPayload.exit_code)",
        "EXTRACT(jsonPayload.exitCode)",
    )
    problems = image_check.monitoring_problems(monitoring)
    assert problems == [
        f"{image_check.METRIC_FILE}: label exit_code extracts jsonPayload.exitCode, "
        "which run.summary does not have"
    ]


def test_an_alert_on_another_metric_is_reported(monitoring: Path) -> None:
    edit(monitoring / image_check.ALERT_FILE, "user/migrate-job-failed-runs", "user/migrate-job-failures")
    problems = image_check.monitoring_problems(monitoring)
    assert len(problems) == 1
    assert "filter must have metric.type=" in problems[0]


def test_an_alert_that_waits_for_several_failures_is_reported(monitoring: Path) -> None:
    edit(monitoring / image_check.ALERT_FILE, "thresholdValue: 0", "thresholdValue: 3")
    problems = image_check.monitoring_problems(monitoring)
    assert any("must fire on one failed run" in p for p in problems)


def test_a_label_the_metric_does_not_have_is_reported(monitoring: Path) -> None:
    edit(monitoring / image_check.ALERT_FILE, "- metric.label.exit_code", "- metric.label.database")
    problems = image_check.monitoring_problems(monitoring)
    assert problems == [
        f"{image_check.ALERT_FILE}: metric.label.database names no label of the metric or of the "
        "cloud_run_job resource"
    ]


def test_missing_files_are_reported(tmp_path: Path) -> None:
    problems = image_check.monitoring_problems(tmp_path)
    assert len(problems) == 4  # the run and the execution metric, each with its alert
    assert all("operators would not be told" in p for p in problems)


def test_the_execution_metric_must_count_execution_summary_lines(tmp_path: Path) -> None:
    shipped = (REPO / image_check.EXECUTION_METRIC_FILE).read_text()
    metric = tmp_path / "metric.yaml"
    metric.write_text(
        shipped.replace('jsonPayload.event="execution.summary"', 'jsonPayload.event="run.summary"')
    )
    _, problems = image_check.metric_problems(metric, "execution.summary", image_check.EXECUTION_FIELDS)
    assert problems == ['filter must have jsonPayload.event="execution.summary"']
