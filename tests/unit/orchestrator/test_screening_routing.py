"""Stage-1 routing bookkeeping: members from heartbeats, suspects, the hedge delay and budget."""

from __future__ import annotations

import asyncio
import time

import pytest
from opentelemetry.trace import NoOpTracer

from cascade.screening_protocol import (
    encode_heartbeat,
    members_subject,
    parse_heartbeat,
    worker_id_for,
    worker_subject,
)
from cascade.settings import HedgingSettings
from orchestrator.expiry import timer_is_late
from orchestrator.screening_client import NatsScreener, _Call
from orchestrator.screening_routing import HedgeBudget, LatencyQuantile, MemberTable


class Clock:
    def __init__(self) -> None:
        self.now = 10.0

    def __call__(self) -> float:
        return self.now


def table(
    clock: Clock, *, routing: str = "pack", salt: bytes = b"fixed", pack_in_flight: int = 1
) -> MemberTable:
    return MemberTable(
        ttl_s=1.0,
        heartbeat_s=0.25,
        clock=clock,
        routing=routing,  # type: ignore[arg-type]  # the two literals, passed as a str
        pack_in_flight=pack_in_flight,
        salt=salt,
    )


def test_no_member_means_the_queue_group() -> None:
    assert table(Clock()).pick() is None


def test_round_robin_over_live_members() -> None:
    members = table(Clock(), routing="round_robin")
    for w in ("a", "b", "c"):
        members.heard(w)
    picks = [members.pick() or "" for _ in range(6)]
    assert sorted(picks) == ["a", "a", "b", "b", "c", "c"]
    assert picks[:3] == picks[3:]


def test_packing_keeps_to_one_worker_until_it_is_busy_then_spills_in_order() -> None:
    members = table(Clock())
    for w in ("a", "b", "c"):
        members.heard(w)
    first = members.pick()
    assert first is not None and {members.pick() for _ in range(10)} == {first}
    members.sent(first)  # one of our requests in flight there: the next worker in order
    second = members.pick()
    assert second not in (None, first)
    members.sent(second)
    third = members.pick()
    assert third not in (None, first, second)
    members.sent(third)
    members.sent(first)
    # Every one busy: the least busy, earliest in order on a tie.
    assert members.pick() == second
    members.finished(first)
    members.finished(first)
    assert members.pick() == first  # free again: back to the preferred worker
    members.finished("gone")  # a worker that has left: harmless
    members.finished(first)  # never below zero
    assert members.pick() == first


def test_packing_waits_for_the_limit_and_passes_over_a_worker_a_hedge_overtook() -> None:
    members = table(Clock(), pack_in_flight=2)
    members.heard("a")
    members.heard("b")
    first = members.pick()
    assert first is not None
    members.sent(first)
    assert members.pick() == first  # one in flight, limit two: still the preferred one
    members.overtook(first)  # that request was overtaken and has not answered
    other = members.pick()
    assert other not in (None, first)
    members.finished(first, overtaken=True)  # it answered after all
    assert members.pick() == first


def test_the_preference_order_is_per_process_and_moves_only_a_joining_workers_share() -> None:
    workers = [f"w{i}" for i in range(8)]
    preferred = set()
    for salt in (b"one", b"two", b"three", b"four", b"five"):
        members = table(Clock(), salt=salt)
        for w in workers:
            members.heard(w)
        preferred.add(members.pick())
    assert len(preferred) > 1  # processes with other salts prefer other workers
    members = table(Clock(), salt=b"one")
    for w in workers:
        members.heard(w)
    before = members.pick()
    for w in (f"new{i}" for i in range(20)):
        members.heard(w)
        now = members.pick()
        assert now in (before, w)  # rendezvous: the preference changes only to a newcomer
        before = now


def test_suspect_is_avoided_until_heard_a_heartbeat_later() -> None:
    clock = Clock()
    members = table(clock)
    members.heard("a")
    members.heard("b")
    members.suspect("a", "overtaken by a hedge")
    assert {members.pick() for _ in range(10)} == {"b"}
    clock.now += 0.1
    members.heard("a")  # a heartbeat already on its way when it stalled: not proof
    assert {members.pick() for _ in range(10)} == {"b"}
    clock.now += 0.2
    members.heard("a")
    assert members.pick(exclude="b") == "a"  # routable again


