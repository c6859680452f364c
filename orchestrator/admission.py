"""Admission control: calls that cannot be answered in time are answered at once, labelled.

A Score call that is queued behind more work than the process can finish before its deadline
would be late, and late is worse than any answer. Two checks run on arrival, before any work:

* **An adaptive concurrency limit** (:class:`GradientLimit`, the Gradient2 algorithm of Netflix's
  concurrency-limits, which Envoy's adaptive-concurrency filter also follows): the limit on calls
  in flight moves with the ratio of the long-run service time to the recent one. While recent
  calls are as fast as usual the limit grows by a queue allowance of ``sqrt(limit)``; when the
  event loop or a dependency slows them down, it shrinks in proportion, so the process stops
  taking work before the work queues.
* **The call's own remaining budget**: a call that arrives with less than ``min_budget_ms`` of
  its budget left has spent the rest waiting in queues (gRPC's, the event loop's) and could only
  end in a late or ``BUDGET_EXHAUSTED`` answer, so it is not started. A fixed floor rather than
  the recent service time: calls that waited out a slow dependency's timeout took long without
  the process being overloaded.

* **Event-loop lag** (:class:`LoopLagMonitor`): when the process as a whole is past its CPU
  capacity, calls queue in front of the handler (in gRPC's queue and the event loop's), where no
  in-flight count sees them, and they reach the handler with their budget half spent. A timer
  that should fire every ``lag_probe_ms`` measures how late it fires; while that lag is above
  ``max_loop_lag_ms``, arrivals are shed, which drains the queue within a few milliseconds since
  a shed answer costs a fraction of a served one.

A refused call gets the configured default decision with reason ``OVERLOADED``. That answer
costs no dependency and almost no CPU, which is what keeps the process in time when several
times its capacity is offered.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from dataclasses import dataclass
from types import TracebackType
from typing import Final, Self

from cascade.settings import AdmissionSettings

_SHORT_WINDOW: Final = 10  # samples in the recent service-time average
_LONG_WINDOW: Final = 600  # samples in the long-run average
_SMOOTHING: Final = 0.2
_LAG_PROBES: Final = 3


class GradientLimit:
    """A concurrency limit that follows the gradient of long-run over recent service time.

    Per sample (one finished call): ``gradient = clamp(tolerance * long_rtt / short_rtt, 0.5,
    1)``, ``new = limit * gradient + sqrt(limit)``, smoothed into the limit. While fewer than half
    the limit are in flight the limit does not grow (the load, not the limit, is what bounds
    concurrency then). When the long-run average is far above the recent one (load has dropped)
    it is pulled down, so the limit can grow again.
    """

    def __init__(
        self, *, initial: int, min_limit: int, max_limit: int, tolerance: float = 2.0
    ) -> None:
        if not 1 <= min_limit <= initial <= max_limit:
            raise ValueError("need 1 <= min_limit <= initial <= max_limit")
        self._limit = float(initial)
        self._min = float(min_limit)
        self._max = float(max_limit)
        self._tolerance = tolerance
        self._short_s = 0.0
        self._long_s = 0.0
        self._samples = 0

    @property
    def limit(self) -> int:
        """Calls that may be in flight now."""
        return int(self._limit)

    @property
    def recent_rtt_s(self) -> float:
        """Recent average service time (0 before the first sample)."""
        return self._short_s

    def update(self, rtt_s: float, in_flight: int) -> None:
        """Account one finished call that took ``rtt_s`` with ``in_flight`` calls in flight."""
        self._samples += 1
        if self._samples == 1:
            self._short_s = self._long_s = rtt_s
        else:
            self._short_s += (rtt_s - self._short_s) / min(self._samples, _SHORT_WINDOW)
            self._long_s += (rtt_s - self._long_s) / min(self._samples, _LONG_WINDOW)
        if self._long_s > 2.0 * self._short_s:
            self._long_s *= 0.95
        if in_flight < self._limit / 2:
            return
        gradient = max(0.5, min(1.0, self._tolerance * self._long_s / self._short_s))
        target = self._limit * gradient + math.sqrt(self._limit)
        limit = self._limit * (1.0 - _SMOOTHING) + target * _SMOOTHING
        self._limit = max(self._min, min(self._max, limit))


class LoopLagMonitor:
    """Measures how late the event loop runs a timer; an async context manager owning its task.

    ``lag_ms`` is the smallest lateness of the last three probes: a backlog makes every probe
    late, while a one-off stall (a collection, a slow callback) makes only one late and must not
    shed the calls that come after it.
    """

    def __init__(self, probe_interval_ms: float) -> None:
        self._interval_s = probe_interval_ms / 1000.0
        self._task: asyncio.Task[None] | None = None
        self._recent_ms: deque[float] = deque([0.0] * _LAG_PROBES, maxlen=_LAG_PROBES)
        self.lag_ms = 0.0

    async def __aenter__(self) -> Self:
        self._task = asyncio.create_task(self._probe(), name="loop-lag-monitor")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _probe(self) -> None:
        interval_s = self._interval_s
        while True:
            due_s = time.monotonic() + interval_s
            await asyncio.sleep(interval_s)
            self._recent_ms.append(max(0.0, (time.monotonic() - due_s) * 1000.0))
            self.lag_ms = min(self._recent_ms)


@dataclass(frozen=True, slots=True)
class Ticket:
    """An admitted call; hand it back to :meth:`Admission.release` when answered."""

    start_ns: int


class Admission:
    """Decides on arrival whether a Score call is worked on or answered ``OVERLOADED`` at once."""

    def __init__(self, settings: AdmissionSettings, lag: LoopLagMonitor | None = None) -> None:
        self._enabled = settings.enabled
        self._min_budget_ms = settings.min_budget_ms
        self._max_lag_ms = settings.max_loop_lag_ms
        self._lag = lag
        self.limit = GradientLimit(
            initial=settings.initial_limit,
            min_limit=settings.min_limit,
            max_limit=settings.max_limit,
            tolerance=settings.rtt_tolerance,
        )
        self.in_flight = 0
        self.shed = 0

    def admit(self, remaining_ms: float) -> Ticket | None:
        """A ticket, or None when the call should be shed (the limit is reached, the event loop
        lags, or less than ``min_budget_ms`` of its budget is left)."""
        if self._enabled and (
            self.in_flight >= self.limit.limit
            or remaining_ms < self._min_budget_ms
            or (self._lag is not None and self._lag.lag_ms > self._max_lag_ms)
        ):
            self.shed += 1
            return None
        self.in_flight += 1
        return Ticket(time.perf_counter_ns())

    def release(self, ticket: Ticket) -> None:
        """The admitted call has been answered."""
        self.in_flight -= 1
        self.limit.update((time.perf_counter_ns() - ticket.start_ns) / 1e9, self.in_flight + 1)
