"""Budget arithmetic and the routing/decision rules."""

from __future__ import annotations

import time

import pytest

from cascade.model_registry import Policy
from cascade.settings import BudgetSettings
from orchestrator.budget import Budget
from orchestrator.codec import timings_to_proto
from orchestrator.results import Timings
from orchestrator.routing import Decision, Route, decide, route

POLICY = Policy(
    version="p-test",
    escalate_low=0.3,
    escalate_high=0.7,
    review_threshold=0.5,
    decline_threshold=0.8,
)


def test_budget_is_slo_minus_margin_without_caller_deadline() -> None:
    budget = Budget.start(None, BudgetSettings(slo_ms=50, response_margin_ms=2))
    assert budget.total_ms == pytest.approx(48)
    assert 47 < budget.remaining_ms() <= 48


def test_shorter_caller_deadline_wins() -> None:
    budget = Budget.start(0.010, BudgetSettings(slo_ms=50, response_margin_ms=2))
    assert budget.total_ms == pytest.approx(8)


def test_expired_caller_deadline_gives_zero_budget() -> None:
    budget = Budget.start(0.001, BudgetSettings(slo_ms=50, response_margin_ms=2))
    assert budget.total_ms == 0
    assert budget.remaining_ms() == 0
    assert budget.allot_s(10) == 0


def test_timings_carry_what_the_caller_had_left() -> None:
    # A caller with 30 ms left (the SLO is longer) and one without a deadline.
    with_deadline = Timings.of(Budget.start(0.030, BudgetSettings(slo_ms=50, response_margin_ms=2)))
    assert (with_deadline.budget_us, with_deadline.deadline_left_us) == (28_000, 30_000)
    without = Timings.of(Budget.start(None, BudgetSettings(slo_ms=50, response_margin_ms=2)))
    assert (without.budget_us, without.deadline_left_us) == (48_000, 0)
    # An expired deadline still reads as one (1 us left), not as none.
    expired = Timings.of(Budget.start(0.0, BudgetSettings(slo_ms=50, response_margin_ms=2)))
    assert (expired.budget_us, expired.deadline_left_us) == (0, 1)
    assert timings_to_proto(with_deadline).deadline_left_us == 30_000


def test_allot_caps_and_keeps_a_margin() -> None:
    budget = Budget(deadline_s=time.monotonic() + 0.020, total_ms=20)
    assert budget.allot_s(5) == pytest.approx(0.005)
    assert budget.allot_s(float("inf"), keep_ms=5) == pytest.approx(0.015, abs=0.001)


def test_a_capped_stage_gets_the_rest_of_the_budget_as_its_grace() -> None:
    budget = Budget(deadline_s=time.monotonic() + 0.020, total_ms=20)
    timeout_s, grace_s = budget.capped_s(5)
    assert timeout_s == pytest.approx(0.005)
    assert timeout_s + grace_s == pytest.approx(0.020, abs=0.001)
    timeout_s, grace_s = budget.capped_s(50)  # the budget is the cap: nothing past it
    assert timeout_s == pytest.approx(0.020, abs=0.001)
    assert grace_s == 0
    expired = Budget(deadline_s=time.monotonic() - 1.0, total_ms=20)
    assert expired.capped_s(5) == (0.0, 0.0)


def test_margin_must_fit_in_slo() -> None:
    with pytest.raises(ValueError, match="response_margin_ms"):
        BudgetSettings(slo_ms=5, response_margin_ms=5)


@pytest.mark.parametrize(
    ("score", "remaining_ms", "expected"),
    [
        (0.1, 40, Route.ANSWER),
        (0.3, 40, Route.ESCALATE),
        (0.69, 40, Route.ESCALATE),
        (0.7, 40, Route.ANSWER),
        (0.5, 2, Route.NO_TIME),
    ],
)
def test_route(score: float, remaining_ms: float, expected: Route) -> None:
    assert route(score, POLICY, remaining_ms, stage2_min_ms=3) is expected


@pytest.mark.parametrize(
    ("score", "expected"),
    [
        (0.1, Decision.APPROVE),
        (0.5, Decision.REVIEW),
        (0.79, Decision.REVIEW),
        (0.8, Decision.DECLINE),
    ],
)
def test_decide(score: float, expected: Decision) -> None:
    assert decide(score, POLICY) is expected
