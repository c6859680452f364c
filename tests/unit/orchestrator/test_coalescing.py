"""The coalescer: concurrent calls share one downstream request, each keeping its own deadline."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from cascade.errors import Dependency, DependencyTimeout, DependencyUnavailable
from orchestrator import coalescing
from orchestrator.coalescing import Coalescer

MAX_ITEMS = 8


@dataclass
class Backend:
    """A downstream service that answers ``10 * item`` per item, after ``delay_s``."""

    delay_s: float = 0.0
    failure: Exception | None = None
    calls: list[list[int]] = field(default_factory=list)
    timeouts_s: list[float] = field(default_factory=list)
    graces_s: list[float] = field(default_factory=list)
    cancelled: int = 0

    async def call(self, items: list[int], timeout_s: float, grace_s: float) -> list[int]:
        self.calls.append(items)
        self.timeouts_s.append(timeout_s)
        self.graces_s.append(grace_s)
        try:
            await asyncio.sleep(self.delay_s)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if self.failure is not None:
            raise self.failure
        return [10 * x for x in items]


def _join(parts: list[list[int]]) -> list[int]:
    return [x for part in parts for x in part]


def _part(out: list[int], start: int, stop: int) -> list[int]:
    return out[start:stop]


@pytest.fixture
def backend() -> Backend:
    return Backend()


@pytest.fixture
async def coalescer(backend: Backend) -> AsyncIterator[Coalescer[list[int], list[int]]]:
    async with Coalescer(
        "test",
        Dependency.SCREENING,
        backend.call,
        join=_join,
        size=len,
        part=_part,
        max_items=MAX_ITEMS,
        handoffs=1,
    ) as c:
        yield c


Co = Coalescer[list[int], list[int]]


async def test_calls_started_together_share_one_call_and_get_their_own_slices(
    coalescer: Co, backend: Backend
) -> None:
    inputs = [[1, 2], [3], [4, 5, 6]]
    outputs = await asyncio.gather(*(coalescer.run(items, 1.0) for items in inputs))
    assert backend.calls == [[1, 2, 3, 4, 5, 6]]
    assert outputs == [[10, 20], [30], [40, 50, 60]]


async def test_a_lone_call_goes_straight_through_unjoined(coalescer: Co, backend: Backend) -> None:
    items = [7, 8]
    assert await coalescer.run(items, 1.0) == [70, 80]
    (sent,) = backend.calls
    assert sent is items  # not a joined copy
    assert backend.timeouts_s[0] == pytest.approx(1.0, abs=0.01)


async def test_a_call_of_max_items_or_more_goes_alone(coalescer: Co, backend: Backend) -> None:
    big = list(range(100, 100 + MAX_ITEMS))
    small_out, big_out = await asyncio.gather(coalescer.run([1], 1.0), coalescer.run(big, 1.0))
    assert small_out == [10] and big_out == [10 * x for x in big]
    assert sorted(backend.calls, key=len) == [[1], big]


async def test_a_round_never_exceeds_max_items(coalescer: Co, backend: Backend) -> None:
    inputs = [[i] * size for i, size in enumerate([3, 2, 4, 1, 5, 2, 7, 1, 1], start=1)]
    outputs = await asyncio.gather(*(coalescer.run(items, 1.0) for items in inputs))
    assert outputs == [[10 * x for x in items] for items in inputs]
    assert all(len(sent) <= MAX_ITEMS for sent in backend.calls)
    assert sorted(_join(backend.calls)) == sorted(_join(inputs))
    assert len(backend.calls) < len(inputs)  # and they were coalesced at all


@pytest.mark.wallclock
@pytest.mark.parametrize("short_leads", [True, False])
async def test_a_short_member_times_out_at_its_own_deadline_the_long_one_gets_its_answer(
    coalescer: Co, backend: Backend, short_leads: bool
) -> None:
    backend.delay_s = 0.100
    short_s, long_s = 0.020, 0.500
    start = time.monotonic()

    async def timed(items: list[int], timeout_s: float) -> tuple[list[int] | Exception, float]:
        try:
            out: list[int] | Exception = await coalescer.run(items, timeout_s)
        except DependencyTimeout as exc:
            out = exc
        return out, time.monotonic() - start

    short, long = timed([1], short_s), timed([2, 3], long_s)
    if short_leads:
        (short_out, short_elapsed_s), (long_out, long_elapsed_s) = await asyncio.gather(short, long)
    else:
        (long_out, long_elapsed_s), (short_out, short_elapsed_s) = await asyncio.gather(long, short)

    assert isinstance(short_out, DependencyTimeout)
    assert short_out.dependency is Dependency.SCREENING
    assert short_s <= short_elapsed_s < short_s + 0.005
    assert long_out == [20, 30]
    assert backend.delay_s <= long_elapsed_s < backend.delay_s + 0.010
    assert len(backend.calls) == 1
    # the shared call is given the latest member's deadline
    assert backend.timeouts_s[0] == pytest.approx(long_s, abs=0.005)


async def test_a_failure_of_the_shared_call_reaches_every_member(
    coalescer: Co, backend: Backend
) -> None:
    backend.failure = DependencyUnavailable(Dependency.SCREENING, "no responders")
    outputs = await asyncio.gather(
        *(coalescer.run([i], 1.0) for i in range(3)), return_exceptions=True
    )
    assert outputs == [backend.failure] * 3
    assert len(backend.calls) == 1


async def test_cancelling_the_leader_before_the_round_goes_out_does_not_strand_the_others(
    coalescer: Co, backend: Backend
) -> None:
    leader = asyncio.create_task(coalescer.run([1], 1.0))
    others = [asyncio.create_task(coalescer.run([i], 1.0)) for i in (2, 3)]
    await asyncio.sleep(0)  # every task has run to its first await: the leader is yielding
    leader.cancel()
    async with asyncio.timeout(1.0):
        assert await asyncio.gather(*others) == [[20], [30]]
    assert leader.cancelled()
    assert backend.calls == [[2, 3]]


async def test_cancelling_the_leader_during_the_shared_call_does_not_strand_the_others(
    coalescer: Co, backend: Backend
) -> None:
    backend.delay_s = 0.020
    leader = asyncio.create_task(coalescer.run([1], 1.0))
    others = [asyncio.create_task(coalescer.run([i], 1.0)) for i in (2, 3)]
    await asyncio.sleep(0.005)
    assert backend.calls == [[1, 2, 3]]
    leader.cancel()
    async with asyncio.timeout(1.0):
        assert await asyncio.gather(*others) == [[20], [30]]
    assert leader.cancelled()
    assert backend.cancelled == 0


async def test_aclose_cancels_shared_calls_in_flight(coalescer: Co, backend: Backend) -> None:
    backend.delay_s = 10.0
    members = [asyncio.create_task(coalescer.run([i], 30.0)) for i in (1, 2)]
    await asyncio.sleep(0.005)
    assert len(backend.calls) == 1
    async with asyncio.timeout(1.0):
        await coalescer.aclose()
        outcomes = await asyncio.gather(*members, return_exceptions=True)
    assert backend.cancelled == 1
    assert all(isinstance(o, asyncio.CancelledError) for o in outcomes)


async def test_the_grace_goes_down_with_the_call_a_round_gets_its_latest(
    coalescer: Co, backend: Backend
) -> None:
    await coalescer.run([1], 0.5, 0.020)  # alone
    await asyncio.gather(coalescer.run([2], 0.5, 0.010), coalescer.run([3], 0.2, 0.100))
    lone, shared = backend.graces_s
    assert lone == pytest.approx(0.020, abs=0.002)
    # The round's timeout is the latest deadline (0.5 s); its grace what reaches furthest past
    # that: 0.2 + 0.1 s ends before 0.5 + 0.01 s.
    # (Less the time from the calls to the round's start: 5 ms once on a busy shared host.)
    assert 0.4 < backend.timeouts_s[1] <= 0.5
    assert shared == pytest.approx(0.010, abs=0.002)


@pytest.mark.parametrize(("grace_s", "answered"), [(0.050, True), (0.0, False)])
async def test_a_member_whose_deadline_passed_while_the_loop_was_away_waits_its_grace(
    coalescer: Co,
    backend: Backend,
    monkeypatch: pytest.MonkeyPatch,
    grace_s: float,
    answered: bool,
) -> None:
    # The short member's 10 ms deadline passes while the loop is stuck until 28 ms; the shared
    # call answers at 32 ms. With grace the member waits STALL_GRACE_S more (10 ms here, for a
    # wide margin) and gets that answer; without, it times out.
    monkeypatch.setattr(coalescing, "STALL_GRACE_S", 0.010)
    backend.delay_s = 0.032
    short = asyncio.ensure_future(coalescer.run([1], 0.010, grace_s))
    long = asyncio.ensure_future(coalescer.run([2], 1.0))
    await asyncio.sleep(0.003)
    time.sleep(0.025)  # noqa: ASYNC251 - the loop stalls, as if off its core
    outcomes = await asyncio.gather(short, long, return_exceptions=True)
    assert outcomes[1] == [20]
    if answered:
        assert outcomes[0] == [10]
    else:
        assert isinstance(outcomes[0], DependencyTimeout)