def test_quiet_member_expires_and_exclude_is_honoured() -> None:
    clock = Clock()
    members = table(clock)
    members.heard("a")
    members.heard("b")
    assert members.pick(exclude="a") == "b"
    clock.now += 0.9
    members.heard("b")
    clock.now += 0.2  # a: 1.1 s quiet, past the TTL
    assert {members.pick() for _ in range(5)} == {"b"}
    assert len(members) == 1
    assert members.pick(exclude="b") is None


def test_left_member_is_gone_at_once() -> None:
    members = table(Clock())
    members.heard("a")
    members.left("a")
    assert members.pick() is None and len(members) == 0
    members.left("a")  # twice is harmless


def test_all_suspect_gives_none() -> None:
    members = table(Clock())
    members.heard("a")
    members.suspect("a", "timed out")
    assert members.pick() is None


def test_latency_quantile_tracks_recent_answers() -> None:
    q = LatencyQuantile(0.95, size=100, every=10)
    assert q.value_s is None
    for i in range(100):
        q.observe(i / 1000)
    assert q.value_s == pytest.approx(0.095)
    for _ in range(100):  # the window moves on: all fast now
        q.observe(0.001)
    assert q.value_s == pytest.approx(0.001)


def test_hedge_budget_is_a_token_bucket() -> None:
    budget = HedgeBudget(ratio=0.25, burst=2)
    assert budget.spend() and budget.spend()
    assert not budget.spend()
    for _ in range(3):
        budget.earn()
    assert not budget.spend()  # 0.75 of a hedge earned
    budget.earn()
    assert budget.spend()
    for _ in range(1000):
        budget.earn()
    assert budget.tokens == 2  # capped at the burst


def test_heartbeat_round_trip_and_subjects() -> None:
    worker_id = worker_id_for("host.example.com", 1234, "ab12cd")
    assert worker_id == "host_example_com-1234-ab12cd"
    assert parse_heartbeat(encode_heartbeat(worker_id)) == (worker_id, False)
    assert parse_heartbeat(encode_heartbeat(worker_id, leaving=True)) == (worker_id, True)
    assert worker_subject("cascade.screen.s1-1", worker_id) == f"cascade.screen.s1-1.w.{worker_id}"
    assert members_subject("cascade.screen.s1-1") == "cascade.screen.s1-1.members"
    with pytest.raises(ValueError, match="worker id"):
        parse_heartbeat(b"a.b")
    with pytest.raises(ValueError, match="worker id"):
        parse_heartbeat(b"")


def test_hedge_prefers_a_suspect_other_worker_to_the_queue_group() -> None:
    members = table(Clock())
    members.heard("a")
    members.heard("b")
    members.suspect("b", "slow once")
    assert members.pick(exclude="a") is None
    assert members.pick_other("a") == "b"
    assert members.pick_other("b") == "a"
    members.left("b")
    assert members.pick_other("a") is None


def test_a_late_hedge_timer_means_the_loop_is_behind() -> None:
    assert not timer_is_late(10.0, 10.0025)  # a noisy machine's jitter is not overload
    assert timer_is_late(10.0, 10.0035)
    assert not timer_is_late(10.0, 10.002, tolerance_s=0.005)


async def test_a_hedge_timer_that_fires_early_waits_out_the_rest() -> None:
    """libuv counts timers in whole milliseconds from the start of a loop pass, so a 1.3 ms hedge
    timer could fire 0.5 ms after it was armed. At 100/s that hedged two thirds of the requests,
    emptied the hedge budget and left none for a stalled worker. An early firing re-arms."""
    screener = NatsScreener(
        "nats://127.0.0.1:1",  # never connected: an early firing sends nothing
        subject_prefix="p",
        model_version="m",
        feature_set="fs-1",
        tracer=NoOpTracer(),
        hedging=HedgingSettings(),
    )
    loop = asyncio.get_running_loop()
    call = _Call(loop.create_future(), time.perf_counter(), b"", {})
    call.hedge_after_s = 0.050  # not due for another 50 ms
    call.hedge_at_s = loop.time()  # what the millisecond clock said
    screener._hedge(None, call)  # type: ignore[arg-type]  # the early path needs no connection
    assert not call.hedged and len(call.tokens) == 0
    assert call.hedge_timer is not None
    call.hedge_timer.cancel()
