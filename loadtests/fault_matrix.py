"""The fault matrix's bookkeeping: which phases, when each fault starts and ends, what each phase
observed, and the table. Pure: no clocks, no signals, no sockets (:mod:`loadtests.faults` does
the I/O).

A phase is one open-loop window at a fixed rate: ``pre_s`` of normal load, then the fault, then
``post_s`` more. A *stop* fault is SIGSTOP on its target for ``fault_s``, then SIGCONT: the fault
ends at SIGCONT. A *kill* fault is SIGKILL on its target, which the stack's supervisor restarts:
the fault ends when the restarted process is ready (the window leaves ``kill_wait_s`` for that).

Per phase: sent, answered, late (answered later than the deadline + grace), DEADLINE_EXCEEDED,
other errors, answers by reason code, and the time from the fault's end until the answers show
the target working again, for good (:meth:`Timeline.recovery_s`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final

from cascade.v1 import scoring_pb2
from loadtests.report import summarize
from loadtests.results import Tally

__all__ = [
    "PHASES",
    "RECOVERY_STREAK",
    "Call",
    "FaultKind",
    "PhaseSpec",
    "PhaseTiming",
    "Target",
    "Timeline",
    "markdown_table",
    "parse_phases",
    "phase_summary",
]


class FaultKind(StrEnum):
    """What is done to the target."""

    NONE = "none"
    STOP = "sigstop"  # SIGSTOP, then SIGCONT after fault_s
    KILL = "sigkill"  # SIGKILL; the supervisor restarts it


class Target(StrEnum):
    """Which processes of the stack the fault hits."""

    NONE = "none"
    ONE_WORKER = "one-worker"
    ALL_WORKERS = "all-workers"
    REDIS = "redis"
    NATS = "nats"
    TRITON = "triton"


@dataclass(frozen=True, slots=True)
class PhaseSpec:
    """One phase of the matrix."""

    name: str
    kind: FaultKind
    target: Target


PHASES: Final = {
    spec.name: spec
    for spec in (
        PhaseSpec("baseline", FaultKind.NONE, Target.NONE),
        PhaseSpec("sigstop-one-worker", FaultKind.STOP, Target.ONE_WORKER),
        PhaseSpec("sigstop-all-workers", FaultKind.STOP, Target.ALL_WORKERS),
        PhaseSpec("sigstop-redis", FaultKind.STOP, Target.REDIS),
        PhaseSpec("sigstop-nats", FaultKind.STOP, Target.NATS),
        PhaseSpec("sigstop-triton", FaultKind.STOP, Target.TRITON),
        PhaseSpec("sigkill-one-worker", FaultKind.KILL, Target.ONE_WORKER),
        PhaseSpec("sigkill-triton", FaultKind.KILL, Target.TRITON),
    )
}
"""Every phase, in the default order."""


def parse_phases(text: str) -> list[PhaseSpec]:
    """``"baseline,sigkill-triton"`` -> the specs; ``"all"`` -> every phase; ValueError naming an
    unknown phase."""
    if text.strip() == "all":
        return list(PHASES.values())
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in PHASES]
    if unknown or not names:
        raise ValueError(f"unknown phase(s) {unknown or [text]}; known: {', '.join(PHASES)}, all")
    return [PHASES[name] for name in names]


@dataclass(frozen=True, slots=True)
class PhaseTiming:
    """How long each part of a phase lasts, in seconds."""

    pre_s: float = 2.0
    fault_s: float = 3.0
    post_s: float = 4.0
    kill_wait_s: float = 10.0
    """A kill phase's room for the restart (Triton's takes a few seconds on 2 busy cores)."""

    def __post_init__(self) -> None:
        if min(self.pre_s, self.fault_s, self.post_s, self.kill_wait_s) <= 0:
            raise ValueError("every part of a phase must last > 0 s")

    def window_s(self, kind: FaultKind) -> float:
        """The phase's load window."""
        middle = self.kill_wait_s if kind is FaultKind.KILL else self.fault_s
        return self.pre_s + middle + self.post_s


