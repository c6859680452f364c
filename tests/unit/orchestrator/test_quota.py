"""Per-caller quotas on a fake clock: the token bucket's refill and the concurrency cap."""

from __future__ import annotations

import pytest

from cascade.errors import QuotaExceededError
from cascade.settings import CallerLimits
from orchestrator.quota import CONCURRENCY_RETRY_S, CallerQuota, TokenBucket


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_bucket_spends_its_burst_then_refills_at_its_rate() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate_per_s=4.0, burst=3.0, clock=clock)
    assert [bucket.take() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take() == pytest.approx(0.25)  # one token every 1/4 s
    clock.now += 0.125
    assert bucket.take() == pytest.approx(0.125)  # half a token there: half the wait left
    clock.now += 0.125
    assert bucket.take() == 0.0
    assert bucket.take() > 0.0


def test_a_bucket_never_holds_more_than_its_burst() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate_per_s=10.0, burst=2.0, clock=clock)
    clock.now += 3600.0
    assert [bucket.take() == 0.0 for _ in range(3)] == [True, True, False]


def test_a_refused_take_spends_nothing() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate_per_s=1.0, burst=1.0, clock=clock)
    assert bucket.take() == 0.0
    for _ in range(100):
        assert bucket.take() > 0.0
    clock.now += 1.0
    assert bucket.take() == 0.0


@pytest.mark.parametrize(("rate", "burst"), [(0.0, 1.0), (1.0, 0.5)])
def test_a_bucket_refuses_nonsense(rate: float, burst: float) -> None:
    with pytest.raises(ValueError, match="token bucket"):
        TokenBucket(rate, burst)


def test_the_quota_caps_calls_in_flight_and_frees_a_slot_on_release() -> None:
    quota = CallerQuota("acme", CallerLimits(max_concurrent=2), FakeClock())
    quota.acquire()
    quota.acquire()
    with pytest.raises(QuotaExceededError) as refused:
        quota.acquire()
    assert refused.value.identity == "acme"
    assert refused.value.retry_after_s == CONCURRENCY_RETRY_S
    quota.release()
    quota.acquire()
    assert quota.in_flight == 2


def test_the_rate_quota_says_how_long_to_wait() -> None:
    clock = FakeClock()
    quota = CallerQuota("acme", CallerLimits(rate_per_s=2.0), clock)  # burst: one second's worth
    quota.acquire()
    quota.acquire()
    with pytest.raises(QuotaExceededError) as refused:
        quota.acquire()
    assert refused.value.retry_after_s == pytest.approx(0.5)
    clock.now += 0.5
    quota.acquire()
    assert quota.in_flight == 3


def test_a_call_refused_for_concurrency_spends_no_token() -> None:
    clock = FakeClock()
    quota = CallerQuota("acme", CallerLimits(rate_per_s=1.0, burst=2.0, max_concurrent=1), clock)
    quota.acquire()
    for _ in range(5):
        with pytest.raises(QuotaExceededError):
            quota.acquire()
    quota.release()
    quota.acquire()  # the second token is still there
