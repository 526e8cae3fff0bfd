"""Tests for job/settings.py: MIGRATE_* settings and what Cloud Run tells the job about itself."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from job.settings import CloudRun, Settings
from tests.support import REPO, SERVICES_DIR

ENVIRONMENTS = REPO / "deploy" / "environments"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Start each test as a fresh container would: no MIGRATE_* and no CLOUD_RUN_* variables."""
    for name in list(os.environ):
        if name.startswith(("MIGRATE_", "CLOUD_RUN_")):
            monkeypatch.delenv(name)


def test_defaults() -> None:
    """With nothing set the job migrates the local environment with the services it ships."""
    settings = Settings()

    assert settings.env == "local"
    assert settings.manifest is None
    assert settings.services_dir == SERVICES_DIR
    assert settings.socket_dir is None
    assert settings.secret_manager_endpoint is None
    assert settings.log_format == "auto"
    assert settings.lock_wait_s == 300
    assert settings.connect_timeout_s == 60
    assert settings.manifest_path() == ENVIRONMENTS / "local.toml"


def test_defaults_do_not_depend_on_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cloud Run may start the job from any directory; the bundled paths are absolute."""
    monkeypatch.chdir(tmp_path)

    settings = Settings()

    assert settings.services_dir == SERVICES_DIR
    assert settings.manifest_path() == ENVIRONMENTS / "local.toml"
    assert settings.manifest_path().is_absolute()


def test_environment_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every documented MIGRATE_* variable reaches its setting, typed."""
    monkeypatch.setenv("MIGRATE_ENV", "prod")
    monkeypatch.setenv("MIGRATE_SERVICES_DIR", "/srv/services")
    monkeypatch.setenv("MIGRATE_SOCKET_DIR", "/tmp/cloudsql")
    monkeypatch.setenv("MIGRATE_SECRET_MANAGER_ENDPOINT", "http://127.0.0.1:8085")
    monkeypatch.setenv("MIGRATE_LOG_FORMAT", "text")
    monkeypatch.setenv("MIGRATE_LOCK_WAIT_S", "12.5")
    monkeypatch.setenv("MIGRATE_CONNECT_TIMEOUT_S", "3")

    settings = Settings()

    assert settings.env == "prod"
    assert settings.services_dir == Path("/srv/services")
    assert settings.socket_dir == Path("/tmp/cloudsql")
    assert settings.secret_manager_endpoint == "http://127.0.0.1:8085"
    assert settings.log_format == "text"
    assert settings.lock_wait_s == 12.5
    assert settings.connect_timeout_s == 3.0


def test_unprefixed_variables_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    """A container's unrelated ENV or LOG_FORMAT must not change what the job migrates."""
    monkeypatch.setenv("ENV", "prod")
    monkeypatch.setenv("LOG_FORMAT", "text")

    settings = Settings()

    assert settings.env == "local"
    assert settings.log_format == "auto"


@pytest.mark.parametrize("env", ["dev", "prod", "local"])
def test_manifest_path_for_an_environment(env: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """MIGRATE_ENV picks deploy/environments/<env>.toml shipped with the job."""
    monkeypatch.setenv("MIGRATE_ENV", env)

    assert Settings().manifest_path() == ENVIRONMENTS / f"{env}.toml"


def test_manifest_wins_over_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole manifest given by path is used as is, whatever MIGRATE_ENV says."""
    path = tmp_path / "custom.toml"
    monkeypatch.setenv("MIGRATE_ENV", "prod")
    monkeypatch.setenv("MIGRATE_MANIFEST", str(path))

    settings = Settings()

    assert settings.manifest_path() == path
    assert settings.env == "prod"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("MIGRATE_LOG_FORMAT", "xml"),
        ("MIGRATE_ENV", "../../etc/passwd"),  # must not escape deploy/environments/
        ("MIGRATE_LOCK_WAIT_S", "-1"),
        ("MIGRATE_CONNECT_TIMEOUT_S", "0"),
        ("MIGRATE_CONNECT_TIMEOUT_S", "soon"),
    ],
)
def test_invalid_values_are_refused(name: str, value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bad setting fails at start (the CLI turns it into exit 2) instead of being half-applied."""
    monkeypatch.setenv(name, value)

    with pytest.raises(ValidationError):
        Settings()


def test_cloud_run_context(monkeypatch: pytest.MonkeyPatch) -> None:
    """The execution and task Cloud Run sets go on every log line and into application_name."""
    monkeypatch.setenv("CLOUD_RUN_JOB", "migrate-job")
    monkeypatch.setenv("CLOUD_RUN_EXECUTION", "migrate-job-abc12")
    monkeypatch.setenv("CLOUD_RUN_TASK_INDEX", "3")
    monkeypatch.setenv("CLOUD_RUN_TASK_COUNT", "4")
    monkeypatch.setenv("CLOUD_RUN_TASK_ATTEMPT", "1")

    cloud_run = CloudRun()

    assert cloud_run.task_count == 4
    assert cloud_run.fields() == {
        "job": "migrate-job",
        "execution": "migrate-job-abc12",
        "task_index": 3,
        "task_attempt": 1,
    }
    assert cloud_run.application_name() == "migrate-job:migrate-job-abc12:3"


def test_application_name_fits_postgresql(monkeypatch: pytest.MonkeyPatch) -> None:
    """PostgreSQL truncates application_name past 63 bytes; the job keeps within it itself."""
    monkeypatch.setenv("CLOUD_RUN_JOB", "j" * 63)
    monkeypatch.setenv("CLOUD_RUN_EXECUTION", "j" * 63 + "-abc12")
    monkeypatch.setenv("CLOUD_RUN_TASK_INDEX", "9999")

    name = CloudRun().application_name()

    assert len(name.encode("utf-8")) <= 63
    assert name.startswith("migrate-job:jjj")


def test_outside_cloud_run() -> None:
    """Run locally, there is no execution to report: no empty fields on every line."""
    cloud_run = CloudRun()

    assert cloud_run.fields() == {}
    assert cloud_run.application_name() == "migrate-job"
    assert (cloud_run.task_index, cloud_run.task_count, cloud_run.task_attempt) == (0, 1, 0)
