"""Turning tallies into the report: summaries, pass/fail at the SLO, capacity, the sweep's next
rate, the baseline comparison and the issue's targets. Pure: dicts in, dicts out, no I/O.

Report layout (``report.json``)::

    {"meta": {...how it was run...},
     "targets": {"cascade": TARGET, "naive": TARGET},      # naive only when the baseline ran
     "comparison": {...naive / cascade ratios...},
     "goals": [{"name", "goal", "measured", "met"}, ...]}

    TARGET = {"serial": STEP | null, "steps": [STEP, ...], "capacity": CAPACITY | null}
    STEP   = {"label", "mode", "arrivals", "offered_rate", "achieved_rate", "window_s",
              "processes", "counts": {...}, "rates": {...}, "latency_ms": SUMMARY,
              "service_ms": SUMMARY, "send_lag_ms": SUMMARY, "by_path_ms": {PATH: SUMMARY},
              "stages_ms": {STAGE: SUMMARY}, "passed", "fail_reasons", "bookkeeping_problems"}
    SUMMARY = {"count", "mean", "p50", "p95", "p99", "p99_9", "max"}   # milliseconds
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from loadtests.histogram import Histogram
from loadtests.results import STAGES, Tally

__all__ = [
    "PERCENTILES",
    "Criteria",
    "Goals",
    "SweepPlan",
    "capacity",
    "compare",
    "evaluate_goals",
    "next_sweep_rate",
    "step_report",
    "summarize",
]

PERCENTILES: Final = (("p50", 50.0), ("p95", 95.0), ("p99", 99.0), ("p99_9", 99.9))


def summarize(hist: Histogram) -> dict[str, float]:
    """Count, mean, p50/p95/p99/p99.9 and max of a microsecond histogram, in milliseconds."""
    out: dict[str, float] = {"count": float(hist.count), "mean": round(hist.mean / 1000, 4)}
    for name, p in PERCENTILES:
        out[name] = round(hist.percentile(p) / 1000, 4)
    out["max"] = round(hist.max / 1000, 4)
    return out


@dataclass(frozen=True, slots=True)
class Criteria:
    """What a step must meet to count as "at SLO": no errors, timeouts or unsent requests, p99 within
    ``p99_target_ms`` and every answer within ``budget_ms``.

    There is no separate throughput test: latency counts from the intended send time, so a
    server (or generator) that cannot keep up shows it as growing latency, which fails the step."""

    p99_target_ms: float = 10.0
    budget_ms: float = 50.0

    def __post_init__(self) -> None:
        if not 0 < self.p99_target_ms <= self.budget_ms:
            raise ValueError("need 0 < p99_target_ms <= budget_ms")


def _rate(part: int, whole: int) -> float:
    return round(part / whole, 6) if whole else 0.0


def step_report(
    tally: Tally,
    *,
    label: str,
    mode: str,
    arrivals: str,
    offered_rate: float,
    window_s: float,
    processes: int,
    criteria: Criteria,
) -> dict[str, Any]:
    """The report of one step.

    ``offered_rate`` is what the schedule asked for; the achieved rate is OK answers per second
    from the step's start to its last answer (or over the window, if that is longer), so a server
    that falls behind shows a lower achieved rate as well as a worse tail.
    """
    span_s = max(window_s, tally.last_done_s)
    achieved = tally.ok / span_s if span_s > 0 else 0.0
    latency = summarize(tally.latency)
    counts = {
        "scheduled": tally.scheduled,
        "sent": tally.sent,
        "unsent": tally.unsent,
        "ok": tally.ok,
        "errors": tally.errors,
        "timeouts": tally.timeouts,
        "degraded": tally.degraded,
        "escalated": tally.escalated,
        "cache_hits": tally.cache_hits,
        "within_budget": tally.within_budget,
        "repeats_planned": tally.repeats_planned,
        "decided_by": dict(sorted(tally.decided_by.items())),
        "reasons": dict(sorted(tally.reasons.items())),
        "error_codes": dict(sorted(tally.error_codes.items())),
    }
    rates = {
        "slo_attainment": _rate(tally.within_budget, tally.scheduled),
        "error": _rate(tally.errors, tally.sent),
        "timeout": _rate(tally.timeouts, tally.sent),
        "fallback": _rate(tally.degraded, tally.ok),
        "escalation": _rate(tally.escalated, tally.ok),
        "cache_hit": _rate(tally.cache_hits, tally.ok),
    }
    report: dict[str, Any] = {
        "label": label,
        "mode": mode,
        "arrivals": arrivals,
        "offered_rate": round(offered_rate, 3),
        "achieved_rate": round(achieved, 3),
        "window_s": round(window_s, 3),
        "processes": processes,
        "counts": counts,
        "rates": rates,
        "latency_ms": latency,
        "service_ms": summarize(tally.service),
        "send_lag_ms": summarize(tally.send_lag),
        "by_path_ms": {path: summarize(h) for path, h in sorted(tally.by_path.items())},
        "stages_ms": {name: summarize(tally.stages[name]) for name in STAGES},
        "bookkeeping_problems": tally.check(),
    }
    reasons = _fail_reasons(report, criteria)
    report["passed"] = not reasons
    report["fail_reasons"] = reasons
    return report


def _fail_reasons(step: Mapping[str, Any], criteria: Criteria) -> list[str]:
    counts, latency = step["counts"], step["latency_ms"]
    reasons = []
    if counts["errors"] or counts["timeouts"]:
        reasons.append(f"{counts['errors']} errors and {counts['timeouts']} timeouts")
    if counts["unsent"]:
        reasons.append(f"{counts['unsent']} requests the generator could not send in time")
    if latency["p99"] > criteria.p99_target_ms:
        reasons.append(f"p99 {latency['p99']:.2f} ms > target {criteria.p99_target_ms:g} ms")
    if latency["max"] > criteria.budget_ms:
        reasons.append(f"max {latency['max']:.2f} ms > budget {criteria.budget_ms:g} ms")
    if step["bookkeeping_problems"]:
        reasons.append("bookkeeping: " + "; ".join(step["bookkeeping_problems"]))
    return reasons


def capacity(steps: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The highest passing offered rate below the lowest failing one (None if none passed).

    Taking the highest pass *below the first failure* keeps one lucky step above a failure from
    overstating capacity.
    """
    open_steps = [s for s in steps if s["mode"] == "open"]
    failing = [s["offered_rate"] for s in open_steps if not s["passed"]]
    ceiling = min(failing) if failing else float("inf")
    passing = [s for s in open_steps if s["passed"] and s["offered_rate"] < ceiling]
    if not passing:
        return None
    best = max(passing, key=lambda s: s["offered_rate"])
    return {
        "rate": best["offered_rate"],
        "achieved_rate": best["achieved_rate"],
        "label": best["label"],
        "p99_ms": best["latency_ms"]["p99"],
        "max_ms": best["latency_ms"]["max"],
        "first_failing_rate": None if ceiling == float("inf") else ceiling,
    }


