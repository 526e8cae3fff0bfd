"""What would run: computed read-only from a database's current heads and the service's scripts.

The same ``Plan`` is shown by ``plan``, judged by ``plan --check`` and applied by ``upgrade``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from job.errors import ConfigError, HistoryError

if TYPE_CHECKING:
    from alembic.runtime.migration import RevisionStep

    from job.services import Service


@dataclass(frozen=True)
class Step:
    """One revision to apply, as shown to people."""

    revision: str
    message: str
    down_revision: tuple[str, ...]

    def fields(self) -> dict[str, Any]:
        """Return the step as a log field."""
        return {"revision": self.revision, "message": self.message}


@dataclass(frozen=True)
class Plan:
    """The revisions that take one database from its current heads to the target."""

    service: str
    current: tuple[str, ...]
    target: str | None
    steps: tuple[Step, ...]
    alembic_steps: tuple[RevisionStep, ...]

    @property
    def pending(self) -> bool:
        """Return True when there is anything to apply."""
        return bool(self.steps)

    @property
    def from_revision(self) -> str | None:
        """Return the current revision as one string (several heads joined with '+')."""
        return "+".join(self.current) or None


def compute_plan(service: Service, current: tuple[str, ...], target: str = "head") -> Plan:
    """Return the upgrade plan from current to target; raise HistoryError on an unknown history."""
    script = service.script
    head = service.head()
    _check_known(service, current)
    destination = head if target == "head" else resolve_revision(service, target)
    if destination is None:
        return Plan(service.name, current, None, (), ())
    try:
        steps = tuple(script._upgrade_revs(destination, current))  # type: ignore[arg-type]
    except Exception as exc:
        raise HistoryError(
            f"service {service.name}: cannot plan from {'+'.join(current) or 'base'} to {destination}: {exc}",
            hint="pick a target that is ahead of the database (migrate-job history)",
            service=service.name,
            revision=destination,
        ) from exc
    return Plan(service.name, current, destination, tuple(_step(s) for s in steps), steps)


def resolve_revision(service: Service, target: str) -> str:
    """Return the full revision id a --to value names; raise ConfigError if it names none."""
    try:
        found = service.script.get_revision(target)
    except Exception:
        found = None
    if found is None:
        raise ConfigError(
            f"--to {target}: service {service.name} has no such revision",
            hint="list the revisions with migrate-job history, or use head",
            service=service.name,
        )
    return found.revision


def _check_known(service: Service, current: tuple[str, ...]) -> None:
    """Raise HistoryError when the database is at a revision this image does not ship."""
    for revision in current:
        try:
            known = service.script.get_revision(revision)
        except Exception:
            known = None
        if known is None:
            raise HistoryError(
                f"database is at revision {revision}, which service {service.name} "
                "does not know in this image",
                hint="a newer image migrated it (deploy that image or newer), or it was stamped "
                "by hand (migrate-job stamp)",
                service=service.name,
                revision=revision,
                unknown_revision=True,
            )


def _step(step: RevisionStep) -> Step:
    """Return the displayable form of an Alembic step."""
    script = step.revision
    down = script.down_revision
    downs = (down,) if isinstance(down, str) else tuple(down or ())
    return Step(script.revision, (script.doc or "").strip(), downs)
