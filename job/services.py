"""Services shipped with the job: each folder under the services directory with an alembic.ini."""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from functools import cache, cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from job.errors import ConfigError, HistoryError
from job.revisions import Index, read_index

if TYPE_CHECKING:
    from alembic.config import Config
    from alembic.script import ScriptDirectory


@dataclass(eq=False)
class Service:
    """One service's Alembic project; its script directory is loaded once and reused."""

    name: str
    path: Path
    _loading: Any = field(default=None, init=False, repr=False)

    @property
    def ini(self) -> Path:
        """Return the service's alembic.ini."""
        return self.path / "alembic.ini"

    def config(self) -> Config:
        """Return a fresh Alembic Config (its attributes carry one run's live objects)."""
        return _job_config()(str(self.ini))

    @cached_property
    def script(self) -> ScriptDirectory:
        """Return the service's script directory, loaded once per process."""
        from alembic.script import ScriptDirectory

        try:
            return ScriptDirectory.from_config(self.config())
        except Exception as exc:
            raise ConfigError(
                f"service {self.name}: cannot load its Alembic scripts from {self.ini}: {exc}",
                service=self.name,
            ) from exc

    @cached_property
    def index(self) -> Index | None:
        """Return the history read from the files' text (job.revisions), or None where only Alembic can."""
        return read_index(self.ini)

    @cached_property
    def env_is_blessed(self) -> bool:
        """Return whether the service ships the blessed env.py (the version table is Alembic's default).

        Read once per run: the preflight asks for every database of the service.
        """
        return self.index is not None and self.index.blessed_env()

    async def load_script(self) -> None:
        """Load the scripts (Alembic, every revision file) in a thread, once, if not loaded yet.

        Called by the preflight when a database has work: the event loop goes on reading the other
        databases while the thread works, instead of stopping for the whole load (about 0.3 s).
        """
        if "script" in self.__dict__:
            return
        if self._loading is None or self._loading.get_loop() is not asyncio.get_running_loop():
            self._loading = asyncio.ensure_future(asyncio.to_thread(lambda: self.script))
        await asyncio.shield(self._loading)

    def knows(self, revision: str) -> bool:
        """Return whether a revision id is in the service's scripts."""
        try:
            return self.script.get_revision(revision) is not None
        except Exception:
            return False

    def head(self) -> str | None:
        """Return the single head revision (None for an empty history); raise HistoryError if many."""
        try:
            # The index when it reads this history exactly: a run at head then never loads Alembic.
            heads = list(self.index.heads) if self.index is not None else self.script.get_heads()
        except ConfigError:
            raise
        except Exception as exc:
            raise HistoryError(
                f"service {self.name}: its revision files do not form a valid history: "
                f"{type(exc).__name__}: {exc}",
                hint="fix the revision files (alembic history shows the graph)",
                service=self.name,
            ) from exc
        if len(heads) > 1:
            raise HistoryError(
                f"service {self.name} has {len(heads)} heads: {', '.join(sorted(heads))}",
                hint=f"add a merge revision: migrate-job merge --service {self.name} -m 'merge'",
                service=self.name,
            )
        return heads[0] if heads else None


def discover(services_dir: Path) -> dict[str, Service]:
    """Return every service under services_dir, by name, in name order."""
    if not services_dir.is_dir():
        raise ConfigError(
            f"services directory {services_dir} does not exist",
            hint="set MIGRATE_SERVICES_DIR to the folder that holds <service>/alembic.ini",
        )
    return {
        child.name: Service(child.name, child)
        for child in sorted(services_dir.iterdir())
        if (child / "alembic.ini").is_file()
    }


def escaped_url(name: str, value: str) -> str:
    """Return an option as ConfigParser must hold it: a URL's ``%`` doubled, unless already done.

    A percent-encoded URL never holds ``%%`` or ``%(``: one without either is raw (an env.py that
    calls ``set_main_option("sqlalchemy.url", os.environ["DATABASE_URL"])``), one with them is
    already escaped or uses interpolation on purpose.
    """
    if name == "sqlalchemy.url" and "%%" not in value and "%(" not in value:
        return value.replace("%", "%%")
    return value


@cache
def _job_config() -> type[Config]:
    """Return Alembic's Config as the job hands it to env.py (built on first use: alembic loads lazily)."""
    from alembic.config import Config

    class JobConfig(Config):
        """Alembic's Config, where a URL env.py sets without doubling ``%`` still parses.

        Plain Alembic raises ``invalid interpolation syntax`` for such a value (any URL-quoted
        password holds ``%``); only the job's runs get this leniency, ``alembic`` itself is unchanged.
        """

        def set_section_option(self, section: str, name: str, value: str) -> None:
            """Set an option, doubling a raw URL's ``%`` (set_main_option comes here too)."""
            super().set_section_option(section, name, escaped_url(name, value))

    return JobConfig


def outside_transaction(service: Service, revision: str) -> str | None:
    """Return how the revision runs statements outside its transaction, if it does.

    ``autocommit_block`` (its own, which a rerun may trip over), ``job.ops`` (helpers that are
    safe to run again), or None.
    """
    script = service.script.get_revision(revision)
    data = revision_file(script.path) if script is not None else None
    if data is None:
        return None
    text = data.decode("utf-8", errors="replace")
    if "autocommit_block" in text:
        return "autocommit_block"
    if "job.ops" in text or "from job import ops" in text:
        return "job.ops"
    return None


def revision_file(path: str | Path) -> bytes | None:
    """Return a revision file's bytes, read once per version of the file; None if unreadable.

    A fleet run asks about the same files once per database (checksums, transaction handling).
    """
    try:
        stat = os.stat(path)
        key = (str(path), stat.st_mtime_ns, stat.st_size)
        if key not in _files:
            _files[key] = Path(path).read_bytes()
    except OSError:
        return None
    return _files[key]


_files: dict[tuple[str, int, int], bytes] = {}