@dataclass(frozen=True, slots=True)
class SweepPlan:
    """How the capacity sweep picks rates: a geometric ramp, then bisection."""

    start_rate: float = 200.0
    factor: float = 1.5
    max_rate: float = 6000.0
    refine_steps: int = 2
    resolution: float = 0.08  # stop bisecting once the bracket is this narrow (relative)
    max_steps: int = 14

    def __post_init__(self) -> None:
        if not (self.start_rate > 0 and self.factor > 1 and self.max_rate >= self.start_rate):
            raise ValueError("need start_rate > 0, factor > 1 and max_rate >= start_rate")


def next_sweep_rate(done: Sequence[tuple[float, bool]], plan: SweepPlan) -> float | None:
    """The next rate to try given ``(rate, passed)`` so far; None when the sweep is finished.

    Ramps by ``factor`` while steps pass (up to ``max_rate``); after the first failure bisects
    between the highest pass below it and the failure, ``refine_steps`` times at most.
    """
    if len(done) >= plan.max_steps:
        return None
    if not done:
        return plan.start_rate
    failures = [r for r, ok in done if not ok]
    if not failures:
        top = max(r for r, _ in done)
        if top >= plan.max_rate:
            return None
        return round(min(top * plan.factor, plan.max_rate), 1)
    ceiling = min(failures)
    passes = [r for r, ok in done if ok and r < ceiling]
    if not passes:
        return None  # even the first rate failed: nothing to bracket
    floor = max(passes)
    first_failure_index = next(i for i, (_, ok) in enumerate(done) if not ok)
    refinements = len(done) - first_failure_index - 1
    if refinements >= plan.refine_steps or (ceiling - floor) <= plan.resolution * floor:
        return None
    return round((floor + ceiling) / 2, 1)


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den == 0:
        return None
    return round(num / den, 3)


