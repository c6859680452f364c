"""The send loops against an in-memory sender (no sockets): open loop, coordinated omission,
timeouts, errors, the hard stop, the serial loop, and how failures are classified."""

from __future__ import annotations

import asyncio
import gc
import time

import grpc
import numpy as np
import pytest

from cascade.v1 import scoring_pb2
from loadtests.client import classify_failure, run_open_loop, run_serial
from loadtests.processes import ShareJob, run_share_here
from loadtests.replay import RequestPlan
from loadtests.results import Failure, Tally
from tests.unit.loadtests.test_results import reply


def _plan(offsets: list[float]) -> RequestPlan:
    return RequestPlan(tuple(offsets), tuple(f"r{i}".encode() for i in range(len(offsets))), 0)


class FakeServer:
    """Answers after ``delay_s``; ``stall_until`` (loop time) holds every answer until then."""

    def __init__(self, delay_s: float = 0.001) -> None:
        self.delay_s = delay_s
        self.stall_until = 0.0
        self.received: list[bytes] = []
        self.fail: dict[bytes, BaseException] = {}

    async def send(self, payload: bytes, timeout_s: float) -> scoring_pb2.ScoreResponse:
        self.received.append(payload)
        if payload in self.fail:
            raise self.fail[payload]
        loop = asyncio.get_running_loop()
        wait = max(self.delay_s, self.stall_until - loop.time())
        if wait > timeout_s:
            await asyncio.sleep(timeout_s)
            raise TimeoutError
        await asyncio.sleep(wait)
        return reply()


async def _run(server: FakeServer, plan: RequestPlan, **kw: float) -> Tally:
    tally = Tally(budget_us=50_000)
    loop = asyncio.get_running_loop()
    await run_open_loop(
        server.send,
        plan,
        tally,
        start_at=loop.time() + 0.01,
        window_s=kw.get("window_s", 0.3),
        deadline_s=kw.get("deadline_s", 0.05),
        clock=loop.time,
        grace_s=kw.get("grace_s", 0.5),
    )
    return tally


async def test_every_scheduled_request_is_sent_once_and_answered() -> None:
    server = FakeServer()
    tally = await _run(server, _plan(list(np.arange(0, 0.3, 0.01))))
    assert sorted(server.received) == sorted(f"r{i}".encode() for i in range(30))
    assert (tally.scheduled, tally.sent, tally.ok, tally.unsent) == (30, 30, 30, 0)
    assert tally.check() == []
    assert tally.latency.percentile(50) < 10_000  # ~1 ms answers


async def test_sends_happen_at_their_intended_times() -> None:
    server = FakeServer()
    loop = asyncio.get_running_loop()
    sent_at: list[float] = []
    inner = server.send

    async def timed(payload: bytes, timeout_s: float) -> scoring_pb2.ScoreResponse:
        sent_at.append(loop.time())
        return await inner(payload, timeout_s)

    tally = Tally(budget_us=50_000)
    start = loop.time() + 0.01
    await run_open_loop(
        timed,
        _plan([0.0, 0.05, 0.1]),
        tally,
        start_at=start,
        window_s=0.1,
        deadline_s=0.05,
        clock=loop.time,
    )
    for actual, intended in zip(sent_at, [0.0, 0.05, 0.1], strict=True):
        # Never early; late only by scheduling noise (generous for a busy CI machine).
        assert intended - 0.002 <= actual - start <= intended + 0.03
    assert tally.send_lag.count == 3 and tally.send_lag.max < 30_000


async def test_latency_counts_from_the_intended_time_when_the_server_stalls() -> None:
    """Open loop keeps sending during a stall, and every call queued behind it shows the wait:
    latency is not measured from a send the generator held back (no coordinated omission)."""
    server = FakeServer(delay_s=0.001)
    loop = asyncio.get_running_loop()
    server.stall_until = loop.time() + 0.13  # nothing is answered for the first 120 ms
    tally = await _run(server, _plan(list(np.arange(0, 0.2, 0.01))), deadline_s=0.5)
    assert tally.sent == 20 and tally.ok == 20  # arrivals went on at their pace during the stall
    # The 12 calls meant for 0..110 ms all get their answer at ~120 ms: latencies 120, 110, .. 10
    # ms. A closed-loop generator would have sent one call and seen the stall once.
    assert tally.latency.max >= 115_000
    assert tally.latency.share_at_or_below(5_000) <= 0.45  # only the 8 calls after the stall
    assert tally.latency.mean >= 35_000  # (10 + 20 + ... + 120) / 20 = 39 ms, plus ~1 ms each


async def test_timeouts_and_errors_are_classified() -> None:
    server = FakeServer(delay_s=0.2)  # slower than the 50 ms deadline
    server.fail[b"r1"] = grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "down"
    )
    tally = await _run(server, _plan([0.0, 0.01, 0.02]))
    assert (tally.ok, tally.timeouts, tally.errors) == (0, 2, 1)
    assert tally.error_codes == {"UNAVAILABLE": 1}
    assert tally.check() == []


