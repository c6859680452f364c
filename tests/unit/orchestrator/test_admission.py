"""Admission control: the Gradient2 concurrency limit and shedding on arrival."""

from __future__ import annotations

import pytest

from cascade.settings import AdmissionSettings
from orchestrator.admission import Admission, GradientLimit

FAST_S = 0.001
SLOW_S = 0.050


def feed(limit: GradientLimit, rtt_s: float, n: int, *, in_flight: int | None = None) -> None:
    """``n`` finished calls of ``rtt_s``, at ``in_flight`` (default: the limit, fully used)."""
    for _ in range(n):
        limit.update(rtt_s, limit.limit if in_flight is None else in_flight)


def test_limit_grows_while_calls_are_fast_and_it_is_used() -> None:
    g = GradientLimit(initial=10, min_limit=4, max_limit=100)
    feed(g, FAST_S, 5)
    after_five = g.limit
    feed(g, FAST_S, 20)
    assert 10 < after_five < g.limit


def test_limit_shrinks_when_recent_calls_are_slower_than_tolerance_allows() -> None:
    g = GradientLimit(initial=50, min_limit=4, max_limit=100, tolerance=2.0)
    feed(g, FAST_S, 50)
    before = g.limit
    feed(g, SLOW_S, 10)
    assert g.limit < before
    assert g.recent_rtt_s > 2.0 * FAST_S


def test_slower_calls_within_tolerance_do_not_shrink_the_limit() -> None:
    g = GradientLimit(initial=50, min_limit=4, max_limit=1000, tolerance=2.0)
    feed(g, FAST_S, 200)
    before = g.limit
    feed(g, 1.5 * FAST_S, 10)  # 1.5x the long-run time: inside a tolerance of 2
    assert g.limit > before


def test_limit_stays_within_its_bounds() -> None:
    g = GradientLimit(initial=10, min_limit=8, max_limit=20)
    feed(g, FAST_S, 200)
    assert g.limit == 20
    # ever slower calls keep the gradient at its floor: the limit falls to, not below, min
    for i in range(200):
        g.update(FAST_S * 1.05**i, g.limit)
        assert 8 <= g.limit <= 20
    assert g.limit == 8


def test_limit_does_not_grow_while_less_than_half_of_it_is_in_flight() -> None:
    g = GradientLimit(initial=20, min_limit=4, max_limit=100)
    feed(g, FAST_S, 100, in_flight=9)
    assert g.limit == 20
    feed(g, FAST_S, 5)  # the same calls with the limit in use: it grows
    assert g.limit > 20


@pytest.mark.parametrize(
    ("initial", "min_limit", "max_limit"), [(3, 4, 10), (11, 4, 10), (4, 0, 10)]
)
def test_limit_rejects_unordered_bounds(initial: int, min_limit: int, max_limit: int) -> None:
    with pytest.raises(ValueError, match="min_limit"):
        GradientLimit(initial=initial, min_limit=min_limit, max_limit=max_limit)


def admission(**settings: object) -> Admission:
    fields: dict[str, object] = {"initial_limit": 2, "min_limit": 1, "min_budget_ms": 5.0}
    fields.update(settings)
    return Admission(AdmissionSettings.model_validate(fields))


def test_sheds_once_in_flight_reaches_the_limit() -> None:
    a = admission()
    tickets = [a.admit(40.0), a.admit(40.0)]
    assert all(t is not None for t in tickets)
    assert a.in_flight == 2
    assert a.admit(40.0) is None
    assert a.shed == 1 and a.in_flight == 2


def test_sheds_a_call_with_less_than_min_budget_left() -> None:
    a = admission()
    assert a.admit(4.9) is None
    assert a.shed == 1 and a.in_flight == 0
    assert a.admit(5.0) is not None


def test_disabled_admission_admits_everything() -> None:
    a = admission(enabled=False)
    tickets = [a.admit(40.0) for _ in range(10)] + [a.admit(0.0)]
    assert all(t is not None for t in tickets)
    assert a.shed == 0 and a.in_flight == 11


def test_release_frees_the_slot_for_the_next_call() -> None:
    a = admission()
    first, second = a.admit(40.0), a.admit(40.0)
    assert first is not None and second is not None
    assert a.admit(40.0) is None
    a.release(first)
    assert a.in_flight == 1
    assert a.admit(40.0) is not None
    assert a.in_flight == 2
