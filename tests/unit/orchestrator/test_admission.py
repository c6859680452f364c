"""Admission control: the Gradient2 concurrency limit and shedding on arrival."""

from __future__ import annotations

import asyncio
import time

import pytest
from prometheus_client import REGISTRY

from cascade.settings import AdmissionSettings
from orchestrator.admission import Admission, GradientLimit, QueueWait

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
    assert a.shed_by_cause == {"queue": 0, "limit": 1, "budget": 0}


def test_sheds_a_call_with_less_than_min_budget_left() -> None:
    a = admission()
    assert a.admit(4.9) is None
    assert a.shed == 1 and a.in_flight == 0
    assert a.shed_by_cause == {"queue": 0, "limit": 0, "budget": 1}
    assert a.admit(5.0) is not None


def test_each_shed_is_counted_by_the_check_that_refused_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def exported(cause: str) -> float:
        value = REGISTRY.get_sample_value("cascade_admission_shed_total", {"cause": cause})
        return value or 0.0

    before = {cause: exported(cause) for cause in ("queue", "limit", "budget")}
    a = admission()
    monkeypatch.setattr(a.queue, "should_shed", lambda remaining_ms, now_s: remaining_ms < 30)
    assert a.admit(20.0) is None  # waited in a standing queue (and has too little left)
    assert a.admit(40.0) is not None and a.admit(40.0) is not None
    assert a.admit(40.0) is None  # the limit
    assert a.shed_by_cause == {"queue": 1, "limit": 1, "budget": 0}
    assert {c: exported(c) - before[c] for c in before} == {"queue": 1, "limit": 1, "budget": 0}


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


def arrivals(
    queue: QueueWait, remaining_ms: list[float], start_s: float, step_s: float
) -> list[bool]:
    """Feed arrivals ``step_s`` apart from ``start_s``; what ``should_shed`` said to each."""
    return [queue.should_shed(r, start_s + i * step_s) for i, r in enumerate(remaining_ms)]


def test_a_standing_queue_is_shed_from_the_next_interval_on() -> None:
    queue = QueueWait(target_ms=2.0, interval_ms=20.0)
    arrivals(queue, [45.0] * 10, 0.0, 0.001)  # fresh calls show the whole budget: the reference
    # Then every call of an interval shows 10 ms less: each waited about 10 ms.
    first = arrivals(queue, [35.0] * 10, 0.020, 0.002)
    assert not any(first) and not queue.dropping  # one interval is the evidence, not yet a verdict
    second = arrivals(queue, [35.0] * 5, 0.040, 0.002)
    assert queue.dropping and all(second)
    # A call that did not wait is never shed, even while dropping.
    assert queue.should_shed(45.0, 0.051) is False


def test_one_waiting_call_or_a_sparse_stream_is_no_standing_queue() -> None:
    queue = QueueWait(target_ms=2.0, interval_ms=20.0)
    arrivals(queue, [45.0] * 10, 0.0, 0.001)
    # Waiting calls mixed with fresh ones: the least-waiting of the interval did not wait.
    mixed = arrivals(queue, [35.0, 45.0] * 5, 0.020, 0.002)
    mixed += arrivals(queue, [35.0, 45.0] * 5, 0.040, 0.002)
    assert not any(mixed) and not queue.dropping
    # All waiting, but fewer than the arrivals needed in an interval to believe it.
    sparse = arrivals(queue, [30.0] * 12, 0.060, 0.010)
    assert not any(sparse) and not queue.dropping


def test_with_two_intervals_asked_a_queue_must_stand_in_two_in_a_row() -> None:
    queue = QueueWait(target_ms=2.0, interval_ms=10.0, intervals=2, min_arrivals=4)
    arrivals(queue, [45.0] * 10, 0.0, 0.001)  # the reference
    arrivals(queue, [35.0] * 5, 0.010, 0.002)  # one interval of waiting calls (a burst)
    burst_over = arrivals(queue, [45.0] * 5, 0.020, 0.002)  # then fresh ones: it drained
    assert not any(burst_over) and not queue.dropping
    arrivals(queue, [35.0] * 5, 0.030, 0.002)
    first = arrivals(queue, [35.0] * 5, 0.040, 0.002)  # the first interval in a row is judged
    assert not any(first) and not queue.dropping
    second = arrivals(queue, [35.0] * 5, 0.050, 0.002)  # the second one was too: shed
    assert queue.dropping and all(second)
    # Too few arrivals in an interval are no evidence.
    sparse = QueueWait(target_ms=2.0, interval_ms=10.0, intervals=1, min_arrivals=4)
    arrivals(sparse, [45.0] * 10, 0.0, 0.001)
    assert not any(arrivals(sparse, [35.0] * 6, 0.010, 0.004)) and not sparse.dropping


def test_the_queue_stops_shedding_once_an_interval_passes_without_one() -> None:
    queue = QueueWait(target_ms=2.0, interval_ms=20.0)
    arrivals(queue, [45.0] * 10, 0.0, 0.001)
    arrivals(queue, [35.0] * 10, 0.020, 0.002)
    assert all(arrivals(queue, [35.0] * 2, 0.040, 0.001)) and queue.dropping
    arrivals(queue, [45.0] * 10, 0.042, 0.001)  # the queue drained: fresh calls again
    assert queue.should_shed(35.0, 0.062) is False and not queue.dropping


@pytest.mark.wallclock
async def test_defer_pauses_whole_while_live_calls_are_about_and_not_otherwise() -> None:
    admission = Admission(AdmissionSettings())
    started = time.monotonic()
    await admission.defer(10.0, 0.05)  # no live call yet: at once
    assert time.monotonic() - started < 0.05  # not the 10 s pause
    ticket = admission.admit(40.0)
    assert ticket is not None
    pausing = asyncio.create_task(admission.defer(0.1, 0.05))
    await asyncio.sleep(0.01)
    admission.release(ticket)  # the live call ends: the pause goes on
    await asyncio.sleep(0.02)
    assert not pausing.done()
    async with asyncio.timeout(0.5):
        await pausing
    await asyncio.sleep(0.06)  # the last call was admitted longer ago than the window
    started = time.monotonic()
    await admission.defer(10.0, 0.05)
    assert time.monotonic() - started < 0.05
    assert admission.admit(40.0) is not None  # admitted, and finished, just now: still about
    started = time.monotonic()
    await admission.defer(0.02, 0.05)
    assert 0.019 <= time.monotonic() - started < 0.5
