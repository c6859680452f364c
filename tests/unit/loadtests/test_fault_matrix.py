"""The fault matrix's pure parts: phases, timing, the per-call timeline and recovery, the table."""

from __future__ import annotations

import pytest

from cascade.v1 import scoring_pb2
from loadtests.fault_matrix import (
    PHASES,
    FaultKind,
    PhaseTiming,
    Target,
    Timeline,
    markdown_table,
    parse_phases,
    phase_summary,
)
from loadtests.results import Failure, Tally

R = scoring_pb2
LATE_AFTER_S = 0.052


def reply(
    decided_by: int = R.DECIDED_BY_STAGE1, *reasons: int, degraded: bool = False
) -> scoring_pb2.ScoreResponse:
    return scoring_pb2.ScoreResponse(
        decided_by=decided_by,  # type: ignore[arg-type]
        reasons=list(reasons),  # type: ignore[arg-type]
        degraded=degraded or bool(reasons),
    )


def test_the_default_matrix_is_every_phase_in_the_issue_order() -> None:
    assert list(PHASES) == [
        "baseline",
        "sigstop-one-worker",
        "sigstop-all-workers",
        "sigstop-redis",
        "sigstop-nats",
        "sigstop-triton",
        "sigkill-one-worker",
        "sigkill-triton",
    ]
    assert parse_phases("all") == list(PHASES.values())
    assert [p.name for p in parse_phases("baseline, sigkill-triton")] == [
        "baseline",
        "sigkill-triton",
    ]


def test_an_unknown_phase_is_named() -> None:
    with pytest.raises(ValueError, match=r"\['sigstop-moon'\]"):
        parse_phases("baseline,sigstop-moon")


def test_a_kill_phase_leaves_room_for_the_restart() -> None:
    timing = PhaseTiming(pre_s=1, fault_s=2, post_s=3, kill_wait_s=10)
    assert timing.window_s(FaultKind.NONE) == 6
    assert timing.window_s(FaultKind.STOP) == 6
    assert timing.window_s(FaultKind.KILL) == 14
    with pytest.raises(ValueError, match="> 0 s"):
        PhaseTiming(pre_s=0)


def test_recovery_is_from_the_fault_end_to_the_first_proof_after_the_last_bad_call() -> None:
    timeline = Timeline(late_after_s=LATE_AFTER_S)
    timeline.record(0.5, 0.51, reply())  # before the fault: ignored
    timeline.record(2.0, 2.001, reply(R.DECIDED_BY_DEFAULT, R.REASON_STAGE1_UNAVAILABLE))
    timeline.record(3.1, 3.102, reply(R.DECIDED_BY_DEFAULT, R.REASON_STAGE1_UNAVAILABLE))
    timeline.record(3.2, 3.3, reply())  # answered, but late: still recovering
    timeline.record(3.4, 3.41, reply(R.DECIDED_BY_CACHE))  # no proof stage 1 works
    timeline.record(3.5, 3.51, reply(R.DECIDED_BY_STAGE1))
    timeline.record(3.6, 3.61, reply(R.DECIDED_BY_STAGE1))
    assert timeline.recovery_s(3.0, Target.ALL_WORKERS) == pytest.approx(0.5)


def test_only_the_targets_own_reasons_delay_its_recovery() -> None:
    timeline = Timeline(late_after_s=LATE_AFTER_S)
    timeline.record(3.1, 3.11, reply(R.DECIDED_BY_STAGE1, R.REASON_STAGE2_UNAVAILABLE))
    timeline.record(3.2, 3.21, reply(R.DECIDED_BY_STAGE2))
    timeline.record(3.3, 3.31, reply(R.DECIDED_BY_STAGE2, R.REASON_CACHE_UNAVAILABLE))
    assert timeline.recovery_s(3.0, Target.TRITON) == pytest.approx(0.2)
    # For Redis the CACHE_UNAVAILABLE at 3.3 is the fault; nothing proves it back after that.
    assert timeline.recovery_s(3.0, Target.REDIS) is None


def test_a_failed_call_is_never_in_time_and_a_fault_that_never_ended_has_no_recovery() -> None:
    timeline = Timeline(late_after_s=LATE_AFTER_S)
    timeline.record(3.1, 3.15, None)
    assert not timeline.calls[0].in_time and not timeline.calls[0].clean
    assert timeline.recovery_s(3.0, Target.NATS) is None
    assert timeline.recovery_s(None, Target.NATS) is None


