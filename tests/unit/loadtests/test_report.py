"""Step reports, pass/fail at the SLO, capacity, the sweep's rates, ratios, goals and tables."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cascade.v1 import scoring_pb2
from loadtests.cpu import CpuSnapshot, cpu_report
from loadtests.histogram import Histogram
from loadtests.machine_speed import machine_speed
from loadtests.report import (
    FLOOR_NAME,
    SEND_LAG_NOTED_MS,
    STOLEN_SHARE_NOTED,
    Criteria,
    Goals,
    SweepPlan,
    SweepPoint,
    capacity,
    capacity_table,
    common_rate,
    compare,
    evaluate_goals,
    max_p99_at_low_load,
    next_sweep_rate,
    passes_at,
    saturation_reasons,
    step_report,
    summarize,
)
from loadtests.results import Failure, Tally
from loadtests.tables import markdown_tables, text_table
from tests.unit.loadtests.test_results import reply


def _tally(latencies_ms: list[float], *, timeouts: int = 0, unsent: int = 0) -> Tally:
    tally = Tally(budget_us=50_000)
    tally.scheduled = len(latencies_ms) + timeouts + unsent
    tally.unsent = unsent
    for i, ms in enumerate(latencies_ms):
        start = i * 0.01
        tally.record_sent(start, start)
        tally.record_answer(start, start, start + ms / 1000, reply())
    for _ in range(timeouts):
        tally.record_sent(0.0, 0.0)
        tally.record_failure(0.0, 0.05, Failure.TIMEOUT)
    return tally


def _step(tally: Tally, rate: float = 100.0, mode: str = "open", window: float = 1.0) -> Any:
    return step_report(
        tally,
        label=f"t @{rate:g}/s",
        mode=mode,
        arrivals="poisson",
        offered_rate=rate,
        window_s=window,
        processes=1,
        criteria=Criteria(),
    )


def test_summarize_reports_milliseconds() -> None:
    hist = Histogram()
    hist.record_many(range(1000, 101_000, 1000))  # 1..100 ms
    s = summarize(hist)
    assert (s["count"], s["max"]) == (100.0, 100.0)
    # Within the histogram's 0.1%, never below the exact value.
    assert 50.0 <= s["p50"] <= 50.05 and 99.0 <= s["p99"] <= 99.1
    assert s["p99_9"] == 100.0 and s["mean"] == pytest.approx(50.5)


def test_a_fast_clean_step_passes_and_its_counts_add_up() -> None:
    report = _step(_tally([2.0] * 100), rate=100.0)
    assert report["passed"], report["fail_reasons"]
    c = report["counts"]
    assert c["sent"] == c["ok"] + c["errors"] + c["timeouts"]
    assert c["scheduled"] == c["sent"] + c["unsent"]
    assert report["rates"]["slo_attainment"] == 1.0
    assert report["achieved_rate"] == pytest.approx(100.0)
    assert report["stages_ms"]["stage1"]["p50"] == 0.6
    assert report["bookkeeping_problems"] == []


def test_a_slow_tail_fails_on_p99_and_on_the_budget() -> None:
    report = _step(_tally([2.0] * 95 + [60.0] * 5))
    reasons = " ".join(report["fail_reasons"])
    assert not report["passed"]
    assert "p99 60.00 ms > target 10 ms" in reasons and "max 60.00 ms > budget 50 ms" in reasons
    assert report["rates"]["slo_attainment"] == pytest.approx(0.95)


def test_timeouts_and_unsent_fail_a_step() -> None:
    report = _step(_tally([1.0] * 98, timeouts=1, unsent=1))
    reasons = " ".join(report["fail_reasons"])
    assert "0 errors and 1 timeouts" in reasons and "1 requests the generator" in reasons
    assert report["rates"]["timeout"] == pytest.approx(1 / 99, abs=1e-6)


def test_a_server_that_falls_behind_fails_through_its_latency() -> None:
    # Answers arrive ever later relative to their intended times: queueing, not a slow stage.
    report = _step(_tally([float(ms) for ms in range(1, 101)]), rate=100.0)
    assert not report["passed"]
    assert any(r.startswith("p99") for r in report["fail_reasons"])
    assert report["achieved_rate"] < report["offered_rate"]


def _fake(rate: float, passed: bool, p99: float | None = None) -> dict[str, Any]:
    return {
        "mode": "open",
        "offered_rate": rate,
        "achieved_rate": rate,
        "passed": passed,
        "label": f"x @{rate:g}/s",
        "latency_ms": {"p50": 1.0, "p99": p99 or (5.0 if passed else 20.0), "max": 30.0},
        "counts": {"errors": 0, "timeouts": 0, "unsent": 0},
        "bookkeeping_problems": [],
    }


def test_capacity_is_the_highest_pass_below_the_first_failure_above_it() -> None:
    steps = [_fake(200, True), _fake(300, True), _fake(450, False), _fake(375, True)]
    steps.append(_fake(600, True))  # a lucky pass above a failure does not count
    cap = capacity(steps)
    assert cap is not None
    assert (cap["rate"], cap["first_failing_rate"], cap["failed_below"]) == (375, 450, [])


def test_low_rate_tail_failures_do_not_hide_capacity_but_are_listed() -> None:
    steps = [_fake(25, False), _fake(50, True), _fake(75, True), _fake(110, False)]
    cap = capacity(steps)
    assert cap is not None
    assert (cap["rate"], cap["first_failing_rate"], cap["failed_below"]) == (75, 110, [25])


def test_capacity_is_none_when_nothing_passed() -> None:
    assert capacity([_fake(200, False)]) is None
    assert capacity([]) is None


def test_capacity_at_other_p99_targets() -> None:
    steps = [_fake(100, True, 8.0), _fake(200, False, 15.0), _fake(300, False, 40.0)]
    table = capacity_table(steps, [10.0, 20.0, 50.0], budget_ms=50.0)
    rates = {k: v["rate"] if v else None for k, v in table.items()}
    assert rates == {"10": 100, "20": 200, "50": 300}
    over_budget = [_fake(100, True, 8.0) | {"latency_ms": {"p99": 8.0, "max": 60.0}}]
    assert capacity(over_budget, 10.0, 50.0) is None
    assert passes_at(steps[0], 10.0, 50.0) and not passes_at(steps[1], 10.0, 50.0)


def test_saturation_is_failure_not_just_a_long_tail() -> None:
    counts = {"errors": 0, "timeouts": 0, "unsent": 0, "sent": 100}
    step = _fake(100, False, 20.0) | {"counts": counts}
    assert saturation_reasons(step, 50.0) == []
    swamped = step | {"achieved_rate": 60.0, "counts": counts | {"timeouts": 5}}
    assert saturation_reasons(swamped, 50.0) == [
        "more than 1% errors or timeouts",
        "achieved rate under 85% of offered",
    ]


def point(rate: float, passed: bool, saturated: bool = False) -> SweepPoint:
    return SweepPoint(rate, passed, saturated)


def test_sweep_ramps_to_saturation_then_bisects_then_stops() -> None:
    plan = SweepPlan(start_rate=100, factor=2, max_rate=10_000, refine_steps=2)
    done: list[SweepPoint] = []
    assert next_sweep_rate(done, plan) == 100
    done += [point(100, True)]
    assert next_sweep_rate(done, plan) == 200
    done += [point(200, True), point(400, True), point(800, False)]
    assert next_sweep_rate(done, plan) == 1600  # past capacity, not yet saturated: the curve
    done += [point(1600, False, saturated=True)]
    assert next_sweep_rate(done, plan) == 600  # now bisect between 400 and 800
    done += [point(600, False)]
    assert next_sweep_rate(done, plan) == 500
    done += [point(500, True)]
    assert next_sweep_rate(done, plan) is None  # two refinements done


def test_sweep_stops_after_failures_in_a_row_above_a_pass() -> None:
    plan = SweepPlan(start_rate=25, factor=2, max_rate=10_000, max_failures_in_a_row=2)
    assert next_sweep_rate([point(25, True), point(50, False)], plan) == 100  # ramp goes on
    # Two failures in a row above the pass end the ramp: bisect between 25 and 50.
    assert next_sweep_rate([point(25, True), point(50, False), point(100, False)], plan) == 37.5


def test_sweep_without_any_pass_ramps_on_to_saturation() -> None:
    plan = SweepPlan(start_rate=25, factor=2, max_rate=10_000, max_failures_in_a_row=2)
    fails = [point(25, False), point(50, False), point(100, False)]
    assert next_sweep_rate(fails, plan) == 200
    assert next_sweep_rate([*fails, point(200, False, saturated=True)], plan) is None


def test_sweep_brackets_above_the_lowest_pass() -> None:
    plan = SweepPlan(start_rate=25, factor=2, max_rate=10_000)
    # An early tail failure at 25/s does not bracket; 100 -> 200 does.
    done = [point(25, False), point(50, True), point(100, True), point(200, False, True)]
    assert next_sweep_rate(done, plan) == 150


def test_sweep_stops_ramping_at_max_rate() -> None:
    plan = SweepPlan(start_rate=100, factor=3, max_rate=500)
    assert next_sweep_rate([point(100, True), point(300, True)], plan) == 500
    assert next_sweep_rate([point(100, True), point(300, True), point(500, True)], plan) is None
    assert next_sweep_rate([point(100, False, saturated=True)], plan) is None


def test_sweep_stops_when_the_bracket_is_narrow() -> None:
    plan = SweepPlan(start_rate=1000, factor=1.05, resolution=0.1, refine_steps=5)
    assert next_sweep_rate([point(1000, True), point(1050, False, saturated=True)], plan) is None


def test_sweep_plan_is_validated() -> None:
    with pytest.raises(ValueError, match="factor"):
        SweepPlan(factor=1.0)


def _target(cap_rate: float, serial_p50: float) -> dict[str, Any]:
    serial = _step(_tally([serial_p50] * 100), mode="serial")
    steps = [_step(_tally([2.0] * 100), rate=100.0), _step(_tally([2.0] * 95 + [80.0] * 5), 200.0)]
    return {
        "serial": serial,
        "steps": steps,
        "capacity": {"rate": cap_rate, "label": steps[0]["label"]},
    }


def test_compare_gives_cascade_over_naive_ratios() -> None:
    comp = compare(_target(2000, 1.0), _target(500, 3.0))
    assert comp["capacity_rate"] == {"cascade": 2000, "naive": 500, "ratio": 4.0}
    assert comp["serial_latency"]["p50"]["ratio"] == 3.0
    assert [row["rate"] for row in comp["same_rate"]] == [100.0, 200.0]


def test_compare_copes_with_a_missing_capacity() -> None:
    naive = _target(500, 3.0) | {"capacity": None}
    assert compare(_target(2000, 1.0), naive)["capacity_rate"]["ratio"] is None


def test_goals_are_judged_against_the_issue_targets() -> None:
    cascade = _target(2000, 1.0)
    goals = {
        g["name"]: g for g in evaluate_goals(cascade, compare(cascade, _target(500, 3.0)), Goals())
    }
    assert goals["serial_stage1_p50_ms"]["met"] is True
    assert goals["capacity_rate"]["met"] is True
    assert goals["capacity_ratio"]["measured"] == 4.0
    # orchestrator overhead in the fake replies: 1000 - 200 - 50 - 600 us = 0.15 ms
    assert goals["orchestrator_p50_ms"]["measured"] == 0.15
    none = {g["name"]: g for g in evaluate_goals({"serial": None, "capacity": None}, None, Goals())}
    assert all(g["met"] is None for g in none.values())


def test_the_low_load_p99_is_the_worst_of_1_in_flight_and_the_steps_up_to_a_share_of_capacity() -> (
    None
):
    cascade = _target(2000, 1.0)
    cascade["serial"]["latency_ms"]["p99"] = 3.0
    p99_at_200 = cascade["steps"][1]["latency_ms"]["p99"]
    assert p99_at_200 > 3.0  # the fake 200/s step has a slow tail
    assert max_p99_at_low_load(cascade, 2000.0, 0.6) == p99_at_200  # 200/s <= 1200/s
    assert max_p99_at_low_load(cascade, 300.0, 0.6) == 3.0  # 200/s > 180/s: serial vs 100/s
    cascade["steps"][0]["latency_ms"]["p99"] = 4.5
    assert max_p99_at_low_load(cascade, 300.0, 0.6) == 4.5
    assert max_p99_at_low_load(cascade, None, 0.6) is None
    goals = {g["name"]: g for g in evaluate_goals(cascade, None, Goals())}
    low = goals["low_load_p99_ms"]
    assert low["goal"] == "p99 <= 5 ms from 1 in flight up to 60% of capacity"
    assert low["measured"] == p99_at_200 and low["met"] is False
    assert "floor" not in low  # no floor ran


def test_goals_carry_the_grpc_floors_figure_where_a_server_without_work_has_one() -> None:
    cascade, floor = _target(2000, 1.0), _target(5000, 0.4)
    goals = {g["name"]: g for g in evaluate_goals(cascade, None, Goals(), floor=floor)}
    assert goals["capacity_rate"]["floor"] == 5000
    assert goals["serial_stage1_p50_ms"]["floor"] == floor["serial"]["by_path_ms"]["STAGE1"]["p50"]
    # The low-load steps are the cascade's (up to 60% of its 2000/s), measured on the floor.
    assert goals["low_load_p99_ms"]["floor"] == max_p99_at_low_load(floor, 2000.0, 0.6)
    # No stage 2, no workers, no overload step on the floor: nothing to set beside those.
    for name in ("serial_escalated_p99_ms", "screening_cpu_ms", "overload_late"):
        assert goals[name]["floor"] is None
    text = text_table({"targets": {}, "goals": list(goals.values())})
    header = next(line for line in text.splitlines() if line.strip().startswith("goal"))
    # The floor's 200/s step has the same slow tail: the low-load goal says it misses it too.
    assert header.split() == [
        "goal",
        "measured",
        "gRPC",
        "floor",
        *"measured besides the product".split(),
    ]
    assert goals["low_load_p99_ms"]["why"] == [
        f"the gRPC floor, doing no work, misses it too ({goals['low_load_p99_ms']['floor']:g})"
    ]
    capacity_line = next(line for line in text.splitlines() if "capacity at SLO" in line)
    assert capacity_line.split()[-3:] == ["2000", "5000", "met"]
    plain = text_table({"targets": {}, "goals": evaluate_goals(cascade, None, Goals())})
    assert "gRPC floor" not in plain


def test_tables_show_every_step_and_goal() -> None:
    cascade, naive = _target(2000, 1.0), _target(500, 3.0)
    comparison = compare(cascade, naive)
    report = {
        "targets": {"cascade": cascade, "naive": naive},
        "comparison": comparison,
        "goals": evaluate_goals(cascade, comparison, Goals()),
    }
    text = text_table(report)
    assert text.count("1 in flight") >= 2 and "capacity at SLO: cascade 2000/s" in text
    md = markdown_tables(report)
    assert md.startswith("| target |") and "| naive | 200 |" in md
    assert "NOT met" in md or "met" in md
    assert scoring_pb2  # the fake replies come from the real message type


def test_tables_split_each_step_by_who_decided_the_answer() -> None:
    tally = Tally(budget_us=50_000)
    answers = [(scoring_pb2.DECIDED_BY_STAGE1, 2.0)] * 18 + [
        (scoring_pb2.DECIDED_BY_STAGE2, 9.0)
    ] * 2
    for i, (decided_by, ms) in enumerate(answers):
        start = i * 0.01
        tally.record_sent(start, start)
        tally.record_answer(start, start, start + ms / 1000, reply(decided_by))
    report = {"targets": {"cascade": {"steps": [_step(tally)]}}}

    row = next(
        x for x in markdown_tables(report).splitlines() if x.startswith("| cascade | 100 | 90.0%")
    )

    # 10% escalated at 9 ms set the step's p99 while the stage-1 path stays at 2 ms
    assert row.split(" | ")[2:] == ["90.0%: 2.00 / 2.00", "10.0%: 9.00 / 9.00", "-", "- |"]
    assert "stage 2 (escalated)" in text_table(report)


def test_tables_show_wake_ups_and_run_queue_wait_where_measured() -> None:
    cascade = _target(2000, 1.0)
    assert "run-queue wait" not in text_table({"targets": {"cascade": cascade}})
    before = CpuSnapshot(
        {"orchestrator": 1.0}, waits={"orchestrator": 1.0}, switches={"orchestrator": 100}
    )
    after = CpuSnapshot(
        {"orchestrator": 1.5}, waits={"orchestrator": 1.25}, switches={"orchestrator": 825}
    )
    cascade["steps"][0]["cpu"] = cpu_report(before, after, 1.0, 100)
    report = {"targets": {"cascade": cascade}}
    line = next(x for x in text_table(report).splitlines() if "7.2 / 2.500" in x)
    assert line.split()[:2] == ["cascade", "100"]  # 725 wake-ups, 0.25 s waited, 100 answers
    assert "| cascade | 100 | 7.2 / 2.500 |" in markdown_tables(report)


def test_tables_show_what_the_host_stole_beside_the_wake_ups() -> None:
    cascade = _target(2000, 1.0)
    times = dict.fromkeys(("user", "nice", "system", "idle", "iowait", "irq", "softirq"), 0.0)
    before = CpuSnapshot(
        {"orchestrator": 1.0},
        waits={"orchestrator": 1.0},
        switches={"orchestrator": 100},
        machine=times | {"steal": 1.0},
    )
    after = CpuSnapshot(
        {"orchestrator": 1.5},
        waits={"orchestrator": 1.25},
        switches={"orchestrator": 825},
        machine=times | {"user": 0.6, "system": 0.2, "idle": 1.0, "steal": 1.2},
    )
    cascade["steps"][0]["cpu"] = cpu_report(before, after, 1.0, 100)
    # 0.2 s stolen of the 1.0 s the cores wanted (0.8 busy): 20%, 2 ms per answer of 100
    row = next(
        x
        for x in markdown_tables({"targets": {"cascade": cascade}}).splitlines()
        if "7.2 / 2.500" in x
    )
    assert row.endswith("| 20.0% / 2.000 |")


def test_tables_set_the_orchestrators_cpu_beside_the_grpc_floor_servers() -> None:
    cascade, floor = _target(2000, 1.0), _target(5000, 0.4)
    cascade["steps"][0]["cpu"] = cpu_report(
        CpuSnapshot({"orchestrator": 1.0}), CpuSnapshot({"orchestrator": 1.08}), 1.0, 100
    )
    floor["steps"][0]["cpu"] = cpu_report(
        CpuSnapshot({FLOOR_NAME: 2.0}), CpuSnapshot({FLOOR_NAME: 2.02}), 1.0, 100
    )
    report = {"targets": {"cascade": cascade, FLOOR_NAME: floor}}
    text = text_table(report)
    assert (
        "@100/s: orchestrator 0.800 ms of CPU per answer, of which the gRPC floor server's "
        "0.200 ms (25%); the product's own work 0.600 ms"
    ) in text
    assert "@200/s: orchestrator" not in text  # no CPU measured in that step
    # The floor's row names its own server's CPU, and no screening workers.
    assert f"| {FLOOR_NAME} | 100 | 0.200 | - | - |" in markdown_tables(report)
    assert "@100/s: orchestrator" not in text_table({"targets": {"cascade": cascade}})


def test_stack_env_pairs() -> None:
    from loadtests.cli import stack_env

    assert stack_env(["A=1", "B=x=y", "C="]) == {"A": "1", "B": "x=y", "C": ""}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        stack_env(["nope"])


def test_common_rate_is_the_highest_rate_every_target_ran_unsaturated() -> None:
    def step(rate: float, saturated: bool = False) -> dict[str, Any]:
        return _fake(rate, True) | {"saturation_reasons": ["x"] if saturated else []}

    report = {
        "targets": {
            "cascade": {"steps": [step(100), step(200), step(300)]},
            "naive": {"steps": [step(100), step(200), step(300, saturated=True)]},
        }
    }
    assert common_rate(report) == 200
    assert common_rate({"targets": {"a": {"steps": [step(1)]}, "b": {"steps": []}}}) is None


def test_render_judges_an_earlier_reports_goals_again_with_the_floor_beside(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from loadtests.cli import main

    cascade, floor = _target(2000, 1.0), _target(5000, 0.4)
    old_goals = [
        g for g in evaluate_goals(cascade, None, Goals()) if g["name"] != "low_load_p99_ms"
    ]
    report = {
        "meta": {"sweep": False},
        "targets": {"cascade": cascade, FLOOR_NAME: floor},
        "comparison": None,
        "goals": old_goals,  # as a report written before the low-load goal existed
    }
    source = tmp_path / "old.json"
    source.write_text(json.dumps(report))
    assert main(["--render", str(source), "--out", str(tmp_path / "out")]) == 0
    rendered = json.loads((tmp_path / "out" / "report.json").read_text())
    goals = {g["name"]: g for g in rendered["goals"]}
    assert goals["low_load_p99_ms"]["floor"] == max_p99_at_low_load(floor, 2000.0, 0.6)
    assert goals["capacity_rate"]["floor"] == 5000
    assert "p99 <= 5 ms from 1 in flight up to 60% of capacity" in capsys.readouterr().out
    assert "| gRPC floor |" in (tmp_path / "out" / "tables.md").read_text()


def _stolen(step: dict[str, Any], share: float) -> dict[str, Any]:
    """``step`` as if the host had run something else for ``share`` of its cores' wanted time."""
    step["cpu"] = {"machine": {"steal_share": share, "steal_ms_per_answer": 1.0}}
    return step


