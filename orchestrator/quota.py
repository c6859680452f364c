"""Per-caller quotas: a token-bucket rate and a cap on calls in flight.

One :class:`CallerQuota` per caller identity, so a caller that floods the orchestrator spends its
own budget and nobody else's. The bucket is refilled lazily from a monotonic clock at each call
(no background task); a refused call learns how long until a retry may pass. Pure and
synchronous: the event loop is the only thread that touches them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final

from cascade.errors import QuotaExceededError
from cascade.settings import CallerLimits

__all__ = ["CONCURRENCY_RETRY_S", "CallerQuota", "TokenBucket"]

Clock = Callable[[], float]

CONCURRENCY_RETRY_S: Final = 0.01
"""The retry hint when the caller's calls in flight are at their cap: a Score call takes a few
milliseconds, so a slot is usually free again by then."""


class TokenBucket:
    """``rate_per_s`` tokens a second, at most ``burst`` held; a call takes one."""

    __slots__ = ("_at", "_burst", "_clock", "_rate", "_tokens")

    def __init__(self, rate_per_s: float, burst: float, clock: Clock = time.monotonic) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ValueError("a token bucket needs rate_per_s > 0 and burst >= 1")
        self._rate = rate_per_s
        self._burst = burst
        self._clock = clock
        self._tokens = burst
        self._at = clock()

    def take(self) -> float:
        """Take a token: 0.0 when one was there, else the seconds until one will be (and
        nothing is taken)."""
        now = self._clock()
        tokens = min(self._burst, self._tokens + (now - self._at) * self._rate)
        self._at = now
        if tokens >= 1.0:
            self._tokens = tokens - 1.0
            return 0.0
        self._tokens = tokens
        return (1.0 - tokens) / self._rate


class CallerQuota:
    """One caller's rate and concurrency quota: :meth:`acquire` before a call, and
    :meth:`release` after it (when acquire did not raise)."""

    __slots__ = ("_bucket", "_max_concurrent", "identity", "in_flight")

    def __init__(self, identity: str, limits: CallerLimits, clock: Clock = time.monotonic) -> None:
        self.identity = identity
        self._bucket: TokenBucket | None = None
        if limits.rate_per_s is not None:
            burst = limits.burst if limits.burst is not None else max(1.0, limits.rate_per_s)
            self._bucket = TokenBucket(limits.rate_per_s, burst, clock)
        self._max_concurrent = limits.max_concurrent
        self.in_flight = 0

    def acquire(self) -> None:
        """Count a call in, or raise :class:`QuotaExceededError` with a retry hint. A call
        refused for concurrency spends no token."""
        if self._max_concurrent is not None and self.in_flight >= self._max_concurrent:
            raise QuotaExceededError(
                f"caller {self.identity!r} has {self.in_flight} calls in flight, its limit",
                self.identity,
                CONCURRENCY_RETRY_S,
            )
        if self._bucket is not None:
            wait_s = self._bucket.take()
            if wait_s > 0.0:
                raise QuotaExceededError(
                    f"caller {self.identity!r} is past its rate quota", self.identity, wait_s
                )
        self.in_flight += 1

    def release(self) -> None:
        """Count a call out."""
        self.in_flight -= 1
