"""Sub-millisecond sleeps for the generator's send loop: a Linux ``timerfd`` watched by the loop.

uvloop's timers (libuv's) tick in whole milliseconds, and the standard loop rounds its epoll
timeout up to one: an open-loop generator sleeping on them sends each request 0-1.2 ms after its
intended time. Latency is counted from the intended time, so that lag was in every open-loop
percentile and in none of the one-in-flight ones (measured: generator lag p99 1.2 ms at every
rate from 100/s up). A ``timerfd`` armed for the remaining delay wakes the loop through a file
descriptor, with the kernel's high-resolution timer, so sends leave within tens of microseconds
of their time.

:class:`PreciseTimer` is an async context manager (it owns the descriptor and its reader);
:func:`precise_timer_available` says whether this platform has ``timerfd`` at all (where it
does not, the send loop keeps ``asyncio.sleep``).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import os
import sys
from types import TracebackType
from typing import Final

__all__ = ["PreciseTimer", "precise_timer_available"]

_CLOCK_MONOTONIC: Final = 1
_TFD_NONBLOCK: Final = os.O_NONBLOCK
_TFD_CLOEXEC: Final = os.O_CLOEXEC
_MIN_DELAY_S: Final = 20e-6  # shorter waits are not worth a wake-up: just yield


class _Timespec(ctypes.Structure):
    _fields_ = (("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long))


class _Itimerspec(ctypes.Structure):
    _fields_ = (("it_interval", _Timespec), ("it_value", _Timespec))


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.timerfd_create  # noqa: B018 - probing that the symbol exists
        libc.timerfd_settime  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


_LIBC: Final = _libc()


def precise_timer_available() -> bool:
    """True where ``timerfd`` exists (Linux)."""
    return _LIBC is not None


class PreciseTimer:
    """One ``timerfd`` on the running loop; :meth:`sleep` waits with microsecond resolution.

    One sleeper at a time (the send loop is sequential); a second concurrent :meth:`sleep` is a
    programming error and raises.
    """

    def __init__(self) -> None:
        if _LIBC is None:
            raise OSError(errno.ENOSYS, "timerfd is not available on this platform")
        self._libc = _LIBC
        self._fd = -1
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._spec = _Itimerspec()

    async def __aenter__(self) -> PreciseTimer:
        fd = self._libc.timerfd_create(_CLOCK_MONOTONIC, _TFD_NONBLOCK | _TFD_CLOEXEC)
        if fd < 0:
            code = ctypes.get_errno()
            raise OSError(code, f"timerfd_create: {os.strerror(code)}")
        self._fd = fd
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(fd, self._on_fire)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._fd < 0:
            return
        if self._loop is not None:
            self._loop.remove_reader(self._fd)
        os.close(self._fd)
        self._fd = -1
        if self._waiter is not None and not self._waiter.done():
            self._waiter.cancel()

    def _on_fire(self) -> None:
        try:
            os.read(self._fd, 8)  # the expiry count; reading re-arms readiness
        except BlockingIOError:
            return
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def sleep(self, delay_s: float) -> None:
        """Wait ``delay_s`` seconds (at least a loop pass: a zero or negative delay yields)."""
        if self._loop is None or self._fd < 0:
            raise RuntimeError("PreciseTimer used outside its async with block")
        if delay_s < _MIN_DELAY_S:
            await asyncio.sleep(0)
            return
        if self._waiter is not None:
            raise RuntimeError("PreciseTimer.sleep is not reentrant")
        whole = int(delay_s)
        self._spec.it_value.tv_sec = whole
        self._spec.it_value.tv_nsec = int((delay_s - whole) * 1e9)
        if self._libc.timerfd_settime(self._fd, 0, ctypes.byref(self._spec), None) != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"timerfd_settime: {os.strerror(code)}")
        waiter = self._waiter = self._loop.create_future()
        try:
            await waiter
        finally:
            if self._waiter is waiter:
                self._waiter = None
