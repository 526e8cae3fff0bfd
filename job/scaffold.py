"""A new service's folder, written from the blessed template that every shipped service follows."""

from __future__ import annotations

import re
import string
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

from job.errors import ConfigError

# Folder names as the shipped services have them: lower case, digits, inner hyphens.
NAME = re.compile(r"^[a-z][a-z0-9]*(?:-[a-z0-9]+)*$")
MAX_NAME = 40
# Files rendered with string.Template ($service, $database); the rest are copied verbatim
# (script.py.mako has ${...} of its own).
TEMPLATED = ".tmpl"


def template_root() -> Traversable:
    """Return the template folder shipped inside the job package."""
    return resources.files("job") / "templates" / "service"


def check_name(name: str) -> None:
    """Raise ConfigError unless name can be a service folder (and a database name derived from it)."""
    if len(name) > MAX_NAME or not NAME.fullmatch(name):
        raise ConfigError(
            f"{name!r} is not a valid service name",
            hint=f"use lower-case letters, digits and inner hyphens, at most {MAX_NAME} characters "
            "(like risk-engine)",
        )


def create_service(services_dir: Path, name: str) -> Path:
    """Write services_dir/name from the template and return its path; refuse an existing folder."""
    check_name(name)
    path = services_dir / name
    if path.exists():
        raise ConfigError(
            f"service folder {path} already exists; nothing was written",
            hint="choose another name, or add a revision to the existing service with migrate-job revision",
            service=name,
        )
    values = {"service": name, "database": name.replace("-", "_")}
    path.mkdir(parents=True)
    _copy(template_root(), path, values)
    versions = path / "migrations" / "versions"
    versions.mkdir(parents=True, exist_ok=True)
    (versions / ".gitkeep").touch()
    return path


def _copy(source: Traversable, destination: Path, values: dict[str, str]) -> None:
    """Copy a template folder, rendering ``*.tmpl`` files and dropping their suffix."""
    for item in source.iterdir():
        if item.name == "__pycache__":
            continue
        if item.is_dir():
            (destination / item.name).mkdir(exist_ok=True)
            _copy(item, destination / item.name, values)
        elif item.name.endswith(TEMPLATED):
            text = string.Template(item.read_text(encoding="utf-8")).substitute(values)
            (destination / item.name.removesuffix(TEMPLATED)).write_text(text, encoding="utf-8")
        else:
            (destination / item.name).write_bytes(item.read_bytes())
