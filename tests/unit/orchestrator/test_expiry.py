"""Timeouts armed with ``expire_later`` let a reply that arrived in time win over its timer,
even when the event loop stalled past the timer inside an I/O callback (uvloop, real sockets)."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable

import pytest
import uvloop

from orchestrator import expiry
from orchestrator.expiry import expire_later

pytestmark = pytest.mark.wallclock  # stalls and timers measured on the wall clock

Arm = Callable[[asyncio.Future[str], float], object]


def _plain(future: asyncio.Future[str], delay_s: float) -> object:
    def fire() -> None:
        if not future.done():
            future.set_exception(TimeoutError())

    return asyncio.get_running_loop().call_later(delay_s, fire)


def _with_one_poll_via_call_later_zero(future: asyncio.Future[str], delay_s: float) -> object:
    """What orchestrator.redis_pipeline did: re-check with call_later(0.0)."""
    loop = asyncio.get_running_loop()

    def fire(polled: bool = False) -> None:
        if future.done():
            return
        if not polled:
            loop.call_later(0.0, fire, True)
            return
        future.set_exception(TimeoutError())

    return loop.call_later(delay_s, fire)


def _expire_later(future: asyncio.Future[str], delay_s: float) -> object:
    return expire_later(future, delay_s, TimeoutError)


def _reply_during_a_stall(arm: Arm) -> str:
    """A 5 ms timeout; the reply is sent at once, but the loop is then stuck for 20 ms in an
    I/O callback, past the timer. Returns the reply or "timeout"."""

    async def main() -> str:
        loop = asyncio.get_running_loop()
        reply_in, reply_out = socket.socketpair()
        stall_in, stall_out = socket.socketpair()
        for s in (reply_in, stall_in):
            s.setblocking(False)
        future: asyncio.Future[str] = loop.create_future()

        def read_reply() -> None:
            reply_in.recv(16)
            if not future.done():
                future.set_result("reply")

        def stall() -> None:  # another socket's callback that runs long
            stall_in.recv(16)
            reply_out.send(b"r")  # the reply arrives in time...
            time.sleep(0.020)  # ...while the loop is busy past the 5 ms timer

        loop.add_reader(reply_in, read_reply)
        loop.add_reader(stall_in, stall)
        try:
            arm(future, 0.005)
            await asyncio.sleep(0.001)
            stall_out.send(b"s")
            try:
                return await future
            except TimeoutError:
                return "timeout"
        finally:
            loop.remove_reader(reply_in)
            loop.remove_reader(stall_in)
            for s in (reply_in, reply_out, stall_in, stall_out):
                s.close()

    return uvloop.run(main())


@pytest.mark.parametrize(
    ("arm", "outcome"),
    [
        (_plain, "timeout"),  # the hazard
        (_with_one_poll_via_call_later_zero, "timeout"),  # the old guard did not guard
        (_expire_later, "reply"),
    ],
)
def test_a_reply_received_in_time_beats_its_timer_after_a_stall(arm: Arm, outcome: str) -> None:
    assert _reply_during_a_stall(arm) == outcome


def test_expire_later_fails_a_future_nobody_answers() -> None:
    async def main() -> float:
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        start = time.monotonic()
        expire_later(future, 0.005, TimeoutError)
        with pytest.raises(TimeoutError):
            await future
        return time.monotonic() - start

    # libuv schedules from the loop's clock, read in whole milliseconds when the pass began, so
    # a 5 ms timer can end up to 1 ms before 5 ms on this clock (4.79 ms once in CI).
    assert 0.004 <= uvloop.run(main()) < 0.5


def test_a_cancelled_expiry_never_fires() -> None:
    async def main() -> bool:
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        expire_later(future, 0.001, TimeoutError).cancel()
        await asyncio.sleep(0.01)
        return future.done()

    assert uvloop.run(main()) is False


def _settle(future: asyncio.Future[str]) -> None:
    if not future.done():
        future.set_result("reply")


def _stalled_then(answer_at_s: float | None, grace_s: float, stall_s: float) -> tuple[str, float]:
    """A 5 ms timeout with ``grace_s``; the loop is stuck for ``stall_s`` at once (this process
    off its core), and an answer comes ``answer_at_s`` after the start (None: never). Returns
    the outcome and the seconds it took."""

    async def main() -> tuple[str, float]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[str] = loop.create_future()
        start = time.monotonic()
        expire_later(future, 0.005, TimeoutError, grace_s=grace_s)
        loop.call_soon(time.sleep, stall_s)
        if answer_at_s is not None:
            loop.call_later(answer_at_s, _settle, future)
        try:
            outcome = await future
        except TimeoutError:
            outcome = "timeout"
        return outcome, time.monotonic() - start

    return uvloop.run(main())


def test_a_timer_that_fired_late_waits_a_little_longer_within_its_grace(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Due at 5 ms, run at 20-25 ms (libuv's next poll still sleeps the timeout it computed
    # before the stall): late, so it waits STALL_GRACE_S more (20 ms here, for a wide margin);
    # the answer at 30 ms wins. Without a grace the same answer loses.
    monkeypatch.setattr(expiry, "STALL_GRACE_S", 0.020)
    assert _stalled_then(0.030, grace_s=0.050, stall_s=0.020)[0] == "reply"
    assert _stalled_then(0.030, grace_s=0.0, stall_s=0.020)[0] == "timeout"


def test_the_extra_wait_is_at_most_the_callers_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(expiry, "STALL_GRACE_S", 0.020)
    # 2 ms of grace: it gives up 22-27 ms in, before the answer at 30 ms.
    assert _stalled_then(0.030, grace_s=0.002, stall_s=0.020)[0] == "timeout"


def test_the_extra_wait_is_not_as_long_as_the_timer_was_late() -> None:
    # 35-40 ms late with 100 ms of grace: it waits STALL_GRACE_S (3 ms), not 35 ms, so an
    # answer 20 ms after the stall comes too late. A stall must not cost twice its length.
    assert expiry.STALL_GRACE_S < 0.010
    assert _stalled_then(0.060, grace_s=0.100, stall_s=0.040)[0] == "timeout"


def test_a_timer_that_fires_on_time_gets_no_grace() -> None:
    async def main() -> float:
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        start = time.monotonic()
        expire_later(future, 0.005, TimeoutError, grace_s=0.100)
        with pytest.raises(TimeoutError):
            await future
        return time.monotonic() - start

    assert uvloop.run(main()) < 0.100  # the grace is for a late timer only