def test_without_bad_calls_recovery_is_the_first_proof_after_the_end() -> None:
    timeline = Timeline(late_after_s=LATE_AFTER_S)
    timeline.record(3.05, 3.06, reply(R.DECIDED_BY_STAGE1))
    timeline.record(3.25, 3.26, reply(R.DECIDED_BY_STAGE2))
    assert timeline.recovery_s(3.0, Target.ONE_WORKER) == pytest.approx(0.05)
    assert timeline.recovery_s(3.0, Target.TRITON) == pytest.approx(0.25)


def _tally() -> Tally:
    tally = Tally(budget_us=50_000, late_after_us=52_000)
    for i in range(4):
        tally.scheduled += 1
        tally.record_sent(i * 0.1, i * 0.1)
    tally.record_answer(0.0, 0.0, 0.004, reply())
    tally.record_answer(0.1, 0.1, 0.160, reply())  # late
    tally.record_answer(0.2, 0.2, 0.203, reply(R.DECIDED_BY_DEFAULT, R.REASON_STAGE1_UNAVAILABLE))
    tally.record_failure(0.3, 0.35, Failure.TIMEOUT, "DEADLINE_EXCEEDED")
    return tally


def test_the_phase_summary_counts_what_the_issue_asks_for() -> None:
    spec = PHASES["sigstop-all-workers"]
    timeline = Timeline(late_after_s=LATE_AFTER_S)
    timeline.record(0.0, 0.004, reply())
    summary = phase_summary(spec, _tally(), timeline, window_s=9.0, fault_at_s=2.0, fault_end_s=5.0)
    assert summary["sent"] == 4 and summary["answered"] == 3
    assert summary["late"] == 1 and summary["deadline_exceeded"] == 1
    assert summary["other_errors"] == 0
    assert summary["reasons"] == {"STAGE1_UNAVAILABLE": 1}
    assert summary["fault"] == "sigstop" and summary["target"] == "all-workers"
    assert summary["bookkeeping_problems"] == []


def test_the_table_has_one_row_per_phase_and_says_why_there_is_no_recovery() -> None:
    baseline = phase_summary(
        PHASES["baseline"],
        _tally(),
        Timeline(LATE_AFTER_S),
        window_s=9.0,
        fault_at_s=None,
        fault_end_s=None,
    )
    killed = phase_summary(
        PHASES["sigkill-triton"],
        _tally(),
        Timeline(LATE_AFTER_S),
        window_s=16.0,
        fault_at_s=2.0,
        fault_end_s=None,
    )
    lines = markdown_table([baseline, killed]).splitlines()
    assert lines[0].startswith("| phase | sent | answered | late (> deadline + 2 ms) |")
    assert len(lines) == 4
    assert lines[2].startswith("| baseline | 4 | 3 | 1 | 1 | 0 |")
    assert lines[2].endswith("| STAGE1_UNAVAILABLE 1 | - |")
    assert lines[3].endswith("| fault did not end |")


def test_unclean_calls_are_counted_by_the_second_they_were_sent_in() -> None:
    timeline = Timeline(late_after_s=LATE_AFTER_S)
    timeline.record(0.2, 0.21, reply())
    timeline.record(1.5, 1.51, reply(R.DECIDED_BY_DEFAULT, R.REASON_STAGE1_TIMEOUT))
    timeline.record(1.7, 1.8, reply())  # late
    timeline.record(2.9, 3.0, None)
    assert timeline.unclean_per_s(3.0) == [0, 2, 1]


def test_a_lone_blip_long_after_the_recovery_does_not_move_it() -> None:
    timeline = Timeline(late_after_s=LATE_AFTER_S)
    timeline.record(3.05, 3.06, reply(R.DECIDED_BY_STAGE1, R.REASON_CACHE_UNAVAILABLE))
    for k in range(30):
        timeline.record(3.1 + k * 0.01, 3.105 + k * 0.01, reply())
    timeline.record(4.0, 4.001, reply(R.DECIDED_BY_STAGE1, R.REASON_CACHE_UNAVAILABLE))
    timeline.record(4.1, 4.101, reply())
    assert timeline.recovery_s(3.0, Target.REDIS) == pytest.approx(0.1)
    # ... but a relapse within the streak does.
    assert timeline.recovery_s(3.0, Target.REDIS, streak=40) == pytest.approx(1.1)
