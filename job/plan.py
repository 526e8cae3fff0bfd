"""What would run: computed read-only from a database's current heads and the service's scripts.

The same ``Plan`` is shown by ``plan``, judged by ``plan --check`` and applied by ``upgrade``;
``downgrade`` and ``stamp`` plan the same way in their own direction.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from job.errors import ConfigError, HistoryError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from alembic.runtime.migration import MigrationStep

    from job.services import Service

# "revert" undoes exactly one revision, whatever other branches are applied (verify uses it).
Direction = Literal["up", "down", "stamp", "revert"]
# Targets Alembic resolves against the database's position, not to one revision of the scripts.
RELATIVE = re.compile(r"^(?:[+-]\d+|base|heads?)$")


@dataclass(frozen=True)
class Step:
    """One revision to apply, as shown to people."""

    revision: str
    message: str
    down_revision: tuple[str, ...]
    lands_at: str | None  # the revision the database is at once this step committed

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
    alembic_steps: tuple[MigrationStep, ...]
    direction: Direction = "up"

    @property
    def pending(self) -> bool:
        """Return True when there is anything to apply."""
        return bool(self.steps)

    @property
    def from_revision(self) -> str | None:
        """Return the current revision as one string (several heads joined with '+')."""
        return "+".join(self.current) or None


def compute_plan(
    service: Service, current: tuple[str, ...], target: str = "head", direction: Direction = "up"
) -> Plan:
    """Return the plan from current to target; raise HistoryError on an unknown history."""
    head = service.head()
    if direction == "up" and target == "head" and head is not None and current == (head,):
        # At head, the usual case: nothing to plan, and the scripts need not be loaded for it.
        return Plan(service.name, current, head, (), (), "up")
    _check_known(service, current)
    if direction == "up" and target == "head":
        return _plan(service, current, head, "up", HistoryError)
    destination = target if RELATIVE.match(target) else resolve_revision(service, target)
    return _plan(service, current, destination, direction, ConfigError)


# Databases at the same revision share one plan: a thousand tenants upgraded from empty hold one
# list of steps, not a thousand copies of it (a Plan is frozen, and Alembic only reads its steps).
@functools.lru_cache(maxsize=64)
def _plan(
    service: Service,
    current: tuple[str, ...],
    destination: str | None,
    direction: Direction,
    error: type[ConfigError] | type[HistoryError],
) -> Plan:
    """Return the plan Alembic computes for one direction; raise error if it cannot."""
    if destination is None:
        return Plan(service.name, current, None, (), (), direction)
    script = service.script
    try:
        if direction == "up":
            steps: tuple[MigrationStep, ...] = tuple(script._upgrade_revs(destination, current))  # type: ignore[arg-type]
        elif direction == "down":
            steps = tuple(script._downgrade_revs(destination, current))  # type: ignore[arg-type]
        elif direction == "revert":
            from alembic.runtime.migration import MigrationStep as AlembicStep

            reverted = script.get_revision(destination)
            assert reverted is not None
            steps = (AlembicStep.downgrade_from_script(script.revision_map, reverted),)
        else:
            steps = tuple(script._stamp_revs(destination, current))
    except Exception as exc:
        raise error(
            f"service {service.name}: cannot {direction_word(direction)} from "
            f"{'+'.join(current) or 'base'} to {destination}: {exc}",
            hint="pick a target that lies in that direction (migrate-job history shows the graph)",
            service=service.name,
            revision=destination,
        ) from exc
    shown = tuple(_step(s, direction) for s in steps)
    lands = shown[-1].lands_at if shown else "+".join(current) or None
    return Plan(service.name, current, lands, shown, steps, direction)


# The status word of a database (and the verb of a step) once a step of that direction committed.
DONE: dict[Direction, str] = {"up": "applied", "down": "reverted", "revert": "reverted", "stamp": "stamped"}


def stamps_forward(service: Service, plan: Plan) -> bool:
    """Return whether a stamp plan only moves forward, onto descendants of the current revisions.

    Backwards (towards base) drops a current revision from the new revisions' ancestry; sideways
    (onto another branch) adds a revision that descends from none of them. From base, any stamp
    is forward.
    """
    current = set(plan.current)
    final = set(current)
    for step in plan.steps:
        final -= set(step.down_revision)
        final |= set(step.lands_at.split("+")) if step.lands_at else set()
    ancestry = {head: _ancestry(service, head) for head in final}
    kept = current <= set().union(*ancestry.values())
    new_descend = all(not current or current & ancestry[head] for head in final - current)
    return kept and new_descend


def _ancestry(service: Service, revision: str) -> set[str]:
    """Return a revision and all its ancestors."""
    return {r.revision for r in service.script.iterate_revisions(revision, "base")}


def as_tuple(value: str | Sequence[str] | None) -> tuple[str, ...]:
    """Return a down_revision (None, one id or several) as a tuple."""
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


def direction_word(direction: Direction) -> str:
    """Return the verb for a direction."""
    return {"up": "upgrade", "down": "downgrade", "stamp": "stamp", "revert": "revert"}[direction]


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


def _step(step: MigrationStep, direction: Direction) -> Step:
    """Return the displayable form of an Alembic step."""
    if direction == "stamp":
        to = tuple(step.to_revisions)  # type: ignore[attr-defined]
        froms = tuple(step.from_revisions)  # type: ignore[attr-defined]
        return Step("+".join(to) or "base", "stamp", froms, "+".join(to) or None)
    script = step.revision  # type: ignore[attr-defined]
    down = script.down_revision
    downs = as_tuple(down)
    lands = script.revision if direction == "up" else "+".join(downs) or None
    return Step(script.revision, (script.doc or "").strip(), downs, lands)