async def test_calls_that_outlive_the_hard_stop_are_abandoned_as_timeouts() -> None:
    async def never(payload: bytes, timeout_s: float) -> scoring_pb2.ScoreResponse:
        await asyncio.sleep(3600)  # a transport that ignores its deadline
        raise AssertionError

    tally = Tally(budget_us=50_000)
    loop = asyncio.get_running_loop()
    await run_open_loop(
        never,
        _plan([0.0, 0.01]),
        tally,
        start_at=loop.time(),
        window_s=0.02,
        deadline_s=0.02,
        clock=loop.time,
        grace_s=0.05,
    )
    assert (tally.sent, tally.timeouts, tally.ok) == (2, 2, 0)
    assert tally.check() == []


async def test_a_generator_far_behind_stops_sending_and_counts_the_rest_unsent() -> None:
    server = FakeServer()
    loop = asyncio.get_running_loop()
    tally = Tally(budget_us=50_000)
    # The step "started" a second ago with a 0.1 s window: everything is hopelessly late.
    await run_open_loop(
        server.send,
        _plan([0.0, 0.05, 0.09]),
        tally,
        start_at=loop.time() - 1.0,
        window_s=0.1,
        deadline_s=0.05,
        clock=loop.time,
    )
    assert (tally.scheduled, tally.sent, tally.unsent) == (3, 0, 3)
    assert tally.check() == []


async def test_serial_loop_keeps_one_call_in_flight() -> None:
    in_flight = 0
    peak = 0

    async def send(payload: bytes, timeout_s: float) -> scoring_pb2.ScoreResponse:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.001)
        in_flight -= 1
        return reply()

    tally = Tally(budget_us=50_000)
    await run_serial(send, [b"a"] * 20, tally, duration_s=10.0, deadline_s=0.05)
    assert peak == 1 and tally.ok == 20 and tally.check() == []


async def test_serial_loop_ends_at_its_duration() -> None:
    server = FakeServer(delay_s=0.01)
    tally = Tally(budget_us=50_000)
    await run_serial(server.send, [b"a"] * 1000, tally, duration_s=0.05, deadline_s=0.05)
    assert 1 <= tally.ok <= 6 and tally.check() == []


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (
            grpc.aio.AioRpcError(
                grpc.StatusCode.DEADLINE_EXCEEDED, grpc.aio.Metadata(), grpc.aio.Metadata()
            ),
            (Failure.TIMEOUT, "DEADLINE_EXCEEDED"),
        ),
        (
            grpc.aio.AioRpcError(
                grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.aio.Metadata(), grpc.aio.Metadata()
            ),
            (Failure.ERROR, "RESOURCE_EXHAUSTED"),
        ),
        (TimeoutError(), (Failure.TIMEOUT, "DEADLINE_EXCEEDED")),
        (ConnectionResetError(), (Failure.ERROR, "ConnectionResetError")),
    ],
)
def test_classify_failure(exc: BaseException, expected: tuple[Failure, str]) -> None:
    assert classify_failure(exc) == expected


async def test_load_is_sent_with_the_heap_frozen_and_unfrozen_after() -> None:
    """The generator's own full collections (30-46 ms each at ~3,000/s) counted answers late."""
    frozen_at_send: list[int] = []

    class Client:
        async def send(self, payload: bytes, timeout_s: float) -> scoring_pb2.ScoreResponse:
            frozen_at_send.append(gc.get_freeze_count())
            return reply()

    assert gc.get_freeze_count() == 0
    job = ShareJob(0, "127.0.0.1:1", 1, _plan([0.0, 0.001]), 0.1, 0.05, 50_000)
    tally = Tally(budget_us=50_000)
    await run_share_here(job, tally, client=Client())  # type: ignore[arg-type]
    await run_serial(Client().send, [b"a", b"b"], tally, duration_s=1.0, deadline_s=0.05)
    assert len(frozen_at_send) == 4
    assert min(frozen_at_send) > 0
    assert gc.get_freeze_count() == 0


async def test_the_collection_before_a_step_does_not_make_its_first_sends_late(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A full collection of a big heap takes tens of ms: it must happen before the start is set."""

    def slow_collect(generation: int = 2) -> int:
        time.sleep(0.3)
        return 0

    monkeypatch.setattr(gc, "collect", slow_collect)

    class Client:
        async def send(self, payload: bytes, timeout_s: float) -> scoring_pb2.ScoreResponse:
            return reply()

    job = ShareJob(0, "127.0.0.1:1", 1, _plan([0.0, 0.002, 0.004]), 0.1, 0.05, 50_000)
    tally = Tally(budget_us=50_000)
    await run_share_here(job, tally, client=Client())  # type: ignore[arg-type]
    assert tally.ok == 3
    assert tally.send_lag.max < 20_000  # us; the 300 ms collection would show in full
