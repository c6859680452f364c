"""Circuit breakers: stop waiting on a dependency that keeps failing, and find out when it is back.

One :class:`CircuitBreaker` per dependency (Redis, stage 1, stage 2) per orchestrator process::

    CLOSED ──(≥ failure_ratio of the last window failed, ≥ min_calls seen)──> OPEN
    OPEN ──(open for open_s)──> HALF_OPEN: the next call is let through as a probe
    HALF_OPEN ──probe answered──> CLOSED (window cleared)
    HALF_OPEN ──probe failed──> OPEN again, open_s doubled up to max_open_s

While OPEN (and while a probe is out) calls are not attempted: the scorer answers at once with the
dependency's usual reason code instead of waiting out its timeout, call after call. The trip rule
is a failure *ratio* over the last ``window`` outcomes (no older than ``window_s``), not a run of
consecutive failures: with one of two screening workers stalled, half the calls fail at random,
and a run-length rule would keep tripping on a dependency that still answers half the traffic.

Only time-outs, refusals and errors count as failures. A dependency that sheds a request
(``DependencyOverloaded``) answered quickly and on purpose; it counts as neither.

Pure logic with an injectable clock: no tasks, no timers, a few attribute updates per call.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from enum import IntEnum
from typing import Final

from cascade import metrics
from cascade.errors import Dependency, DependencyError, DependencyOverloaded
from cascade.settings import BreakerSettings
from orchestrator.outage_log import OutageLog

logger = logging.getLogger(__name__)

__all__ = ["BreakerState", "CircuitBreaker", "DependencyBreakers", "DependencyGuard"]


class BreakerState(IntEnum):
    """A breaker's state; the value is what the ``cascade_breaker_state`` gauge shows."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


_STATE_NAMES: Final = {s: s.name.lower() for s in BreakerState}


class CircuitBreaker:
    """The breaker of one dependency (see the module docstring for the rules)."""

    def __init__(
        self,
        dependency: Dependency,
        settings: BreakerSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.dependency: Final = dependency
        self._enabled = settings.enabled
        self._window = settings.window
        self._window_s = settings.window_s
        self._min_calls = settings.min_calls
        self._failure_ratio = settings.failure_ratio
        self._base_open_s = settings.open_s
        self._max_open_s = settings.max_open_s
        self._clock = clock
        self._outcomes: deque[tuple[float, bool]] = deque()  # (when, failed)
        self._failures = 0
        self._open_s = settings.open_s
        self._opened_at = 0.0
        self._probe_out = False
        self.state = BreakerState.CLOSED
        self._gauge = metrics.BREAKER_STATE.labels(dependency.value)
        self._gauge.set(BreakerState.CLOSED)

    def allow(self) -> bool:
        """Whether to attempt the dependency now. In HALF_OPEN the caller that gets True is the
        probe and must report its outcome with :meth:`record`."""
        if self.state is BreakerState.CLOSED:
            return True
        if self.state is BreakerState.OPEN:
            if self._clock() - self._opened_at < self._open_s:
                return False
            self._move(BreakerState.HALF_OPEN)
        if self._probe_out:
            return False
        self._probe_out = True
        return True

    def record(self, failed: bool) -> None:
        """The outcome of an attempt :meth:`allow` permitted."""
        if not self._enabled:
            return
        if self.state is BreakerState.OPEN:
            return  # a call from before the trip ending late says nothing new
        if self.state is BreakerState.HALF_OPEN:
            self._probe_out = False
            if failed:
                self._open_s = min(self._open_s * 2, self._max_open_s)
                self._trip()
            else:
                self._close()
            return
        now = self._clock()
        outcomes = self._outcomes
        outcomes.append((now, failed))
        self._failures += failed
        while len(outcomes) > self._window or now - outcomes[0][0] > self._window_s:
            self._failures -= outcomes.popleft()[1]
        if (
            failed
            and len(outcomes) >= self._min_calls
            and self._failures >= self._failure_ratio * len(outcomes)
        ):
            logger.warning(
                "%s breaker open: %d of the last %d calls failed; skipping it for %.0f ms",
                self.dependency.value,
                self._failures,
                len(outcomes),
                self._open_s * 1000,
            )
            self._trip()

    def release(self) -> None:
        """An attempt :meth:`allow` permitted ended with no verdict (the dependency shed it, or
        the call was cancelled): a probe slot is handed back, nothing is counted."""
        self._probe_out = False

    def _trip(self) -> None:
        self._opened_at = self._clock()
        self._move(BreakerState.OPEN)

    def _close(self) -> None:
        logger.info("%s breaker closed: the dependency answered a probe", self.dependency.value)
        self._outcomes.clear()
        self._failures = 0
        self._open_s = self._base_open_s
        self._move(BreakerState.CLOSED)

    def _move(self, state: BreakerState) -> None:
        if state is self.state:
            return
        self.state = state
        self._gauge.set(state)
        metrics.BREAKER_TRANSITIONS.labels(self.dependency.value, _STATE_NAMES[state]).inc()


class DependencyBreakers:
    """The three breakers of one orchestrator process."""

    def __init__(
        self, settings: BreakerSettings, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.redis: Final = CircuitBreaker(Dependency.REDIS, settings, clock=clock)
        self.stage1: Final = CircuitBreaker(Dependency.SCREENING, settings, clock=clock)
        self.stage2: Final = CircuitBreaker(Dependency.HEAVY, settings, clock=clock)

    def open_ones(self) -> dict[str, str]:
        """Span attributes naming every breaker that is not closed (empty when all are)."""
        return {
            f"cascade.breaker.{b.dependency.value}": _STATE_NAMES[b.state]
            for b in (self.redis, self.stage1, self.stage2)
            if b.state is not BreakerState.CLOSED
        }


class DependencyGuard:
    """What the scorer tells about each attempt on one dependency, in one place: its breaker
    (skip it while it keeps failing) and its outage log (one line when it starts failing, one
    when it answers again)."""

    __slots__ = ("_log", "breaker")

    def __init__(self, breaker: CircuitBreaker, what: str) -> None:
        self.breaker = breaker
        self._log = OutageLog(what)

    def allow(self) -> bool:
        """Whether to attempt the dependency now (see :meth:`CircuitBreaker.allow`)."""
        return self.breaker.allow()

    def answered(self) -> None:
        """The attempt succeeded."""
        self.breaker.record(False)
        self._log.answered()

    def raised(self, exc: BaseException) -> None:
        """The attempt raised ``exc``: a failure, or (shed on purpose, cancelled, our own bug)
        no verdict on the dependency's health."""
        if isinstance(exc, DependencyError) and not isinstance(exc, DependencyOverloaded):
            self.breaker.record(True)
            self._log.failed(exc)
        else:
            self.breaker.release()
