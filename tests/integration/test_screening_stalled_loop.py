"""The screening hop's cap on a real nats-server when the orchestrator's own event loop stalls.

On a shared machine the orchestrator is sometimes off its core for a few milliseconds. Two ways
that used to turn an answer into a stage-1 timeout, each reproduced here with the real
``NatsScreener`` (uvloop) and a stand-in worker:

- the worker's reply arrives during the stall, inside the cap, and is still unread in the
  socket when the overdue cap timer fires: nats-py hands a reply on through two tasks after the
  read, so a check one read later still came before it;
- the stall begins just after the request was queued, so the request leaves only after the cap
  has passed. The worker never had the cap's time; the timer firing that late is the evidence.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from contextlib import contextmanager
from typing import Any

import nats
import numpy as np
import pytest
import uvloop
from nats.aio.msg import Msg
from opentelemetry.trace import NoOpTracer

from cascade.errors import DependencyTimeout
from cascade.screening_protocol import (
    encode_heartbeat,
    encode_screening_reply,
    members_subject,
    screening_subject,
    worker_subject,
)
from cascade.settings import HedgingSettings
from devstack.servers import NatsServer
from orchestrator import screening_client
from orchestrator.expiry import NATS_HANDOFFS
from orchestrator.screening_client import NatsScreener

pytestmark = pytest.mark.integration

_PREFIX = "stall-test.screen"
_MODEL = "s1-stall"
_CAP_S = 0.005
_STALL_S = 0.020


Serve = Callable[[asyncio.Event, threading.Event], Coroutine[Any, Any, None]]


@contextmanager
def _on_own_thread(serve: Serve) -> Iterator[None]:
    """Run ``serve(stop, ready)`` on its own thread and event loop, so that it answers while the
    test's loop is stalled; inside once it has set ``ready``, and ``stop`` is set on the way out."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    stop = asyncio.Event()
    thread = threading.Thread(
        target=loop.run_until_complete, args=(serve(stop, ready),), daemon=True
    )
    thread.start()
    try:
        assert ready.wait(10.0), "the stand-in worker did not subscribe"
        yield
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10.0)
        loop.close()


def _worker_thread(
    url: str, before_reply: Callable[[], object] | None = None
) -> contextlib.AbstractContextManager[None]:
    """A stand-in worker that answers on the queue group subject at once, after
    ``before_reply()``."""

    async def serve(stop: asyncio.Event, ready: threading.Event) -> None:
        nc = await nats.connect(url)

        async def answer(msg: Msg) -> None:
            if before_reply is not None:
                before_reply()
                time.sleep(0.002)  # noqa: ASYNC251 - the test's loop is in its stall by now
            await nc.publish(msg.reply, encode_screening_reply(_MODEL, np.zeros(1, np.float32)))
            await nc.flush()

        await nc.subscribe(screening_subject(_PREFIX, _MODEL), queue="workers", cb=answer)
        await nc.flush()
        ready.set()
        await stop.wait()
        await nc.close()

    return _on_own_thread(serve)


def _screener(url: str) -> NatsScreener:
    # No worker sends heartbeats, so requests go to the queue group; the hedge comes too late to
    # matter (the cap is what is tested).
    return NatsScreener(
        url,
        subject_prefix=_PREFIX,
        model_version=_MODEL,
        feature_set="fs-1",
        tracer=NoOpTracer(),
        hedging=HedgingSettings(initial_delay_ms=50.0, min_delay_ms=50.0),
    )


class _Stall:
    """A socket whose read callback blocks the test's loop for 20 ms, as if it lost its core;
    ``trigger()`` (from any thread) sets it off once it is armed."""

    def __init__(self) -> None:
        self._in, self._out = socket.socketpair()
        self._in.setblocking(False)
        self.armed = False

    def trigger(self) -> None:
        if self.armed:
            self.armed = False
            self._out.send(b"s")

    def on_readable(self) -> None:
        self._in.recv(16)
        time.sleep(_STALL_S)

    def fileno(self) -> int:
        return self._in.fileno()

    def close(self) -> None:
        self._in.close()
        self._out.close()


async def _outcome(request: Awaitable[object], start: float) -> tuple[str, float]:
    """How one screening request ended ("reply" or "timeout"), and the seconds since ``start``."""
    try:
        await request
        outcome = "reply"
    except DependencyTimeout:
        outcome = "timeout"
    return outcome, time.perf_counter() - start


def _run(url: str, stall: _Stall, *, before_send: bool, grace_s: float) -> tuple[str, float]:
    """One screening request with a 5 ms cap while the loop stalls for 20 ms: when the worker
    is about to reply, or (``before_send``) before nats-py's flusher has written the request.
    The outcome ("reply" or "timeout") and the seconds it took."""

    async def main() -> tuple[str, float]:
        loop = asyncio.get_running_loop()
        loop.add_reader(stall.fileno(), stall.on_readable)
        rows = np.zeros((1, 4), dtype=np.float32)
        try:
            async with _screener(url) as screener:
                await screener.screen(rows, timeout_s=1.0)  # connected and warm
                start = time.perf_counter()
                request = asyncio.ensure_future(screener.screen(rows, _CAP_S, grace_s))
                if before_send:
                    loop.call_soon(time.sleep, _STALL_S)
                else:
                    stall.armed = True
                return await _outcome(request, start)
        finally:
            loop.remove_reader(stall.fileno())

    return uvloop.run(main())