def test_a_goal_missed_where_the_host_stole_carries_that_and_a_goal_met_carries_nothing() -> None:
    cascade = _target(2000, 5.0)  # serial p50 5 ms: the 1.5 ms stage-1 goal is missed
    _stolen(cascade["serial"], 0.32)
    goals = {g["name"]: g for g in evaluate_goals(cascade, None, Goals())}
    missed = goals["serial_stage1_p50_ms"]
    assert missed["met"] is False
    assert missed["why"] == [
        f"the host stole 32% of the cores' time ({cascade['serial']['label']})"
    ]
    assert goals["capacity_rate"]["met"] is True and goals["capacity_rate"]["why"] == []
    # Below the threshold the host is not named: the miss is the product's own figure.
    _stolen(cascade["serial"], STOLEN_SHARE_NOTED - 0.01)
    goals = {g["name"]: g for g in evaluate_goals(cascade, None, Goals())}
    assert goals["serial_stage1_p50_ms"]["why"] == []
    # The low-load goal reads the serial step too.
    cascade["serial"] = _stolen(_step(_tally([2.0] * 90 + [9.0] * 10), mode="serial"), 0.5)
    low = {g["name"]: g for g in evaluate_goals(cascade, None, Goals())}["low_load_p99_ms"]
    assert low["met"] is False and any("stole 50%" in why for why in low["why"])


