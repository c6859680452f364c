"""Stage-1 routing on a real nats-server: hedges, suspects, and packing onto one worker.

Two stand-in screening workers, driven by the real ``NatsScreener``. Round robin: one answers
at once, the other only after the hedge delay (busy, not stalled) or never (stalled); a worker
whose request a hedge overtook is routed around only if it then stays silent. Packing (the
default): requests keep to the preferred worker, spill to the other while it is busy, and go
around it once it stalls.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import nats
import numpy as np
import pytest
from nats.aio.msg import Msg
from opentelemetry.trace import NoOpTracer
from prometheus_client import REGISTRY

from cascade.screening_protocol import (
    encode_heartbeat,
    encode_screening_reply,
    members_subject,
    screening_subject,
    worker_subject,
)
from cascade.settings import HedgingSettings
from devstack.servers import NatsServer
from orchestrator.screening_client import NatsScreener

pytestmark = pytest.mark.integration

_PREFIX = "hedge-test.screen"
_MODEL = "s1-hedge"
_GRACE_MS = 40.0  # generous: a busy shared machine must not make the slow worker miss it
# A suspect stays one for a second at least (a heartbeat_s after it was suspected), whatever
# the stand-ins' 50 ms heartbeats say: long past the checks below.
_HEDGING = HedgingSettings(
    initial_delay_ms=2.0,
    min_delay_ms=2.0,
    overtaken_grace_ms=_GRACE_MS,
    burst=100.0,
    ratio=1.0,
    heartbeat_s=1.0,
    member_ttl_s=3.0,
    routing="round_robin",  # these tests need both workers to get requests
)


class _Behaviour:
    """How a stand-in worker answers (changeable while it runs), and what it was sent."""

    def __init__(self, delay_s: float | None) -> None:
        self.delay_s = delay_s  # None: never
        self.received = 0


@asynccontextmanager
async def _worker(
    url: str, worker_id: str, delay_s: float | None, behaviour: _Behaviour | None = None
) -> AsyncIterator[None]:
    """A stand-in worker: heartbeats every 50 ms; answers each request after ``delay_s`` (never
    when None), or as ``behaviour`` says at the time."""
    subject = screening_subject(_PREFIX, _MODEL)
    how = behaviour if behaviour is not None else _Behaviour(delay_s)
    nc = await nats.connect(url)
    replies: set[asyncio.Task[None]] = set()

    async def answer(msg: Msg) -> None:
        delay = how.delay_s
        if delay is None:
            return
        await asyncio.sleep(delay)
        reply = encode_screening_reply(_MODEL, np.zeros(1, dtype=np.float32))
        await nc.publish(msg.reply, reply)

    async def on_request(msg: Msg) -> None:
        how.received += 1
        task = asyncio.create_task(answer(msg))
        replies.add(task)
        task.add_done_callback(replies.discard)

    async def beat() -> None:
        while True:
            await nc.publish(members_subject(subject), encode_heartbeat(worker_id))
            await asyncio.sleep(0.05)

    await nc.subscribe(worker_subject(subject, worker_id), cb=on_request)
    beats = asyncio.create_task(beat())
    try:
        yield
    finally:
        beats.cancel()
        for task in (beats, *replies):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await nc.close()


def _screener(url: str, hedging: HedgingSettings = _HEDGING) -> NatsScreener:
    return NatsScreener(
        url,
        subject_prefix=_PREFIX,
        model_version=_MODEL,
        feature_set="fs-1",
        tracer=NoOpTracer(),
        hedging=hedging,
    )


def _hedges(outcome: str) -> float:
    value = REGISTRY.get_sample_value("cascade_screening_hedges_total", {"outcome": outcome})
    return value or 0.0


async def _wait_members(screener: NatsScreener, n: int) -> None:
    members = screener.members
    assert members is not None
    for _ in range(500):  # the first heartbeats come within 50 ms
        if len(members) >= n:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{len(members)} of {n} workers heard from")


def _routable(screener: NatsScreener) -> set[str]:
    assert screener.members is not None
    return {w for _ in range(4) if (w := screener.members.pick()) is not None}


async def _screen_a_few(screener: NatsScreener, n: int) -> None:
    rows = np.zeros((1, 4), dtype=np.float32)
    for _ in range(n):
        scores = await screener.screen(rows, timeout_s=1.0)
        assert scores.shape == (1,)


async def test_a_worker_that_answers_after_losing_to_a_hedge_is_not_routed_around(
    nats_server: NatsServer,
) -> None:
    # The slow worker answers 10 ms late: after the 2 ms hedge, well within the 40 ms grace.
    async with (
        _worker(nats_server.url, "fast", 0.0),
        _worker(nats_server.url, "slow", 0.010),
        _screener(nats_server.url) as screener,
    ):
        await _wait_members(screener, 2)
        outrun = _hedges("outrun")
        await _screen_a_few(screener, 10)  # about half went to "slow" and were overtaken
        await asyncio.sleep(_GRACE_MS / 1000.0 + 0.05)  # every grace has run out
        assert _hedges("outrun") > outrun  # "slow" lost races, and answered after each
        assert _routable(screener) == {"fast", "slow"}
        assert screener.members is not None  # every request, overtaken or not, is accounted
        assert [screener.members.in_flight(w) for w in ("fast", "slow")] == [0, 0]


async def test_a_worker_that_stays_silent_after_losing_to_a_hedge_is_routed_around(
    nats_server: NatsServer,
) -> None:
    async with (
        _worker(nats_server.url, "fast", 0.0),
        _worker(nats_server.url, "stalled", None),
        _screener(nats_server.url) as screener,
    ):
        await _wait_members(screener, 2)
        await _screen_a_few(screener, 4)  # every call answered, by a hedge when it went astray
        await asyncio.sleep(_GRACE_MS / 1000.0 + 0.02)
        assert _routable(screener) == {"fast"}


_PACKING = _HEDGING.model_copy(update={"routing": "pack"})
# Packing alone, no hedge within a call's second: on a machine busy beyond its cores a call one
# at a time can take past the 2 ms hedge delay, and its hedge would reach the spare worker.
_PACKING_UNHEDGED = _PACKING.model_copy(update={"initial_delay_ms": 500.0, "min_delay_ms": 500.0})


@asynccontextmanager
async def _packing_pair(
    url: str, hedging: HedgingSettings = _PACKING
) -> AsyncIterator[tuple[NatsScreener, _Behaviour, _Behaviour]]:
    """Two stand-in workers, "one" and "two", answering at once, and a packing screener that
    has heard both."""
    one, two = _Behaviour(0.0), _Behaviour(0.0)
    async with (
        _worker(url, "one", None, one),
        _worker(url, "two", None, two),
        _screener(url, hedging) as screener,
    ):
        await _wait_members(screener, 2)
        yield screener, one, two


async def test_packing_keeps_to_one_worker_and_spills_while_it_is_busy(
    nats_server: NatsServer,
) -> None:
    async with _packing_pair(nats_server.url, _PACKING_UNHEDGED) as (screener, one, two):
        await _screen_a_few(screener, 20)  # one at a time: the preferred worker is never busy
        assert sorted((one.received, two.received)) == [0, 20]
        spare = one if one.received == 0 else two
        rows = np.zeros((1, 4), dtype=np.float32)
        await asyncio.gather(*(screener.screen(rows, timeout_s=1.0) for _ in range(6)))
        assert spare.received >= 1  # calls in flight together spilled over to the other one
        assert screener.members is not None
        assert [screener.members.in_flight(w) for w in ("one", "two")] == [0, 0]


async def test_packing_goes_around_a_preferred_worker_that_stalls(
    nats_server: NatsServer,
) -> None:
    async with _packing_pair(nats_server.url) as (screener, one, two):
        await _screen_a_few(screener, 3)
        preferred, spare, spare_id = (one, two, "two") if one.received else (two, one, "one")
        preferred.delay_s = None  # stalls: connected, heartbeating, never answering
        await _screen_a_few(screener, 10)  # every call answered: by a hedge, then by the spare
        await asyncio.sleep(_GRACE_MS / 1000.0 + 0.02)
        assert _routable(screener) == {spare_id}
        assert spare.received >= 10
        assert preferred.received <= 4  # after the first overtaken request, at most a few more
        assert screener.members is not None  # the unanswered copies ended with their grace
        assert [screener.members.in_flight(w) for w in ("one", "two")] == [0, 0]