def compare(cascade: Mapping[str, Any], naive: Mapping[str, Any]) -> dict[str, Any]:
    """Side-by-side ratios (cascade's gain over the naive baseline: >1 means cascade is better)."""
    out: dict[str, Any] = {}
    cap_c, cap_n = cascade.get("capacity"), naive.get("capacity")
    out["capacity_rate"] = {
        "cascade": cap_c["rate"] if cap_c else None,
        "naive": cap_n["rate"] if cap_n else None,
        "ratio": _ratio(cap_c["rate"] if cap_c else None, cap_n["rate"] if cap_n else None),
    }
    ser_c, ser_n = cascade.get("serial"), naive.get("serial")
    if ser_c and ser_n:
        out["serial_latency"] = {
            name: {
                "cascade_ms": ser_c["latency_ms"][name],
                "naive_ms": ser_n["latency_ms"][name],
                "ratio": _ratio(ser_n["latency_ms"][name], ser_c["latency_ms"][name]),
            }
            for name in ("p50", "p99")
        }
    steps_c = {s["offered_rate"]: s for s in cascade.get("steps", []) if s["mode"] == "open"}
    steps_n = {s["offered_rate"]: s for s in naive.get("steps", []) if s["mode"] == "open"}
    common = sorted(set(steps_c) & set(steps_n))
    out["same_rate"] = [
        {
            "rate": rate,
            **{
                name: {
                    "cascade_ms": steps_c[rate]["latency_ms"][name],
                    "naive_ms": steps_n[rate]["latency_ms"][name],
                    "ratio": _ratio(
                        steps_n[rate]["latency_ms"][name], steps_c[rate]["latency_ms"][name]
                    ),
                }
                for name in ("p50", "p99")
            },
        }
        for rate in common
    ]
    return out


@dataclass(frozen=True, slots=True)
class Goals:
    """The issue's targets for this machine kind."""

    serial_stage1_p50_ms: float = 1.3
    serial_stage1_p99_ms: float = 2.5
    capacity_rate: float = 1500.0
    capacity_ratio: float = 1.5
    orchestrator_p50_ms: float = 0.3


def evaluate_goals(
    cascade: Mapping[str, Any], comparison: Mapping[str, Any] | None, goals: Goals
) -> list[dict[str, Any]]:
    """Each goal with what was measured and whether it was met (``met`` None: not measured)."""
    serial = cascade.get("serial")
    stage1 = serial["by_path_ms"].get("STAGE1") if serial else None
    cap = cascade.get("capacity")
    ratio = comparison["capacity_rate"]["ratio"] if comparison else None
    rows: list[tuple[str, str, float | None, float, bool]] = [
        (
            "serial_stage1_p50_ms",
            "stage-1 path, 1 in flight, p50 <= {:g} ms",
            stage1["p50"] if stage1 else None,
            goals.serial_stage1_p50_ms,
            False,
        ),
        (
            "serial_stage1_p99_ms",
            "stage-1 path, 1 in flight, p99 <= {:g} ms",
            stage1["p99"] if stage1 else None,
            goals.serial_stage1_p99_ms,
            False,
        ),
        (
            "capacity_rate",
            "capacity at SLO >= {:g}/s",
            cap["rate"] if cap else None,
            goals.capacity_rate,
            True,
        ),
        (
            "capacity_ratio",
            ">= {:g}x the naive baseline's capacity",
            ratio,
            goals.capacity_ratio,
            True,
        ),
        (
            "orchestrator_p50_ms",
            "orchestrator overhead p50 <= {:g} ms (1 in flight)",
            serial["stages_ms"]["orchestrator"]["p50"] if serial else None,
            goals.orchestrator_p50_ms,
            False,
        ),
    ]
    out = []
    for name, text, measured, goal, higher_is_better in rows:
        met = None
        if measured is not None:
            met = measured >= goal if higher_is_better else measured <= goal
        out.append({"name": name, "goal": text.format(goal), "measured": measured, "met": met})
    return out
