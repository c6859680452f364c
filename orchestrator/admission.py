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

* **The wait in front of the handler** (:class:`QueueWait`): when the process as a whole is past
  its CPU capacity, calls queue before the handler runs (gRPC accepts them one event-loop pass
  at a time), where no in-flight count sees them, and reach it with their budget half spent.
  When a standing queue forms, calls that waited more than ``max_queue_ms`` are shed, which
  drains it quickly: a shed answer costs a fraction of a served one.

A refused call gets the configured default decision with reason ``OVERLOADED``. That answer
costs no dependency and almost no CPU, which is what keeps the process in time when several
times its capacity is offered.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from typing import Final

from cascade.metrics import ADMISSION_SHED
from cascade.settings import AdmissionSettings

_SHORT_WINDOW: Final = 10  # samples in the recent service-time average
_LONG_WINDOW: Final = 600  # samples in the long-run average
_SMOOTHING: Final = 0.2
_REFERENCE_BUCKET_S: Final = 5.0
_MIN_ARRIVALS: Final = 8  # in one interval, before a queue is believed


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


class QueueWait:
    """Estimates how long calls waited before reaching the handler, and says when to drop.

    gRPC does not say when a call arrived, but each call says how much of its budget is left
    (capped at the SLO). The freshest arrivals show the most: ``reference`` is the largest
    remaining budget seen in the last 5-10 s (a two-bucket sliding maximum, so it follows
    callers' deadlines when they change), and a call showing less has waited about the
    difference. Following CoDel, one waiting call proves nothing (another caller may simply send
    shorter deadlines), and neither does a sparse stream; a standing queue is believed when
    ``intervals`` intervals in a row each held at least ``min_arrivals`` calls and even the
    least-waiting of them waited more than ``target_ms``. Until an interval passes without one,
    calls that waited more than ``target_ms`` are shed.

    On this 2-core machine the defaults (one 20 ms interval, 8 arrivals) shed 0.2-0.6% of calls
    at 300/s, half the capacity: the orchestrator waits for a core behind the other processes
    for 2-20 ms at a time, and the calls that arrived meanwhile look queued. Looser settings shed
    less there and more late under overload (docs/latency.md, twelfth run).

    What it cannot see: a wait hidden by the cap. A caller whose deadline is longer than the SLO
    shows the whole SLO left until it has waited out the difference, so such calls can queue for
    that long unseen. In ``test_load_protection.py``, 50 calls sent at once with 200 ms deadlines
    on a slow machine were answered one after another, about 15 ms apart, each after 15-36 ms in
    the handler with its whole budget left on arrival, and the last ones got DEADLINE_EXCEEDED
    (docs/latency.md, tenth run). The uncapped remaining time would show such a wait, but then
    one caller with long deadlines would make every shorter-deadline caller look as if it had
    waited.

    Why the wait matters more than the in-flight count: grpc.aio accepts one new call per pass
    of the event loop, so a loop made slow by many calls in flight accepts slowly, and calls
    queue in gRPC's core where no count of ours sees them.
    """

    def __init__(
        self,
        target_ms: float,
        interval_ms: float,
        *,
        intervals: int = 1,
        min_arrivals: int = _MIN_ARRIVALS,
    ) -> None:
        self._target_ms = target_ms
        self._interval_s = interval_ms / 1000.0
        self._intervals = intervals
        self._min_arrivals = min_arrivals
        self._standing = 0  # intervals in a row that held a standing queue
        self._bucket_end_s = 0.0
        self._bucket_max_ms = 0.0
        self._previous_max_ms = 0.0
        self._interval_end_s = 0.0
        self._interval_min_ms = math.inf
        self._interval_arrivals = 0
        self.dropping = False

    def should_shed(self, remaining_ms: float, now_s: float) -> bool:
        """Account one arrival with ``remaining_ms`` of its budget left; True to shed it."""
        if now_s >= self._bucket_end_s:
            # The bucket that ended becomes the previous one; after a silence, neither counts.
            recent = now_s < self._bucket_end_s + _REFERENCE_BUCKET_S
            self._previous_max_ms = self._bucket_max_ms if recent else 0.0
            self._bucket_max_ms = 0.0
            self._bucket_end_s = now_s + _REFERENCE_BUCKET_S
        self._bucket_max_ms = max(self._bucket_max_ms, remaining_ms)
        waited_ms = max(self._bucket_max_ms, self._previous_max_ms) - remaining_ms
        if now_s >= self._interval_end_s:
            standing = (
                self._interval_arrivals >= self._min_arrivals
                and self._interval_min_ms > self._target_ms
            )
            self._standing = self._standing + 1 if standing else 0
            self.dropping = self._standing >= self._intervals
            self._interval_min_ms = math.inf
            self._interval_arrivals = 0
            self._interval_end_s = now_s + self._interval_s
        self._interval_min_ms = min(self._interval_min_ms, waited_ms)
        self._interval_arrivals += 1
        return self.dropping and waited_ms > self._target_ms


