"""Tallies: classification, the per-stage decomposition, merging, and the count identities."""

from __future__ import annotations

import pytest

from cascade.v1 import scoring_pb2
from loadtests.results import Failure, Tally


def reply(
    decided_by: int = scoring_pb2.DECIDED_BY_STAGE1,
    *,
    total: int = 1000,
    redis: int = 200,
    features: int = 50,
    stage1: int = 600,
    stage2: int = 0,
    degraded: bool = False,
    escalated: bool = False,
    reasons: tuple[int, ...] = (),
    deadline_left: int = 0,
) -> scoring_pb2.ScoreResponse:
    return scoring_pb2.ScoreResponse(
        decided_by=decided_by,  # type: ignore[arg-type]
        degraded=degraded,
        escalated=escalated,
        reasons=list(reasons),  # type: ignore[arg-type]
        timings=scoring_pb2.StageTimings(
            total_us=total,
            redis_us=redis,
            features_us=features,
            stage1_us=stage1,
            stage2_us=stage2,
            budget_us=47_000,
            deadline_left_us=deadline_left,
        ),
    )


def test_answer_is_decomposed_by_stage() -> None:
    tally = Tally(budget_us=50_000)
    tally.record_sent(0.0, 0.0005)
    # intended at 0, sent 0.5 ms late, answered at 2.0 ms: service 1.5 ms, server total 1.0 ms.
    tally.record_answer(0.0, 0.0005, 0.0020, reply())
    assert tally.latency.max == 2000
    assert tally.service.max == 1500
    assert tally.send_lag.max == 500
    stages = tally.stages
    assert stages["redis"].max == 200 and stages["stage1"].max == 600
    assert stages["orchestrator"].max == 1000 - 200 - 50 - 600
    assert stages["transport"].max == 1500 - 1000
    assert stages["stage2"].count == 0  # stage 2 did not run
    assert tally.decided_by == {"STAGE1": 1}
    assert tally.within_budget == 1
    assert tally.check() == ["scheduled 0 != sent 1 + unsent 0"]


def test_transport_splits_into_the_servers_front_and_the_legs() -> None:
    tally = Tally(budget_us=50_000)
    # Sent with a 50 ms deadline; the handler started with 49.2 ms of it left: 0.8 ms in the
    # server's gRPC front. Service 3.0 ms, server total 1.0 ms: transport 2.0 ms, legs 1.2 ms.
    tally.record_answer(0.0, 0.0, 0.003, reply(deadline_left=49_200), deadline_s=0.050)
    stages = tally.stages
    assert stages["transport"].max == 2000
    assert (stages["front"].max, stages["legs"].max) == (800, 1200)
    # Without a deadline sent, or a server that does not say (0), transport stays whole.
    tally.record_answer(0.0, 0.0, 0.003, reply(deadline_left=49_200))
    tally.record_answer(0.0, 0.0, 0.003, reply(), deadline_s=0.050)
    assert stages["transport"].count == 3
    assert stages["front"].count == stages["legs"].count == 1


def test_flags_and_reasons_are_counted() -> None:
    tally = Tally(budget_us=50_000)
    r = reply(
        scoring_pb2.DECIDED_BY_STAGE1,
        stage2=3000,
        degraded=True,
        escalated=True,
        reasons=(scoring_pb2.REASON_STAGE2_TIMEOUT,),
    )
    tally.record_answer(0.0, 0.0, 0.004, r)
    tally.record_answer(0.0, 0.0, 0.001, reply(scoring_pb2.DECIDED_BY_CACHE, stage1=0))
    assert (tally.degraded, tally.escalated, tally.cache_hits) == (1, 1, 1)
    assert tally.reasons == {"STAGE2_TIMEOUT": 1}
    assert tally.stages["stage2"].count == 1
    assert set(tally.by_path) == {"STAGE1", "CACHE"}


def test_late_answers_are_outside_the_budget() -> None:
    tally = Tally(budget_us=50_000)
    tally.record_answer(0.0, 0.045, 0.051, reply())  # sent late: 51 ms from intended
    assert tally.within_budget == 0


def test_failures_are_counted_by_kind_and_code() -> None:
    tally = Tally(budget_us=50_000)
    tally.record_failure(0.0, 0.05, Failure.TIMEOUT)
    tally.record_failure(0.0, 0.001, Failure.ERROR, "UNAVAILABLE")
    tally.record_failure(0.0, 0.001, Failure.ERROR)
    assert (tally.timeouts, tally.errors) == (1, 2)
    assert tally.error_codes == {"UNAVAILABLE": 1, "UNKNOWN": 1}
    assert tally.latency.count == 3


def _tally(n_ok: int, n_err: int) -> Tally:
    tally = Tally(budget_us=50_000)
    tally.scheduled = n_ok + n_err
    for i in range(n_ok):
        tally.record_sent(i, i)
        tally.record_answer(i, i, i + 0.002, reply())
    for i in range(n_err):
        tally.record_sent(i, i)
        tally.record_failure(i, i + 0.05, Failure.TIMEOUT)
    return tally


def test_counts_add_up_and_survive_merging() -> None:
    a, b = _tally(5, 1), _tally(3, 2)
    assert a.check() == [] and b.check() == []
    a.merge(b)
    assert a.check() == []
    assert (a.scheduled, a.sent, a.ok, a.timeouts) == (11, 11, 8, 3)
    assert a.stages["stage1"].count == 8
    assert a.last_done_s == pytest.approx(4.002)
    assert a.in_flight == 0


def test_merge_refuses_different_budgets() -> None:
    with pytest.raises(ValueError, match="budgets"):
        Tally(budget_us=1).merge(Tally(budget_us=2))


def test_check_names_each_broken_identity() -> None:
    tally = _tally(2, 0)
    tally.ok += 1
    problems = tally.check()
    assert any("sent 2 != ok 3" in p for p in problems)
    assert any("decided_by" in p for p in problems)
