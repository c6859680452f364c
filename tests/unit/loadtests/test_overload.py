"""The overload step's bookkeeping: shed and degraded answers, lateness, how failures ended, the
summary whose counts add up, the goals and the tables."""

from __future__ import annotations

from typing import Any

from cascade.v1 import scoring_pb2
from loadtests.report import (
    Criteria,
    Goals,
    evaluate_goals,
    max_degraded_under_capacity,
    nearest_step,
    overload_basis,
    overload_summary,
    step_report,
)
from loadtests.results import Failure, Tally
from loadtests.tables import markdown_tables, text_table
from tests.unit.loadtests.test_results import reply

DEADLINE_MS = 50.0
LATE_AFTER_US = 52_000


def _overloaded_tally() -> Tally:
    """10 sent: 4 served (one late, one degraded by stage-2 overload), 3 shed, 1 default without
    a reason, 1 DEADLINE_EXCEEDED, 1 UNAVAILABLE error."""
    tally = Tally(budget_us=50_000, late_after_us=LATE_AFTER_US)
    tally.scheduled = 10
    answers = [
        (0.010, reply()),
        (0.0525, reply()),  # 52.5 ms after it was sent: late
        (0.010, reply(scoring_pb2.DECIDED_BY_STAGE1, degraded=True, reasons=(8,))),
        (0.010, reply(scoring_pb2.DECIDED_BY_CACHE)),
        (0.001, reply(scoring_pb2.DECIDED_BY_DEFAULT, degraded=True, reasons=(11,))),
        (0.001, reply(scoring_pb2.DECIDED_BY_DEFAULT, degraded=True, reasons=(11,))),
        (0.001, reply(scoring_pb2.DECIDED_BY_DEFAULT, degraded=True, reasons=(11,))),
        (0.001, reply(scoring_pb2.DECIDED_BY_DEFAULT)),  # a fallback nobody labelled
    ]
    for service_s, answer in answers:
        tally.record_sent(0.0, 0.001)
        tally.record_answer(0.0, 0.001, 0.001 + service_s, answer)
    tally.record_sent(0.0, 0.0)
    tally.record_failure(0.0, 0.050, Failure.TIMEOUT, "DEADLINE_EXCEEDED")
    tally.record_sent(0.0, 0.0)
    tally.record_failure(0.0, 0.002, Failure.ERROR, "UNAVAILABLE")
    return tally


def _step(tally: Tally, rate: float, mode: str = "open") -> dict[str, Any]:
    report = step_report(
        tally,
        label=f"cascade @{rate:g}/s",
        mode=mode,
        arrivals="poisson",
        offered_rate=rate,
        window_s=1.0,
        processes=1,
        criteria=Criteria(),
    )
    if mode == "overload":
        report["summary"] = overload_summary(report)
    return report


def test_tally_counts_shed_degraded_unlabelled_late_and_timeout_codes() -> None:
    tally = _overloaded_tally()
    assert (tally.ok, tally.shed, tally.degraded_other, tally.unlabelled_fallbacks) == (8, 3, 1, 1)
    assert tally.late == 1
    assert tally.timeout_codes == {"DEADLINE_EXCEEDED": 1}
    assert tally.error_codes == {"UNAVAILABLE": 1}
    assert tally.check() == []
    merged = Tally(budget_us=50_000, late_after_us=LATE_AFTER_US)
    merged.merge(tally)
    merged.merge(tally)
    assert (merged.shed, merged.late, merged.timeout_codes["DEADLINE_EXCEEDED"]) == (6, 2, 2)


def test_late_is_not_counted_without_a_limit() -> None:
    tally = Tally(budget_us=50_000)
    tally.record_sent(0.0, 0.0)
    tally.record_answer(0.0, 0.0, 0.5, reply())
    assert tally.late == 0


def test_overload_summary_adds_up_to_what_was_sent() -> None:
    step = _step(_overloaded_tally(), 900.0, mode="overload")
    o = step["summary"]
    assert (o["sent"], o["answers"], o["served"], o["shed"]) == (10, 8, 5, 3)
    assert (o["stage2_overloaded"], o["late"], o["deadline_exceeded"], o["other_failures"]) == (
        1,
        1,
        1,
        1,
    )
    assert o["unlabelled_fallbacks"] == 1
    assert o["adds_up"] is True
    assert o["served"] + o["shed"] + o["deadline_exceeded"] + o["other_failures"] == o["sent"]
    assert step["rates"]["shed"] == 3 / 8
    assert step["rates"]["degraded_share"] == 1 / 8
    assert step["late_after_ms"] == 52.0


