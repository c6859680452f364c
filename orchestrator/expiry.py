"""Timeouts that do not outrun replies already received.

Each pass of the event loop (uvloop, on libuv) runs its due timers first, then the ready
callbacks, then reads the sockets. When a pass overruns, with a long callback or the VM off its
core, a reply can arrive in time and still be unread when its timer fires. A plain timeout then
fails a call whose answer is waiting in the socket. Measured with uvloop: a reply sent in time,
the loop stalled past the timer inside an I/O callback. A plain ``call_later`` timeout fails the
call. So does one that re-checks after ``call_later(0)`` or one ``call_soon``: both run before the
next read. A re-check two ``call_soon`` hops later comes after it, and the call gets its reply
(``tests/unit/orchestrator/test_expiry.py``).

:func:`expire_later` arms such a timeout: when it fires, the future is failed only after the loop
has read its sockets once more, and only if no reply settled it meanwhile. On a loop that keeps up,
that costs two callbacks on the timeout path and nothing otherwise.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["after_next_read", "expire_later"]

T = TypeVar("T")


def after_next_read(callback: Callable[..., object], *args: Any) -> None:
    """Run ``callback(*args)`` once the running loop has read its sockets at least once more."""
    loop = asyncio.get_running_loop()
    # The first hop runs in this pass's ready callbacks, before the read; the second in the next
    # pass's, after it.
    loop.call_soon(loop.call_soon, callback, *args)


def expire_later(
    future: asyncio.Future[T], delay_s: float, error: Callable[[], BaseException]
) -> asyncio.TimerHandle:
    """Fail ``future`` with ``error()`` ``delay_s`` from now, unless a reply already received by
    then settles it first (see the module's docstring). Cancel the returned handle once the
    future is settled otherwise."""

    def fail() -> None:
        if not future.done():
            future.set_exception(error())

    def fire() -> None:
        if not future.done():
            after_next_read(fail)

    return asyncio.get_running_loop().call_later(delay_s, fire)