def test_a_generator_that_fell_behind_is_named_beside_the_goals_of_that_step() -> None:
    cascade = _target(2000, 1.0)
    slow = _step(_tally([2.0] * 95 + [80.0] * 5), rate=300.0)  # the CPU goals' step
    slow["send_lag_ms"]["p99"] = SEND_LAG_NOTED_MS + 7.5
    slow["cpu"] = {"ms_per_answer": {"orchestrator": 2.0, "screening-workers": 0.2, "stack": 3.0}}
    cascade["steps"].append(slow)
    goals = {g["name"]: g for g in evaluate_goals(cascade, None, Goals())}
    assert goals["orchestrator_cpu_ms"]["why"] == [
        f"the generator sent 12.5 ms late at p99 ({slow['label']})"
    ]
    assert goals["screening_cpu_ms"]["met"] is True and goals["screening_cpu_ms"]["why"] == []
    # The serial step did not lag: its goals do not carry the 300/s step's lag.
    assert goals["serial_stage1_p50_ms"]["why"] == []


def test_no_step_passing_is_a_measured_miss_of_capacity_not_a_missing_figure() -> None:
    tail = [2.0] * 95 + [80.0] * 5
    steps = [_step(_tally(tail), rate=100.0), _step(_tally(tail), rate=200.0)]
    cascade = _target(2000, 1.0) | {"capacity": capacity(steps), "steps": steps}
    assert cascade["capacity"] is None
    goals = {g["name"]: g for g in evaluate_goals(cascade, None, Goals())}
    cap = goals["capacity_rate"]
    assert cap["measured"] is None and cap["met"] is False
    lowest = cascade["steps"][0]
    assert cap["why"] == ["no step passed; at 100/s: " + "; ".join(lowest["fail_reasons"])]
    # The goals judged up to the capacity cannot be judged, and say why.
    for name in ("low_load_p99_ms", "degraded_share_under_capacity"):
        assert goals[name]["met"] is None
        assert goals[name]["why"] == ["judged up to the capacity, and " + cap["why"][0]]
    # Without any step, capacity is simply not measured.
    bare = {g["name"]: g for g in evaluate_goals({"serial": None, "capacity": None}, None, Goals())}
    assert bare["capacity_rate"]["met"] is None and bare["capacity_rate"]["why"] == []


