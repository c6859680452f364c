"""What one generator process observed during one step, as mergeable counts and histograms.

Pure: the I/O code hands every finished call to :meth:`Tally.record_answer` or
:meth:`Tally.record_failure` with its three moments (intended, actually sent, done; seconds on one
monotonic clock, relative to the step's common start) and the decoded response. Tallies of several
processes add up with :meth:`Tally.merge`.

Counts add up by construction::

    scheduled = sent + unsent
    sent      = ok + errors + timeouts
    ok        = sum(decided_by.values())

Histograms hold microseconds. ``latency`` is what the caller saw, from the *intended* send time to
the answer, for every sent call (a timeout counts at the moment it was given up); ``service`` is
from the actual send; ``send_lag`` is how late the generator itself was. ``stages`` decomposes OK
answers with the server's own timings: ``redis``, ``features``, ``stage1``, ``stage2`` (only when
the stage ran), ``server_total``, ``orchestrator`` (server total minus the stages: the
orchestrator's own work between its downstream calls) and ``transport`` (client-side service time
minus server total: both gRPC legs, the servicer's work outside the scorer, and client overhead).
``transport`` splits in two where the call had a deadline and the server says how much of it was
left when its handler started: ``front``, the call's deadline minus that (how long it waited in the
server's gRPC front, from its headers' arrival to the handler: gRPC starts the server-side
deadline there), and ``legs``, the rest of ``transport`` (the client's and the kernel's work both
ways, the answer's encoding and sending).

Overload bookkeeping: ``shed`` counts answers labelled ``OVERLOADED`` (turned away on arrival with
the default decision), ``degraded_other`` answers with any other reason, ``unlabelled_fallbacks``
default or degraded answers that carry no reason at all (an unlabelled shed), ``late`` OK answers
whose client-measured service time exceeded ``late_after_us`` (the deadline plus a small grace),
and ``timeout_codes`` how each timeout ended (gRPC ``DEADLINE_EXCEEDED`` or ``ABANDONED``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Final

from cascade.v1 import scoring_pb2
from loadtests.histogram import Histogram

__all__ = ["SHED_REASON", "STAGES", "Failure", "Tally"]

STAGES: Final = (
    "redis",
    "features",
    "stage1",
    "stage2",
    "server_total",
    "orchestrator",
    "transport",
    "front",
    "legs",
)
_DECIDED_BY_NAMES: Final = {
    value: name.removeprefix("DECIDED_BY_") for name, value in scoring_pb2.DecidedBy.items()
}
_REASON_NAMES: Final = {
    value: name.removeprefix("REASON_") for name, value in scoring_pb2.Reason.items()
}
SHED_REASON: Final = "OVERLOADED"
_COUNTS: Final = (
    "scheduled",
    "sent",
    "unsent",
    "ok",
    "errors",
    "timeouts",
    "degraded",
    "escalated",
    "within_budget",
    "repeats_planned",
    "shed",
    "degraded_other",
    "unlabelled_fallbacks",
    "late",
)


class Failure(StrEnum):
    """How a call that brought no answer ended."""

    TIMEOUT = "timeout"  # the deadline passed (gRPC DEADLINE_EXCEEDED, or abandoned at the end)
    ERROR = "error"  # any other status


def _us(seconds: float) -> int:
    return round(seconds * 1_000_000)


@dataclass(slots=True)
class Tally:
    """Counts and histograms of one step (one process's share, or several merged)."""

    budget_us: int
    late_after_us: int | None = None  # None: lateness is not counted
    scheduled: int = 0
    sent: int = 0
    unsent: int = 0
    ok: int = 0
    errors: int = 0
    timeouts: int = 0
    degraded: int = 0
    escalated: int = 0
    within_budget: int = 0
    repeats_planned: int = 0
    shed: int = 0
    degraded_other: int = 0
    unlabelled_fallbacks: int = 0
    late: int = 0
    decided_by: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    error_codes: Counter[str] = field(default_factory=Counter)
    timeout_codes: Counter[str] = field(default_factory=Counter)
    latency: Histogram = field(default_factory=Histogram)
    service: Histogram = field(default_factory=Histogram)
    send_lag: Histogram = field(default_factory=Histogram)
    by_path: dict[str, Histogram] = field(default_factory=dict)
    stages: dict[str, Histogram] = field(default_factory=lambda: {s: Histogram() for s in STAGES})
    last_done_s: float = 0.0

    @property
    def cache_hits(self) -> int:
        """Answers the output cache gave."""
        return self.decided_by.get("CACHE", 0)

    @property
    def in_flight(self) -> int:
        """Sent and not finished yet."""
        return self.sent - self.ok - self.errors - self.timeouts

    def record_sent(self, intended_s: float, sent_s: float) -> None:
        """A call went out at ``sent_s``; it was meant to at ``intended_s``."""
        self.sent += 1
        self.send_lag.record(_us(sent_s - intended_s))

    def record_answer(
        self,
        intended_s: float,
        sent_s: float,
        done_s: float,
        reply: scoring_pb2.ScoreResponse,
        deadline_s: float | None = None,
    ) -> None:
        """An OK answer arrived at ``done_s``; ``deadline_s``: the deadline the call was sent
        with (None: none), which with the reply's ``deadline_left_us`` splits ``transport``."""
        latency_us = _us(done_s - intended_s)
        service_us = _us(done_s - sent_s)
        self.ok += 1
        self.latency.record(latency_us)
        self.service.record(service_us)
        if latency_us <= self.budget_us:
            self.within_budget += 1
        if self.late_after_us is not None and service_us > self.late_after_us:
            self.late += 1
        path = _DECIDED_BY_NAMES.get(reply.decided_by, str(reply.decided_by))
        self.decided_by[path] += 1
        hist = self.by_path.get(path)
        if hist is None:
            hist = self.by_path[path] = Histogram()
        hist.record(latency_us)
        if reply.degraded:
            self.degraded += 1
        if reply.escalated:
            self.escalated += 1
        names = [_REASON_NAMES.get(reason, str(reason)) for reason in reply.reasons]
        self.reasons.update(names)
        if SHED_REASON in names:
            self.shed += 1
        if any(name != SHED_REASON for name in names):
            self.degraded_other += 1
        if not names and (reply.degraded or path == "DEFAULT"):
            self.unlabelled_fallbacks += 1
        t = reply.timings
        stages = self.stages
        for name, value in (
            ("redis", t.redis_us),
            ("features", t.features_us),
            ("stage1", t.stage1_us),
            ("stage2", t.stage2_us),
        ):
            if value > 0:
                stages[name].record(value)
        stages["server_total"].record(t.total_us)
        stages["orchestrator"].record(
            t.total_us - t.redis_us - t.features_us - t.stage1_us - t.stage2_us
        )
        transport_us = service_us - t.total_us
        stages["transport"].record(transport_us)
        if deadline_s is not None and t.deadline_left_us > 0:
            front_us = max(0, _us(deadline_s) - t.deadline_left_us)
            stages["front"].record(front_us)
            stages["legs"].record(max(0, transport_us - front_us))
        self.last_done_s = max(self.last_done_s, done_s)

    def record_failure(
        self, intended_s: float, done_s: float, failure: Failure, code: str = ""
    ) -> None:
        """A call ended without an answer at ``done_s``."""
        self.latency.record(_us(done_s - intended_s))
        if failure is Failure.TIMEOUT:
            self.timeouts += 1
            self.timeout_codes[code or "DEADLINE_EXCEEDED"] += 1
        else:
            self.errors += 1
            self.error_codes[code or "UNKNOWN"] += 1
        self.last_done_s = max(self.last_done_s, done_s)

    def merge(self, other: Tally) -> None:
        """Add ``other`` (another process's share of the same step) into this tally."""
        if (other.budget_us, other.late_after_us) != (self.budget_us, self.late_after_us):
            raise ValueError("cannot merge tallies measured against different budgets")
        for name in _COUNTS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.decided_by.update(other.decided_by)
        self.reasons.update(other.reasons)
        self.error_codes.update(other.error_codes)
        self.timeout_codes.update(other.timeout_codes)
        self.latency.merge(other.latency)
        self.service.merge(other.service)
        self.send_lag.merge(other.send_lag)
        for path, hist in other.by_path.items():
            self.by_path.setdefault(path, Histogram()).merge(hist)
        for name, hist in other.stages.items():
            self.stages.setdefault(name, Histogram()).merge(hist)
        self.last_done_s = max(self.last_done_s, other.last_done_s)

    def check(self) -> list[str]:
        """Problems with the bookkeeping (empty when every identity holds)."""
        problems = []
        if self.scheduled != self.sent + self.unsent:
            problems.append(
                f"scheduled {self.scheduled} != sent {self.sent} + unsent {self.unsent}"
            )
        if self.sent != self.ok + self.errors + self.timeouts:
            problems.append(
                f"sent {self.sent} != ok {self.ok} + errors {self.errors} + "
                f"timeouts {self.timeouts}"
            )
        if self.ok != sum(self.decided_by.values()):
            problems.append("decided_by counts do not add up to ok")
        if self.latency.count != self.sent:
            problems.append("latency histogram count != sent")
        return problems
