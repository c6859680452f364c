"""The generator's sub-millisecond sleep: never early, well under the loop's 1 ms tick, owned."""

from __future__ import annotations

import asyncio
import statistics
import time

import pytest

from cascade.v1 import scoring_pb2
from loadtests.client import run_open_loop
from loadtests.precise_timer import PreciseTimer, precise_timer_available
from loadtests.replay import RequestPlan
from loadtests.results import Tally
from tests.unit.loadtests.test_results import reply

pytestmark = pytest.mark.skipif(not precise_timer_available(), reason="needs Linux timerfd")


async def test_sleeps_are_never_early_and_far_finer_than_a_millisecond_tick() -> None:
    delay_s = 0.0003
    overshoots: list[float] = []
    async with PreciseTimer() as timer:
        for _ in range(40):
            start = time.perf_counter()
            await timer.sleep(delay_s)
            overshoots.append(time.perf_counter() - start - delay_s)
    assert min(overshoots) >= 0
    # The loop's own timers land ~0.8 ms late here (or up to a tick early under uvloop).
    assert statistics.median(overshoots) < 0.0004


async def test_a_zero_delay_yields_and_misuse_raises() -> None:
    timer = PreciseTimer()
    with pytest.raises(RuntimeError, match="outside its async with"):
        await timer.sleep(0.001)
    async with timer:
        ran: list[bool] = []
        asyncio.get_running_loop().call_soon(ran.append, True)
        await timer.sleep(0)
        assert ran == [True]
        first = asyncio.create_task(timer.sleep(0.05))
        await asyncio.sleep(0)
        with pytest.raises(RuntimeError, match="not reentrant"):
            await timer.sleep(0.01)
        first.cancel()
    with pytest.raises(RuntimeError, match="outside its async with"):
        await timer.sleep(0.001)


async def test_the_open_loop_waits_with_the_sleep_it_is_given() -> None:
    delays: list[float] = []

    async def sleep(delay_s: float) -> None:
        delays.append(delay_s)
        await asyncio.sleep(delay_s)

    async def send(payload: bytes, timeout_s: float) -> scoring_pb2.ScoreResponse:
        return reply()

    loop = asyncio.get_running_loop()
    plan = RequestPlan((0.0, 0.01, 0.02), (b"a", b"b", b"c"), 0)
    tally = Tally(budget_us=50_000)
    await run_open_loop(
        send,
        plan,
        tally,
        start_at=loop.time(),
        window_s=0.1,
        deadline_s=0.05,
        clock=loop.time,
        sleep=sleep,
    )
    assert len(delays) == 3
    assert tally.ok == 3
