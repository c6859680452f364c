"""Timeouts that do not outrun replies already received, nor count time the loop was away.

Each pass of the event loop (uvloop, on libuv) runs its due timers first, then the ready
callbacks, then reads the sockets. When a pass overruns, with a long callback or the VM off its
core, a reply can arrive in time and still be unread when its timer fires. A plain timeout then
fails a call whose answer is waiting in the socket. Measured with uvloop: a reply sent in time,
the loop stalled past the timer inside an I/O callback. A plain ``call_later`` timeout fails the
call. So does one that re-checks after ``call_later(0)`` or one ``call_soon``: both run before the
next read. A re-check two ``call_soon`` hops later comes after it, and the call gets its reply
(``tests/unit/orchestrator/test_expiry.py``) when the read itself settles the future, as our
Redis protocol's does. nats-py hands a reply on through two more tasks after the read (its read
loop, then the subscription's), so the screening client waits that many more passes
(:data:`NATS_HANDOFFS`; ``tests/integration/test_screening_stalled_loop.py``).

A timer that fires late is the evidence that this process did not run for that long: a request
it queued just before may have left only now, or its worker (on the same cores) was stopped too.
Given a ``grace_s``, the expiry then waits once more, :data:`STALL_GRACE_S` and at most the
grace, which the caller bounds by its budget: a stage cap counts the dependency's time, not ours.
Not as long as the timer was late: a stall then costs twice its length, and near the end of a
budget that can make an answer late.

:func:`expire_later` arms such a timeout. On a loop that keeps up it costs a few callbacks on the
timeout path and nothing otherwise.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Final, Generic, TypeVar

__all__ = [
    "LATE_TIMER_S",
    "NATS_HANDOFFS",
    "STALL_GRACE_S",
    "Expiry",
    "after_next_read",
    "expire_later",
    "timer_is_late",
]

T = TypeVar("T")

LATE_TIMER_S: Final = 0.003
"""A timer firing this much after it was due means the event loop was behind or away."""

STALL_GRACE_S: Final = 0.003
"""How much longer a late timer waits: a request that left when the loop came back, or a worker
stopped with it, answers within about a millisecond here."""

NATS_HANDOFFS: Final = 2
"""Loop passes from nats-py reading a reply to a subscription callback seeing it."""


def timer_is_late(due_s: float, now_s: float, tolerance_s: float = LATE_TIMER_S) -> bool:
    """Whether a timer due at ``due_s`` (loop time) that runs at ``now_s`` ran late: the loop
    had more to do than time to do it, or did not run at all."""
    return now_s - due_s > tolerance_s


def after_next_read(callback: Callable[..., object], *args: Any, handoffs: int = 0) -> None:
    """Run ``callback(*args)`` once the running loop has read its sockets at least once more,
    and then run ``handoffs`` more passes (what the read made ready, handed on that many times)."""
    loop = asyncio.get_running_loop()

    def hop(left: int) -> None:
        if left:
            loop.call_soon(hop, left - 1)
        else:
            callback(*args)

    # The first hop runs in this pass's ready callbacks, before the read; the second in the next
    # pass's, after it; each further one a pass later.
    loop.call_soon(hop, 1 + handoffs)


class Expiry(Generic[T]):
    """A pending timeout of one future (see :func:`expire_later`)."""

    __slots__ = ("_error", "_future", "_grace_s", "_handoffs", "_loop", "_timer", "cancelled")

    def __init__(
        self,
        future: asyncio.Future[T],
        delay_s: float,
        error: Callable[[], BaseException],
        handoffs: int,
        grace_s: float,
    ) -> None:
        self._loop = loop = asyncio.get_running_loop()
        self._future = future
        self._error = error
        self._handoffs = handoffs
        self._grace_s = grace_s
        self.cancelled = False
        self._timer = loop.call_later(delay_s, self._fire, loop.time() + delay_s)

    def cancel(self) -> None:
        """Never fail the future (call once it is settled otherwise, or abandoned)."""
        self.cancelled = True
        self._timer.cancel()

    def _fire(self, due_s: float) -> None:
        if self.cancelled or self._future.done():
            return
        now_s = self._loop.time()
        if self._grace_s > 0.0 and timer_is_late(due_s, now_s):
            wait_s = min(STALL_GRACE_S, self._grace_s)
            self._grace_s = 0.0  # once: a loop that keeps stalling gets no more
            self._timer = self._loop.call_later(wait_s, self._fire, now_s + wait_s)
            return
        after_next_read(self._fail, handoffs=self._handoffs)

    def _fail(self) -> None:
        if not self.cancelled and not self._future.done():
            self._future.set_exception(self._error())


def expire_later(
    future: asyncio.Future[T],
    delay_s: float,
    error: Callable[[], BaseException],
    *,
    handoffs: int = 0,
    grace_s: float = 0.0,
) -> Expiry[T]:
    """Fail ``future`` with ``error()`` ``delay_s`` from now, unless a reply already received by
    then settles it first, ``handoffs`` passes after its read (see the module's docstring). When
    the timer fires late, wait once more, :data:`STALL_GRACE_S` and at most ``grace_s``. Cancel
    the returned expiry once the future is settled otherwise."""
    return Expiry(future, delay_s, error, handoffs, grace_s)