@pytest.mark.parametrize(
    ("handoffs", "outcome"),
    [
        (NATS_HANDOFFS - 1, "timeout"),  # the hazard: checked a pass before nats-py hands it on
        (NATS_HANDOFFS, "reply"),
    ],
)
def test_a_reply_that_arrived_during_a_stall_beats_the_overdue_cap(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch, handoffs: int, outcome: str
) -> None:
    monkeypatch.setattr(screening_client, "NATS_HANDOFFS", handoffs)
    stall = _Stall()
    try:
        with _worker_thread(nats_server.url, before_reply=stall.trigger):
            # No grace: the reply is already there, only the order of the checks matters.
            got, took_s = _run(nats_server.url, stall, before_send=False, grace_s=0.0)
    finally:
        stall.close()
    assert got == outcome
    assert took_s < _STALL_S + 0.010  # settled as soon as the loop was back either way


@pytest.mark.parametrize(("grace_s", "outcome"), [(0.0, "timeout"), (0.040, "reply")])
def test_a_request_that_left_after_the_cap_gets_the_time_the_stall_took(
    nats_server: NatsServer, grace_s: float, outcome: str
) -> None:
    stall = _Stall()
    try:
        with _worker_thread(nats_server.url):
            got, took_s = _run(nats_server.url, stall, before_send=True, grace_s=grace_s)
    finally:
        stall.close()
    assert got == outcome
    # With grace, answered about when the worker could answer: long before the 40 ms grace.
    assert took_s < _STALL_S + 0.010


_WORKERS = ("stand-in-a", "stand-in-b")


def _two_routed_workers(
    url: str, drop_next: threading.Event
) -> contextlib.AbstractContextManager[None]:
    """Two stand-in workers, each on its own subject and announcing itself by heartbeat, as real
    ones do; the first request either gets once ``drop_next`` is set goes unanswered (the worker
    it went to is frozen for it), and ``drop_next`` is cleared."""
    subject = screening_subject(_PREFIX, _MODEL)

    async def serve(stop: asyncio.Event, ready: threading.Event) -> None:
        nc = await nats.connect(url)

        async def answer(msg: Msg) -> None:
            if drop_next.is_set():
                drop_next.clear()
                return
            await nc.publish(msg.reply, encode_screening_reply(_MODEL, np.zeros(1, np.float32)))
            await nc.flush()

        for worker_id in _WORKERS:
            await nc.subscribe(worker_subject(subject, worker_id), cb=answer)
        await nc.flush()
        ready.set()
        while not stop.is_set():
            for worker_id in _WORKERS:
                await nc.publish(members_subject(subject), encode_heartbeat(worker_id))
            await nc.flush()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.1)
        await nc.close()

    return _on_own_thread(serve)


def test_a_hedge_due_during_a_stall_still_goes_out_once_the_loop_is_back(
    nats_server: NatsServer,
) -> None:
    # The request goes to a worker that never answers it, and the loop stalls for 20 ms before
    # the 2 ms hedge is due: the hedge timer fires ~18 ms late. Skipping the hedge then (the loop
    # looked overloaded) cost the call its whole stage-1 cap, a default answer; the loop is on
    # time again once it has read its sockets, so the hedge goes out and the other worker
    # answers well inside the cap.
    cap_s = 0.060
    drop_next = threading.Event()

    async def main() -> tuple[str, float]:
        loop = asyncio.get_running_loop()
        rows = np.zeros((1, 4), dtype=np.float32)
        hedging = HedgingSettings(initial_delay_ms=2.0, min_delay_ms=2.0, quantile=0.5)
        async with NatsScreener(
            nats_server.url,
            subject_prefix=_PREFIX,
            model_version=_MODEL,
            feature_set="fs-1",
            tracer=NoOpTracer(),
            hedging=hedging,
        ) as screener:
            assert screener.members is not None
            for _ in range(500):  # heartbeats come every 0.1 s
                if len(screener.members) == len(_WORKERS):
                    break
                await asyncio.sleep(0.01)
            for _ in range(4):  # connected, warm, and answers seen by both
                await screener.screen(rows, timeout_s=1.0)
            drop_next.set()
            start = time.perf_counter()
            request = asyncio.ensure_future(screener.screen(rows, cap_s))
            loop.call_soon(time.sleep, _STALL_S)
            return await _outcome(request, start)

    with _two_routed_workers(nats_server.url, drop_next):
        got, took_s = uvloop.run(main())
    assert not drop_next.is_set()  # the request did reach a worker that dropped it
    assert (got, took_s < cap_s) == ("reply", True), took_s
