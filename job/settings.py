"""Settings from the environment (prefix ``MIGRATE_``) and what Cloud Run tells the job about itself."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

# The services/ tree shipped next to the job package (in the repo and in the image).
BUNDLED_SERVICES_DIR = Path(__file__).resolve().parent.parent / "services"
BUNDLED_ENVIRONMENTS_DIR = Path(__file__).resolve().parent.parent / "deploy" / "environments"


class Settings(BaseSettings):
    """The job's settings; every field is read from ``MIGRATE_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="MIGRATE_", extra="ignore")

    env: str = Field(default="local", pattern=r"^[A-Za-z0-9_.-]+$")
    manifest: Path | None = None
    services_dir: Path = BUNDLED_SERVICES_DIR
    socket_dir: Path | None = None
    secret_manager_endpoint: str | None = None
    log_format: Literal["json", "text", "auto"] = "auto"
    lock_wait_s: float = Field(default=300.0, ge=0)
    connect_timeout_s: float = Field(default=60.0, gt=0)
    # A run with work for several databases logs run.progress this often (0: never).
    progress_s: float = Field(default=10.0, ge=0)
    # Cloud Run does not tell a container which image it runs: the job definition and the image say.
    image: str | None = None
    image_revision: str | None = None

    def manifest_path(self) -> Path:
        """Return the manifest file: MIGRATE_MANIFEST, else deploy/environments/<env>.toml."""
        if self.manifest is not None:
            return self.manifest
        return BUNDLED_ENVIRONMENTS_DIR / f"{self.env}.toml"


class CloudRun(BaseSettings):
    """The execution and task Cloud Run sets for a job's container; empty when run elsewhere."""

    model_config = SettingsConfigDict(env_prefix="CLOUD_RUN_", extra="ignore")

    job: str | None = None
    execution: str | None = None
    task_index: int = 0
    task_count: int = 1
    task_attempt: int = 0

    def fields(self) -> dict[str, str | int]:
        """Return the execution context to attach to every log line."""
        if self.execution is None and self.job is None:
            return {}
        return {
            "job": self.job or "",
            "execution": self.execution or "",
            "task_index": self.task_index,
            "task_attempt": self.task_attempt,
        }

    def application_name(self) -> str:
        """Return the PostgreSQL application_name that identifies this execution and task."""
        if not self.execution:
            return "migrate-job"
        # PostgreSQL keeps 63 bytes: shorten the execution name, never the task index.
        suffix = f":{self.task_index}"
        return "migrate-job:" + self.execution[: 63 - len("migrate-job:") - len(suffix)] + suffix