def test_a_goal_the_grpc_floor_misses_too_says_so() -> None:
    cascade, floor = _target(2000, 5.0), _target(5000, 2.0)
    goals = {g["name"]: g for g in evaluate_goals(cascade, None, Goals(), floor=floor)}
    assert goals["serial_stage1_p50_ms"]["why"] == [
        "the gRPC floor, doing no work, misses it too (2)"
    ]
    fast_floor = _target(5000, 0.4)
    goals = {g["name"]: g for g in evaluate_goals(cascade, None, Goals(), floor=fast_floor)}
    assert goals["serial_stage1_p50_ms"]["met"] is False
    assert goals["serial_stage1_p50_ms"]["why"] == []


def test_the_goal_table_gives_each_reason_in_a_last_column_and_the_machines_speed() -> None:
    cascade = _target(2000, 5.0)
    _stolen(cascade["serial"], 0.4)
    speed = {"wall_p50_us": 75.0, "cpu_mean_us": 76.0, "runs": 300}
    report = {
        "meta": {
            "machine_speed": {
                "workload": "w",
                "start": speed,
                "end": speed | {"wall_p50_us": 300.0},
            }
        },
        "targets": {},
        "goals": evaluate_goals(cascade, None, Goals()),
    }
    text = text_table(report)
    header = next(line for line in text.splitlines() if line.strip().startswith("goal"))
    assert header.endswith("measured besides the product")
    row = next(line for line in text.splitlines() if "stage-1 path, 1 in flight, p50" in line)
    assert row.endswith("NOT met  the host stole 40% of the cores' time (t @100/s)")
    assert "p50 75 us before the first step, 300 us after the last" in text
    md = markdown_tables(report)
    assert "| measured besides the product |" in md
    assert "| NOT met | the host stole 40% of the cores' time (t @100/s) |" in md


def test_machine_speed_times_the_fixed_workload() -> None:
    speed = machine_speed(runs=20, warmup=2)
    assert speed["runs"] == 20
    assert 0 < speed["wall_p50_us"] < 100_000 and speed["cpu_mean_us"] > 0
    with pytest.raises(ValueError, match="runs"):
        machine_speed(runs=0)
