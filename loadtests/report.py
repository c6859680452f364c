"""Turning tallies into the report: summaries, pass/fail at the SLO, capacity, the sweep's next
rate, the baseline comparison and the issue's targets. Pure: dicts in, dicts out, no I/O.

Report layout (``report.json``)::

    {"meta": {...how it was run...},
     "targets": {"cascade": TARGET, "naive": TARGET},      # naive only when the baseline ran
     "comparison": {...naive / cascade ratios...},
     "goals": [{"name", "goal", "measured", "met", "why", "floor"}, ...]}   # floor: with --floor

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
    "FLOOR_NAME",
    "PERCENTILES",
    "SEND_LAG_NOTED_MS",
    "STOLEN_SHARE_NOTED",
    "Criteria",
    "Goals",
    "SweepPlan",
    "SweepPoint",
    "capacity",
    "capacity_table",
    "common_rate",
    "compare",
    "evaluate_goals",
    "max_degraded_under_capacity",
    "max_p99_at_low_load",
    "nearest_step",
    "next_sweep_rate",
    "overload_basis",
    "overload_summary",
    "passes_at",
    "saturation_reasons",
    "step_report",
    "summarize",
]

FLOOR_NAME: Final = "grpc-floor"
"""The report's name for the gRPC floor target (``cascade loadtest --floor``)."""
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
        "shed": tally.shed,
        "degraded_other": tally.degraded_other,
        "unlabelled_fallbacks": tally.unlabelled_fallbacks,
        "late": tally.late,
        "decided_by": dict(sorted(tally.decided_by.items())),
        "reasons": dict(sorted(tally.reasons.items())),
        "error_codes": dict(sorted(tally.error_codes.items())),
        "timeout_codes": dict(sorted(tally.timeout_codes.items())),
    }
    rates = {
        "slo_attainment": _rate(tally.within_budget, tally.scheduled),
        "error": _rate(tally.errors, tally.sent),
        "timeout": _rate(tally.timeouts, tally.sent),
        "fallback": _rate(tally.degraded, tally.ok),
        "escalation": _rate(tally.escalated, tally.ok),
        "cache_hit": _rate(tally.cache_hits, tally.ok),
        "shed": _rate(tally.shed, tally.ok),
        "degraded_share": _rate(tally.degraded_other, tally.ok),
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
    if tally.late_after_us is not None:
        report["late_after_ms"] = round(tally.late_after_us / 1000, 3)
    reasons = _fail_reasons(report, criteria)
    report["passed"] = not reasons
    report["fail_reasons"] = reasons
    report["saturation_reasons"] = saturation_reasons(report, criteria.budget_ms)
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


def passes_at(step: Mapping[str, Any], p99_target_ms: float, budget_ms: float) -> bool:
    """Whether a step meets a given p99 target (and the budget, with no failures) at all."""
    c, lat = step["counts"], step["latency_ms"]
    clean = not (c["errors"] or c["timeouts"] or c["unsent"] or step["bookkeeping_problems"])
    return clean and lat["p99"] <= p99_target_ms and lat["max"] <= budget_ms


def capacity(
    steps: Sequence[Mapping[str, Any]],
    p99_target_ms: float | None = None,
    budget_ms: float | None = None,
) -> dict[str, Any] | None:
    """The highest passing offered rate below the first failure above the lowest pass.

    Without targets, "passing" is each step's own verdict; with them, :func:`passes_at`. Taking
    the highest pass *below the next failure* keeps one lucky step above a real failure from
    overstating capacity; failures *below* the lowest pass are kept out of that rule (on an idle
    VM, waking sleeping processes costs milliseconds, so very low rates can have worse tails than
    moderate ones) and listed as ``failed_below``. None when no step passed.
    """
    open_steps = sorted((s for s in steps if s["mode"] == "open"), key=lambda s: s["offered_rate"])

    def ok(step: Mapping[str, Any]) -> bool:
        if p99_target_ms is None or budget_ms is None:
            return bool(step["passed"])
        return passes_at(step, p99_target_ms, budget_ms)

    passing = [s for s in open_steps if ok(s)]
    if not passing:
        return None
    lowest_pass = passing[0]["offered_rate"]
    above = [s["offered_rate"] for s in open_steps if not ok(s) and s["offered_rate"] > lowest_pass]
    ceiling = min(above) if above else float("inf")
    best = max((s for s in passing if s["offered_rate"] < ceiling), key=lambda s: s["offered_rate"])
    return {
        "rate": best["offered_rate"],
        "achieved_rate": best["achieved_rate"],
        "label": best["label"],
        "p99_ms": best["latency_ms"]["p99"],
        "max_ms": best["latency_ms"]["max"],
        "first_failing_rate": None if ceiling == float("inf") else ceiling,
        "failed_below": [
            s["offered_rate"] for s in open_steps if not ok(s) and s["offered_rate"] < lowest_pass
        ],
    }


def saturation_reasons(step: Mapping[str, Any], budget_ms: float) -> list[str]:
    """Why a step shows the target past its capacity (the sweep stops ramping on these), as
    opposed to a tail that is merely longer than the p99 target."""
    c, lat = step["counts"], step["latency_ms"]
    reasons = []
    if c["sent"] and (c["errors"] + c["timeouts"]) / c["sent"] > 0.01:
        reasons.append("more than 1% errors or timeouts")
    if c["unsent"]:
        reasons.append("the generator could not keep up")
    if lat["p99"] > budget_ms:
        reasons.append("p99 beyond the budget")
    if step["mode"] == "open" and step["achieved_rate"] < 0.85 * step["offered_rate"]:
        reasons.append("achieved rate under 85% of offered")
    return reasons


@dataclass(frozen=True, slots=True)
class SweepPlan:
    """How the capacity sweep picks rates: a geometric ramp, then bisection."""

    start_rate: float = 50.0
    factor: float = 1.5
    max_rate: float = 6000.0
    refine_steps: int = 2
    resolution: float = 0.08  # stop bisecting once the bracket is this narrow (relative)
    max_steps: int = 16
    # Failures in a row above a pass that end the ramp early; the default keeps every target
    # ramping to saturation, so all curves cover the same range.
    max_failures_in_a_row: int = 99

    def __post_init__(self) -> None:
        if not (self.start_rate > 0 and self.factor > 1 and self.max_rate >= self.start_rate):
            raise ValueError("need start_rate > 0, factor > 1 and max_rate >= start_rate")


@dataclass(frozen=True, slots=True)
class SweepPoint:
    """What the sweep needs to know about a finished step."""

    rate: float
    passed: bool
    saturated: bool = False


def next_sweep_rate(done: Sequence[SweepPoint], plan: SweepPlan) -> float | None:
    """The next rate to try; None when the sweep is finished.

    Ramp: multiply the highest rate so far by ``factor`` until a step is saturated (see
    :func:`saturation_reasons`), ``max_failures_in_a_row`` steps in a row fail after a pass, or
    ``max_rate`` is reached, so the latency-against-load curve runs from light load to saturation. Then bisect
    between the capacity step (the highest pass below the first failure above the lowest pass,
    as :func:`capacity` reads it) and that failure, ``refine_steps`` times at most.
    """
    if len(done) >= plan.max_steps:
        return None
    if not done:
        return plan.start_rate
    ramp_over_at = _ramp_end(done, plan)
    if ramp_over_at is None:
        top = max(p.rate for p in done)
        return None if top >= plan.max_rate else round(min(top * plan.factor, plan.max_rate), 1)
    passes = sorted(p.rate for p in done if p.passed)
    if not passes:
        return None
    above = [p.rate for p in done if not p.passed and p.rate > passes[0]]
    if not above:
        return None
    ceiling = min(above)
    floor = max(r for r in passes if r < ceiling)
    refinements = len(done) - ramp_over_at - 1
    if refinements >= plan.refine_steps or (ceiling - floor) <= plan.resolution * floor:
        return None
    return round((floor + ceiling) / 2, 1)


def _ramp_end(done: Sequence[SweepPoint], plan: SweepPlan) -> int | None:
    """Index of the step that ended the ramp, or None while it goes on."""
    in_a_row = 0
    seen_pass = False
    for i, point in enumerate(done):
        seen_pass = seen_pass or point.passed
        in_a_row = 0 if point.passed else in_a_row + 1
        # Failures in a row only end the ramp above a pass: with no pass at all, the curve is
        # still wanted up to saturation.
        enough_above = seen_pass and in_a_row >= plan.max_failures_in_a_row
        if point.saturated or point.rate >= plan.max_rate or enough_above:
            return i
    return None


def common_rate(report: Mapping[str, Any]) -> float | None:
    """The highest offered rate every target ran unsaturated: where side by side is fair."""
    rates: set[float] | None = None
    for target in report["targets"].values():
        mine = {
            s["offered_rate"]
            for s in target.get("steps", [])
            if s["mode"] == "open" and not s.get("saturation_reasons")
        }
        rates = mine if rates is None else rates & mine
    return max(rates) if rates else None


def capacity_table(
    steps: Sequence[Mapping[str, Any]], p99_targets_ms: Sequence[float], budget_ms: float
) -> dict[str, dict[str, Any] | None]:
    """:func:`capacity` at several p99 targets (keys: the target in ms, as text)."""
    return {f"{t:g}": capacity(steps, t, budget_ms) for t in p99_targets_ms}


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den == 0:
        return None
    return round(num / den, 3)


def compare(
    cascade: Mapping[str, Any],
    naive: Mapping[str, Any],
    names: tuple[str, str] = ("cascade", "naive"),
) -> dict[str, Any]:
    """Side-by-side ratios of two targets (``names``: how the report calls them; the ratio is the
    first one's gain over the second: >1 means the first is better)."""
    first, second = names

    def rate(cap: Mapping[str, Any] | None) -> float | None:
        return cap["rate"] if cap else None

    def pair(a: float | None, b: float | None, gain: float | None) -> dict[str, Any]:
        return {first: a, second: b, "ratio": gain}

    def ms_pair(a: float, b: float) -> dict[str, Any]:
        return {f"{first}_ms": a, f"{second}_ms": b, "ratio": _ratio(b, a)}

    out: dict[str, Any] = {"names": [first, second]}
    cap_c, cap_n = rate(cascade.get("capacity")), rate(naive.get("capacity"))
    out["capacity_rate"] = pair(cap_c, cap_n, _ratio(cap_c, cap_n))
    by_c = cascade.get("capacity_by_p99_ms") or {}
    by_n = naive.get("capacity_by_p99_ms") or {}
    out["capacity_by_p99_ms"] = {
        key: pair(
            rate(by_c[key]), rate(by_n.get(key)), _ratio(rate(by_c[key]), rate(by_n.get(key)))
        )
        for key in by_c
    }
    ser_c, ser_n = cascade.get("serial"), naive.get("serial")
    if ser_c and ser_n:
        out["serial_latency"] = {
            name: ms_pair(ser_c["latency_ms"][name], ser_n["latency_ms"][name])
            for name in ("p50", "p99")
        }
    steps_c = {s["offered_rate"]: s for s in cascade.get("steps", []) if s["mode"] == "open"}
    steps_n = {s["offered_rate"]: s for s in naive.get("steps", []) if s["mode"] == "open"}
    common = sorted(set(steps_c) & set(steps_n))
    out["same_rate"] = [
        {
            "rate": rate,
            **{
                name: ms_pair(steps_c[rate]["latency_ms"][name], steps_n[rate]["latency_ms"][name])
                for name in ("p50", "p99")
            },
        }
        for rate in common
    ]
    return out


def overload_basis(target: Mapping[str, Any]) -> float | None:
    """The rate an overload step multiplies: the capacity at SLO, else (no step met the SLO) the
    lowest open step's offered rate, which bounds the capacity from above, so the factor times it
    is at least that many times the capacity. Not the best achieved rate: an open-loop sweep
    achieves what it offers up to its top step, and 3x that (4,381/s on 2026-12-06) was more than
    the generator could send on these two cores (2.6 s behind), and than the gRPC floor could
    answer. None without open steps."""
    cap = target.get("capacity")
    if cap:
        return float(cap["rate"])
    offered = [s["offered_rate"] for s in target.get("steps", []) if s["mode"] == "open"]
    return min(offered) if offered else None


def overload_summary(step: Mapping[str, Any]) -> dict[str, Any]:
    """What an overload step shows about keeping deadlines: every sent call is exactly one of
    served (answered, not shed), shed (answered ``OVERLOADED``), ``DEADLINE_EXCEEDED`` or another
    failure (an error, or a call abandoned at the end of the step)."""
    c = step["counts"]
    deadline_exceeded = int(c.get("timeout_codes", {}).get("DEADLINE_EXCEEDED", 0))
    other_failures = c["errors"] + c["timeouts"] - deadline_exceeded
    served = c["ok"] - c["shed"]
    lat = step["latency_ms"]
    return {
        "offered_rate": step["offered_rate"],
        "achieved_rate": step["achieved_rate"],
        "sent": c["sent"],
        "unsent": c["unsent"],
        "answers": c["ok"],
        "served": served,
        "shed": c["shed"],
        "stage2_overloaded": int(c["reasons"].get("STAGE2_OVERLOADED", 0)),
        "degraded_other": c["degraded_other"],
        "unlabelled_fallbacks": c["unlabelled_fallbacks"],
        "late": c["late"],
        "late_after_ms": step.get("late_after_ms"),
        "deadline_exceeded": deadline_exceeded,
        "other_failures": other_failures,
        "error_codes": c["error_codes"],
        "latency_ms": {k: lat[k] for k in ("p50", "p99", "max")},
        "service_ms": {k: step["service_ms"][k] for k in ("p50", "p99", "max")},
        "adds_up": served + c["shed"] + deadline_exceeded + other_failures == c["sent"],
    }


def nearest_step(
    steps: Sequence[Mapping[str, Any]], rate: float, tolerance: float = 0.2
) -> Mapping[str, Any] | None:
    """The open step whose offered rate is nearest ``rate``, if within ``tolerance`` (relative)."""
    near = [
        s
        for s in steps
        if s["mode"] == "open" and abs(s["offered_rate"] - rate) <= tolerance * rate
    ]
    return min(near, key=lambda s: abs(s["offered_rate"] - rate)) if near else None


def max_degraded_under_capacity(target: Mapping[str, Any]) -> float | None:
    """The highest degraded share (answers with a reason other than ``OVERLOADED``) of the open
    steps at or below the capacity rate; None without a capacity."""
    cap = target.get("capacity")
    if not cap:
        return None
    shares = [
        s["rates"]["degraded_share"]
        for s in target.get("steps", [])
        if s["mode"] == "open" and s["offered_rate"] <= cap["rate"]
    ]
    return max(shares) if shares else None


def max_p99_at_low_load(
    target: Mapping[str, Any], capacity_rate: float | None, share: float
) -> float | None:
    """The highest p99 (ms) of the 1-in-flight step and of the open steps offered at most
    ``share`` of ``capacity_rate``; None without a capacity or without any such step."""
    if not capacity_rate:
        return None
    p99s = [
        s["latency_ms"]["p99"]
        for s in target.get("steps", [])
        if s["mode"] == "open" and s["offered_rate"] <= share * capacity_rate
    ]
    serial = target.get("serial")
    if serial:
        p99s.append(serial["latency_ms"]["p99"])
    return max(p99s) if p99s else None


@dataclass(frozen=True, slots=True)
class Goals:
    """The targets of "Keep every deadline at any load" for this 2-core machine kind."""

    serial_stage1_p50_ms: float = 1.5
    serial_stage1_p99_ms: float = 3.0
    serial_escalated_p99_ms: float = 8.0
    capacity_rate: float = 1000.0
    capacity_ratio: float = 1.5
    low_load_p99_ms: float = 5.0
    low_load_share: float = 0.6  # of the capacity rate: where the low-load p99 target holds
    orchestrator_p50_ms: float = 0.3
    cpu_rate: float = 300.0  # the CPU targets hold at this rate (nearest step within 20%)
    orchestrator_cpu_ms: float = 0.6
    screening_cpu_ms: float = 0.25
    stack_cpu_ms: float = 1.2
    degraded_share_under_capacity: float = 0.001
    overload_late: int = 0
    overload_deadline_exceeded: int = 0
    overload_unlabelled: int = 0


def _figures(
    target: Mapping[str, Any],
    goals: Goals,
    *,
    server_role: str,
    capacity_rate: float | None,
) -> dict[str, float | None]:
    """The measurements the goals judge, read from one target's results. ``server_role`` is the
    process role whose CPU the orchestrator goal reads; ``capacity_rate`` bounds the low-load
    steps (the cascade's capacity, also when these are the floor's figures)."""
    serial = target.get("serial")
    stage1 = serial["by_path_ms"].get("STAGE1") if serial else None
    stage2 = serial["by_path_ms"].get("STAGE2") if serial else None
    cap = target.get("capacity")
    cpu_step = nearest_step(target.get("steps", []), goals.cpu_rate)
    per_answer = (cpu_step.get("cpu") or {}).get("ms_per_answer", {}) if cpu_step else {}
    overload = target.get("overload")
    summary = overload["summary"] if overload else None
    return {
        "serial_stage1_p50_ms": stage1["p50"] if stage1 else None,
        "serial_stage1_p99_ms": stage1["p99"] if stage1 else None,
        "serial_escalated_p99_ms": stage2["p99"] if stage2 else None,
        "capacity_rate": cap["rate"] if cap else None,
        "low_load_p99_ms": max_p99_at_low_load(target, capacity_rate, goals.low_load_share),
        "orchestrator_p50_ms": serial["stages_ms"]["orchestrator"]["p50"] if serial else None,
        "orchestrator_cpu_ms": per_answer.get(server_role),
        "screening_cpu_ms": per_answer.get("screening-workers"),
        "stack_cpu_ms": per_answer.get("stack"),
        "degraded_share_under_capacity": max_degraded_under_capacity(target),
        "overload_late": summary["late"] if summary else None,
        "overload_deadline_exceeded": summary["deadline_exceeded"] if summary else None,
        "overload_unlabelled": summary["unlabelled_fallbacks"] if summary else None,
    }


STOLEN_SHARE_NOTED: Final = 0.10
"""A goal not met is noted as measured on a noisy host when, in a step it reads, the host ran
something else for at least this share of the time this machine's cores wanted to run."""
SEND_LAG_NOTED_MS: Final = 5.0
"""... and as measured with a generator that could not keep up when, in a step it reads, calls
went out this much later than planned (send lag p99): the machine could not both send and serve."""
_SERIAL_GOALS: Final = frozenset(
    {
        "serial_stage1_p50_ms",
        "serial_stage1_p99_ms",
        "serial_escalated_p99_ms",
        "orchestrator_p50_ms",
    }
)
_CPU_GOALS: Final = frozenset({"orchestrator_cpu_ms", "screening_cpu_ms", "stack_cpu_ms"})
_NEEDS_CAPACITY: Final = frozenset({"low_load_p99_ms", "degraded_share_under_capacity"})


def _goal_steps(
    target: Mapping[str, Any], name: str, goals: Goals, capacity_rate: float | None
) -> list[Mapping[str, Any]]:
    """The steps whose figures a goal reads (the serial step, the CPU step, the overload step,
    or the open steps the rate-bounded goals range over)."""
    steps: list[Mapping[str, Any]] = [s for s in target.get("steps", []) if s["mode"] == "open"]
    serial = target.get("serial")
    chosen: list[Mapping[str, Any] | None]
    if name in _SERIAL_GOALS:
        chosen = [serial]
    elif name in _CPU_GOALS:
        chosen = [nearest_step(steps, goals.cpu_rate)]
    elif name.startswith("overload_"):
        chosen = [target.get("overload")]
    elif name == "low_load_p99_ms" and capacity_rate:
        limit = goals.low_load_share * capacity_rate
        chosen = [serial, *(s for s in steps if s["offered_rate"] <= limit)]
    elif name == "degraded_share_under_capacity" and capacity_rate:
        chosen = [s for s in steps if s["offered_rate"] <= capacity_rate]
    else:
        chosen = list(steps)
    return [s for s in chosen if s]


def _noise_reasons(steps: Sequence[Mapping[str, Any]]) -> list[str]:
    """What in ``steps`` made the machine, not the product, part of the figure: the host's steal
    and a generator that fell behind, each from the worst such step."""
    reasons = []
    stolen = [
        (share, s["label"])
        for s in steps
        if (share := ((s.get("cpu") or {}).get("machine") or {}).get("steal_share")) is not None
    ]
    if stolen and max(stolen)[0] >= STOLEN_SHARE_NOTED:
        share, label = max(stolen)
        reasons.append(f"the host stole {share:.0%} of the cores' time ({label})")
    lags = [
        (lag, s["label"])
        for s in steps
        if (lag := (s.get("send_lag_ms") or {}).get("p99")) is not None
    ]
    if lags and max(lags)[0] > SEND_LAG_NOTED_MS:
        lag, label = max(lags)
        reasons.append(f"the generator sent {lag:.1f} ms late at p99 ({label})")
    return reasons


def _lowest_step_failure(target: Mapping[str, Any]) -> str | None:
    """Why the lowest-rate open step did not pass at the SLO (None without open steps)."""
    steps = [s for s in target.get("steps", []) if s["mode"] == "open"]
    if not steps:
        return None
    lowest = min(steps, key=lambda s: s["offered_rate"])
    failed = "; ".join(lowest.get("fail_reasons") or []) or "it did not pass"
    return f"no step passed; at {lowest['offered_rate']:g}/s: {failed}"


# The goals whose measurement means something on the gRPC floor server (no stages, no workers).
_FLOOR_FIGURES: Final = frozenset(
    {
        "serial_stage1_p50_ms",
        "serial_stage1_p99_ms",
        "capacity_rate",
        "low_load_p99_ms",
        "orchestrator_cpu_ms",
        "stack_cpu_ms",
    }
)


def evaluate_goals(
    cascade: Mapping[str, Any],
    comparison: Mapping[str, Any] | None,
    goals: Goals,
    floor: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Each goal with what was measured and whether it was met (``met`` None: not measured).

    With ``floor`` (the gRPC floor server's results, :mod:`loadtests.grpc_floor`), each goal
    that a server doing no work can be measured by also carries ``floor``: the same figure on
    the floor, in the same run, which is the part of the cascade's that gRPC and the machine cost
    before any of the product's work.

    Each goal not met carries ``why``: what the run measured that explains it besides the
    product (the floor missing it too, the host's steal or the generator's lag in the steps the
    goal reads, no step passing where the goal needs a capacity); empty where the run shows
    nothing but the product's own figure."""
    cap = cascade.get("capacity")
    cap_rate = cap["rate"] if cap else None
    measured = _figures(cascade, goals, server_role="orchestrator", capacity_rate=cap_rate)
    on_floor = (
        _figures(floor, goals, server_role=FLOOR_NAME, capacity_rate=cap_rate) if floor else {}
    )
    measured["capacity_ratio"] = comparison["capacity_rate"]["ratio"] if comparison else None
    cpu_step = nearest_step(cascade.get("steps", []), goals.cpu_rate)
    at = f" at {cpu_step['offered_rate']:g}/s" if cpu_step else f" at ~{goals.cpu_rate:g}/s"
    share = f"{goals.low_load_share:.0%}"
    rows: list[tuple[str, str, float, bool]] = [
        (
            "serial_stage1_p50_ms",
            "stage-1 path, 1 in flight, p50 <= {:g} ms",
            goals.serial_stage1_p50_ms,
            False,
        ),
        (
            "serial_stage1_p99_ms",
            "stage-1 path, 1 in flight, p99 <= {:g} ms",
            goals.serial_stage1_p99_ms,
            False,
        ),
        (
            "serial_escalated_p99_ms",
            "escalated calls, 1 in flight, p99 <= {:g} ms",
            goals.serial_escalated_p99_ms,
            False,
        ),
        ("capacity_rate", "capacity at SLO >= {:g}/s", goals.capacity_rate, True),
        ("capacity_ratio", ">= {:g}x the naive baseline's capacity", goals.capacity_ratio, True),
        (
            "low_load_p99_ms",
            "p99 <= {:g} ms from 1 in flight up to " + share + " of capacity",
            goals.low_load_p99_ms,
            False,
        ),
        (
            "orchestrator_p50_ms",
            "orchestrator overhead p50 <= {:g} ms (1 in flight)",
            goals.orchestrator_p50_ms,
            False,
        ),
        (
            "orchestrator_cpu_ms",
            "orchestrator CPU <= {:g} ms per answer" + at,
            goals.orchestrator_cpu_ms,
            False,
        ),
        (
            "screening_cpu_ms",
            "screening CPU <= {:g} ms per answer" + at,
            goals.screening_cpu_ms,
            False,
        ),
        ("stack_cpu_ms", "whole stack CPU <= {:g} ms per answer" + at, goals.stack_cpu_ms, False),
        (
            "degraded_share_under_capacity",
            "degraded share (reasons other than OVERLOADED) <= {:.1%} at or below capacity",
            goals.degraded_share_under_capacity,
            False,
        ),
        (
            "overload_late",
            "overload: answers later than deadline + 2 ms == {:g}",
            goals.overload_late,
            False,
        ),
        (
            "overload_deadline_exceeded",
            "overload: DEADLINE_EXCEEDED == {:g}",
            goals.overload_deadline_exceeded,
            False,
        ),
        (
            "overload_unlabelled",
            "overload: default or degraded answers without a reason == {:g}",
            goals.overload_unlabelled,
            False,
        ),
    ]
    no_capacity = _lowest_step_failure(cascade) if cap_rate is None else None
    out = []
    for name, text, goal, higher_is_better in rows:
        value = measured[name]
        met = None
        why: list[str] = []
        if value is not None:
            met = value >= goal if higher_is_better else value <= goal
        elif name == "capacity_rate" and no_capacity:
            met = False  # steps ran and none passed: a measured miss, not a missing figure
            why.append(no_capacity)
        elif name in _NEEDS_CAPACITY and no_capacity:
            why.append("judged up to the capacity, and " + no_capacity)
        row: dict[str, Any] = {"name": name, "goal": text.format(goal), "measured": value}
        if floor is not None:
            row["floor"] = on_floor.get(name) if name in _FLOOR_FIGURES else None
            on = row["floor"]
            floor_met = None if on is None else (on >= goal if higher_is_better else on <= goal)
            if met is False and floor_met is False:
                why.append(f"the gRPC floor, doing no work, misses it too ({on:g})")
        if met is False:
            why.extend(_noise_reasons(_goal_steps(cascade, name, goals, cap_rate)))
        row["met"] = met
        row["why"] = why
        out.append(row)
    return out