RECOVERY_STREAK: Final = 20
"""Calls in a row (0.2 s at 100/s) that must not show the fault for a phase to count as
recovered from the first of them."""
_OVERLOAD_REASONS: Final = frozenset({"OVERLOADED", "BUDGET_EXHAUSTED"})
_STAGE1_REASONS: Final = frozenset({"STAGE1_TIMEOUT", "STAGE1_UNAVAILABLE", "STAGE1_ERROR"})
_TARGET_REASONS: Final = {
    Target.NONE: _OVERLOAD_REASONS,
    Target.ONE_WORKER: _STAGE1_REASONS | _OVERLOAD_REASONS,
    Target.ALL_WORKERS: _STAGE1_REASONS | _OVERLOAD_REASONS,
    Target.NATS: _STAGE1_REASONS | _OVERLOAD_REASONS,
    Target.REDIS: frozenset({"CACHE_UNAVAILABLE", "FEATURES_UNAVAILABLE"}) | _OVERLOAD_REASONS,
    Target.TRITON: frozenset(
        {"STAGE2_TIMEOUT", "STAGE2_UNAVAILABLE", "STAGE2_ERROR", "STAGE2_OVERLOADED"}
    )
    | _OVERLOAD_REASONS,
}
"""Reason codes that show a target's fault (shedding and exhausted budgets count for every one:
they are what a backlog after the fault looks like)."""
_PROOF: Final = {
    Target.ONE_WORKER: frozenset({"STAGE1", "STAGE2"}),
    Target.ALL_WORKERS: frozenset({"STAGE1", "STAGE2"}),
    Target.NATS: frozenset({"STAGE1", "STAGE2"}),
    Target.TRITON: frozenset({"STAGE2"}),
}
"""``decided_by`` values of an answer that proves the target works again (any answer without
its reasons does for Redis: the lookup went through)."""
_DECIDED_BY_NAMES: Final = {
    value: name.removeprefix("DECIDED_BY_") for name, value in scoring_pb2.DecidedBy.items()
}
_REASON_NAMES: Final = {
    value: name.removeprefix("REASON_") for name, value in scoring_pb2.Reason.items()
}


@dataclass(frozen=True, slots=True)
class Call:
    """One finished call of a phase."""

    sent_s: float
    in_time: bool
    """Answered within the deadline + grace (False for every failed call)."""
    decided_by: str = ""
    reasons: frozenset[str] = frozenset()

    @property
    def clean(self) -> bool:
        """Answered in time with no reason code."""
        return self.in_time and not self.reasons


@dataclass(slots=True)
class Timeline:
    """Every call of a phase, as it finished (times in seconds from the phase's start)."""

    late_after_s: float
    calls: list[Call] = field(default_factory=list)

    def record(self, sent_s: float, done_s: float, reply: scoring_pb2.ScoreResponse | None) -> None:
        """One finished call (``reply`` None: it failed)."""
        if reply is None:
            self.calls.append(Call(sent_s, in_time=False))
            return
        self.calls.append(
            Call(
                sent_s,
                in_time=done_s - sent_s <= self.late_after_s,
                decided_by=_DECIDED_BY_NAMES.get(reply.decided_by, str(reply.decided_by)),
                reasons=frozenset(_REASON_NAMES.get(r, str(r)) for r in reply.reasons),
            )
        )

    def unclean_per_s(self, window_s: float) -> list[int]:
        """Calls that were not clean (failed, late or labelled), by the second they were sent in:
        how the fault and the recovery looked over the phase."""
        counts = [0] * max(1, math.ceil(window_s))
        for call in self.calls:
            if not call.clean:
                counts[min(len(counts) - 1, max(0, int(call.sent_s)))] += 1
        return counts

    def recovery_s(
        self, fault_end_s: float | None, target: Target, *, streak: int = RECOVERY_STREAK
    ) -> float | None:
        """Seconds from ``fault_end_s`` until answers showed ``target`` working again: the send
        time of the first call, sent after the fault ended, that proves it (for Triton an answer
        stage 2 decided; for workers and NATS one stage 1 or 2 decided; for Redis any answer
        without Redis's reasons) and begins ``streak`` calls none of which still shows the fault
        (failed, late, or labelled with the target's reasons or as shed). A lone blip later in
        the phase (a busy shared machine) does not count. None when no call proved it."""
        if fault_end_s is None:
            return None
        bad_reasons = _TARGET_REASONS[target]
        proof = _PROOF.get(target)
        calls = sorted((c for c in self.calls if c.sent_s >= fault_end_s), key=lambda c: c.sent_s)

        def bad(call: Call) -> bool:
            return not call.in_time or bool(call.reasons & bad_reasons)

        i = 0
        while i < len(calls):
            call = calls[i]
            if bad(call) or (proof is not None and call.decided_by not in proof):
                i += 1
                continue
            relapse = next((k for k, c in enumerate(calls[i : i + streak]) if bad(c)), None)
            if relapse is None:
                return call.sent_s - fault_end_s
            i += relapse + 1
        return None


