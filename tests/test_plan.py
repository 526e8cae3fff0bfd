"""The plan: what upgrade would apply, computed from a database's heads and a service's scripts."""

from __future__ import annotations

import pytest

from job.errors import ConfigError, HistoryError
from job.plan import compute_plan
from job.services import Service, discover
from tests.support import FIXTURES, HEADS, SERVICES_DIR

INITIAL = "c81a6c877761"


@pytest.fixture(scope="module")
def settlement() -> Service:
    """The shipped settlement service (two revisions)."""
    return discover(SERVICES_DIR)["settlement"]


def test_from_empty_database_plans_every_revision_in_order(settlement: Service) -> None:
    """An empty database gets the whole history, oldest first, with the messages people wrote."""
    plan = compute_plan(settlement, ())
    assert [s.revision for s in plan.steps] == [INITIAL, HEADS["settlement"]]
    assert [s.message for s in plan.steps] == ["initial migration", "add escrows table"]
    assert plan.steps[1].down_revision == (INITIAL,)
    assert plan.pending and plan.from_revision is None and plan.target == HEADS["settlement"]
    assert len(plan.alembic_steps) == 2, "the same plan object is what upgrade applies"


def test_partial_and_current_databases(settlement: Service) -> None:
    """A database part-way gets only the rest; one at head gets nothing."""
    assert [s.revision for s in compute_plan(settlement, (INITIAL,)).steps] == [HEADS["settlement"]]
    at_head = compute_plan(settlement, (HEADS["settlement"],))
    assert not at_head.pending and at_head.from_revision == HEADS["settlement"]


def test_explicit_target_stops_there(settlement: Service) -> None:
    """upgrade --to REV plans only up to REV."""
    plan = compute_plan(settlement, (), INITIAL)
    assert [s.revision for s in plan.steps] == [INITIAL] and plan.target == INITIAL


def test_unknown_revision_in_database_is_invalid_history(settlement: Service) -> None:
    """A database stamped by a newer image (or by hand) is exit 6, naming the revision and a way out."""
    with pytest.raises(HistoryError) as caught:
        compute_plan(settlement, ("feedfacecafe",))
    assert caught.value.revision == "feedfacecafe"
    assert "newer image" in (caught.value.hint or "")


def test_target_behind_the_database_plans_nothing(settlement: Service) -> None:
    """As with Alembic, upgrading to a revision the database is past applies nothing (no downgrade)."""
    plan = compute_plan(settlement, (HEADS["settlement"],), INITIAL)
    assert not plan.pending and plan.from_revision == HEADS["settlement"]


def test_unknown_target_is_a_usage_error(settlement: Service) -> None:
    """A --to that names no revision is exit 2 (the operator's typo), not a history problem."""
    with pytest.raises(ConfigError) as caught:
        compute_plan(settlement, (), "nosuchrevision")
    assert "nosuchrevision" in caught.value.message


def test_short_revision_prefix_is_accepted(settlement: Service) -> None:
    """Like Alembic, a unique prefix of a revision id is enough for --to."""
    assert compute_plan(settlement, (), INITIAL[:4]).target == INITIAL


def test_fixture_service_plans_like_a_shipped_one() -> None:
    """A services directory other than the shipped one (MIGRATE_SERVICES_DIR) plans the same way."""
    broken = discover(FIXTURES / "services")["broken"]
    assert [s.revision for s in compute_plan(broken, ()).steps] == ["aaaa00000001", "aaaa00000002"]