def test_an_abandoned_call_is_another_failure_not_a_deadline_exceeded() -> None:
    tally = Tally(budget_us=50_000, late_after_us=LATE_AFTER_US)
    tally.scheduled = 1
    tally.record_sent(0.0, 0.0)
    tally.record_failure(0.0, 2.0, Failure.TIMEOUT, "ABANDONED")
    o = overload_summary(_step(tally, 10.0))
    assert (o["deadline_exceeded"], o["other_failures"], o["adds_up"]) == (0, 1, True)


def _clean(rate: float, *, degraded: int = 0) -> dict[str, Any]:
    tally = Tally(budget_us=50_000, late_after_us=LATE_AFTER_US)
    tally.scheduled = 1000
    for i in range(1000):
        tally.record_sent(0.0, 0.0)
        reasons = (7,) if i < degraded else ()
        tally.record_answer(0.0, 0.0, 0.002, reply(reasons=reasons))
    step = _step(tally, rate)
    step["cpu"] = {
        "cores": {"orchestrator": 0.2, "stack": 0.4, "total": 0.5},
        "ms_per_answer": {
            "orchestrator": 0.5,
            "screening-workers": 0.3,
            "stack": 1.1,
            "loadgen": 0.2,
            "total": 1.3,
        },
        "per_process_ms_per_answer": {
            "screening-workers": {"101": 0.1, "102": 0.2},
            "orchestrator": {"201": 0.26, "202": 0.24},
        },
    }
    return step


def test_goals_read_cpu_near_300_degraded_share_under_capacity_and_the_overload() -> None:
    steps = [_clean(100.0), _clean(280.0, degraded=2), _clean(600.0, degraded=50)]
    target = {
        "serial": None,
        "steps": steps,
        "capacity": {"rate": 280.0, "label": steps[1]["label"]},
        "overload": _step(_overloaded_tally(), 840.0, mode="overload"),
    }
    assert nearest_step(steps, 300.0) is steps[1]
    assert nearest_step(steps, 1000.0) is None
    # 600/s is past capacity, so its 5% does not count; 280/s has 0.2%.
    assert max_degraded_under_capacity(target) == 0.002
    assert overload_basis(target) == 280.0
    # No step met the SLO: the lowest step bounds the capacity from above.
    assert overload_basis({"capacity": None, "steps": steps}) == 100.0
    assert overload_basis({"capacity": None, "steps": []}) is None
    goals = {g["name"]: g for g in evaluate_goals(target, None, Goals())}
    assert goals["orchestrator_cpu_ms"]["measured"] == 0.5 and goals["orchestrator_cpu_ms"]["met"]
    assert goals["screening_cpu_ms"]["met"] is False  # 0.3 > 0.25
    assert goals["stack_cpu_ms"]["met"] is True
    assert "at 280/s" in goals["stack_cpu_ms"]["goal"]
    assert goals["degraded_share_under_capacity"]["met"] is False
    assert goals["overload_late"]["measured"] == 1 and goals["overload_late"]["met"] is False
    assert goals["overload_deadline_exceeded"]["met"] is False
    assert goals["overload_unlabelled"]["measured"] == 1


def test_tables_show_cpu_per_step_with_each_worker_and_the_overload_step() -> None:
    cascade = {
        "serial": None,
        "steps": [_clean(100.0)],
        "capacity": None,
        "overload": _step(_overloaded_tally(), 900.0, mode="overload"),
    }
    report = {
        "meta": {
            "history": {
                "mode": "mature",
                "backfilled_transactions": 640,
                "backfilled_cards": 10,
            }
        },
        "targets": {"cascade": cascade},
        "comparison": None,
        "goals": evaluate_goals(cascade, None, Goals()),
    }
    text = text_table(report)
    md = markdown_tables(report)
    assert "900 (overload)" in text
    assert "0.100 / 0.200" in text  # each screening worker
    assert "0.500 (0.260 / 0.240)" in text  # the orchestrator, and each of its processes
    assert "orchestrator <= 0.6 ms" in text
    assert "640 earlier transactions of 10 cards" in text
    overload_row = next(line for line in md.splitlines() if line.startswith("| cascade | 900 |"))
    # sent, answers, shed, stage2 overloaded, other degraded, unlabelled, late, DE, other, unsent
    assert "| 10 | 8 | 3 | 1 | 1 | 1 | 1 | 1 | 1 | 0 |" in overload_row
    assert "| Overload step" not in md and "Overload step" in md