SHED_CAUSES: Final = ("queue", "limit", "budget")


@dataclass(frozen=True, slots=True)
class Ticket:
    """An admitted call; hand it back to :meth:`Admission.release` when answered."""

    start_ns: int


class Admission:
    """Decides on arrival whether a Score call is worked on or answered ``OVERLOADED`` at once."""

    def __init__(self, settings: AdmissionSettings) -> None:
        self._enabled = settings.enabled
        self._min_budget_ms = settings.min_budget_ms
        self.queue = QueueWait(
            settings.max_queue_ms,
            settings.queue_interval_ms,
            intervals=settings.queue_intervals,
            min_arrivals=settings.queue_min_arrivals,
        )
        self.limit = GradientLimit(
            initial=settings.initial_limit,
            min_limit=settings.min_limit,
            max_limit=settings.max_limit,
            tolerance=settings.rtt_tolerance,
        )
        self.in_flight = 0
        self._last_admitted_s = -math.inf
        self.shed_by_cause = dict.fromkeys(SHED_CAUSES, 0)
        self._shed_metrics = {cause: ADMISSION_SHED.labels(cause) for cause in SHED_CAUSES}

    def admit(self, remaining_ms: float) -> Ticket | None:
        """A ticket, or None when the call should be shed (the limit is reached, a standing
        queue formed and this call waited in it, or less than ``min_budget_ms`` of its budget is
        left)."""
        now_s = time.monotonic()
        cause = self._refusal(remaining_ms, now_s) if self._enabled else None
        if cause is not None:
            self.shed_by_cause[cause] += 1
            self._shed_metrics[cause].inc()
            return None
        self.in_flight += 1
        self._last_admitted_s = now_s
        return Ticket(time.perf_counter_ns())

    def _refusal(self, remaining_ms: float, now_s: float) -> str | None:
        """Which check refuses the call, if one does. The queue's is asked first and always:
        every arrival is part of what it measures."""
        if self.queue.should_shed(remaining_ms, now_s):
            return "queue"
        if self.in_flight >= self.limit.limit:
            return "limit"
        if remaining_ms < self._min_budget_ms:
            return "budget"
        return None

    @property
    def shed(self) -> int:
        """Calls shed so far."""
        return sum(self.shed_by_cause.values())

    def release(self, ticket: Ticket) -> None:
        """The admitted call has been answered."""
        self.in_flight -= 1
        self.limit.update((time.perf_counter_ns() - ticket.start_ns) / 1e9, self.in_flight + 1)

    async def defer(self, pause_s: float, window_s: float) -> None:
        """How ``ScoreBatch`` lets live calls go first between two of its chunks: sleep
        ``pause_s`` when a Score call is in flight or one was admitted in the last ``window_s``
        (the chunk just done), else return at once. The pause is whole, not cut short when the
        live calls finish: the next ones arriving in it find the event loop, the workers and
        Redis free of the batch."""
        live = self.in_flight or time.monotonic() - self._last_admitted_s <= window_s
        if live and pause_s > 0:
            await asyncio.sleep(pause_s)
