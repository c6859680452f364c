"""Circuit breakers: the trip rule, open -> half-open -> closed, and the scorer skipping what is
open (in-memory twins, a fake clock)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import numpy as np
import pytest

from cascade.errors import Dependency, DependencyOverloaded, DependencyUnavailable
from cascade.settings import BreakerSettings
from orchestrator.breaker import BreakerState, CircuitBreaker, DependencyBreakers
from orchestrator.heavy_client import InMemoryHeavyScorer
from orchestrator.online_store import InMemoryOnlineStore
from orchestrator.results import DecidedBy, Reason
from orchestrator.scoring import CascadeScorer
from orchestrator.screening_client import InMemoryScreener
from tests.conftest import make_transaction
from tests.unit.orchestrator.test_scoring import budget, scorer_with

SETTINGS_B = BreakerSettings(window=10, min_calls=5, failure_ratio=0.8, open_s=0.1, max_open_s=0.4)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def state(b: CircuitBreaker) -> BreakerState:
    """The state, read through a call (mypy would narrow the attribute across calls)."""
    return b.state


def breaker(clock: Clock, settings: BreakerSettings = SETTINGS_B) -> CircuitBreaker:
    return CircuitBreaker(Dependency.HEAVY, settings, clock=clock)


def test_trips_once_the_failure_ratio_is_reached_with_enough_calls() -> None:
    clock = Clock()
    b = breaker(clock)
    for _ in range(4):  # 4 failures: below min_calls
        assert b.allow()
        b.record(True)
    assert state(b) is BreakerState.CLOSED
    b.record(True)  # 5 of 5 failed
    assert state(b) is BreakerState.OPEN
    assert not b.allow()


def test_half_the_calls_failing_does_not_trip() -> None:
    # One of two screening workers stalled: every other call fails. That is hedging's problem;
    # a breaker that opened here would turn half the answers into all of them.
    clock = Clock()
    b = breaker(clock)
    for i in range(200):
        assert b.allow()
        b.record(i % 2 == 0)
        clock.now += 0.01
    assert state(b) is BreakerState.CLOSED


def test_old_outcomes_leave_the_window() -> None:
    clock = Clock()
    b = breaker(clock, BreakerSettings(window=10, min_calls=5, failure_ratio=0.8, window_s=1.0))
    for _ in range(4):
        b.record(True)
    clock.now += 2.0  # those four are stale now
    b.record(True)
    assert state(b) is BreakerState.CLOSED


def test_open_lets_one_probe_through_then_closes_on_success() -> None:
    clock = Clock()
    b = breaker(clock)
    for _ in range(5):
        b.record(True)
    assert not b.allow()
    clock.now += 0.099
    assert not b.allow()  # still inside open_s
    clock.now += 0.002
    assert b.allow()  # the probe
    assert state(b) is BreakerState.HALF_OPEN
    assert not b.allow()  # only one probe at a time
    b.record(False)
    assert state(b) is BreakerState.CLOSED
    assert b.allow() and b.allow()


def test_failed_probe_reopens_for_longer_up_to_the_cap() -> None:
    clock = Clock()
    b = breaker(clock)
    for _ in range(5):
        b.record(True)
    waits = []
    for _ in range(4):
        opened = clock.now
        while not b.allow():
            clock.now += 0.01
        waits.append(round(clock.now - opened, 2))
        b.record(True)  # the probe failed
    assert waits == [0.1, 0.2, 0.4, 0.4]


def test_late_outcome_of_a_call_from_before_the_trip_is_ignored() -> None:
    clock = Clock()
    b = breaker(clock)
    for _ in range(5):
        b.record(True)
    b.record(False)  # a call started while closed, answering now: not a probe
    assert state(b) is BreakerState.OPEN


def test_released_probe_slot_can_be_taken_again() -> None:
    clock = Clock()
    b = breaker(clock)
    for _ in range(5):
        b.record(True)
    clock.now += 0.2
    assert b.allow()
    b.release()  # shed or cancelled: no verdict
    assert state(b) is BreakerState.HALF_OPEN
    assert b.allow()


def test_disabled_breaker_never_opens() -> None:
    clock = Clock()
    b = breaker(clock, BreakerSettings(enabled=False))
    for _ in range(100):
        assert b.allow()
        b.record(True)
    assert state(b) is BreakerState.CLOSED


def test_settings_refuse_inconsistent_values() -> None:
    with pytest.raises(ValueError, match="open_s"):
        BreakerSettings(open_s=2.0, max_open_s=1.0)
    with pytest.raises(ValueError, match="min_calls"):
        BreakerSettings(window=5, min_calls=6)


Parts = tuple[CascadeScorer, InMemoryOnlineStore, InMemoryScreener, InMemoryHeavyScorer, Clock]


@pytest.fixture
async def parts() -> AsyncIterator[Parts]:
    clock = Clock()
    breakers = DependencyBreakers(SETTINGS_B, clock=clock)
    async with scorer_with(stage1=0.5, breakers=breakers) as c:  # 0.5: in the band, escalates
        yield c.scorer, c.store, c.screener, c.heavy, clock


async def test_open_stage2_breaker_answers_stage1_without_asking(
    parts: Parts,
) -> None:
    scorer, _, _, heavy, clock = parts
    heavy.failure = DependencyUnavailable(Dependency.HEAVY, "refused")
    for _ in range(5):
        result = await scorer.score(make_transaction(), budget())
        assert result.reasons == [Reason.STAGE2_UNAVAILABLE]
    assert heavy.calls == 5 and state(scorer.breakers.stage2) is BreakerState.OPEN
    result = await scorer.score(make_transaction(), budget())
    assert heavy.calls == 5  # not asked
    assert result.reasons == [Reason.STAGE2_UNAVAILABLE]
    assert result.decided_by is DecidedBy.STAGE1 and result.score == pytest.approx(0.5)
    heavy.failure = None  # back
    clock.now += SETTINGS_B.open_s + 0.001
    result = await scorer.score(make_transaction(), budget())
    assert heavy.calls == 6 and result.decided_by is DecidedBy.STAGE2 and not result.degraded
    assert state(scorer.breakers.stage2) is BreakerState.CLOSED


async def test_open_stage1_breaker_gives_the_labelled_default_at_once(
    parts: Parts,
) -> None:
    scorer, _, screener, _, _ = parts
    screener.delay_s = 1.0  # every call times out at its stage-1 cap
    for _ in range(5):
        result = await scorer.score(make_transaction(), budget())
        assert result.reasons == [Reason.STAGE1_TIMEOUT]
    result = await scorer.score(make_transaction(), budget())
    assert screener.calls == 5
    assert result.reasons == [Reason.STAGE1_UNAVAILABLE]
    assert result.decided_by is DecidedBy.DEFAULT
    assert result.timings.stage1_us == 0  # nothing was waited for


async def test_open_redis_breaker_scores_without_the_store(
    parts: Parts,
) -> None:
    scorer, store, _, _, clock = parts
    store.failure = DependencyUnavailable(Dependency.REDIS, "refused")
    for _ in range(5):
        await scorer.score(make_transaction(), budget())
    lookups = store.lookups
    result = await scorer.score(make_transaction(), budget())
    assert store.lookups == lookups
    assert Reason.CACHE_UNAVAILABLE in result.reasons
    store.failure = None
    clock.now += SETTINGS_B.open_s + 0.001
    result = await scorer.score(make_transaction(), budget())
    assert not result.degraded and state(scorer.breakers.redis) is BreakerState.CLOSED


async def test_shedding_is_not_counted_against_a_dependency(
    parts: Parts,
) -> None:
    scorer, _, _, heavy, _ = parts
    heavy.failure = DependencyOverloaded(Dependency.HEAVY, "queue full")
    for _ in range(20):
        result = await scorer.score(make_transaction(), budget())
        assert result.reasons == [Reason.STAGE2_OVERLOADED]
    assert heavy.calls == 20 and state(scorer.breakers.stage2) is BreakerState.CLOSED


def test_open_ones_names_what_is_not_closed() -> None:
    clock = Clock()
    breakers = DependencyBreakers(SETTINGS_B, clock=clock)
    assert breakers.open_ones() == {}
    for _ in range(5):
        breakers.stage1.record(True)
    assert breakers.open_ones() == {"cascade.breaker.screening": "open"}
    assert np.isfinite(SETTINGS_B.open_s)