def _rounded(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def phase_summary(
    spec: PhaseSpec,
    tally: Tally,
    timeline: Timeline,
    *,
    window_s: float,
    fault_at_s: float | None,
    fault_end_s: float | None,
    restarts: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """What one phase observed, as a JSON-ready dict (times in seconds from the phase start)."""
    deadline_exceeded = tally.timeout_codes.get("DEADLINE_EXCEEDED", 0)
    return {
        "phase": spec.name,
        "fault": str(spec.kind),
        "target": str(spec.target),
        "window_s": round(window_s, 3),
        "fault_at_s": _rounded(fault_at_s),
        "fault_end_s": _rounded(fault_end_s),
        "sent": tally.sent,
        "unsent": tally.unsent,
        "answered": tally.ok,
        "late": tally.late,
        "deadline_exceeded": deadline_exceeded,
        "other_errors": tally.errors + tally.timeouts - deadline_exceeded,
        "error_codes": dict(sorted(tally.error_codes.items())),
        "timeout_codes": dict(sorted(tally.timeout_codes.items())),
        "decided_by": dict(sorted(tally.decided_by.items())),
        "reasons": dict(sorted(tally.reasons.items())),
        "clean_answers": sum(c.clean for c in timeline.calls),
        "unclean_per_s": timeline.unclean_per_s(window_s),
        "recovery_s": (
            None
            if spec.kind is FaultKind.NONE
            else _rounded(timeline.recovery_s(fault_end_s, spec.target))
        ),
        "restarts": dict(sorted((restarts or {}).items())),
        "latency_ms": summarize(tally.latency),
        "bookkeeping_problems": tally.check(),
    }


def _reasons_cell(reasons: Mapping[str, int]) -> str:
    return ", ".join(f"{name} {n}" for name, n in sorted(reasons.items(), key=lambda kv: -kv[1]))


def _recovery_cell(summary: Mapping[str, Any]) -> str:
    if summary["fault"] == str(FaultKind.NONE):
        return "-"
    if summary["fault_end_s"] is None:
        return "fault did not end"
    recovery = summary["recovery_s"]
    return "not within the phase" if recovery is None else f"{recovery:.2f}"


_HEADER: Final = (
    "phase",
    "sent",
    "answered",
    "late (> deadline + 2 ms)",
    "DEADLINE_EXCEEDED",
    "other errors",
    "p99 / max ms",
    "answers by reason",
    "recovery s",
)


def markdown_table(summaries: Iterable[Mapping[str, Any]]) -> str:
    """One row per phase."""
    lines = ["| " + " | ".join(_HEADER) + " |", "|" + "---|" * len(_HEADER)]
    for s in summaries:
        latency = s["latency_ms"]
        cells: Sequence[object] = (
            s["phase"],
            s["sent"],
            s["answered"],
            s["late"],
            s["deadline_exceeded"],
            s["other_errors"],
            f"{latency['p99']:.1f} / {latency['max']:.1f}",
            _reasons_cell(s["reasons"]) or "none",
            _recovery_cell(s),
        )
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"
